//! What the stateless generation APIs (OpenAI's and Anthropic's) share, so that both refuse,
//! queue, limit and count alike: the request's prompt is built first (one that cannot fit is
//! refused before it costs anything), its tokens are held against the tenant's and user's
//! budgets, it waits for a generation slot in the same per-tenant queues as chat replies,
//! and it runs to its end on its own task, which records the usage whether or not the
//! client stays (a client that leaves cancels it). Each API only reads its own wire format
//! and writes the [`Piece`]s in its own.

use poem::Request;
use serde_json::json;
use tokio::sync::mpsc;

use super::auth::Caller;
use super::middleware::Authenticated;
use super::AppState;
use crate::chat::budget::Hold;
use crate::chat::{ChatService, Slot};
use crate::domain::ValidationError;
use crate::engine::{
    EngineError, EngineHandle, GenerateRequest, Generation, GenerationEvent, GenerationSummary,
    Prepared, TokenLogprob,
};
use crate::error::ApiError;

/// A request field that is wrong: `field` is its path, `rule` what it must be.
pub fn invalid(field: &str, message: impl Into<String>, rule: serde_json::Value) -> ApiError {
    ApiError::Validation(ValidationError::new(field, message, rule))
}

/// A request field asking for what this server does not do: refused by name, never
/// silently ignored.
pub fn unsupported(field: &str, what: &str) -> ApiError {
    invalid(
        field,
        format!("is not supported by this server ({what})"),
        json!({"supported": false}),
    )
}

/// A setting outside its bounds (`domain::generation`, shared with chats' config).
pub fn within(
    field: &str,
    v: Option<f64>,
    bound: crate::domain::generation::FloatBound,
) -> Result<(), ApiError> {
    match v {
        Some(x) => bound.check(field, x).map_err(ApiError::Validation),
        None => Ok(()),
    }
}

/// A request body as `T`, with the path of a field of the wrong type in the error.
pub fn read<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::InvalidJson {
                reason: inner.to_string(),
                line: inner.line(),
                column: inner.column(),
            };
        }
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        let message = inner.to_string();
        // serde's message ends with " at line L column C", which says nothing useful here.
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m)
            .to_string();
        invalid(&field, message, json!({}))
    })
}

/// The caller of a `/v1` request, which the middleware authenticated before it got here.
pub fn caller_of(req: &Request) -> Result<Caller, ApiError> {
    req.extensions()
        .get::<Authenticated>()
        .map(|a| a.0.clone())
        .ok_or(ApiError::Internal)
}

/// The loaded model's engine, or why there is none yet.
pub fn engine_of(state: &AppState) -> Result<EngineHandle, ApiError> {
    state.model.engine().ok_or(ApiError::ModelNotReady)
}

/// Requests name the model they want; only the loaded one is served.
pub fn check_model(engine: &EngineHandle, model: &str) -> Result<(), ApiError> {
    if model == engine.info.id {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound {
            model: model.to_string(),
            available: vec![engine.info.id.clone()],
        })
    }
}

/// Whose usage a request is: a user token's requests are its user's (`named` may only
/// name that user, or be `anonymous`, the API's name for none); a tenant key's, the one
/// the request names.
pub fn user_of(caller: &Caller, named: String, anonymous: &str) -> Result<String, ApiError> {
    match &caller.user {
        Some(u) => {
            if named != anonymous {
                caller.may_act_for(&named)?;
            }
            Ok(u.clone())
        }
        None => Ok(named),
    }
}

/// The length in tokens of `request`'s prompt, refused as a generation would be when it
/// cannot fit; nothing is generated.
pub async fn count_prompt(
    engine: &EngineHandle,
    request: GenerateRequest,
    grammar_field: &'static str,
) -> Result<usize, ApiError> {
    let refusals = Refusals::of(engine, &request, grammar_field);
    Ok(prepare(engine, request, &refusals).await?.prompt_tokens())
}

/// Builds the request's prompt, refused when it cannot fit: before the request takes a
/// reply slot or reaches the engine, so a prompt that is too long costs its sender only.
async fn prepare(
    engine: &EngineHandle,
    request: GenerateRequest,
    refusals: &Refusals,
) -> Result<Prepared, ApiError> {
    let prepared = engine
        .prepare(request)
        .await
        .map_err(|e| refusals.word(e))?;
    if prepared.dropped_messages() > 0 {
        // The engine keeps a chat going by leaving out its oldest turns; a stateless client
        // sent exactly the conversation it wants answered.
        return Err(refusals.too_long());
    }
    Ok(prepared)
}

/// What the generation task hands the request handler.
pub enum Piece {
    Started,
    Delta(String, Vec<TokenLogprob>),
    Done(GenerationSummary),
}

