//! The Anthropic Messages wire format (`POST /v1/messages`): what clients send, how it
//! becomes an engine request, and what goes back.
//!
//! Read as the OpenAI format is (the field's path in every error, unknown fields ignored,
//! fields we cannot honour refused by name). Content is a string or a list of blocks:
//! `text`, `tool_use` (an assistant's call; its `input` an object) and `tool_result` (a
//! call's answer, in a user turn) become the engine's messages and tool turns; blocks of
//! kinds this server has no use for (images, documents, extended thinking) are refused at
//! their path, because silently dropping part of a conversation changes its meaning.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::offered_tools;
use crate::api::stateless::{invalid, read, unsupported, within};
use crate::chat::sampling_for;
use crate::domain::{generation, validate_user_id, ChatConfig, ValidationError};
use crate::engine::{
    ChatMessage, FinishReason, GenerateRequest, GenerationSummary, Grammar, Speaker, ToolCall,
    ToolChoice, ToolSpec,
};
use crate::error::ApiError;

/// Usage of requests whose `metadata` names no `user_id` is counted under this user id.
pub const ANONYMOUS_USER: &str = "(anthropic)";

/// Anthropic's temperature range (narrower than OpenAI's).
const TEMPERATURE: generation::FloatBound = generation::FloatBound {
    min: 0.0,
    exclusive_min: false,
    max: 1.0,
};

/// Anthropic's default temperature, used when a request sets none.
const DEFAULT_TEMPERATURE: f64 = 1.0;

