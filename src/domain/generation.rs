//! The bounds of generation settings (sampling ranges, `max_tokens`, stop strings), declared
//! once. A chat's `config` (its OpenAPI schema and its parser, `api::types::Bounded`) and the
//! OpenAI-compatible parser (`api::openai::wire`) both check against these, so a value one
//! accepts the other accepts too.

use serde_json::json;

use super::{reject_nul, ValidationError};

/// A range of a real-valued setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloatBound {
    pub min: f64,
    /// Whether `min` itself is refused.
    pub exclusive_min: bool,
    pub max: f64,
}

/// A range of a whole-number setting, both ends allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntBound {
    pub min: u64,
    pub max: u64,
}

/// Sampling temperature; 0 picks the most likely token every time.
pub const TEMPERATURE: FloatBound = FloatBound {
    min: 0.0,
    exclusive_min: false,
    max: 2.0,
};
/// Nucleus sampling's probability mass.
pub const TOP_P: FloatBound = FloatBound {
    min: 0.0,
    exclusive_min: true,
    max: 1.0,
};
/// Penalty for repeating recent tokens; 1 means none.
pub const REPEAT_PENALTY: FloatBound = FloatBound {
    min: 0.0,
    exclusive_min: true,
    max: 10.0,
};
/// OpenAI's `presence_penalty`: subtracted from the logits of tokens the reply holds.
pub const PRESENCE_PENALTY: FloatBound = FloatBound {
    min: -2.0,
    exclusive_min: false,
    max: 2.0,
};
/// OpenAI's `frequency_penalty`: subtracted once per occurrence in the reply.
pub const FREQUENCY_PENALTY: FloatBound = FloatBound {
    min: -2.0,
    exclusive_min: false,
    max: 2.0,
};
/// Alternatives reported per token with `logprobs` (OpenAI's own limit).
pub const TOP_LOGPROBS: IntBound = IntBound { min: 0, max: 20 };
/// The most likely tokens kept.
pub const TOP_K: IntBound = IntBound {
    min: 1,
    max: 1_000_000,
};
/// Longest reply, in tokens (a request is also bounded by the loaded model's context).
pub const MAX_TOKENS: IntBound = IntBound {
    min: 1,
    max: 32_768,
};
/// Most stop strings (OpenAI's own limit, so its clients never meet a stricter one here).
pub const MAX_STOP_STRINGS: usize = 4;
/// Length of one stop string, in characters.
pub const STOP_CHARS: IntBound = IntBound { min: 1, max: 128 };

impl FloatBound {
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite() && x <= self.max && (x > self.min || (!self.exclusive_min && x == self.min))
    }

    pub fn check(&self, field: &str, x: f64) -> Result<(), ValidationError> {
        if self.contains(x) {
            return Ok(());
        }
        let lower = if self.exclusive_min { ">" } else { "≥" };
        Err(ValidationError::new(
            field,
            format!("must be {lower} {} and ≤ {}, got {x}", self.min, self.max),
            json!({"minimum": self.min, "exclusive_minimum": self.exclusive_min, "maximum": self.max}),
        ))
    }
}

impl IntBound {
    pub fn contains(&self, n: u64) -> bool {
        (self.min..=self.max).contains(&n)
    }

    pub fn check(&self, field: &str, n: u64) -> Result<(), ValidationError> {
        if self.contains(n) {
            return Ok(());
        }
        Err(ValidationError::new(
            field,
            format!("must be from {} to {}, got {n}", self.min, self.max),
            json!({"minimum": self.min, "maximum": self.max}),
        ))
    }
}

/// At most [`MAX_STOP_STRINGS`] strings of [`STOP_CHARS`] characters, without NUL. An
/// item's error names it (`stop[1]`).
pub fn check_stop(field: &str, stops: &[String]) -> Result<(), ValidationError> {
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ValidationError::new(
            field,
            format!(
                "may hold at most {MAX_STOP_STRINGS} strings, got {}",
                stops.len()
            ),
            json!({"max_items": MAX_STOP_STRINGS}),
        ));
    }
    for (i, s) in stops.iter().enumerate() {
        let item = format!("{field}[{i}]");
        reject_nul(&item, s)?;
        let n = s.chars().count() as u64;
        if !STOP_CHARS.contains(n) {
            return Err(ValidationError::new(
                &item,
                format!(
                    "must be {} to {} characters long, got {n}",
                    STOP_CHARS.min, STOP_CHARS.max
                ),
                json!({"min_length": STOP_CHARS.min, "max_length": STOP_CHARS.max}),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_take_their_ends_as_declared() {
        assert!(TEMPERATURE.contains(0.0) && TEMPERATURE.contains(2.0));
        assert!(!TEMPERATURE.contains(2.01) && !TEMPERATURE.contains(f64::NAN));
        assert!(!TOP_P.contains(0.0) && TOP_P.contains(1.0));
        assert!(TOP_K.check("top_k", 0).is_err() && TOP_K.check("top_k", 1).is_ok());
        let e = REPEAT_PENALTY.check("repeat_penalty", 0.0).unwrap_err();
        assert_eq!(e.rule["exclusive_minimum"], true);
    }

    #[test]
    fn stop_strings() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_stop("stop", &s(&["a", "b", "c", "d"])).is_ok());
        assert!(check_stop("stop", &s(&["a", "b", "c", "d", "e"])).is_err());
        assert_eq!(
            check_stop("stop", &s(&["a", ""])).unwrap_err().field,
            "stop[1]"
        );
        assert!(check_stop("stop", &s(&["a\0"])).is_err());
        assert!(check_stop("stop", &["x".repeat(129)]).is_err());
    }
}
