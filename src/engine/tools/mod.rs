//! Tool calling: the functions a request offers the model, how the loaded model's family
//! writes a call ([`ToolFormat`]), the prompt that describes the tools, the grammar that
//! holds a reply to a valid call when the caller requires one, and the parser that turns
//! the model's text back into calls ([`parse::ToolCallParser`]).
//!
//! Models are trained on one way of writing calls, set by their chat template: Hermes 2
//! Pro, Qwen 2.5/3 and SmolLM3 wrap a JSON object in `<tool_call>` tags, Llama 3.1–3.3 write
//! a bare JSON object (`"parameters"` for the arguments), Mistral Nemo a `[TOOL_CALLS]`
//! JSON list, newer Mistral templates `[TOOL_CALLS]name[ARGS]{…}`. A template that renders
//! the request's tools itself is given them ("native"); for one that does not (SmolLM2's
//! ChatML), the tools are described in a system prompt of ours that asks for the Hermes
//! form, and tool turns are rendered as text the template does take.

pub mod parse;

use serde_json::{json, Value};

use super::tokenizer::TextTokenizer;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

impl ToolSpec {
    /// The tool as chat templates (and OpenAI) take it.
    pub fn as_json(&self) -> Value {
        let mut function = json!({"name": self.name});
        if let Some(d) = &self.description {
            function["description"] = json!(d);
        }
        function["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": function})
    }
}

/// Whether, and which, tools the model calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model decides between text and calls.
    Auto,
    /// At least one call (decoding is constrained to calls).
    Required,
    /// One call of this function (constrained).
    Named(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// Whether a reply may hold more than one call.
    pub parallel: bool,
}

impl ToolUse {
    /// The tools the model is shown: none for [`ToolChoice::None`].
    pub fn offered(&self) -> &[ToolSpec] {
        match self.choice {
            ToolChoice::None => &[],
            _ => &self.tools,
        }
    }
}

/// A call the assistant made: in a conversation's history, or parsed from a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as the model wrote them.
    pub arguments: String,
}

impl ToolCall {
    /// The call as templates take it (OpenAI's shape, with the arguments as an object when
    /// they parse: Hugging Face templates print them with `tojson`).
    pub fn as_template_json(&self) -> Value {
        let arguments = serde_json::from_str::<Value>(&self.arguments)
            .unwrap_or_else(|_| Value::String(self.arguments.clone()));
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        })
    }
}

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one block per call.
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the reply, optionally after `<|python_tag|>`.
    Llama3,
    /// `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
    MistralList,
    /// `[TOOL_CALLS]name[ARGS]{…}`, once per call.
    MistralArgs,
}

impl ToolFormat {
    /// The family a chat template's source writes calls for; `None` when it shows no sign
    /// of tool calls.
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if source.contains("[TOOL_CALLS]") {
            if source.contains("[ARGS]") {
                Some(ToolFormat::MistralArgs)
            } else {
                Some(ToolFormat::MistralList)
            }
        } else if source.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\": dictionary")
        {
            Some(ToolFormat::Llama3)
        } else {
            None
        }
    }

    /// Texts that frame calls in this format (some are special tokens in a vocabulary).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &["<tool_call>", "</tool_call>"],
            ToolFormat::Llama3 => &["<|python_tag|>"],
            ToolFormat::MistralList => &["[TOOL_CALLS]"],
            ToolFormat::MistralArgs => &["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"],
        }
    }

    /// The key that holds a call's arguments.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// A new call id. Mistral's templates refuse ids that are not nine letters and digits.
    pub fn new_call_id(self) -> String {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        match self {
            ToolFormat::MistralList | ToolFormat::MistralArgs => hex[..9].to_string(),
            _ => format!("call_{}", &hex[..24]),
        }
    }
}

/// How the loaded model is given tools and writes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolStyle {
    pub format: ToolFormat,
    /// The chat template renders tools, calls and results itself; otherwise our system
    /// prompt describes the tools and tool turns are rendered as text.
    pub native: bool,
}

/// The system prompt that offers `tools` to a model whose template does not (the wording of
/// the Hermes 2 Pro and Qwen 2.5 templates, so the form asked for is one models know).
pub fn fallback_prompt(tools: &[ToolSpec]) -> String {
    let mut p = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        p.push('\n');
        p.push_str(&python_json(&t.as_json()));
    }
    p.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    p
}

/// A call in a fallback conversation, as the fallback prompt asks for it.
pub fn fallback_call_text(call: &ToolCall) -> String {
    let arguments = serde_json::from_str::<Value>(&call.arguments)
        .map(|v| python_json(&v))
        .unwrap_or_else(|_| call.arguments.clone());
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>",
        python_json(&json!(call.name))
    )
}

/// A tool's result in a fallback conversation (a user turn, as Hermes templates render it).
pub fn fallback_result_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// JSON as Python's `json.dumps` writes it by default (`", "` and `": "` separators), the
/// form templates print with `tojson`.
pub fn python_json(v: &Value) -> String {
    let mut out = String::new();
    super::template::write_python_json(&mut out, v, None, (", ", ": "), 0);
    out
}

