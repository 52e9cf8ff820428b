//! The Anthropic Messages API: `POST /v1/messages` (streamed as Anthropic's named
//! server-sent events, or whole) and `POST /v1/messages/count_tokens`, so applications
//! written against Anthropic's SDKs run on a local model by changing their base URL.
//!
//! The same keys (`x-api-key`, or `Authorization: Bearer`), quotas, queues, budgets and
//! usage accounting as the OpenAI API ([`super::stateless`]); only the wire format differs.
//! Errors have Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`), with
//! our stable `code` and `details` beside its two fields.

pub mod wire;

use futures_util::StreamExt;
use poem::web::sse::{Event as SseEvent, SSE};
use poem::web::{Data, Json};
use poem::{Body, IntoResponse, Request, Response};
use serde_json::{json, Value};

use super::auth::Caller;
use super::stateless::{self, caller_of, check_model, engine_of, Piece, Running};
use super::AppState;
use crate::engine::tools::parse::{parse_reply, ParsedReply, ToolCallParser, ToolEvent};
use crate::engine::tools::ToolFormat;
use crate::engine::EngineHandle;
use crate::error::ApiError;
use wire::{BlockOut, MessageOut, Usage};

/// An error on an Anthropic route: our error, in Anthropic's shape.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl From<crate::chat::ChatError> for AnthropicError {
    fn from(e: crate::chat::ChatError) -> Self {
        AnthropicError(e.into())
    }
}

impl AnthropicError {
    /// Anthropic's error `type` for our status.
    fn kind(&self) -> &'static str {
        match self.0.status().as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body: Anthropic's fields, plus our `code` and `details`.
    pub fn body(&self) -> Value {
        let e = &self.0;
        let message = match e {
            ApiError::MissingApiKey => {
                "This endpoint needs the tenant API key in the x-api-key header (or as `Authorization: Bearer <key>`).".to_string()
            }
            other => other.message(),
        };
        json!({"type": "error", "error": {
            "type": self.kind(),
            "message": message,
            "code": e.code(),
            "details": e.details(),
        }})
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut resp = Json(self.body())
            .with_status(self.0.status())
            .into_response();
        self.0.add_headers(&mut resp);
        resp
    }
}

type Result<T> = std::result::Result<T, AnthropicError>;

