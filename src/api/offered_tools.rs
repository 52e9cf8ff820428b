//! The checks both stateless APIs make of the tools a request offers (OpenAI's
//! `tools[].function`, Anthropic's `tools[]`) and of its tool choice: how many tools, their
//! names, that parameters are a schema object, that a named choice names one of them. One
//! place, so both APIs refuse the same tools alike; each names its own fields.

use serde_json::{json, Value};

use super::stateless::invalid;
use crate::engine::{ToolChoice, ToolSpec, ToolUse};
use crate::error::ApiError;

/// Most tools a request may offer (OpenAI's own limit).
pub const MAX_TOOLS: usize = 128;

/// Refuses more than [`MAX_TOOLS`] tools.
pub fn check_count(n: usize) -> Result<(), ApiError> {
    if n > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("may hold at most {MAX_TOOLS} tools, got {n}"),
            json!({"max_items": MAX_TOOLS}),
        ));
    }
    Ok(())
}

/// Checks one tool (its fields are under `at`: `at.name`, `at.<params_key>`) and adds it.
pub fn add(
    specs: &mut Vec<ToolSpec>,
    at: &str,
    params_key: &str,
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
) -> Result<(), ApiError> {
    let valid_name = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(invalid(
            &format!("{at}.name"),
            format!("must be 1 to 64 letters, digits, underscores or dashes, got {name:?}"),
            json!({"pattern": "^[a-zA-Z0-9_-]{1,64}$"}),
        ));
    }
    if specs.iter().any(|s| s.name == name) {
        return Err(invalid(
            &format!("{at}.name"),
            format!("{name:?} names two tools"),
            json!({"unique": true}),
        ));
    }
    let parameters = match parameters {
        None => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Err(invalid(
                &format!("{at}.{params_key}"),
                "must be a JSON Schema object",
                json!({"type": "object"}),
            ))
        }
    };
    specs.push(ToolSpec {
        name,
        description,
        parameters,
    });
    Ok(())
}

/// A choice of the tool named `name` (at `field`), which must be one of `specs`.
pub fn named(specs: &[ToolSpec], field: &str, name: String) -> Result<ToolChoice, ApiError> {
    if !specs.iter().any(|s| s.name == name) {
        return Err(invalid(
            field,
            format!("{name:?} is not one of the request's tools"),
            json!({"allowed": specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>()}),
        ));
    }
    Ok(ToolChoice::Named(name))
}

/// The request's tool use: none without tools (a choice that needs some is refused), and
/// `auto` when tools come without a choice.
pub fn tool_use(
    specs: Vec<ToolSpec>,
    choice: Option<ToolChoice>,
    parallel: bool,
) -> Result<Option<ToolUse>, ApiError> {
    let choice = choice.unwrap_or(ToolChoice::Auto);
    if specs.is_empty() {
        return match choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            _ => Err(invalid(
                "tool_choice",
                "needs tools to choose from",
                json!({"requires": "tools"}),
            )),
        };
    }
    Ok(Some(ToolUse {
        tools: specs,
        choice,
        parallel,
    }))
}