/// How JSON inside a call is laid out (as in constrained replies: `x-guidance`).
fn layout(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A tool's arguments schema as given, or `{"type": "object"}` when it says nothing.
fn arguments_schema(t: &ToolSpec) -> Value {
    match &t.parameters {
        Value::Object(o) if !o.is_empty() => t.parameters.clone(),
        _ => json!({"type": "object"}),
    }
}

/// The schema of one call object (`{"name": …, "<arguments key>": …}`) of any of `tools`.
fn call_schema(format: ToolFormat, tools: &[&ToolSpec]) -> Value {
    let key = format.arguments_key();
    let one = |t: &ToolSpec| {
        json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, key: arguments_schema(t)},
            "required": ["name", key],
            "additionalProperties": false,
        })
    };
    match tools {
        [t] => one(t),
        many => json!({"anyOf": many.iter().map(|t| one(t)).collect::<Vec<_>>()}),
    }
}

/// A literal of a Lark grammar: the special token's id when `text` is one in this
/// vocabulary (text cannot produce a special token), else the quoted text.
fn lark_literal(tokenizer: &TextTokenizer, text: &str) -> String {
    match tokenizer.special_tokens().find(|(_, t)| *t == text) {
        Some((id, _)) => format!("<[{id}]>"),
        None => serde_json::to_string(text).unwrap_or_default(),
    }
}

/// The Lark grammar (llguidance's dialect) of a reply that is only calls, for
/// [`ToolChoice::Required`] and [`ToolChoice::Named`]; `None` for the other choices.
/// Each call's arguments are held to its function's parameter schema.
pub fn call_grammar(style: ToolStyle, use_: &ToolUse, tokenizer: &TextTokenizer) -> Option<String> {
    let tools: Vec<&ToolSpec> = match &use_.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => use_.tools.iter().collect(),
        ToolChoice::Named(n) => use_.tools.iter().filter(|t| &t.name == n).collect(),
    };
    let parallel = use_.parallel && !matches!(use_.choice, ToolChoice::Named(_));
    let lit = |t: &str| lark_literal(tokenizer, t);
    let json = |schema: Value| format!("%json {}", layout(schema));
    let grammar = match style.format {
        ToolFormat::Hermes => format!(
            "start: {calls}\ncall: {open} \"\\n\" {body} \"\\n\" {close}\n",
            calls = if parallel {
                "call (\"\\n\" call)*"
            } else {
                "call"
            },
            open = lit("<tool_call>"),
            close = lit("</tool_call>"),
            body = json(call_schema(style.format, &tools)),
        ),
        // Llama 3 writes one call per reply.
        ToolFormat::Llama3 => format!("start: {}\n", json(call_schema(style.format, &tools))),
        ToolFormat::MistralList => {
            let mut list = json!({
                "type": "array",
                "items": call_schema(style.format, &tools),
                "minItems": 1,
            });
            if !parallel {
                list["maxItems"] = json!(1);
            }
            format!("start: {} {}\n", lit("[TOOL_CALLS]"), json(list))
        }
        ToolFormat::MistralArgs => {
            let alternatives: Vec<String> = tools
                .iter()
                .map(|t| {
                    format!(
                        "{} {} {}",
                        serde_json::to_string(&t.name).unwrap_or_default(),
                        lit("[ARGS]"),
                        json(arguments_schema(t))
                    )
                })
                .collect();
            format!(
                "start: {calls}\ncall: {open} ({alts})\n",
                calls = if parallel { "call+" } else { "call" },
                open = lit("[TOOL_CALLS]"),
                alts = alternatives.join(" | "),
            )
        }
    };
    Some(grammar)
}

/// The grammar of a single tool's arguments (to find which tool a grammar error is about).
pub fn arguments_grammar(t: &ToolSpec) -> String {
    format!("start: %json {}\n", layout(arguments_schema(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_templates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/llama.cpp/models/templates");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .unwrap_or_else(|e| panic!("{name}: {e} (run ./models/fetch-llama-cpp)"))
        };
        for (name, want) in [
            ("Qwen-Qwen2.5-7B-Instruct.jinja", Some(ToolFormat::Hermes)),
            ("Qwen-Qwen3-0.6B.jinja", Some(ToolFormat::Hermes)),
            (
                "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
                Some(ToolFormat::Hermes),
            ),
            (
                "meta-llama-Llama-3.1-8B-Instruct.jinja",
                Some(ToolFormat::Llama3),
            ),
            (
                "meta-llama-Llama-3.2-3B-Instruct.jinja",
                Some(ToolFormat::Llama3),
            ),
            (
                "meta-llama-Llama-3.3-70B-Instruct.jinja",
                Some(ToolFormat::Llama3),
            ),
            (
                "mistralai-Mistral-Nemo-Instruct-2407.jinja",
                Some(ToolFormat::MistralList),
            ),
            (
                "Mistral-Small-3.2-24B-Instruct-2506.jinja",
                Some(ToolFormat::MistralArgs),
            ),
            ("google-gemma-2-2b-it.jinja", None),
            ("microsoft-Phi-3.5-mini-instruct.jinja", None),
        ] {
            assert_eq!(ToolFormat::of_template(&read(name)), want, "{name}");
        }
    }

    #[test]
    fn call_ids() {
        assert_eq!(ToolFormat::MistralList.new_call_id().len(), 9);
        let id = ToolFormat::Hermes.new_call_id();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    }

    #[test]
    fn fallback_texts() {
        let call = ToolCall {
            id: "x".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris","days":[1,2]}"#.into(),
        };
        assert_eq!(
            fallback_call_text(&call),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>"
        );
        let p = fallback_prompt(&[ToolSpec {
            name: "f".into(),
            description: Some("Does f.".into()),
            parameters: json!({"type": "object"}),
        }]);
        assert!(p.contains(
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"Does f.\", \"parameters\": {\"type\": \"object\"}}}\n</tools>"
        ), "{p}");
    }
}
