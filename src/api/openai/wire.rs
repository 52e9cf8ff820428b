//! The OpenAI wire format of chat completions and (legacy) text completions: what clients
//! send, how it becomes an engine request, and what goes back.
//!
//! Requests are read field by field with the field's path in every error
//! (`messages[2].content: invalid type…`), because OpenAI clients are generated code whose
//! users need to know which of many fields was wrong. Unknown fields are ignored (clients
//! send many we have no use for); known fields we cannot honour (`n > 1`, `echo`, `suffix`,
//! prompts as token ids) are refused by name rather than silently dropped.
//! `response_format` (`json_object`, `json_schema`) constrains decoding to the schema, and
//! `grammar` (llama-server's extension) to a GBNF grammar; `tools` and `tool_choice` offer
//! functions to the model (calls are read out of the reply by `engine::tools::parse`), and
//! `tool` messages bring their results back.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::offered_tools;
use crate::api::stateless::{invalid, read, unsupported, within};
use crate::chat::sampling_for;
use crate::domain::{self, generation, validate_user_id, ChatConfig, ValidationError};
use crate::engine::constraint::gbnf;
use crate::engine::{
    ChatMessage, FinishReason, GenerateRequest, Grammar, Speaker, TokenLogprob, ToolCall,
    ToolChoice, ToolSpec, ToolUse,
};
use crate::error::ApiError;

/// Usage of requests that name no `user` is counted under this user id.
pub const ANONYMOUS_USER: &str = "(openai)";

/// What chat completions and (legacy) completions share: sampling, limits, streaming, user.
#[derive(Debug, Deserialize)]
struct Settings {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Extension (llama.cpp, Ollama): keep only the k most likely tokens; 0 turns it off.
    top_k: Option<u32>,
    /// Extension (llama.cpp, Ollama): penalty for repeating recent tokens; 1 means none.
    repeat_penalty: Option<f64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<u64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    /// Extension (llama-server): a GBNF grammar the reply must match; empty means none.
    grammar: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(flatten)]
    settings: Settings,
    messages: Vec<InMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<ToolChoiceIn>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<ResponseFormat>,
}

/// A `/v1/completions` request: a prompt to continue as written.
#[derive(Debug, Deserialize)]
struct TextRequest {
    #[serde(flatten)]
    settings: Settings,
    prompt: Prompt,
    /// How many alternatives to report per token (0 to 5), as the legacy API has it.
    logprobs: Option<u64>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    name: Option<String>,
    schema: Option<Value>,
    // `strict` is read as any unknown field is: whatever it says, decoding is constrained
    // and the output matches the schema.
}

/// What a `response_format` asks for (`None`: free text).
fn format_of(f: ResponseFormat) -> Result<Option<domain::ResponseFormat>, ApiError> {
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(domain::ResponseFormat::JsonObject)),
        "json_schema" => {
            let Some(js) = f.json_schema else {
                return Err(invalid(
                    "response_format.json_schema",
                    "is required when type is \"json_schema\"",
                    json!({"required": ["name", "schema"]}),
                ));
            };
            let name = js.name.unwrap_or_default();
            domain::validate_schema_name("response_format.json_schema.name", &name)?;
            let schema = match js.schema {
                Some(schema @ Value::Object(_)) => schema,
                Some(_) => {
                    return Err(invalid(
                        "response_format.json_schema.schema",
                        "must be a JSON Schema object",
                        json!({"type": "object"}),
                    ))
                }
                // OpenAI: without a schema any JSON is accepted.
                None => json!({}),
            };
            Ok(Some(domain::ResponseFormat::JsonSchema {
                json_schema: domain::JsonSchemaSpec { name, schema },
            }))
        }
        other => Err(invalid(
            "response_format.type",
            format!("must be one of text, json_object, json_schema; got {other:?}"),
            json!({"allowed": ["text", "json_object", "json_schema"]}),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<ToolCallIn>>,
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolIn {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionIn>,
}

#[derive(Debug, Deserialize)]
struct FunctionIn {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
    // `strict` is read as any unknown field is: a required or named call is always held
    // to the schema.
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ToolChoiceIn {
    Mode(String),
    Function {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Deserialize)]
struct NamedFunction {
    name: String,
}

#[derive(Debug, Deserialize)]
struct ToolCallIn {
    id: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: CalledFunction,
}

#[derive(Debug, Deserialize)]
struct CalledFunction {
    name: String,
    arguments: String,
}

/// The request's tools and tool choice, checked.
fn tool_use(
    tools: Option<Vec<ToolIn>>,
    choice: Option<ToolChoiceIn>,
    parallel: Option<bool>,
) -> Result<Option<ToolUse>, ApiError> {
    let tools = tools.unwrap_or_default();
    offered_tools::check_count(tools.len())?;
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(invalid(
                &format!("tools[{i}].type"),
                format!("must be \"function\", got {:?}", t.kind),
                json!({"allowed": ["function"]}),
            ));
        }
        let Some(f) = t.function else {
            return Err(invalid(
                &format!("tools[{i}].function"),
                "is required",
                json!({"required": ["name"]}),
            ));
        };
        let at = format!("tools[{i}].function");
        offered_tools::add(
            &mut specs,
            &at,
            "parameters",
            f.name,
            f.description,
            f.parameters,
        )?;
    }
    let choice = match choice {
        None => None,
        Some(ToolChoiceIn::Mode(m)) => Some(match m.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("must be none, auto, required or a named function, got {other:?}"),
                    json!({"allowed": ["none", "auto", "required", {"type": "function", "function": {"name": "…"}}]}),
                ))
            }
        }),
        Some(ToolChoiceIn::Function { kind, function }) => {
            if kind != "function" {
                return Err(invalid(
                    "tool_choice.type",
                    format!("must be \"function\", got {kind:?}"),
                    json!({"allowed": ["function"]}),
                ));
            }
            Some(offered_tools::named(
                &specs,
                "tool_choice.function.name",
                function.name,
            )?)
        }
    };
    offered_tools::tool_use(specs, choice, parallel.unwrap_or(true))
}

