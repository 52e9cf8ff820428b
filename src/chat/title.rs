//! Titles for chats created without one: after a chat's first reply, the model writes a short
//! title in the background — a small greedy generation held to one line by a grammar, in a
//! slot granted only when no reply waits (`Scheduler`'s background queue) — and the sockets of
//! the chat, on every replica, get a `chat_updated` event. A title set by the client is never replaced: the
//! store writes the generated one only while the chat still has none.

use uuid::Uuid;

use super::ChatService;
use crate::domain::Role;
use crate::engine::{ChatMessage, GenerateRequest, GenerationEvent, Grammar, SamplingParams};
use crate::store::TenantId;

/// Longest title kept, in characters (titles are cut at a word).
pub const MAX_TITLE_CHARS: usize = 80;
/// How much of the question and of the reply the model is shown, in characters.
const EXCERPT_CHARS: usize = 1500;

/// What the title is made from and who pays for its tokens.
#[derive(Debug, Clone)]
pub(super) struct TitleJob {
    pub tenant: TenantId,
    pub chat_id: Uuid,
    pub user_id: String,
    pub key_id: Uuid,
    pub question: String,
    pub answer: String,
}

fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(EXCERPT_CHARS).collect();
    if s.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    out
}

fn request(job: &TitleJob, max_tokens: u32) -> GenerateRequest {
    let instruction = format!(
        "Write a short title (at most six words) for this conversation. Reply with the \
         title only.\n\nUser: {}\n\nAssistant: {}",
        excerpt(&job.question),
        excerpt(&job.answer)
    );
    GenerateRequest {
        messages: vec![
            ChatMessage::new(Role::System, "You name conversations."),
            ChatMessage::new(Role::User, instruction),
        ],
        sampling: SamplingParams::greedy(),
        max_tokens: max_tokens.max(1) as usize,
        stop: vec!["\n".into()],
        cache_key: None,
        // One line without quotes.
        grammar: Some(Grammar::Lark(format!(
            "start: TITLE\nTITLE: /[^\\r\\n\"]{{1,{MAX_TITLE_CHARS}}}/\n"
        ))),
        tools: None,
        logprobs: None,
        raw_prompt: None,
    }
}

/// The model's line as a title: no label, quotes, Markdown marks or final period; spaces
/// collapsed; at most [`MAX_TITLE_CHARS`], cut at a word. `None` when nothing is left.
pub fn clean_title(raw: &str) -> Option<String> {
    let mut t = raw.lines().next().unwrap_or_default().trim();
    for label in ["title:", "Title:", "TITLE:"] {
        if let Some(rest) = t.strip_prefix(label) {
            t = rest.trim();
        }
    }
    let t = t.trim_matches(|c: char| "\"'“”‘’*#`_".contains(c) || c.is_whitespace());
    let t = t.trim_end_matches(['.', ':', ';', ',']);
    let words: Vec<&str> = t.split_whitespace().collect();
    let mut out = String::new();
    for w in words {
        let len = out.chars().count() + usize::from(!out.is_empty()) + w.chars().count();
        if len > MAX_TITLE_CHARS {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    if out.is_empty() {
        // One word longer than the limit: cut it.
        out = t.chars().take(MAX_TITLE_CHARS).collect();
    }
    let out = out.chars().filter(|c| !c.is_control()).collect::<String>();
    (!out.trim().is_empty()).then(|| out.trim().to_string())
}

impl ChatService {
    /// Writes a title for the chat of `job` in the background, at the lowest priority.
    pub(super) fn title_later(&self, job: TitleJob) {
        let service = self.clone();
        tokio::spawn(async move {
            if let Err(why) = service.make_title(job).await {
                tracing::debug!(%why, "no title written");
            }
        });
    }

    async fn make_title(&self, job: TitleJob) -> Result<(), String> {
        let slot = self
            .acquire_background(job.tenant)
            .await
            .ok_or("no background slot")?;
        let engine = self.0.model.engine().ok_or("the model is not loaded")?;
        let prepared = engine
            .prepare(request(&job, self.0.settings.title_max_tokens))
            .await
            .map_err(|e| e.to_string())?;
        let mut generation = engine
            .submit(prepared, slot.cancel.clone())
            .map_err(|e| e.to_string())?;
        let mut summary = None;
        while let Some(event) = generation.events.recv().await {
            if let GenerationEvent::Finished(s) = event {
                summary = Some(s);
            }
        }
        drop(slot);
        let summary = summary.ok_or("the generation ended without a summary")?;
        // Its tokens are the tenant's, like any other.
        self.account(
            job.tenant,
            &job.user_id,
            job.key_id,
            summary.prompt_tokens,
            summary.completion_tokens,
            None,
        )
        .await;
        let title = clean_title(&summary.text).ok_or("the model wrote no title")?;
        let written = self
            .0
            .store
            .tenant(job.tenant)
            .set_title_if_unset(job.chat_id, &title)
            .await
            .map_err(|e| e.to_string())?;
        if !written {
            return Err("the chat has a title already".into());
        }
        self.chat_titled(job.tenant, job.chat_id, title);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_cleaned_and_bounded() {
        assert_eq!(
            clean_title("Title: \"Paris Trip Plans.\"").as_deref(),
            Some("Paris Trip Plans")
        );
        assert_eq!(
            clean_title("  **Baking   bread**  ").as_deref(),
            Some("Baking bread")
        );
        assert_eq!(clean_title("# Heading\nmore").as_deref(), Some("Heading"));
        assert_eq!(clean_title("\"\""), None);
        assert_eq!(clean_title("   "), None);
        let long = "word ".repeat(40);
        let t = clean_title(&long).unwrap();
        assert!(
            t.chars().count() <= MAX_TITLE_CHARS && t.ends_with("word"),
            "{t}"
        );
        let one = "x".repeat(200);
        assert_eq!(clean_title(&one).unwrap().chars().count(), MAX_TITLE_CHARS);
    }
}
