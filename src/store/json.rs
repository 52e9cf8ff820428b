//! JSON objects stored as text columns (see the first migration for why).

use serde_json::{Map, Value};

use super::StoreError;

pub(super) fn encode_object(m: &Map<String, Value>) -> String {
    Value::Object(m.clone()).to_string()
}

/// Decodes a stored object; `what` names the row for the error.
pub(super) fn decode_object(
    text: &str,
    what: &dyn std::fmt::Display,
) -> Result<Map<String, Value>, StoreError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(StoreError::Corrupt(format!(
            "{what}: expected a JSON object, found {other}"
        ))),
        Err(e) => Err(StoreError::Corrupt(format!("{what}: {e}"))),
    }
}