/// The text of a message's `content` (a string, or text parts joined).
fn text_of(i: usize, content: Option<Content>) -> Result<String, ApiError> {
    Ok(match content {
        None => String::new(),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(invalid(
                            &format!("messages[{i}].content[{j}].text"),
                            "is required for a text part",
                            json!({}),
                        ))
                    }
                    (other, _) => {
                        return Err(unsupported(
                            &format!("messages[{i}].content[{j}].type"),
                            &format!("only text parts, got {other:?}"),
                        ))
                    }
                }
            }
            text
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// A validated chat-completion request.
#[derive(Debug)]
pub struct Completion {
    pub model: String,
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Whose usage this is (the request's `user`, or [`ANONYMOUS_USER`]).
    pub user: String,
    /// The field that set the request's grammar (`grammar`, `response_format`, `tools`), for
    /// naming it when the grammar cannot be enforced.
    pub grammar_field: &'static str,
}

/// Reads and checks a request body. `default_max_tokens` applies when the request sets no
/// limit; `context` is the model's context length; `max_messages` bounds `messages` before
/// any prompt is built from them.
pub fn parse(
    body: &[u8],
    default_max_tokens: u32,
    context: usize,
    max_messages: usize,
) -> Result<Completion, ApiError> {
    let r: Request = read(body)?;
    if r.messages.is_empty() {
        return Err(invalid(
            "messages",
            "must hold at least one message",
            json!({"min_items": 1}),
        ));
    }
    if r.messages.len() > max_messages {
        return Err(invalid(
            "messages",
            format!(
                "must hold at most {max_messages} messages, got {}",
                r.messages.len()
            ),
            json!({"max_items": max_messages}),
        ));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let field = |name: &str| format!("messages[{i}].{name}");
        let role = match m.role.as_str() {
            "system" | "developer" => Speaker::System,
            "user" => Speaker::User,
            "assistant" => Speaker::Assistant,
            "tool" => Speaker::Tool,
            "function" => {
                return Err(unsupported(
                    &field("role"),
                    "the deprecated function role; use tools and tool messages",
                ))
            }
            other => {
                return Err(invalid(
                    &field("role"),
                    format!(
                        "must be one of system, developer, user, assistant, tool; got {other:?}"
                    ),
                    json!({"allowed": ["system", "developer", "user", "assistant", "tool"]}),
                ))
            }
        };
        let mut message = ChatMessage::new(role, text_of(i, m.content)?);
        let calls = m.tool_calls.unwrap_or_default();
        if !calls.is_empty() && role != Speaker::Assistant {
            return Err(invalid(
                &field("tool_calls"),
                "is only allowed on assistant messages",
                json!({}),
            ));
        }
        for (j, c) in calls.into_iter().enumerate() {
            let item = |name: &str| format!("messages[{i}].tool_calls[{j}].{name}");
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(invalid(
                    &item("type"),
                    "must be \"function\"",
                    json!({"allowed": ["function"]}),
                ));
            }
            if c.id.is_empty() {
                return Err(invalid(
                    &item("id"),
                    "must not be empty",
                    json!({"min_length": 1}),
                ));
            }
            message.tool_calls.push(ToolCall {
                id: c.id,
                name: c.function.name,
                arguments: c.function.arguments,
            });
        }
        if role == Speaker::Tool {
            match m.tool_call_id {
                Some(id) if !id.is_empty() => message.tool_call_id = Some(id),
                _ => {
                    return Err(invalid(
                        &field("tool_call_id"),
                        "is required on a tool message: the id of the call it answers",
                        json!({"required": true}),
                    ))
                }
            }
        }
        messages.push(message);
    }

