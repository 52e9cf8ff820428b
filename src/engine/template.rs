//! Chat templates: the model's own `tokenizer.chat_template` (Jinja), rendered with
//! minijinja the way Hugging Face transformers renders it, with ChatML as the fallback.

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// The context variable that carries the render's clock to `strftime_now`.
const NOW: &str = "__confab_now";

/// Used when a model carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
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
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| {
                EngineError::Template(format!("the model's chat template does not compile: {e}"))
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_at(messages, add_generation_prompt, chrono::Utc::now())
    }

    /// [`Self::render`] as of `now` (the date templates print).
    ///
    /// The context is what transformers' `apply_chat_template` gives a template: `tools`
    /// and `documents` are defined as none (templates test `tools is not none`, which an
    /// undefined value would pass).
    pub fn render_at(
        &self,
        messages: &[TemplateMessage],
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
            tools => minijinja::Value::from(()),
            documents => minijinja::Value::from(()),
            __confab_now => now.timestamp(),
        })
        .map_err(|e| EngineError::Template(format!("rendering the chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<TemplateMessage> {
        pairs
            .iter()
            .map(|(r, c)| TemplateMessage {
                role: r.to_string(),
                content: c.to_string(),
            })
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
                let got = t.render_at(&c.messages, c.add_generation_prompt, now);
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
