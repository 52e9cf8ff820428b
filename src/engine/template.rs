//! Chat templates: the model's own `tokenizer.chat_template` (Jinja), rendered with
//! minijinja the way Hugging Face transformers renders it, with ChatML as the fallback.

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use super::EngineError;

/// Used when a model carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One message as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
        env.add_function("strftime_now", |fmt: String| -> String {
            chrono::Utc::now().format(&fmt).to_string()
        });
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
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
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
}
