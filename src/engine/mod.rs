//! The in-process inference engine.
//!
//! One dedicated OS thread owns the model (candle and tokenization never run on a tokio
//! worker). The rest of the server holds an [`EngineHandle`]: cheap to clone, it submits a
//! [`GenerateRequest`] over a bounded channel and gets back a [`Generation`], whose own
//! channel streams [`GenerationEvent`]s. Cancelling (or dropping the receiver) is noticed at
//! every token and between prompt chunks, and frees the engine at once.
//!
//! Pieces: [`gguf`] (file header, model shape), [`tokenizer`] (from the GGUF's metadata,
//! UTF-8-safe deltas), [`template`] (the model's Jinja chat template), [`model`] (the CPU
//! path [`cpu`] on [`kernels`], or candle's [`llama`] on a GPU),
//! [`sampler`], [`stop`] (stop strings), [`worker`] (the thread and its generation loop),
//! [`source`] (model file location: path or Hugging Face), [`bench`].

pub(crate) mod arch;
pub(crate) mod batch;
pub(crate) mod bench;
pub(crate) mod complete;
pub(crate) mod constraint;
pub(crate) mod cpu;
pub(crate) mod gguf;
pub(crate) mod kernels;
pub(crate) mod llama;
pub(crate) mod model;
pub(crate) mod pages;
pub(crate) mod prefix;
pub(crate) mod prompt;
pub(crate) mod sampler;
pub(crate) mod source;
pub(crate) mod stop;
pub(crate) mod team;
pub(crate) mod template;
pub(crate) mod tokenizer;
pub mod tools;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use constraint::Grammar;
pub use kernels::Isa;
pub use sampler::SamplingParams;
pub use tools::{ToolCall, ToolChoice, ToolSpec, ToolStyle, ToolUse};
pub use worker::{load, EngineOptions, LoadedEngine};

/// What the tests reach below the engine's handle: the model file, tokenizer, template and
/// forward pass, checked against llama.cpp's reference outputs. The rest of the engine's
/// modules are private to the crate; this exists only with the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
pub mod testing {
    pub use super::gguf::GgufFile;
    pub use super::llama::Llama;
    pub use super::model::Model;
    pub use super::template::TemplateMessage;
    pub use super::tokenizer::TextTokenizer;
}

use crate::domain::Role;

/// Everything that can go wrong in the engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("model architecture {0:?} is not supported (supported: {supported})", supported = arch::supported())]
    UnsupportedArchitecture(String),
    #[error("model: {0}")]
    Model(String),
    #[error("model file: {0}")]
    Source(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("device: {0}")]
    Device(String),
    #[error("the prompt needs {tokens} tokens but the context holds {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("the sequence is full ({capacity} tokens)")]
    ContextFull { capacity: usize },
    #[error("the engine queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    /// A request's grammar or JSON Schema does not compile (or uses what is not supported).
    #[error("{0}")]
    InvalidGrammar(String),
    /// The grammar engine failed mid-reply.
    #[error("grammar: {0}")]
    Grammar(String),
    /// A tool's parameter schema cannot be enforced (for a required or named tool choice).
    #[error("tool {tool:?}: {message}")]
    InvalidToolSchema { tool: String, message: String },
}

/// Who wrote a message of a conversation the engine continues: a chat's roles, and the
/// results of tool calls (stateless APIs only; chats store no tool turns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    System,
    User,
    Assistant,
    Tool,
}

impl From<Role> for Speaker {
    fn from(r: Role) -> Speaker {
        match r {
            Role::System => Speaker::System,
            Role::User => Speaker::User,
            Role::Assistant => Speaker::Assistant,
        }
    }
}

impl Speaker {
    /// The role as chat templates name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::System => "system",
            Speaker::User => "user",
            Speaker::Assistant => "assistant",
            Speaker::Tool => "tool",
        }
    }
}

/// One message of the conversation to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Speaker,
    pub content: String,
    /// The calls an assistant turn made.
    pub tool_calls: Vec<ToolCall>,
    /// A tool's result: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of text alone.
    pub fn new(role: impl Into<Speaker>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A request to generate the assistant's next message.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The conversation, oldest first; leading system messages are never dropped.
    pub messages: Vec<ChatMessage>,
    /// A prompt continued as written, without the chat template (`/v1/completions`); when
    /// set, `messages` and `tools` are not used.
    pub raw_prompt: Option<String>,
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end the reply (not included in it).
    pub stop: Vec<String>,
    /// The chat this continues: its kept attention state is reused where the prompt
    /// starts with the same tokens, and the state after this reply is kept for the next
    /// turn. `None` for stateless requests.
    pub cache_key: Option<uuid::Uuid>,
    /// What the reply must match (constrained decoding); `None`: free text.
    pub grammar: Option<Grammar>,
    /// Functions the model may call, and whether it must.
    pub tools: Option<ToolUse>,
    /// Report each generated token's log-probability, with this many of the most likely
    /// alternatives; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
}

