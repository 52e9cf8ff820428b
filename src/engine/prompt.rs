//! Prompts: a conversation rendered with the model's chat template and tokenized, fitted to
//! the context by leaving out the oldest turns.
//!
//! This runs before a request is queued, on a blocking worker ([`super::EngineHandle::prepare`]),
//! never on the engine thread: a long prompt costs the request that sent it, not the replies
//! streaming meanwhile. It is the one place prompts are checked, for chats and the OpenAI API
//! alike. The work is bounded before anything is rendered: a text of `n` bytes needs at least
//! `n / max_token_bytes` tokens, so messages that cannot fit are never rendered or tokenized,
//! and a prompt that cannot fit at all is refused at the cost of summing lengths.

use std::sync::Arc;

use super::template::{ChatTemplate, TemplateMessage};
use super::tokenizer::TextTokenizer;
use super::tools::{self, ToolSpec, ToolUse};
use super::{ChatMessage, EngineError, Speaker};

/// A conversation's prompt, ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Oldest history messages left out so that the prompt fits.
    pub dropped_messages: usize,
    /// Tokens that may be generated: `max_tokens`, or less when even the shortest prompt
    /// leaves less room.
    pub max_new: usize,
}

/// Renders and tokenizes prompts; shared by the engine handle's callers.
pub struct PromptBuilder {
    pub tokenizer: Arc<TextTokenizer>,
    pub template: ChatTemplate,
    pub context_length: usize,
}

impl PromptBuilder {
    /// The prompt for `messages` (offering the model `tools`), leaving out the oldest
    /// messages (never the leading system messages) until prompt + `max_tokens` fits the
    /// context.
    pub fn build(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolUse>,
        max_tokens: usize,
    ) -> Result<Prompt, EngineError> {
        let offered = tools.map_or(&[][..], ToolUse::offered);
        let max_tokens = max_tokens.max(1);
        let n_system = messages
            .iter()
            .take_while(|m| m.role == Speaker::System)
            .count();
        let (system, history) = messages.split_at(n_system);
        // A prompt may start at any user message (or at the very beginning).
        let mut starts: Vec<usize> = (0..history.len())
            .filter(|&i| i == 0 || history[i].role == Speaker::User)
            .collect();
        if starts.is_empty() {
            starts.push(0);
        }
        // Lower bounds on the tokens of each candidate prompt, from content lengths alone.
        let per_token = self.tokenizer.max_token_bytes.max(1);
        let system_bytes: usize = system.iter().map(|m| m.content.len()).sum();
        let mut suffix_bytes = vec![0usize; history.len() + 1];
        for i in (0..history.len()).rev() {
            suffix_bytes[i] = suffix_bytes[i + 1] + history[i].content.len();
        }
        let at_least = |start: usize| (system_bytes + suffix_bytes[start]) / per_token;
        let last = *starts.last().unwrap_or(&0);
        if at_least(last) >= self.context_length {
            return Err(EngineError::PromptTooLong {
                tokens: at_least(last),
                context: self.context_length,
            });
        }
        // Starts whose bound already overflows are never rendered.
        let first = starts
            .iter()
            .position(|&s| at_least(s) + max_tokens <= self.context_length)
            .unwrap_or(starts.len() - 1);
        let starts = &starts[first..];
        let render = |start: usize| -> Result<Vec<u32>, EngineError> {
            let msgs: Vec<&ChatMessage> = system.iter().chain(&history[start..]).collect();
            let text = if self.template.tool_style().native {
                let msgs: Vec<TemplateMessage> = msgs.iter().map(|m| self.native(m)).collect();
                self.template.render_with_tools(&msgs, offered, true)?
            } else {
                self.template.render(&self.fallback(&msgs, offered), true)?
            };
            self.tokenizer.encode_prompt(&text)
        };
        let fits = |ids: &[u32]| ids.len() + max_tokens <= self.context_length;
        let full = render(starts[0])?;
        if fits(&full) {
            return Ok(Prompt {
                tokens: full,
                dropped_messages: starts[0],
                max_new: max_tokens,
            });
        }
        // Fewer messages never make a longer prompt: binary search for the earliest start
        // that fits, keeping at least the last user turn. When none fits, the search has
        // rendered the last start (its final probe), which is kept for the answer below.
        let (mut lo, mut hi) = (1, starts.len() - 1);
        let mut best: Option<(usize, Vec<u32>)> = None;
        let mut shortest = None;
        while lo <= hi {
            let mid = (lo + hi) / 2;
            let ids = render(starts[mid])?;
            if fits(&ids) {
                best = Some((mid, ids));
                hi = mid - 1;
            } else if mid == starts.len() - 1 {
                shortest = Some(ids);
                lo = mid + 1;
            } else {
                lo = mid + 1;
            }
        }
        match best {
            Some((i, tokens)) => Ok(Prompt {
                tokens,
                dropped_messages: starts[i],
                max_new: max_tokens,
            }),
            None => {
                let ids = match shortest {
                    Some(ids) => ids,
                    // One candidate start: `full` is its render.
                    None => full,
                };
                self.squeezed(ids, last, max_tokens)
            }
        }
    }

