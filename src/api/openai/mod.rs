//! The OpenAI-compatible API: `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (a prompt continued as written,
//! without the chat template), streamed as server-sent events or whole.
//!
//! Stateless, as OpenAI clients expect: the conversation comes in the request and nothing
//! is stored but the token usage. Authentication (`Authorization: Bearer <key>` or
//! `X-API-Key`) and the tenant's request quota are the middleware's, as for `/api`; budgets,
//! queues and usage are [`super::stateless`]'s, shared with the Anthropic API, so a
//! generation waits in the same per-tenant queues as chat replies and every API shares one
//! engine fairly. Errors have OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`), with our stable code as `code`.

pub mod wire;

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use poem::http::{HeaderValue, StatusCode};
use poem::web::sse::{Event as SseEvent, SSE};
use poem::web::{Data, Json, Path};
use poem::{Body, IntoResponse, Request, Response};
use serde_json::{json, Value};

use super::stateless::{self, caller_of, check_model, engine_of, Piece, Running};
use super::AppState;
use crate::engine::tools::parse::{parse_reply, ToolCallParser, ToolEvent};
use crate::engine::tools::ToolFormat;
use crate::engine::{EngineHandle, TokenLogprob};
use crate::error::ApiError;
use wire::{Chunk, ChunkChoice, Delta, FunctionDelta, ToolCallDelta, UsageOut};

/// An error on an OpenAI route: our error, in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<crate::chat::ChatError> for OpenAiError {
    fn from(e: crate::chat::ChatError) -> Self {
        OpenAiError(e.into())
    }
}

