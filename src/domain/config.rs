//! A chat's generation settings.
//!
//! Stored as JSON on the chat. Every field is optional: an absent field means "the server's
//! default", so a later change of defaults reaches chats that never chose a value.

use serde::{Deserialize, Serialize};

/// The system prompt and sampling settings of a chat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// 0 means greedy decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f64>,
    /// Same seed and same input give the same reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation stops before any of these strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

/// A change to one optional field: leave it, clear it (JSON `null`) or set it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<T> Patch<T> {
    /// Applies the change to a stored value.
    pub fn apply(self, target: &mut Option<T>) {
        match self {
            Patch::Keep => {}
            Patch::Clear => *target = None,
            Patch::Set(v) => *target = Some(v),
        }
    }
}

/// A field-by-field change to a [`ChatConfig`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatConfigPatch {
    pub system_prompt: Patch<String>,
    pub temperature: Patch<f64>,
    pub top_p: Patch<f64>,
    pub top_k: Patch<u32>,
    pub max_tokens: Patch<u32>,
    pub repeat_penalty: Patch<f64>,
    pub seed: Patch<u64>,
    pub stop: Patch<Vec<String>>,
}

impl ChatConfig {
    /// Merges a patch into this config.
    pub fn apply(&mut self, p: ChatConfigPatch) {
        p.system_prompt.apply(&mut self.system_prompt);
        p.temperature.apply(&mut self.temperature);
        p.top_p.apply(&mut self.top_p);
        p.top_k.apply(&mut self.top_k);
        p.max_tokens.apply(&mut self.max_tokens);
        p.repeat_penalty.apply(&mut self.repeat_penalty);
        p.seed.apply(&mut self.seed);
        p.stop.apply(&mut self.stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_keeps_clears_and_sets() {
        let mut c = ChatConfig {
            system_prompt: Some("be brief".into()),
            temperature: Some(0.5),
            seed: Some(7),
            ..Default::default()
        };
        c.apply(ChatConfigPatch {
            temperature: Patch::Clear,
            top_k: Patch::Set(40),
            ..Default::default()
        });
        assert_eq!(c.system_prompt.as_deref(), Some("be brief"));
        assert_eq!(c.temperature, None);
        assert_eq!(c.top_k, Some(40));
        assert_eq!(c.seed, Some(7));
    }

    #[test]
    fn absent_fields_are_not_serialized() {
        let c = ChatConfig {
            top_k: Some(3),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"top_k":3}"#);
        let back: ChatConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(back, ChatConfig::default());
    }
}