#[derive(Debug, Deserialize)]
struct Request {
    model: String,
    max_tokens: Option<u64>,
    messages: Vec<InMessage>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    metadata: Option<Metadata>,
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<ToolChoiceIn>,
    thinking: Option<Kind>,
    /// Structured outputs: `{"format": {"type": "json_schema", "schema": {…}}}`.
    output_config: Option<OutputConfig>,
    /// The same format, as the structured-outputs beta named it.
    output_format: Option<OutputFormat>,
    mcp_servers: Option<Vec<Value>>,
    container: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    user_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolIn {
    /// Absent or `custom` for a client tool; Anthropic's server tools have versioned types.
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToolChoiceIn {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct OutputConfig {
    format: Option<OutputFormat>,
    effort: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct OutputFormat {
    #[serde(rename = "type")]
    kind: String,
    schema: Option<Value>,
}

/// A checked Messages request, ready for the engine.
pub struct MessagesRequest {
    pub model: String,
    pub request: GenerateRequest,
    pub stream: bool,
    /// Whose usage this is (`metadata.user_id`, or [`ANONYMOUS_USER`]).
    pub user: String,
    /// The field that set the request's grammar, named when it cannot be enforced.
    pub grammar_field: &'static str,
}

/// One content block of a request.
enum Block {
    Text(String),
    ToolUse(ToolCall),
    ToolResult { id: String, text: String },
}

/// A string field of a block, required.
fn text_field(block: &Value, at: &str, key: &str) -> Result<String, ApiError> {
    match block.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(
            &format!("{at}.{key}"),
            "must be a string",
            json!({"type": "string"}),
        )),
        None => Err(invalid(
            &format!("{at}.{key}"),
            "is required",
            json!({"required": [key]}),
        )),
    }
}

/// Content (a string, or blocks) at `field` as blocks.
fn blocks(field: &str, content: Value) -> Result<Vec<Block>, ApiError> {
    let items = match content {
        Value::String(s) => return Ok(vec![Block::Text(s)]),
        Value::Array(items) => items,
        _ => {
            return Err(invalid(
                field,
                "must be a string or an array of content blocks",
                json!({"type": ["string", "array"]}),
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (j, b) in items.into_iter().enumerate() {
        let at = format!("{field}[{j}]");
        let kind = text_field(&b, &at, "type")?;
        out.push(match kind.as_str() {
            "text" => Block::Text(text_field(&b, &at, "text")?),
            "tool_use" => {
                let id = text_field(&b, &at, "id")?;
                if id.is_empty() {
                    return Err(invalid(
                        &format!("{at}.id"),
                        "must not be empty",
                        json!({"min_length": 1}),
                    ));
                }
                let input = match b.get("input") {
                    Some(v @ Value::Object(_)) => v.to_string(),
                    _ => {
                        return Err(invalid(
                            &format!("{at}.input"),
                            "must be an object (the call's arguments)",
                            json!({"type": "object"}),
                        ))
                    }
                };
                Block::ToolUse(ToolCall {
                    id,
                    name: text_field(&b, &at, "name")?,
                    arguments: input,
                })
            }
            "tool_result" => {
                let id = text_field(&b, &at, "tool_use_id")?;
                let mut text = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => {
                        let mut parts = Vec::new();
                        for inner in blocks(&format!("{at}.content"), c.clone())? {
                            match inner {
                                Block::Text(t) => parts.push(t),
                                _ => {
                                    return Err(invalid(
                                        &format!("{at}.content"),
                                        "may hold only text blocks",
                                        json!({"allowed": ["text"]}),
                                    ))
                                }
                            }
                        }
                        parts.join("\n")
                    }
                };
                if b.get("is_error") == Some(&Value::Bool(true)) {
                    text.insert_str(0, "Error: ");
                }
                Block::ToolResult { id, text }
            }
            "image" | "document" | "search_result" => {
                return Err(unsupported(
                    &format!("{at}.type"),
                    &format!("{kind} input; the model reads text"),
                ))
            }
            "thinking" | "redacted_thinking" => {
                return Err(unsupported(&format!("{at}.type"), "extended thinking"))
            }
            other => {
                return Err(invalid(
                    &format!("{at}.type"),
                    format!("must be text, tool_use or tool_result; got {other:?}"),
                    json!({"allowed": ["text", "tool_use", "tool_result"]}),
                ))
            }
        });
    }
    Ok(out)
}

/// The conversation as engine messages: the system prompt first, a user turn's tool
/// results as tool messages (in their order among its text), an assistant turn's calls on
/// its message.
fn conversation(
    system: Option<Value>,
    messages: Vec<InMessage>,
    max_messages: usize,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(invalid(
            "messages",
            "must hold at least one message",
            json!({"min_items": 1}),
        ));
    }
    if messages.len() > max_messages {
        return Err(invalid(
            "messages",
            format!(
                "must hold at most {max_messages} messages, got {}",
                messages.len()
            ),
            json!({"max_items": max_messages}),
        ));
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system {
        let mut parts = Vec::new();
        for b in blocks("system", system)? {
            match b {
                Block::Text(t) => parts.push(t),
                _ => {
                    return Err(invalid(
                        "system",
                        "may hold only text blocks",
                        json!({"allowed": ["text"]}),
                    ))
                }
            }
        }
        let text = parts.join("\n");
        if !text.is_empty() {
            out.push(ChatMessage::new(Speaker::System, text));
        }
    }
    let last = messages.len() - 1;
    for (i, m) in messages.into_iter().enumerate() {
        let field = format!("messages[{i}].content");
        let role = match m.role.as_str() {
            "user" => Speaker::User,
            "assistant" => Speaker::Assistant,
            other => {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!(
                    "must be user or assistant; got {other:?} (the system prompt goes in `system`)"
                ),
                    json!({"allowed": ["user", "assistant"]}),
                ))
            }
        };
        if role == Speaker::Assistant && i == last {
            return Err(unsupported(
                &format!("messages[{i}]"),
                "continuing a final assistant message; end with a user message",
            ));
        }
        let content = blocks(&field, m.content)?;
        if content.is_empty() {
            return Err(invalid(
                &field,
                "must hold at least one block",
                json!({"min_items": 1}),
            ));
        }
        let mut text: Vec<String> = Vec::new();
        let mut calls = Vec::new();
        for (j, b) in content.into_iter().enumerate() {
            match (b, role) {
                (Block::Text(t), _) => text.push(t),
                (Block::ToolUse(call), Speaker::Assistant) => calls.push(call),
                (Block::ToolResult { id, text: result }, Speaker::User) => {
                    if !text.is_empty() {
                        out.push(ChatMessage::new(Speaker::User, text.join("\n")));
                        text.clear();
                    }
                    let mut m = ChatMessage::new(Speaker::Tool, result);
                    m.tool_call_id = Some(id);
                    out.push(m);
                }
                (Block::ToolUse(_), _) => {
                    return Err(invalid(
                        &format!("{field}[{j}].type"),
                        "tool_use blocks belong in assistant messages",
                        json!({"allowed": ["text", "tool_result"]}),
                    ))
                }
                (Block::ToolResult { .. }, _) => {
                    return Err(invalid(
                        &format!("{field}[{j}].type"),
                        "tool_result blocks belong in user messages",
                        json!({"allowed": ["text", "tool_use"]}),
                    ))
                }
            }
        }
        if !text.is_empty() || !calls.is_empty() {
            let mut m = ChatMessage::new(role, text.join("\n"));
            m.tool_calls = calls;
            out.push(m);
        }
    }
    Ok(out)
}

/// The request's tools and tool choice, checked.
fn tool_use(
    tools: Option<Vec<ToolIn>>,
    choice: Option<ToolChoiceIn>,
) -> Result<Option<crate::engine::ToolUse>, ApiError> {
    let tools = tools.unwrap_or_default();
    offered_tools::check_count(tools.len())?;
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        let at = format!("tools[{i}]");
        if let Some(kind) = t.kind.filter(|k| k != "custom") {
            return Err(unsupported(
                &format!("{at}.type"),
                &format!("Anthropic's server tool {kind:?}; define the tool with an input_schema"),
            ));
        }
        if t.input_schema.is_none() {
            return Err(invalid(
                &format!("{at}.input_schema"),
                "is required: the JSON Schema of the tool's input",
                json!({"required": ["input_schema"]}),
            ));
        }
        offered_tools::add(
            &mut specs,
            &at,
            "input_schema",
            t.name,
            t.description,
            t.input_schema,
        )?;
    }
    let mut parallel = true;
    let choice = match choice {
        None => None,
        Some(c) => {
            parallel = !c.disable_parallel_tool_use.unwrap_or(false);
            Some(match c.kind.as_str() {
                "auto" => ToolChoice::Auto,
                "any" => ToolChoice::Required,
                "none" => ToolChoice::None,
                "tool" => match c.name {
                    Some(name) => offered_tools::named(&specs, "tool_choice.name", name)?,
                    None => {
                        return Err(invalid(
                            "tool_choice.name",
                            "is required when tool_choice.type is \"tool\"",
                            json!({"required": ["name"]}),
                        ))
                    }
                },
                other => {
                    return Err(invalid(
                        "tool_choice.type",
                        format!("must be auto, any, tool or none; got {other:?}"),
                        json!({"allowed": ["auto", "any", "tool", "none"]}),
                    ))
                }
            })
        }
    };
    offered_tools::tool_use(specs, choice, parallel)
}

/// Reads and checks a `/v1/messages` body. `count_only` (for `count_tokens`) does not need
/// `max_tokens`.
pub fn parse(
    body: &[u8],
    context: usize,
    max_messages: usize,
    count_only: bool,
) -> Result<MessagesRequest, ApiError> {
    let r: Request = read(body)?;
    if let Some(t) = r.thinking.filter(|t| t.kind != "disabled") {
        return Err(unsupported(
            "thinking",
            &format!("extended thinking ({:?}); leave it out", t.kind),
        ));
    }
    if r.mcp_servers.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("mcp_servers", "MCP connectors"));
    }
    if r.container.is_some() {
        return Err(unsupported("container", "code execution containers"));
    }
    let messages = conversation(r.system, r.messages, max_messages)?;
    let max_tokens = match (r.max_tokens, count_only) {
        (Some(n), _) => {
            generation::MAX_TOKENS.check("max_tokens", n)?;
            if n >= context as u64 {
                return Err(invalid(
                    "max_tokens",
                    format!("must be less than the model's context of {context} tokens, got {n}"),
                    json!({"minimum": 1, "maximum": context.saturating_sub(1)}),
                ));
            }
            n as usize
        }
        (None, true) => 1,
        (None, false) => {
            return Err(invalid(
                "max_tokens",
                "is required: the most tokens the reply may have",
                json!({"required": ["max_tokens"]}),
            ))
        }
    };
    within("temperature", r.temperature, TEMPERATURE)?;
    within("top_p", r.top_p, generation::TOP_P)?;
    if let Some(k) = r.top_k {
        generation::TOP_K.check("top_k", u64::from(k))?;
    }
    let stop = r.stop_sequences.unwrap_or_default();
    generation::check_stop("stop_sequences", &stop).map_err(|e| ValidationError {
        field: "stop_sequences".into(),
        ..e
    })?;
    let user = match r.metadata.and_then(|m| m.user_id) {
        Some(u) => {
            validate_user_id("metadata.user_id", &u).map_err(ApiError::Validation)?;
            u
        }
        None => ANONYMOUS_USER.to_string(),
    };
    let tools = tool_use(r.tools, r.tool_choice)?;
    let offers_tools = tools.as_ref().is_some_and(|t| !t.offered().is_empty());
    let (format_field, format) = match (r.output_config, r.output_format) {
        (Some(c), _) if c.effort.as_ref().is_some_and(|e| !e.is_null()) => {
            return Err(unsupported(
                "output_config.effort",
                "effort levels; the model answers as it is",
            ))
        }
        (
            Some(OutputConfig {
                format: Some(_), ..
            }),
            Some(_),
        ) => {
            return Err(invalid(
                "output_format",
                "cannot be combined with output_config.format; send one of them",
                json!({"conflicts_with": "output_config.format"}),
            ))
        }
        (
            Some(OutputConfig {
                format: Some(f), ..
            }),
            None,
        ) => ("output_config.format", Some(f)),
        (_, f) => ("output_format", f),
    };
    let grammar = match format {
        None => None,
        Some(f) if f.kind == "json_schema" => match f.schema {
            Some(s @ Value::Object(_)) => Some(Grammar::JsonSchema(s)),
            _ => {
                return Err(invalid(
                    &format!("{format_field}.schema"),
                    "is required: a JSON Schema object",
                    json!({"type": "object"}),
                ))
            }
        },
        Some(f) => {
            return Err(invalid(
                &format!("{format_field}.type"),
                format!("must be \"json_schema\", got {:?}", f.kind),
                json!({"allowed": ["json_schema"]}),
            ))
        }
    };
    if grammar.is_some() && offers_tools {
        return Err(invalid(
            format_field,
            "cannot be combined with tools the model may call (a reply either matches the schema or calls tools)",
            json!({"conflicts_with": "tools"}),
        ));
    }
    let config = ChatConfig {
        temperature: Some(r.temperature.unwrap_or(DEFAULT_TEMPERATURE)),
        top_p: r.top_p,
        top_k: r.top_k,
        ..Default::default()
    };
    Ok(MessagesRequest {
        model: r.model,
        request: GenerateRequest {
            messages,
            raw_prompt: None,
            sampling: sampling_for(&config),
            max_tokens,
            stop,
            cache_key: None,
            grammar,
            tools,
            logprobs: None,
        },
        stream: r.stream.unwrap_or(false),
        user,
        grammar_field: if offers_tools { "tools" } else { format_field },
    })
}

/// Why a reply ended, as Anthropic says it.
pub fn stop_reason(s: &GenerationSummary, called: bool) -> &'static str {
    match s.finish_reason {
        FinishReason::Length => "max_tokens",
        _ if s.stop_sequence.is_some() => "stop_sequence",
        _ if called => "tool_use",
        // A cancelled generation only reaches a client that is still there when the
        // server stopped it (shutdown); it ended early like a stop.
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::Error => "end_turn",
    }
}

/// A content block of a reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockOut {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

impl From<ToolCall> for BlockOut {
    fn from(c: ToolCall) -> BlockOut {
        // The arguments of a call the model wrote freely (`auto`) may not be an object;
        // Anthropic's `input` must be one.
        let input = serde_json::from_str::<Value>(&c.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        BlockOut::ToolUse {
            id: c.id,
            name: c.name,
            input,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub input_tokens: usize,
    pub output_tokens: usize,
}

/// A whole reply (and, empty, the `message_start` event's message).
#[derive(Debug, Serialize)]
pub struct MessageOut<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: &'a str,
    pub content: Vec<BlockOut>,
    pub stop_reason: Option<&'static str>,
    pub stop_sequence: Option<String>,
    pub usage: Usage,
}
