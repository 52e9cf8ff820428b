//! Input bounds that are not part of the published schema, and the checks that use them.
//!
//! Bounds fixed by the API contract (user id length, title length, sampling ranges) live in
//! the OpenAPI schema; the ones an operator may want to tune live here.

use serde_json::{Map, Value};

/// Operator-tunable input limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `metadata` object, in bytes of compact JSON.
    pub max_metadata_bytes: usize,
    /// Deepest nesting of objects and arrays inside `metadata`.
    pub max_metadata_depth: usize,
    /// Longest system prompt, in characters.
    pub max_system_prompt_chars: usize,
    /// Most messages in one OpenAI-API request.
    pub max_request_messages: usize,
    /// Longest life of a user-scoped token (`POST /api/v1/tokens`), in seconds.
    pub max_token_ttl_secs: u64,
    /// Largest body of `POST /api/v1/chats/import`, in bytes (a whole chat's export).
    pub max_import_bytes: usize,
    /// Most messages one imported chat may hold.
    pub max_import_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_metadata_depth: 8,
            max_system_prompt_chars: 32 * 1024,
            max_request_messages: 1024,
            max_token_ttl_secs: 24 * 3600,
            max_import_bytes: 16 * 1024 * 1024,
            max_import_messages: 10_000,
        }
    }
}

/// A value broke a rule; names the field and says what would be accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
    /// A machine-readable description of the rule, e.g. `{"max_bytes": 16384}`.
    pub rule: Value,
}

impl ValidationError {
    pub fn new(field: &str, message: impl Into<String>, rule: Value) -> Self {
        ValidationError {
            field: field.to_string(),
            message: message.into(),
            rule,
        }
    }
}

/// Longest user id, in characters (API contract).
pub const MAX_USER_ID_CHARS: usize = 128;
/// Longest chat title, in characters (API contract).
pub const MAX_TITLE_CHARS: usize = 256;
/// [`validate_user_id`]'s characters as a JSON Schema pattern (with the lengths above), so
/// the published schema accepts exactly what the server does. `\s` is Unicode whitespace in
/// ECMAScript, Python and Rust's `regex` alike; the control characters are Unicode's `Cc`.
pub const USER_ID_PATTERN: &str = r"^[^\s/\x00-\x1f\x7f-\x9f]+$";
/// [`validate_title`]'s characters as a JSON Schema pattern.
pub const TITLE_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";
/// Free text (a system prompt, a stop string) may hold anything but NUL, which neither
/// PostgreSQL's text nor the tokenizers take.
pub const NO_NUL_PATTERN: &str = r"^[^\x00]*$";

fn is_forbidden_in_id(c: char) -> bool {
    c.is_control() || c.is_whitespace() || c == '/'
}

/// A user id is 1–128 characters with no whitespace, control characters or `/` (it appears
/// in URL paths). It is stored exactly as sent: nothing is trimmed.
pub fn validate_user_id(field: &str, s: &str) -> Result<(), ValidationError> {
    let n = s.chars().count();
    if n == 0 || n > MAX_USER_ID_CHARS {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_USER_ID_CHARS} characters long, got {n}"),
            serde_json::json!({"min_length": 1, "max_length": MAX_USER_ID_CHARS}),
        ));
    }
    if let Some(c) = s.chars().find(|&c| is_forbidden_in_id(c)) {
        return Err(ValidationError::new(
            field,
            format!("must not contain whitespace, control characters or '/', found {c:?}"),
            serde_json::json!({"forbidden": "whitespace, control characters, '/'"}),
        ));
    }
    Ok(())
}

/// A title is at most 256 characters without control characters (newlines included).
pub fn validate_title(s: &str) -> Result<(), ValidationError> {
    let n = s.chars().count();
    if n > MAX_TITLE_CHARS {
        return Err(ValidationError::new(
            "title",
            format!("must be at most {MAX_TITLE_CHARS} characters long, got {n}"),
            serde_json::json!({"max_length": MAX_TITLE_CHARS}),
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            "title",
            format!("must not contain control characters, found {c:?}"),
            serde_json::json!({"forbidden": "control characters"}),
        ));
    }
    Ok(())
}

/// Text may hold any character but U+0000, which PostgreSQL cannot store (in `text` or
/// `jsonb`): refused on both backends alike, so a chat never works on one and fails on the
/// other.
pub fn reject_nul(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.contains('\0') {
        return Err(ValidationError::new(
            field,
            "must not contain the NUL character (U+0000)",
            serde_json::json!({"forbidden": "U+0000"}),
        ));
    }
    Ok(())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Bounds the size and nesting of a `metadata` object.
pub fn validate_metadata(limits: &Limits, m: &Map<String, Value>) -> Result<(), ValidationError> {
    // The object itself counts as one level.
    let d = 1 + m.values().map(depth).max().unwrap_or(0);
    if d > limits.max_metadata_depth {
        return Err(ValidationError::new(
            "metadata",
            format!(
                "is nested {d} levels deep; at most {} allowed",
                limits.max_metadata_depth
            ),
            serde_json::json!({"max_depth": limits.max_metadata_depth}),
        ));
    }
    let bytes = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    if bytes > limits.max_metadata_bytes {
        return Err(ValidationError::new(
            "metadata",
            format!(
                "is {bytes} bytes as JSON; at most {} allowed",
                limits.max_metadata_bytes
            ),
            serde_json::json!({"max_bytes": limits.max_metadata_bytes}),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_ids() {
        assert!(validate_user_id("user_id", "user123").is_ok());
        assert!(validate_user_id("user_id", "ana@example.com").is_ok());
        assert!(validate_user_id("user_id", "auth0|5f3a").is_ok());
        assert!(validate_user_id("user_id", "用户").is_ok());
        assert!(validate_user_id("user_id", &"x".repeat(128)).is_ok());
        assert!(validate_user_id("user_id", &"é".repeat(128)).is_ok());
        assert!(validate_user_id("user_id", &"x".repeat(129)).is_err());
        assert!(validate_user_id("user_id", "").is_err());
        assert!(validate_user_id("user_id", " a").is_err());
        assert!(validate_user_id("user_id", "a/b").is_err());
        assert!(validate_user_id("user_id", "a\u{0}b").is_err());
    }

    /// The patterns published in the schema and the validators agree, character by character.
    #[test]
    fn patterns_match_the_validators() {
        let user_id = regex::Regex::new(USER_ID_PATTERN).unwrap();
        let title = regex::Regex::new(TITLE_PATTERN).unwrap();
        let samples = (0u32..0x3100)
            .chain([0xfeff, 0x1f600, 0x10fffd])
            .filter_map(char::from_u32);
        for c in samples {
            let s = format!("a{c}b");
            assert_eq!(
                user_id.is_match(&s),
                validate_user_id("u", &s).is_ok(),
                "{c:?}"
            );
            assert_eq!(title.is_match(&s), validate_title(&s).is_ok(), "{c:?}");
        }
    }

    #[test]
    fn metadata_bounds() {
        let l = Limits {
            max_metadata_depth: 3,
            max_metadata_bytes: 30,
            ..Limits::default()
        };
        let ok = json!({"a": {"b": [1]}});
        assert!(validate_metadata(&l, ok.as_object().unwrap()).is_ok());
        let deep = json!({"a": {"b": [[1]]}});
        assert_eq!(
            validate_metadata(&l, deep.as_object().unwrap())
                .unwrap_err()
                .rule,
            json!({"max_depth": 3})
        );
        let big = json!({"a": "x".repeat(40)});
        assert!(validate_metadata(&l, big.as_object().unwrap()).is_err());
    }
}
