//! Chat templates: the model's own `tokenizer.chat_template` (Jinja), rendered with
//! minijinja the way Hugging Face transformers renders it, with ChatML as the fallback.

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::tools::{ToolFormat, ToolSpec, ToolStyle};
use super::EngineError;

/// The context variable that carries the render's clock to `strftime_now`.
const NOW: &str = "__confab_now";

/// Used when a model carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message as templates see it (Hugging Face's conversation format).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls: `{"id", "type": "function", "function": {"name",
    /// "arguments": {…}}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result: the function that gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl TemplateMessage {
    /// A plain text message.
    pub fn text(role: &str, content: impl Into<String>) -> TemplateMessage {
        TemplateMessage {
            role: role.to_string(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the template's model family writes tool calls, and whether the template
    /// renders tools itself.
    tool_style: ToolStyle,
    /// Whether the template takes a system turn (Gemma's refuses one).
    takes_system: bool,
}

impl ChatTemplate {
    /// Compiles `source` (or ChatML when `None`). transformers renders with
    /// `trim_blocks` and `lstrip_blocks` on, offers `raise_exception`, and templates call
    /// Python string methods (`.strip()`, `.startswith()`), which minijinja-contrib's
    /// pycompat layer provides.
    pub fn new(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, EngineError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // The date templates print (Llama 3.x's "Today Date"): the render's clock, given
        // in the context, so one render reads one instant.
        env.add_function(
            "strftime_now",
            |state: &minijinja::State, fmt: String| -> Result<String, Error> {
                let now = state.lookup(NOW).and_then(|v| v.as_i64()).ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "strftime_now without a clock")
                })?;
                let now = chrono::DateTime::from_timestamp(now, 0)
                    .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "clock out of range"))?;
                Ok(now.format(&fmt).to_string())
            },
        );
        env.add_filter("tojson", tojson);
        let source = source.unwrap_or(CHATML);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                EngineError::Template(format!("the model's chat template does not compile: {e}"))
            })?;
        let mut template = ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            tool_style: ToolStyle {
                format: ToolFormat::Hermes,
                native: false,
            },
            takes_system: true,
        };
        template.takes_system = template
            .render(
                &[
                    TemplateMessage::text("system", "S"),
                    TemplateMessage::text("user", "U"),
                ],
                true,
            )
            .is_ok();
        if let Some(format) = ToolFormat::of_template(source) {
            template.tool_style = ToolStyle {
                format,
                native: template.renders_tools(),
            };
        }
        Ok(template)
    }

    /// How the model is given tools and writes calls.
    pub fn tool_style(&self) -> ToolStyle {
        self.tool_style
    }

    /// Whether the template takes a system turn.
    pub fn takes_system(&self) -> bool {
        self.takes_system
    }

    /// Whether the template shows the model the tools it is given: a probe tool's name
    /// appears in the render.
    fn renders_tools(&self) -> bool {
        const PROBE: &str = "confab_probe_function";
        let tools = [ToolSpec {
            name: PROBE.into(),
            description: Some("Probe.".into()),
            parameters: serde_json::json!({"type": "object", "properties": {}}),
        }];
        let messages = [TemplateMessage::text("user", "Hi")];
        self.render_with_tools(&messages, &tools, true)
            .is_ok_and(|p| p.contains(PROBE))
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_at(messages, None, add_generation_prompt, chrono::Utc::now())
    }

    /// [`Self::render`] with the tools the model may call (in the template's `tools`).
    pub fn render_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tools: Vec<serde_json::Value> = tools.iter().map(ToolSpec::as_json).collect();
        self.render_at(
            messages,
            Some(&tools).filter(|t| !t.is_empty()).map(|t| t.as_slice()),
            add_generation_prompt,
            chrono::Utc::now(),
        )
    }

    /// [`Self::render`] as of `now` (the date templates print).
    ///
    /// The context is what transformers' `apply_chat_template` gives a template: `tools`
    /// (none when there are none) and `documents` are defined as none (templates test
    /// `tools is not none`, which an undefined value would pass).
    pub fn render_at(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools.map(minijinja::value::Serde),
            documents => minijinja::Value::from(()),
            __confab_now => now.timestamp(),
        })
        .map_err(|e| EngineError::Template(format!("rendering the chat template failed: {e}")))
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps` with `ensure_ascii=False`
/// (`", "` and `": "` between items, or newlines and `indent` spaces), keys in their order
/// unless `sort_keys`. minijinja's own `tojson` writes compact, HTML-escaped JSON, which
/// would put other text in prompts than the model was trained on.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        sort_json_keys(&mut json);
    }
    let default = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    let seps = match &separators {
        Some(s) if s.len() == 2 => (s[0].as_str(), s[1].as_str()),
        _ => default,
    };
    let mut out = String::new();
    write_python_json(&mut out, &json, indent, seps, 0);
    Ok(out)
}

fn sort_json_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.sort_keys();
            o.values_mut().for_each(sort_json_keys);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

/// Writes `v` as Python's `json.dumps(v, ensure_ascii=False, indent=…, separators=…)`.
pub(crate) fn write_python_json(
    out: &mut String,
    v: &serde_json::Value,
    indent: Option<usize>,
    (item, key): (&str, &str),
    level: usize,
) {
    use serde_json::Value;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                write_python_json(out, x, indent, (item, key), level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(key);
                write_python_json(out, x, indent, (item, key), level + 1);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<TemplateMessage> {
        pairs
            .iter()
            .map(|(r, c)| TemplateMessage::text(r, *c))
            .collect()
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, "", "<|im_end|>").unwrap();
        let p = t
            .render(&msgs(&[("system", "S"), ("user", "U")]), true)
            .unwrap();
        assert_eq!(p, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
        let p = t.render(&msgs(&[("user", "U")]), false).unwrap();
        assert_eq!(p, "<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn hf_conventions() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n  {{ m.content.strip() }}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(Some(src), "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "  hi  ")]), false).unwrap(),
            "<s>  hi</s>"
        );
        let e = t.render(&msgs(&[("tool", "x")]), false).unwrap_err();
        assert!(e.to_string().contains("no tools"), "{e}");
    }

    /// Templates that render tools are given them; the others (and ChatML) get the
    /// fallback prompt and the Hermes form.
    #[test]
    fn tool_styles() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/llama.cpp/models/templates");
        for (name, format, native) in [
            ("Qwen-Qwen2.5-7B-Instruct.jinja", ToolFormat::Hermes, true),
            (
                "meta-llama-Llama-3.1-8B-Instruct.jinja",
                ToolFormat::Llama3,
                true,
            ),
            (
                "mistralai-Mistral-Nemo-Instruct-2407.jinja",
                ToolFormat::MistralList,
                true,
            ),
            (
                "Mistral-Small-3.2-24B-Instruct-2506.jinja",
                ToolFormat::MistralArgs,
                true,
            ),
            ("google-gemma-2-2b-it.jinja", ToolFormat::Hermes, false),
        ] {
            let source = std::fs::read_to_string(dir.join(name))
                .unwrap_or_else(|e| panic!("{name}: {e} (run ./models/fetch-llama-cpp)"));
            let t = ChatTemplate::new(Some(&source), "<s>", "</s>").unwrap();
            assert_eq!(t.tool_style(), ToolStyle { format, native }, "{name}");
        }
        let chatml = ChatTemplate::new(None, "", "<|im_end|>").unwrap();
        assert!(!chatml.tool_style().native && chatml.takes_system());
        let gemma = std::fs::read_to_string(dir.join("google-gemma-2-2b-it.jinja")).unwrap();
        assert!(!ChatTemplate::new(Some(&gemma), "<bos>", "<eos>")
            .unwrap()
            .takes_system());
    }

    #[test]
    fn broken_template_is_refused() {
        assert!(ChatTemplate::new(Some("{% for %}"), "", "").is_err());
    }

    /// Every template of a supported family (llama.cpp's copies of the models' own
    /// templates) renders exactly as Python jinja2 renders it with transformers' settings,
    /// on fixed conversations: `tests/fixtures/templates.json`, made by
    /// `tests/fixtures/make-templates.py`. A template that refuses a conversation (Gemma's
    /// "System role not supported") refuses it here too.
    #[test]
    fn templates_render_as_jinja2_does() {
        #[derive(serde::Deserialize)]
        struct Case {
            messages: Vec<TemplateMessage>,
            #[serde(default)]
            tools: Option<Vec<serde_json::Value>>,
            add_generation_prompt: bool,
            rendered: Option<String>,
            error: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Fixture {
            template: String,
            bos_token: String,
            eos_token: String,
            cases: Vec<Case>,
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let json = std::fs::read_to_string(root.join("tests/fixtures/templates.json")).unwrap();
        let fixtures: Vec<Fixture> = serde_json::from_str(&json).unwrap();
        assert!(fixtures.len() >= 14);
        let now = chrono::NaiveDate::from_ymd_opt(2026, 7, 26)
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc();
        for f in &fixtures {
            let path = root
                .join("models/llama.cpp/models/templates")
                .join(&f.template);
            let source = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (run ./models/fetch-llama-cpp)", path.display())
            });
            let t = ChatTemplate::new(Some(&source), &f.bos_token, &f.eos_token)
                .unwrap_or_else(|e| panic!("{}: {e}", f.template));
            for (i, c) in f.cases.iter().enumerate() {
                let got = t.render_at(
                    &c.messages,
                    c.tools.as_deref(),
                    c.add_generation_prompt,
                    now,
                );
                match (&c.rendered, &c.error, got) {
                    (Some(want), _, Ok(got)) => {
                        assert_eq!(&got, want, "{} case {i}", f.template)
                    }
                    (None, Some(want), Err(e)) => assert!(
                        e.to_string().contains(want.as_str()),
                        "{} case {i}: {e} vs {want}",
                        f.template
                    ),
                    (_, _, got) => panic!(
                        "{} case {i}: jinja2 gave {:?} / {:?}, minijinja {got:?}",
                        f.template, c.rendered, c.error
                    ),
                }
            }
        }
    }
}