/// A generated token's log-probability (see [`sampler::logprobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's text (a piece of a character shows as U+FFFD; `bytes` has it whole).
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first: (text, bytes, log-probability).
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// A request whose prompt is built and fits, and whose grammar is compiled: what the engine
/// queue takes. Made only by [`EngineHandle::prepare`], so the engine never sees an
/// unchecked prompt or grammar.
#[derive(Debug)]
pub struct Prepared {
    request: GenerateRequest,
    prompt: prompt::Prompt,
    constraint: Option<constraint::Constraint>,
    /// Special tokens whose text the reply shows (tool-call markers, which a tool-call
    /// parser reads); every other special token is left out of the text.
    shown: Vec<(u32, String)>,
}

impl Prepared {
    /// Oldest history messages left out so that the prompt fits.
    pub fn dropped_messages(&self) -> usize {
        self.prompt.dropped_messages
    }

    /// The prompt's length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.tokens.len()
    }

    /// Most tokens the reply may generate.
    pub fn max_tokens(&self) -> usize {
        self.request.max_tokens
    }
}

/// Compiles the grammar that holds a reply to tool calls; when it does not compile, finds
/// the tool whose parameter schema is at fault.
fn compile_call_grammar(
    grammars: &constraint::LazyGrammars,
    lark: String,
    tools: &[ToolSpec],
) -> Result<constraint::Constraint, EngineError> {
    match grammars.compile(&Grammar::Lark(lark)) {
        Err(EngineError::InvalidGrammar(message)) => {
            for t in tools {
                let alone = Grammar::Lark(tools::arguments_grammar(t));
                if let Err(EngineError::InvalidGrammar(message)) = grammars.compile(&alone) {
                    return Err(EngineError::InvalidToolSchema {
                        tool: t.name.clone(),
                        message,
                    });
                }
            }
            Err(EngineError::InvalidGrammar(message))
        }
        other => other,
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn, or a stop string appeared.
    Stop,
    /// `max_tokens` (or the context) was reached.
    Length,
    Cancelled,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// The outcome of a generation.
#[derive(Debug, Clone)]
pub struct GenerationSummary {
    pub finish_reason: FinishReason,
    /// The whole reply, as streamed.
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Oldest history messages left out so the prompt fits the context.
    pub dropped_messages: usize,
    /// Prompt tokens whose attention state was reused from the chat's previous turn (not
    /// run through the model again).
    pub cached_tokens: usize,
    /// From the engine picking the request up to the first token.
    pub time_to_first_token: Option<Duration>,
    /// Generated tokens per second after the first.
    pub tokens_per_second: f64,
    /// Set when `finish_reason` is `Error`.
    pub error: Option<EngineError>,
    /// Every generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// The stop string the reply ended before, if it ended at one (Anthropic's API says
    /// which).
    pub stop_sequence: Option<String>,
}

/// What a generation reports while it runs.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The prompt is built; processing it starts.
    Started {
        prompt_tokens: usize,
        dropped_messages: usize,
    },
    /// New text; never splits a character, never includes stop strings.
    Delta {
        text: String,
        index: usize,
        /// The tokens sampled since the previous delta, when the request asked for them.
        logprobs: Vec<TokenLogprob>,
    },
    Finished(GenerationSummary),
}

/// Stops a generation from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A running generation: its events and its cancel switch. Dropping `events` cancels too.
pub struct Generation {
    pub events: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
    pub cancel: CancelToken,
}

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// The file name without `.gguf`, as an identifier (lowercase, `-` for spaces): the
    /// model id of the OpenAI-compatible API.
    pub id: String,
    /// When it was loaded, in seconds since the Unix epoch.
    pub loaded_at: u64,
    pub architecture: String,
    /// `Q4_K_M`, `Q8_0`, … (see `ModelSpec::quantization`).
    pub quantization: String,
    /// Values in the model's tensors.
    pub parameters: u64,
    /// Context the engine uses (the model's, or less when configured).
    pub context_length: usize,
    pub load_time: Duration,
    pub device: String,
}

/// A model name as an identifier: lowercase ASCII letters, digits, `.`, `_` and `-`, with
/// every other run of characters turned into one `-`.
pub fn model_id(name: &str) -> String {
    let mut id = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            id.push(c.to_ascii_lowercase());
        } else if !id.ends_with('-') {
            id.push('-');
        }
    }
    let id = id.trim_matches('-');
    if id.is_empty() {
        "model".into()
    } else {
        id.into()
    }
}

/// The cheap, cloneable way to talk to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::SyncSender<worker::Job>,
    pub info: Arc<ModelInfo>,
    /// Sequences generated together: the number of reply slots the chat service hands out.
    max_batch: usize,
    prefixes: prefix::PrefixCache,
    /// Builds prompts on the caller's side of the queue.
    prompts: Arc<prompt::PromptBuilder>,
    /// Compiles grammars, also on the caller's side.
    grammars: constraint::LazyGrammars,
}