fn respond(r: Result<Response>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/messages`.
#[poem::handler]
pub async fn messages(req: &Request, body: Body, state: Data<&AppState>) -> Response {
    respond(create(req, body, &state).await)
}

/// `POST /v1/messages/count_tokens`: the prompt's length in tokens, as the request would
/// be given to the model; nothing is generated.
#[poem::handler]
pub async fn count_tokens(req: &Request, body: Body, state: Data<&AppState>) -> Response {
    respond(count(req, body, &state).await)
}

/// Reads a request body and checks its caller and model.
async fn request(
    req: &Request,
    body: Body,
    state: &AppState,
    count_only: bool,
) -> Result<(Caller, EngineHandle, wire::MessagesRequest)> {
    let caller = caller_of(req)?;
    let engine = engine_of(state)?;
    let bytes = body.into_vec().await.map_err(|e| ApiError::InvalidBody {
        reason: e.to_string(),
    })?;
    let mut m = wire::parse(
        &bytes,
        engine.info.context_length,
        state.limits.max_request_messages,
        count_only,
    )?;
    m.user = stateless::user_of(&caller, m.user, wire::ANONYMOUS_USER)?;
    check_model(&engine, &m.model)?;
    Ok((caller, engine, m))
}

async fn count(req: &Request, body: Body, state: &AppState) -> Result<Response> {
    let (_, engine, m) = request(req, body, state, true).await?;
    let tokens = stateless::count_prompt(&engine, m.request, m.grammar_field).await?;
    Ok(Json(json!({"input_tokens": tokens})).into_response())
}

async fn create(req: &Request, body: Body, state: &AppState) -> Result<Response> {
    let (caller, engine, m) = request(req, body, state, false).await?;
    // Replies that may call tools are read for calls in the loaded model's format.
    let tool_format = m
        .request
        .tools
        .as_ref()
        .filter(|t| !t.offered().is_empty())
        .map(|_| engine.tool_style().format);
    let running =
        stateless::start(state, &engine, caller, m.user, m.request, m.grammar_field).await?;
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let model = engine.info.id.clone();
    if m.stream {
        return Ok(SSE::new(sse_events(running, id, model, tool_format))
            .keep_alive(std::time::Duration::from_secs(15))
            .into_response());
    }
    let prompt_tokens = running.prompt_tokens;
    let summary = running.finish().await?;
    let reply = match tool_format {
        Some(format) => parse_reply(format, &summary.text),
        None => ParsedReply {
            content: summary.text.clone(),
            calls: Vec::new(),
        },
    };
    let called = !reply.calls.is_empty();
    let mut content = Vec::new();
    if !reply.content.is_empty() {
        content.push(BlockOut::Text {
            text: reply.content,
        });
    }
    content.extend(reply.calls.into_iter().map(BlockOut::from));
    let body = MessageOut {
        id: &id,
        kind: "message",
        role: "assistant",
        model: &model,
        content,
        stop_reason: Some(wire::stop_reason(&summary, called)),
        stop_sequence: summary.stop_sequence.clone(),
        usage: Usage {
            input_tokens: prompt_tokens,
            output_tokens: summary.completion_tokens,
        },
    };
    Ok(Json(serde_json::to_value(&body).unwrap_or_default()).into_response())
}

/// One named event.
fn event(name: &str, data: Value) -> SseEvent {
    SseEvent::message(data.to_string()).event_type(name)
}

/// The content blocks of a streamed reply, opened and closed as its text turns out to be
/// content or calls.
#[derive(Default)]
struct Blocks {
    /// The open block's index and whether it is text (else a tool use).
    open: Option<(usize, bool)>,
    next: usize,
}

impl Blocks {
    fn stop(&mut self, out: &mut Vec<SseEvent>) {
        if let Some((index, _)) = self.open.take() {
            out.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn start(&mut self, text: bool, block: Value, out: &mut Vec<SseEvent>) -> usize {
        self.stop(out);
        let index = self.next;
        self.next += 1;
        self.open = Some((index, text));
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn push(&mut self, e: ToolEvent, out: &mut Vec<SseEvent>) {
        match e {
            ToolEvent::Content(text) if text.is_empty() => {}
            ToolEvent::Content(text) => {
                let index = match self.open {
                    Some((i, true)) => i,
                    _ => self.start(true, json!({"type": "text", "text": ""}), out),
                };
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            ToolEvent::CallStart { id, name, .. } => {
                self.start(
                    false,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    out,
                );
            }
            ToolEvent::Arguments { text, .. } => {
                if let Some((index, false)) = self.open {
                    out.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": text}}),
                    ));
                }
            }
        }
    }
}

/// The SSE body, as Anthropic streams it: `message_start`, a `ping`, each content block as
/// `content_block_start`, its deltas (`text_delta`, or `input_json_delta` pieces of a
/// call's input) and `content_block_stop`, then `message_delta` (stop reason, output
/// tokens) and `message_stop`; an `error` event when generation fails midway.
fn sse_events(
    running: Running,
    id: String,
    model: String,
    tool_format: Option<ToolFormat>,
) -> impl futures_util::Stream<Item = SseEvent> + Send + 'static {
    let start = MessageOut {
        id: &id,
        kind: "message",
        role: "assistant",
        model: &model,
        content: Vec::new(),
        stop_reason: None,
        stop_sequence: None,
        usage: Usage {
            input_tokens: running.prompt_tokens,
            output_tokens: 0,
        },
    };
    let opening = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": start}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let parser = tool_format.map(ToolCallParser::new);
    let state = (running, false, parser, Blocks::default());
    let rest = futures_util::stream::unfold(
        state,
        |(mut running, ended, mut parser, mut blocks)| async move {
            if ended {
                return None;
            }
            let mut out = Vec::new();
            match running.next().await {
                Some(Piece::Started) => {}
                Some(Piece::Delta(text, _)) => {
                    let events = match &mut parser {
                        Some(p) => p.push(&text),
                        None => vec![ToolEvent::Content(text)],
                    };
                    for e in events {
                        blocks.push(e, &mut out);
                    }
                }
                Some(Piece::Done(s)) => {
                    if let Some(e) = s.error.clone() {
                        let err = AnthropicError(ApiError::from(e));
                        out.push(event("error", err.body()));
                    } else {
                        let mut called = false;
                        if let Some(p) = &mut parser {
                            for e in p.finish() {
                                blocks.push(e, &mut out);
                            }
                            called = !p.calls().is_empty();
                        }
                        blocks.stop(&mut out);
                        out.push(event(
                            "message_delta",
                            json!({"type": "message_delta",
                                "delta": {"stop_reason": wire::stop_reason(&s, called),
                                    "stop_sequence": s.stop_sequence},
                                "usage": {"output_tokens": s.completion_tokens}}),
                        ));
                        out.push(event("message_stop", json!({"type": "message_stop"})));
                    }
                    return Some((out, (running, true, parser, blocks)));
                }
                None => {
                    let err =
                        AnthropicError(ApiError::GenerationFailed("the engine stopped".into()));
                    out.push(event("error", err.body()));
                    return Some((out, (running, true, parser, blocks)));
                }
            }
            Some((out, (running, false, parser, blocks)))
        },
    );
    futures_util::stream::iter(opening).chain(rest.flat_map(futures_util::stream::iter))
}