/// How the engine's refusals of one request are worded.
#[derive(Debug, Clone, Copy)]
pub struct Refusals {
    /// The field that set the request's grammar, named when it cannot be enforced.
    pub grammar_field: &'static str,
    /// The reply's token limit and the model's context, named when the prompt and the
    /// reply do not fit together.
    pub max_tokens: usize,
    pub context: usize,
}

impl Refusals {
    /// How `request`'s refusals are worded; `grammar_field` set its grammar, if any.
    fn of(engine: &EngineHandle, request: &GenerateRequest, grammar_field: &'static str) -> Self {
        Refusals {
            grammar_field,
            max_tokens: request.max_tokens,
            context: engine.info.context_length,
        }
    }

    pub fn word(&self, e: EngineError) -> ApiError {
        match e {
            EngineError::PromptTooLong { .. } | EngineError::ContextFull { .. } => self.too_long(),
            EngineError::InvalidGrammar(m) => ApiError::unenforceable(self.grammar_field, m),
            other => other.into(),
        }
    }

    fn too_long(&self) -> ApiError {
        ApiError::ContextLengthExceeded {
            max_tokens: self.max_tokens,
            context: self.context,
        }
    }
}

/// A generation under way.
pub struct Running {
    first: Option<Piece>,
    pieces: mpsc::UnboundedReceiver<Piece>,
    /// The prompt's length in tokens.
    pub prompt_tokens: usize,
}

impl Running {
    /// The next piece; `None` when the engine stopped without a summary.
    pub async fn next(&mut self) -> Option<Piece> {
        match self.first.take() {
            Some(p) => Some(p),
            None => self.pieces.recv().await,
        }
    }

    /// Waits for a whole reply's end: its summary, or its error.
    pub async fn finish(mut self) -> Result<GenerationSummary, ApiError> {
        let mut summary = loop {
            match self.next().await {
                Some(Piece::Done(s)) => break s,
                Some(_) => {}
                None => return Err(ApiError::GenerationFailed("the engine stopped".into())),
            }
        };
        match summary.error.take() {
            Some(e) => Err(e.into()),
            None => Ok(summary),
        }
    }
}

/// Prepares, admits and starts `request` for `caller`, counting it under `user`; returns
/// once the engine has taken it (or refused it: a refusal is an error here, not a piece).
pub async fn start(
    state: &AppState,
    engine: &EngineHandle,
    caller: Caller,
    user: String,
    request: GenerateRequest,
    grammar_field: &'static str,
) -> Result<Running, ApiError> {
    let refusals = Refusals::of(engine, &request, grammar_field);
    let prepared = prepare(engine, request, &refusals).await?;
    let prompt_tokens = prepared.prompt_tokens();
    // Held against the budgets until the completion's usage is recorded.
    let hold = state
        .chat
        .hold_budget(caller.tenant, &user, prompt_tokens + prepared.max_tokens())
        .await?;
    let slot = state.chat.acquire(caller.tenant).await?;
    let generation = engine.submit(prepared, slot.cancel.clone())?;
    let mut pieces = drive(state.chat.clone(), caller, user, (slot, hold), generation);
    let first = match pieces.recv().await {
        Some(Piece::Started) => None,
        Some(Piece::Done(s)) if s.error.is_some() => {
            return Err(refusals.word(s.error.unwrap_or(EngineError::Stopped)))
        }
        Some(p) => Some(p),
        None => return Err(ApiError::GenerationFailed("the engine stopped".into())),
    };
    Ok(Running {
        first,
        pieces,
        prompt_tokens,
    })
}

/// Runs the generation to its end on its own task, holding the slot, and counts its
/// tokens, whether or not the client stays: a client that leaves only cancels it.
fn drive(
    chat: ChatService,
    caller: Caller,
    user: String,
    held: (Slot, Option<Hold>),
    mut generation: Generation,
) -> mpsc::UnboundedReceiver<Piece> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The hold goes after the usage is recorded (below), with the slot.
        let _held = held;
        let mut gaps = crate::metrics::TokenGaps::default();
        while let Some(event) = generation.events.recv().await {
            let piece = match event {
                GenerationEvent::Started { .. } => Piece::Started,
                GenerationEvent::Delta { text, logprobs, .. } => {
                    gaps.tick();
                    Piece::Delta(text, logprobs)
                }
                GenerationEvent::Finished(summary) => {
                    chat.account(
                        caller.tenant,
                        &user,
                        caller.key_id,
                        summary.prompt_tokens,
                        summary.completion_tokens,
                        summary.time_to_first_token,
                    )
                    .await;
                    let _ = tx.send(Piece::Done(summary));
                    return;
                }
            };
            if tx.send(piece).is_err() {
                generation.cancel.cancel();
            }
        }
    });
    rx
}