impl OpenAiError {
    /// OpenAI's error `type` for our status.
    fn kind(&self) -> &'static str {
        if matches!(self.0, ApiError::QuotaExceeded(_)) {
            return "insufficient_quota";
        }
        match self.0.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body: OpenAI's four fields, plus our `details`.
    pub fn body(&self) -> Value {
        let e = &self.0;
        let message = match e {
            ApiError::MissingApiKey => "This endpoint needs the tenant API key as `Authorization: Bearer <key>` (or in the X-API-Key header).".to_string(),
            other => other.message(),
        };
        let param = match e {
            ApiError::Validation(v) => Some(v.field.clone()),
            ApiError::InvalidParameter { name, .. } => Some(name.clone()),
            ApiError::ModelNotFound { .. } => Some("model".into()),
            _ => None,
        };
        json!({"error": {
            "message": message,
            "type": self.kind(),
            "param": param,
            // OpenAI's clients know a spent budget by this code.
            "code": match e {
                ApiError::QuotaExceeded(_) => "insufficient_quota",
                other => other.code(),
            },
            "details": e.details(),
        }})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut resp = Json(self.body())
            .with_status(self.0.status())
            .into_response();
        self.0.add_headers(&mut resp);
        if self.0.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type Result<T> = std::result::Result<T, OpenAiError>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The loaded model as both OpenAI's clients (`object`, `created`, `owned_by`) and
/// Anthropic's (`type`, `display_name`, `created_at`) read a model, so one route serves both.
fn model_object(engine: &EngineHandle) -> Value {
    let created_at = chrono::DateTime::from_timestamp(engine.info.loaded_at as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    json!({
        "id": engine.info.id,
        "object": "model",
        "created": engine.info.loaded_at,
        "owned_by": "confab",
        "type": "model",
        "display_name": engine.info.id,
        "created_at": created_at,
        // What llama-server reports under `meta`: enough to tell which file is loaded.
        "meta": {
            "architecture": engine.info.architecture,
            "quantization": engine.info.quantization,
            "parameters": engine.info.parameters,
            "context_length": engine.info.context_length,
        },
    })
}

/// An answer or its error, as the response.
fn respond(r: Result<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/models`: the loaded model, in a list both OpenAI's and Anthropic's clients page
/// through.
#[poem::handler]
pub async fn models(req: &Request, state: Data<&AppState>) -> Response {
    respond(list_models(req, &state))
}

fn list_models(req: &Request, state: &AppState) -> Result<Response> {
    caller_of(req)?;
    let engine = engine_of(state)?;
    let id = &engine.info.id;
    Ok(
        Json(json!({"object": "list", "data": [model_object(&engine)],
        "has_more": false, "first_id": id, "last_id": id}))
        .into_response(),
    )
}

/// `GET /v1/models/{id}`.
#[poem::handler]
pub async fn model_by_id(
    req: &Request,
    Path(id): Path<String>,
    state: Data<&AppState>,
) -> Response {
    respond(find_model(req, &id, &state))
}

fn find_model(req: &Request, id: &str, state: &AppState) -> Result<Response> {
    caller_of(req)?;
    let engine = engine_of(state)?;
    check_model(&engine, id)?;
    Ok(Json(model_object(&engine)).into_response())
}

/// `POST /v1/chat/completions`.
#[poem::handler]
pub async fn chat_completions(req: &Request, body: Body, state: Data<&AppState>) -> Response {
    respond(complete(req, body, &state, Api::Chat).await)
}

/// `POST /v1/completions`.
#[poem::handler]
pub async fn completions(req: &Request, body: Body, state: Data<&AppState>) -> Response {
    respond(complete(req, body, &state, Api::Text).await)
}

/// Which of the two completion APIs a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `/v1/chat/completions`: messages through the chat template.
    Chat,
    /// `/v1/completions`: a prompt as written.
    Text,
}

async fn complete(req: &Request, body: Body, state: &AppState, api: Api) -> Result<Response> {
    let caller = caller_of(req)?;
    let engine = engine_of(state)?;
    let bytes = body.into_vec().await.map_err(|e| ApiError::InvalidBody {
        reason: e.to_string(),
    })?;
    let context = engine.info.context_length;
    let default_max_tokens = state.chat.settings().default_max_tokens;
    let mut completion = match api {
        Api::Chat => wire::parse(
            &bytes,
            default_max_tokens,
            context,
            state.limits.max_request_messages,
        )?,
        Api::Text => wire::parse_text(&bytes, default_max_tokens, context)?,
    };
    completion.user = stateless::user_of(&caller, completion.user, wire::ANONYMOUS_USER)?;
    check_model(&engine, &completion.model)?;
    // Replies that may call tools are read for calls in the loaded model's format.
    let tool_format = completion
        .request
        .tools
        .as_ref()
        .filter(|t| !t.offered().is_empty())
        .map(|_| engine.tool_style().format);
    let logprobs = completion.request.logprobs.is_some();
    let running = stateless::start(
        state,
        &engine,
        caller,
        completion.user,
        completion.request,
        completion.grammar_field,
    )
    .await?;
    let model = engine.info.id.clone();
    let created = unix_now();
    if api == Api::Text {
        let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
        let reply = Reply {
            id,
            model,
            created,
            include_usage: completion.include_usage,
            tool_format: None,
            logprobs,
        };
        if completion.stream {
            return Ok(SSE::new(text_sse_events(running, reply))
                .keep_alive(std::time::Duration::from_secs(15))
                .into_response());
        }
        let summary = running.finish().await?;
        let body = wire::TextCompletion {
            id: &reply.id,
            object: "text_completion",
            created,
            model: &reply.model,
            choices: vec![wire::TextChoice {
                text: summary.text,
                index: 0,
                logprobs: logprobs.then(|| wire::TextLogprobs::new(summary.logprobs, 0)),
                finish_reason: Some(wire::finish_reason(summary.finish_reason, false)),
            }],
            usage: Some(UsageOut::new(
                summary.prompt_tokens,
                summary.completion_tokens,
            )),
        };
        return Ok(Json(serde_json::to_value(&body).unwrap_or_default()).into_response());
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if completion.stream {
        let events = sse_events(
            running,
            Reply {
                id,
                model,
                created,
                include_usage: completion.include_usage,
                tool_format,
                logprobs,
            },
        );
        return Ok(SSE::new(events)
            .keep_alive(std::time::Duration::from_secs(15))
            .into_response());
    }
    let summary = running.finish().await?;
    let reply = match tool_format {
        Some(format) => parse_reply(format, &summary.text),
        None => crate::engine::tools::parse::ParsedReply {
            content: summary.text,
            calls: Vec::new(),
        },
    };
    let called = !reply.calls.is_empty();
    Ok(Json(wire::ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![wire::Choice {
            index: 0,
            message: wire::MessageOut {
                role: "assistant",
                content: Some(reply.content).filter(|c| !(called && c.is_empty())),
                tool_calls: reply.calls.into_iter().map(Into::into).collect(),
            },
            finish_reason: wire::finish_reason(summary.finish_reason, called),
            logprobs: logprobs.then(|| wire::LogprobsOut::new(summary.logprobs)),
        }],
        usage: UsageOut::new(summary.prompt_tokens, summary.completion_tokens),
    })
    .into_response())
}

/// The SSE body of `/v1/completions`: one `text_completion` chunk per delta, a last one
/// with the finish reason (then the usage, when asked for), then `[DONE]`.
fn text_sse_events(
    running: Running,
    reply: Reply,
) -> impl futures_util::Stream<Item = SseEvent> + Send + 'static {
    let Reply {
        id,
        model,
        created,
        include_usage,
        logprobs,
        ..
    } = reply;
    let event = move |choices: Vec<wire::TextChoice>, usage: Option<UsageOut>| {
        let c = wire::TextCompletion {
            id: &id,
            object: "text_completion",
            created,
            model: &model,
            choices,
            usage,
        };
        SseEvent::message(serde_json::to_string(&c).unwrap_or_default())
    };
    // Characters sent so far (the logprobs' text offsets).
    let state = (running, false, 0usize);
    futures_util::stream::unfold(state, move |(mut running, ended, mut sent)| {
        let event = event.clone();
        async move {
            if ended {
                return None;
            }
            let piece = running.next().await;
            let choice = |text: String, tokens: Vec<TokenLogprob>, at: usize, f| wire::TextChoice {
                text,
                index: 0,
                logprobs: logprobs.then(|| wire::TextLogprobs::new(tokens, at)),
                finish_reason: f,
            };
            let out = match piece {
                Some(Piece::Started) => Vec::new(),
                Some(Piece::Delta(text, tokens)) => {
                    let at = sent;
                    sent += text.chars().count();
                    vec![event(vec![choice(text, tokens, at, None)], None)]
                }
                Some(Piece::Done(s)) => {
                    let mut out = Vec::new();
                    if let Some(e) = s.error.clone() {
                        out.push(SseEvent::message(
                            OpenAiError(ApiError::from(e)).body().to_string(),
                        ));
                    } else {
                        let finish = Some(wire::finish_reason(s.finish_reason, false));
                        out.push(event(
                            vec![choice(String::new(), Vec::new(), sent, finish)],
                            None,
                        ));
                        if include_usage {
                            let usage = UsageOut::new(s.prompt_tokens, s.completion_tokens);
                            out.push(event(Vec::new(), Some(usage)));
                        }
                    }
                    out.push(SseEvent::message("[DONE]"));
                    return Some((out, (running, true, sent)));
                }
                None => {
                    let err = OpenAiError(ApiError::GenerationFailed("the engine stopped".into()));
                    return Some((
                        vec![SseEvent::message(err.body().to_string())],
                        (running, true, sent),
                    ));
                }
            };
            Some((out, (running, false, sent)))
        }
    })
    .flat_map(futures_util::stream::iter)
}

/// What every chunk of a streamed reply says, and how its text is read.
struct Reply {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Set when the reply may call tools: its text is read for calls in this format.
    tool_format: Option<ToolFormat>,
    /// Whether chunks carry the log-probabilities of their tokens.
    logprobs: bool,
}

/// Content text as a delta.
fn content_delta(text: String) -> Delta {
    Delta {
        content: Some(text),
        ..Delta::default()
    }
}

/// What the tool-call parser found, as deltas.
fn tool_deltas(events: Vec<ToolEvent>) -> Vec<Delta> {
    events
        .into_iter()
        .map(|e| match e {
            ToolEvent::Content(text) => content_delta(text),
            ToolEvent::CallStart { index, id, name } => Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: String::new(),
                    },
                }]),
                ..Delta::default()
            },
            ToolEvent::Arguments { index, text } => Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: text,
                    },
                }]),
                ..Delta::default()
            },
        })
        .collect()
}

/// The SSE body: a first chunk with the role, one chunk per delta (content, or a piece of a
/// tool call), a last one with the finish reason (and the usage, when asked for), then
/// `[DONE]`.
fn sse_events(
    running: Running,
    reply: Reply,
) -> impl futures_util::Stream<Item = SseEvent> + Send + 'static {
    let Reply {
        id,
        model,
        created,
        include_usage,
        tool_format,
        logprobs,
    } = reply;
    let message = move |choices: Vec<ChunkChoice>, usage: Option<UsageOut>| {
        let c = Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &model,
            choices,
            usage,
        };
        SseEvent::message(serde_json::to_string(&c).unwrap_or_default())
    };
    let one = message.clone();
    let chunk = move |delta: Delta, finish: Option<&'static str>, tokens: Vec<TokenLogprob>| {
        one(
            vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
                logprobs: logprobs.then(|| wire::LogprobsOut::new(tokens)),
            }],
            None,
        )
    };
    let opening = chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        },
        None,
        Vec::new(),
    );
    let parser = tool_format.map(ToolCallParser::new);
    // Log-probabilities received and not yet sent (a delta the tool-call parser holds
    // back makes no chunk), and how many were received.
    let state = (running, false, parser, (Vec::new(), 0usize));
    let rest = futures_util::stream::unfold(
        state,
        move |(mut running, ended, mut parser, (mut held, mut received))| {
            let chunk = chunk.clone();
            let message = message.clone();
            async move {
                if ended {
                    return None;
                }
                let piece = running.next().await;
                let out: Vec<SseEvent> = match piece {
                    Some(Piece::Started) => Vec::new(),
                    Some(Piece::Delta(text, tokens)) => {
                        received += tokens.len();
                        held.extend(tokens);
                        let deltas = match &mut parser {
                            Some(p) => tool_deltas(p.push(&text)),
                            None => vec![content_delta(text)],
                        };
                        deltas
                            .into_iter()
                            .map(|d| chunk(d, None, std::mem::take(&mut held)))
                            .collect()
                    }
                    Some(Piece::Done(s)) => {
                        let mut out = Vec::new();
                        if let Some(e) = s.error.clone() {
                            let err = OpenAiError(ApiError::from(e));
                            out.push(SseEvent::message(err.body().to_string()));
                        } else {
                            let mut called = false;
                            // Tokens no delta carried (held back, or ended by a stop string).
                            held.extend(s.logprobs.into_iter().skip(received));
                            if let Some(p) = &mut parser {
                                let rest = p.finish();
                                out.extend(
                                    tool_deltas(rest)
                                        .into_iter()
                                        .map(|d| chunk(d, None, std::mem::take(&mut held))),
                                );
                                called = !p.calls().is_empty();
                            }
                            out.push(chunk(
                                Delta::default(),
                                Some(wire::finish_reason(s.finish_reason, called)),
                                std::mem::take(&mut held),
                            ));
                            // As OpenAI does it: a chunk of its own, with no choices.
                            if include_usage {
                                let usage = UsageOut::new(s.prompt_tokens, s.completion_tokens);
                                out.push(message(Vec::new(), Some(usage)));
                            }
                        }
                        out.push(SseEvent::message("[DONE]"));
                        return Some((out, (running, true, parser, (held, received))));
                    }
                    None => {
                        let err =
                            OpenAiError(ApiError::GenerationFailed("the engine stopped".into()));
                        return Some((
                            vec![SseEvent::message(err.body().to_string())],
                            (running, true, parser, (held, received)),
                        ));
                    }
                };
                Some((out, (running, false, parser, (held, received))))
            }
        },
    );
    futures_util::stream::once(async move { opening })
        .chain(rest.flat_map(futures_util::stream::iter))
}