    let logprobs = match (r.logprobs, r.top_logprobs) {
        (Some(true), top) => {
            let top = top.unwrap_or(0);
            generation::TOP_LOGPROBS.check("top_logprobs", top)?;
            Some(top as usize)
        }
        (_, Some(top)) if top > 0 => {
            return Err(invalid(
                "top_logprobs",
                "needs logprobs set to true",
                json!({"requires": "logprobs"}),
            ))
        }
        _ => None,
    };
    let tools = tool_use(r.tools, r.tool_choice, r.parallel_tool_calls)?;
    let format = match r.response_format {
        Some(f) => format_of(f)?.as_ref().map(Grammar::from),
        None => None,
    };
    let mut c = settings(r.settings, default_max_tokens, context)?;
    if let Some(format) = format {
        if c.request.grammar.is_some() {
            return Err(invalid(
                "grammar",
                "cannot be combined with response_format (each constrains the whole reply); send one of them",
                json!({"conflicts_with": "response_format"}),
            ));
        }
        c.request.grammar = Some(format);
        c.grammar_field = "response_format";
    }
    if c.request.grammar.is_some() && tools.as_ref().is_some_and(|t| !t.offered().is_empty()) {
        return Err(invalid(
            c.grammar_field,
            format!(
                "cannot be combined with tools the model may call (a reply either matches the {} or calls tools); set tool_choice to \"none\" or leave out {}",
                if c.grammar_field == "grammar" { "grammar" } else { "format" },
                c.grammar_field
            ),
            json!({"conflicts_with": "tools"}),
        ));
    }
    if tools.as_ref().is_some_and(|t| !t.offered().is_empty()) {
        c.grammar_field = "tools";
    }
    c.request.messages = messages;
    c.request.tools = tools;
    c.request.logprobs = logprobs;
    Ok(c)
}

