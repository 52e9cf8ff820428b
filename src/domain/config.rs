//! A chat's generation settings.
//!
//! Stored as JSON on the chat. Every field is optional: an absent field means "the server's
//! default", so a later change of defaults reaches chats that never chose a value.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ValidationError;

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
    /// Replies must be JSON (constrained decoding); absent: free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// What replies must be, as OpenAI's `response_format` says it (stored in that shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against a JSON Schema.
    JsonSchema { json_schema: JsonSchemaSpec },
}

/// A named JSON Schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaSpec {
    pub name: String,
    pub schema: Value,
}

impl ResponseFormat {
    /// Its `type`, as events and errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema { .. } => "json_schema",
        }
    }
}

/// A schema's name, as OpenAI takes it: 1 to 64 characters from a-z, A-Z, 0-9, `_`, `-`.
pub fn validate_schema_name(field: &str, name: &str) -> Result<(), ValidationError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "is required: 1 to 64 characters from a-z, A-Z, 0-9, '_' and '-'",
            serde_json::json!({"pattern": SCHEMA_NAME_PATTERN}),
        ))
    }
}

pub const SCHEMA_NAME_PATTERN: &str = "^[a-zA-Z0-9_-]{1,64}$";

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
    pub response_format: Patch<ResponseFormat>,
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
        p.response_format.apply(&mut self.response_format);
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

    #[test]
    fn response_formats_are_stored_as_openai_writes_them() {
        let c = ChatConfig {
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchemaSpec {
                    name: "p".into(),
                    schema: serde_json::json!({"type": "object"}),
                },
            }),
            ..Default::default()
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object"}}}}"#
        );
        assert_eq!(serde_json::from_str::<ChatConfig>(&text).unwrap(), c);
        assert!(validate_schema_name("n", "a-b_9").is_ok());
        assert!(validate_schema_name("n", "").is_err());
        assert!(validate_schema_name("n", "no spaces").is_err());
    }
}