impl EngineHandle {
    /// Sequences the engine steps together (`EngineOptions::max_batch`).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Drops the chat's kept attention state (it was edited or deleted).
    pub fn forget_chat(&self, chat: uuid::Uuid) {
        self.prefixes.forget(&chat);
    }

    /// Builds the request's prompt (template, tokenizer, fitting to the context) on a
    /// blocking worker: never on the engine thread, never on a tokio worker. Fails with
    /// [`EngineError::PromptTooLong`] when even the last turn cannot fit.
    pub async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, EngineError> {
        let prompts = self.prompts.clone();
        let grammars = self.grammars.clone();
        tokio::task::spawn_blocking(move || {
            let style = prompts.template.tool_style();
            let mut shown = Vec::new();
            let call_grammar = match &request.tools {
                Some(t) if !t.offered().is_empty() => {
                    shown = prompts
                        .tokenizer
                        .special_tokens()
                        .filter(|(_, text)| style.format.markers().contains(text))
                        .map(|(id, text)| (id, text.to_string()))
                        .collect();
                    tools::call_grammar(style, t, &prompts.tokenizer)
                }
                _ => None,
            };
            let constraint = match (&request.grammar, call_grammar) {
                (Some(g), _) => Some(grammars.compile(g)?),
                (None, Some(lark)) => Some(compile_call_grammar(
                    &grammars,
                    lark,
                    request.tools.as_ref().map_or(&[][..], |t| &t.tools),
                )?),
                (None, None) => None,
            };
            let prompt = match &request.raw_prompt {
                Some(text) => prompts.build_raw(text, request.max_tokens)?,
                None => prompts.build(
                    &request.messages,
                    request.tools.as_ref(),
                    request.max_tokens,
                )?,
            };
            Ok(Prepared {
                request,
                prompt,
                constraint,
                shown,
            })
        })
        .await
        .map_err(|e| EngineError::Model(format!("building the prompt failed: {e}")))?
    }

    /// How the loaded model is given tools and writes calls: what a reply's tool calls are
    /// parsed with.
    pub fn tool_style(&self) -> ToolStyle {
        self.prompts.template.tool_style()
    }

    /// Whether `grammar` compiles for this model ([`EngineError::InvalidGrammar`] says why
    /// not): for checking a chat's `response_format` when it is set, not at its first reply.
    pub async fn check_grammar(&self, grammar: Grammar) -> Result<(), EngineError> {
        let grammars = self.grammars.clone();
        tokio::task::spawn_blocking(move || grammars.compile(&grammar).map(|_| ()))
            .await
            .map_err(|e| EngineError::Model(format!("checking the grammar failed: {e}")))?
    }

    /// Prepares and queues a generation; fails at once when the queue is full.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let prepared = self.prepare(request).await?;
        self.submit(prepared, CancelToken::default())
    }

    /// Queues a prepared generation, stopped by a token the caller already holds (a chat's
    /// reply can be cancelled before it reaches the engine); fails at once when the queue
    /// is full.
    pub fn submit(
        &self,
        request: Prepared,
        cancel: CancelToken,
    ) -> Result<Generation, EngineError> {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let job = worker::Job {
            request,
            events: events_tx,
            cancel: cancel.clone(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => EngineError::QueueFull,
            std::sync::mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
        Ok(Generation { events, cancel })
    }
}

/// Where the model is in its life, as `/readyz` reports it.
#[derive(Clone)]
pub enum ModelStatus {
    /// The server runs without a model: storage-only tests (a test hook, absent from
    /// builds without the `test-hooks` feature).
    #[cfg(feature = "test-hooks")]
    NotConfigured,
    Loading,
    Ready(EngineHandle),
    Failed(String),
}

/// Shared, updatable model status.
#[derive(Clone)]
pub struct ModelSlot(Arc<RwLock<ModelStatus>>);

impl ModelSlot {
    pub fn new(status: ModelStatus) -> ModelSlot {
        ModelSlot(Arc::new(RwLock::new(status)))
    }

    pub fn set(&self, status: ModelStatus) {
        if let Ok(mut s) = self.0.write() {
            *s = status;
        }
    }

    pub fn status(&self) -> ModelStatus {
        self.0
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The engine, when loaded.
    pub fn engine(&self) -> Option<EngineHandle> {
        match self.status() {
            ModelStatus::Ready(h) => Some(h),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn model_ids() {
        use super::model_id;
        assert_eq!(
            model_id("SmolLM2-135M-Instruct.Q4_1"),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(model_id("My Model  (v2)"), "my-model-v2");
        assert_eq!(model_id("??"), "model");
    }
}