/// Most alternatives per token the legacy completions API reports (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// Reads and checks a `/v1/completions` body (see [`parse`]).
pub fn parse_text(
    body: &[u8],
    default_max_tokens: u32,
    context: usize,
) -> Result<Completion, ApiError> {
    let r: TextRequest = read(body)?;
    let prompt = match r.prompt {
        Prompt::Text(t) => t,
        Prompt::Texts(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(_) => return Err(unsupported("prompt", "one prompt per request")),
        Prompt::Tokens(ids) => {
            return Err(unsupported(
                "prompt",
                &format!("prompts as token ids ({} sent); send text", ids.len()),
            ))
        }
    };
    crate::domain::reject_nul("prompt", &prompt).map_err(ApiError::Validation)?;
    if prompt.is_empty() {
        return Err(invalid(
            "prompt",
            "must not be empty",
            json!({"min_length": 1}),
        ));
    }
    if r.echo == Some(true) {
        return Err(unsupported("echo", "the reply holds the completion only"));
    }
    if r.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "no insertion after a suffix"));
    }
    if r.best_of.is_some_and(|n| n != 1) {
        return Err(unsupported("best_of", "one candidate per request"));
    }
    let logprobs = match r.logprobs {
        None => None,
        Some(n) if n <= MAX_COMPLETION_LOGPROBS => Some(n as usize),
        Some(n) => {
            return Err(invalid(
                "logprobs",
                format!("must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {n}"),
                json!({"minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS}),
            ))
        }
    };
    let mut c = settings(r.settings, default_max_tokens, context)?;
    c.request.raw_prompt = Some(prompt);
    c.request.logprobs = logprobs;
    Ok(c)
}

/// Checks what both APIs share; the request it returns has no prompt yet.
fn settings(r: Settings, default_max_tokens: u32, context: usize) -> Result<Completion, ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(unsupported("n", "one choice per request"));
    }
    within(
        "presence_penalty",
        r.presence_penalty,
        generation::PRESENCE_PENALTY,
    )?;
    within(
        "frequency_penalty",
        r.frequency_penalty,
        generation::FREQUENCY_PENALTY,
    )?;
    within("temperature", r.temperature, generation::TEMPERATURE)?;
    within("top_p", r.top_p, generation::TOP_P)?;
    within(
        "repeat_penalty",
        r.repeat_penalty,
        generation::REPEAT_PENALTY,
    )?;
    if let Some(k) = r.top_k {
        generation::TOP_K.check("top_k", u64::from(k))?;
    }
    let (limit_field, limit) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    if let Some(n) = limit {
        generation::MAX_TOKENS.check(limit_field, n)?;
        if n >= context as u64 {
            return Err(invalid(
                limit_field,
                format!("must be less than the model's context of {context} tokens, got {n}"),
                json!({"minimum": 1, "maximum": context.saturating_sub(1)}),
            ));
        }
    }
    let stop = match r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    // OpenAI's `param` names the parameter, not an item of it.
    generation::check_stop("stop", &stop).map_err(|e| ValidationError {
        field: "stop".into(),
        ..e
    })?;
    let grammar = match r.grammar.filter(|g| !g.is_empty()) {
        Some(g) => {
            crate::domain::reject_nul("grammar", &g).map_err(ApiError::Validation)?;
            let lark = gbnf::to_lark(&g).map_err(|e| {
                invalid(
                    "grammar",
                    format!("is not a valid GBNF grammar: {e}"),
                    json!({"format": "GBNF (llama.cpp)"}),
                )
            })?;
            Some(Grammar::Lark(lark))
        }
        None => None,
    };
    let user = match r.user {
        Some(u) => {
            validate_user_id("user", &u).map_err(ApiError::Validation)?;
            u
        }
        None => ANONYMOUS_USER.to_string(),
    };

    // The same mapping as a chat's settings, so both APIs sample alike.
    let config = ChatConfig {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        repeat_penalty: r.repeat_penalty,
        // OpenAI seeds are signed; the bits are what matter.
        seed: r.seed.map(|s| s as u64),
        ..Default::default()
    };
    let max_tokens = limit.map_or(default_max_tokens as usize, |n| n as usize);
    let mut sampling = sampling_for(&config);
    sampling.presence_penalty = r.presence_penalty.unwrap_or(0.0) as f32;
    sampling.frequency_penalty = r.frequency_penalty.unwrap_or(0.0) as f32;
    Ok(Completion {
        model: r.model,
        request: GenerateRequest {
            messages: Vec::new(),
            raw_prompt: None,
            sampling,
            max_tokens,
            stop,
            cache_key: None,
            grammar,
            tools: None,
            logprobs: None,
        },
        stream: r.stream.unwrap_or(false),
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        user,
        grammar_field: "grammar",
    })
}