    /// `tokens` as the prompt, the reply's limit shrunk to the room the context leaves;
    /// refused when it leaves none.
    fn squeezed(
        &self,
        tokens: Vec<u32>,
        dropped_messages: usize,
        max_tokens: usize,
    ) -> Result<Prompt, EngineError> {
        if tokens.len() >= self.context_length {
            return Err(EngineError::PromptTooLong {
                tokens: tokens.len(),
                context: self.context_length,
            });
        }
        let max_new = max_tokens.max(1).min(self.context_length - tokens.len());
        Ok(Prompt {
            tokens,
            dropped_messages,
            max_new,
        })
    }
}

impl PromptBuilder {
    /// The prompt for a text continued as written (special-token text in it becomes the
    /// special tokens, as llama-server reads a completion prompt); `max_new` shrinks to the
    /// room left, and a text that cannot fit is refused before it is tokenized.
    pub fn build_raw(&self, text: &str, max_tokens: usize) -> Result<Prompt, EngineError> {
        let at_least = text.len() / self.tokenizer.max_token_bytes.max(1);
        if at_least >= self.context_length {
            return Err(EngineError::PromptTooLong {
                tokens: at_least,
                context: self.context_length,
            });
        }
        self.squeezed(self.tokenizer.encode(text)?, 0, max_tokens)
    }

    /// A message for a template that renders tool calls and results itself.
    fn native(&self, m: &ChatMessage) -> TemplateMessage {
        let mut t = TemplateMessage::text(m.role.as_str(), self.tokenizer.escape(&m.content));
        if !m.tool_calls.is_empty() {
            t.tool_calls = Some(m.tool_calls.iter().map(|c| c.as_template_json()).collect());
        }
        t.tool_call_id = m.tool_call_id.clone();
        t
    }

    /// The conversation for a template that knows no tools: the tools described in the
    /// system prompt (or, where the template takes no system turn, before the first user
    /// turn), calls written out as the prompt asks for them, and results as user turns
    /// (consecutive results in one).
    fn fallback(&self, messages: &[&ChatMessage], offered: &[ToolSpec]) -> Vec<TemplateMessage> {
        let escape = |s: &str| self.tokenizer.escape(s).into_owned();
        let mut out: Vec<TemplateMessage> = Vec::with_capacity(messages.len() + 1);
        let mut last_was_result = false;
        for m in messages {
            let (role, content) = match m.role {
                Speaker::Tool => ("user", escape(&tools::fallback_result_text(&m.content))),
                Speaker::Assistant if !m.tool_calls.is_empty() => {
                    let mut text = escape(&m.content);
                    for c in &m.tool_calls {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&escape(&tools::fallback_call_text(c)));
                    }
                    ("assistant", text)
                }
                other => (other.as_str(), escape(&m.content)),
            };
            match out.last_mut() {
                Some(prev) if last_was_result && m.role == Speaker::Tool => {
                    prev.content.push('\n');
                    prev.content.push_str(&content);
                }
                _ => out.push(TemplateMessage::text(role, content)),
            }
            last_was_result = m.role == Speaker::Tool;
        }
        if !offered.is_empty() {
            let prompt = escape(&tools::fallback_prompt(offered));
            match out.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content.push_str("\n\n");
                    first.content.push_str(&prompt);
                }
                _ if self.template.takes_system() => {
                    out.insert(0, TemplateMessage::text("system", prompt))
                }
                _ => {
                    if let Some(user) = out.iter_mut().find(|m| m.role == "user") {
                        user.content = format!("{prompt}\n\n{}", user.content);
                    }
                }
            }
        }
        out
    }
}