/// OpenAI's name for how a generation ended; a reply that stopped after calling tools ends
/// with `tool_calls`.
pub fn finish_reason(f: FinishReason, called: bool) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop if called => "tool_calls",
        // A cancelled generation only reaches a client that is still there when the
        // server stopped it (shutdown); it ended early like a stop.
        FinishReason::Stop | FinishReason::Cancelled | FinishReason::Error => "stop",
    }
}

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl UsageOut {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> UsageOut {
        UsageOut {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MessageOut {
    pub role: &'static str,
    /// `null` when the reply is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call in a whole reply.
#[derive(Debug, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Serialize)]
pub struct FunctionOut {
    pub name: String,
    pub arguments: String,
}

impl From<ToolCall> for ToolCallOut {
    fn from(c: ToolCall) -> ToolCallOut {
        ToolCallOut {
            id: c.id,
            kind: "function",
            function: FunctionOut {
                name: c.name,
                arguments: c.arguments,
            },
        }
    }
}

/// A piece of a call in a streamed reply: the first names it (`id`, `type`, `name`), the
/// rest carry pieces of its arguments.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: MessageOut,
    pub finish_reason: &'static str,
    pub logprobs: Option<LogprobsOut>,
}

/// The log-probabilities of a reply's tokens (`logprobs: true`).
#[derive(Debug, Serialize)]
pub struct LogprobsOut {
    pub content: Vec<TokenLogprobOut>,
    pub refusal: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct TokenLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprobOut>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprobOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl LogprobsOut {
    pub fn new(tokens: Vec<TokenLogprob>) -> LogprobsOut {
        LogprobsOut {
            content: tokens
                .into_iter()
                .map(|t| TokenLogprobOut {
                    token: t.token,
                    logprob: t.logprob,
                    bytes: t.bytes,
                    top_logprobs: t
                        .top
                        .into_iter()
                        .map(|(token, bytes, logprob)| TopLogprobOut {
                            token,
                            logprob,
                            bytes,
                        })
                        .collect(),
                })
                .collect(),
            refusal: None,
        }
    }
}

/// The legacy API's log-probabilities: parallel lists, one entry per token.
#[derive(Debug, Serialize)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Where each token starts in the completion's text, in characters.
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The entries of `tokens`, whose text starts `offset` characters into the completion.
    pub fn new(tokens: Vec<TokenLogprob>, mut offset: usize) -> TextLogprobs {
        let mut out = TextLogprobs {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        };
        for t in tokens {
            out.text_offset.push(offset);
            offset += t.token.chars().count();
            out.token_logprobs.push(t.logprob);
            out.top_logprobs.push(
                t.top
                    .into_iter()
                    .map(|(text, _, lp)| (text, json!(lp)))
                    .collect(),
            );
            out.tokens.push(t.token);
        }
        out
    }
}

/// A `/v1/completions` choice, whole or streamed (then `text` is the new piece).
#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A `/v1/completions` reply, or one chunk of a streamed one (same object, as OpenAI sends).
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// A whole (non-streamed) completion.
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: UsageOut,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<LogprobsOut>,
}

/// One streamed piece (`chat.completion.chunk`).
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk, and only when the client asked (`stream_options`); `null`
    /// on the others, as OpenAI sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(body: Value) -> Result<Completion, ApiError> {
        parse(body.to_string().as_bytes(), 64, 8192, 4)
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Validation(v) => v.field,
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn a_plain_request() {
        let c = p(json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}
        ], "stop": "\n", "seed": -1, "max_tokens": 5, "temperature": 0, "user": "ana"}))
        .unwrap();
        assert_eq!(c.request.messages[0].role, Speaker::System);
        assert_eq!(c.request.messages[1].content, "hi there");
        assert_eq!(c.request.stop, vec!["\n".to_string()]);
        assert_eq!(c.request.sampling.seed, u64::MAX);
        assert_eq!(c.request.sampling.temperature, 0.0);
        assert_eq!(c.request.max_tokens, 5);
        assert_eq!(c.user, "ana");
        assert!(!c.stream);
        let d = p(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(d.request.max_tokens, 64);
        assert_eq!(d.user, ANONYMOUS_USER);
    }

    #[test]
    fn errors_name_the_field() {
        let e = p(json!({"model": "m", "messages": [{"role": "user", "content": 3}]}));
        assert_eq!(field_of(e.unwrap_err()), "messages[0].content");
        let e = p(json!({"model": "m", "messages": []}));
        assert_eq!(field_of(e.unwrap_err()), "messages");
        let e = p(json!({"messages": [{"role": "user", "content": "x"}]}));
        assert_eq!(field_of(e.unwrap_err()), "body");
        let e = p(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}));
        assert_eq!(field_of(e.unwrap_err()), "messages[0].tool_call_id");
        let e = p(json!({"model": "m", "messages": [{"role": "critic", "content": "x"}]}));
        assert_eq!(field_of(e.unwrap_err()), "messages[0].role");
        let ok = json!([{"role": "user", "content": "x"}]);
        for (k, v) in [
            ("temperature", json!(2.5)),
            ("top_p", json!(0)),
            ("n", json!(2)),
            ("max_tokens", json!(0)),
            ("max_tokens", json!(8192)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("stop", json!([""])),
            ("frequency_penalty", json!(2.5)),
            ("top_logprobs", json!(3)),
            ("user", json!("a b")),
            ("tools", json!({"type": "function"})),
            ("tool_choice", json!("always")),
        ] {
            let mut body = json!({"model": "m", "messages": ok});
            body[k] = v;
            assert_eq!(field_of(p(body).unwrap_err()), k);
        }
        let five = vec![json!({"role": "user", "content": "x"}); 5];
        assert_eq!(
            field_of(p(json!({"model": "m", "messages": five})).unwrap_err()),
            "messages"
        );
        assert!(matches!(
            parse(b"{\"model\": ", 1, 10, 4),
            Err(ApiError::InvalidJson { .. })
        ));
    }
}
