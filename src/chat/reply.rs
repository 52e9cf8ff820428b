//! One reply, from the moment it leaves the queue to its saved end.
//!
//! Order of things: read the chat's settings and history; save the assistant message as
//! `streaming` (so the stream has an id and a crash leaves a row to mark `interrupted`);
//! announce the stream; relay the engine's deltas to the room, saving the text at least every
//! `save_interval`; save the outcome; announce the end. Every path ends the room's reply.

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Map;
use uuid::Uuid;

use super::protocol::{Event, Timings, Usage};
use super::{ChatService, Queued};
use crate::domain::{Chat, ChatConfig, Message, MessageStatus, NewMessage, Parent, Role};
use crate::engine::{
    CancelToken, ChatMessage, FinishReason, GenerateRequest, GenerationEvent, Grammar,
    SamplingParams,
};
use crate::error::ApiError;
use crate::store::{ReplyUpdate, StoreError, TenantScope};

/// How a reply ended.
struct Outcome {
    finish: FinishReason,
    text: String,
    usage: Usage,
    time_to_first_token: Option<Duration>,
    tokens_per_second: f64,
}

impl Outcome {
    fn empty(finish: FinishReason) -> Outcome {
        Outcome {
            finish,
            text: String::new(),
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            },
            time_to_first_token: None,
            tokens_per_second: 0.0,
        }
    }
}

/// A chat's sampling settings as engine parameters, server defaults where it sets none (a
/// random seed among them). The OpenAI-compatible API maps its fields through this too.
pub fn sampling_for(c: &ChatConfig) -> SamplingParams {
    let d = SamplingParams::default();
    SamplingParams {
        temperature: c.temperature.map_or(d.temperature, |t| t as f32),
        top_k: match c.top_k {
            Some(0) => None,
            Some(k) => Some(k as usize),
            None => d.top_k,
        },
        top_p: c.top_p.map(|p| p as f32).or(d.top_p),
        repeat_penalty: c.repeat_penalty.map_or(d.repeat_penalty, |p| p as f32),
        repeat_last_n: d.repeat_last_n,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: c.seed.unwrap_or_else(|| rand::rng().random()),
    }
}

/// The chat's settings as engine parameters (server defaults where the chat sets none).
pub(super) fn request_for(
    chat: &Chat,
    history: Vec<Message>,
    default_max_tokens: u32,
) -> GenerateRequest {
    let c = &chat.config;
    let sampling = sampling_for(c);
    let mut messages = Vec::with_capacity(history.len() + 1);
    if let Some(system) = c.system_prompt.as_ref().filter(|s| !s.is_empty()) {
        messages.push(ChatMessage::new(Role::System, system.clone()));
    }
    // Replies that produced no text (failed, cancelled at once) would only confuse the model.
    messages.extend(
        history
            .into_iter()
            .filter(|m| !(m.role == Role::Assistant && m.content.is_empty()))
            .map(|m| ChatMessage::new(m.role, m.content)),
    );
    GenerateRequest {
        messages,
        sampling,
        max_tokens: c.max_tokens.unwrap_or(default_max_tokens).max(1) as usize,
        stop: c.stop.clone().unwrap_or_default(),
        cache_key: Some(chat.id),
        grammar: c.response_format.as_ref().map(Grammar::from),
        tools: None,
        logprobs: None,
        raw_prompt: None,
    }
}

/// A chat and the stored history a reply to `user_message` is built from: its branch, up
/// to and with that message, whatever branch is active meanwhile.
async fn chat_and_history(
    service: &ChatService,
    scope: &TenantScope<'_>,
    chat_id: Uuid,
    user_message: Uuid,
) -> Result<(Chat, Vec<Message>), StoreError> {
    let chat = scope.get_chat(chat_id).await?;
    let history = scope
        .branch_history(chat_id, user_message, service.settings().history_messages)
        .await?;
    Ok((chat, history))
}

/// Runs the reply of `q` to its end.
pub(super) async fn run(service: &ChatService, q: Queued) {
    let room = q.room.clone();
    let queue_ms = q.enqueued_at.elapsed().as_millis() as u64;
    let scope = service.store().tenant(room.tenant);
    let cancel = match room.lock().reply.as_ref() {
        Some(r) => r.cancel.clone(),
        None => return,
    };
    let chat_and_history = async {
        let (chat, history) =
            chat_and_history(service, &scope, room.chat_id, q.user_message).await?;
        let message = scope
            .append_message(
                room.chat_id,
                NewMessage {
                    role: Role::Assistant,
                    content: String::new(),
                    metadata: Map::new(),
                    status: MessageStatus::Streaming,
                    parent: Parent::Of(Some(q.user_message)),
                },
            )
            .await?;
        Ok::<_, StoreError>((chat, history, message.id))
    }
    .await;
    let (chat, history, message_id) = match chat_and_history {
        Ok(x) => x,
        Err(e) => {
            // No assistant message could be saved: the user message stays unanswered and
            // the client is told why.
            let mut st = room.lock();
            if st.deleted {
                room.finish(&mut st, None);
            } else {
                if !matches!(e, StoreError::NotFound) {
                    tracing::warn!(chat = %room.chat_id, error = %e, "reply could not start");
                }
                let error = ApiError::for_chat(room.chat_id)(e).to_event();
                room.finish(&mut st, Some(&error));
            }
            return;
        }
    };
    room.send(
        &mut room.lock(),
        &Event::MessageStreamStarted {
            message_id,
            chat_id: room.chat_id,
            reply_to: q.user_message,
        },
    );
    // The first turn of a chat without a title: the model names the chat afterwards.
    let question = history
        .last()
        .filter(|m| m.depth == 1 && chat.title.is_none() && service.settings().auto_titles)
        .map(|m| m.content.clone());
    let request = request_for(&chat, history, service.settings().default_max_tokens);
    let constrained = chat.config.response_format.as_ref().map(|f| f.kind());
    let outcome = stream(service, &q, &scope, message_id, request, &cancel).await;
    let interrupted = room.lock().reply.as_ref().is_some_and(|r| r.interrupted);
    let status = match outcome.finish {
        _ if interrupted => MessageStatus::Interrupted,
        FinishReason::Stop | FinishReason::Length => MessageStatus::Complete,
        FinishReason::Cancelled => MessageStatus::Cancelled,
        FinishReason::Error => MessageStatus::Failed,
    };
    let update = ReplyUpdate {
        content: outcome.text.clone(),
        status,
        usage: Some((
            outcome.usage.prompt_tokens as i32,
            outcome.usage.completion_tokens as i32,
        )),
    };
    let saved = save_final(service, &scope, room.chat_id, message_id, update).await;
    let usage = outcome.usage;
    service
        .account(
            room.tenant,
            &chat.user_id,
            q.key_id,
            usage.prompt_tokens,
            usage.completion_tokens,
            outcome.time_to_first_token,
        )
        .await;
    // Its usage is recorded: the tokens held against the budgets go back.
    drop(q.hold);
    if let Some(question) = question.filter(|_| status == MessageStatus::Complete) {
        if !outcome.text.trim().is_empty() {
            service.title_later(super::title::TitleJob {
                tenant: room.tenant,
                chat_id: room.chat_id,
                user_id: chat.user_id.clone(),
                key_id: q.key_id,
                question,
                answer: outcome.text.clone(),
            });
        }
    }
    let mut st = room.lock();
    if st.deleted {
        room.finish(&mut st, None);
        return;
    }
    if let Err(e) = saved {
        if !matches!(e, StoreError::NotFound) {
            let reason = ApiError::from(e).code();
            room.send(
                &mut st,
                &ApiError::ReplyNotSaved { message_id, reason }.to_event(),
            );
        }
    }
    let ended = Event::MessageStreamEnded {
        message_id,
        content: outcome.text,
        finish_reason: outcome.finish.as_str(),
        usage: outcome.usage,
        response_format: constrained,
        timings: Timings {
            queue_ms,
            time_to_first_token_ms: outcome.time_to_first_token.map(|d| d.as_millis() as u64),
            tokens_per_second: (outcome.tokens_per_second * 10.0).round() / 10.0,
        },
    };
    room.finish(&mut st, Some(&ended));
}

/// Saves a reply's final state, retrying with backoff (100 ms doubling to 5 s) while the
/// database is unavailable or locked, until it succeeds or the server has stopped: a reply
/// the client received in full must not be lost to one failed write. Other failures get
/// three tries. `message_stream_ended` waits for this, so it tells the saved state.
async fn save_final(
    service: &ChatService,
    scope: &TenantScope<'_>,
    chat: Uuid,
    message_id: Uuid,
    update: ReplyUpdate,
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match scope.update_reply(message_id, update.clone()).await {
            Ok(()) => {
                if attempts > 1 {
                    tracing::info!(%chat, message = %message_id, attempts, "reply saved after retries");
                }
                return Ok(());
            }
            // The chat was deleted meanwhile: nothing to save into.
            Err(StoreError::NotFound) => return Err(StoreError::NotFound),
            Err(e) => e,
        };
        let transient = matches!(err, StoreError::Unavailable(_));
        if (!transient && attempts >= 3) || service.is_closed() {
            tracing::error!(%chat, message = %message_id, attempts, error = %err, "reply not saved");
            return Err(err);
        }
        tracing::warn!(%chat, message = %message_id, attempts, error = %err, "saving the reply failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Relays the engine's deltas to the room and saves the growing text.
async fn stream(
    service: &ChatService,
    q: &Queued,
    scope: &TenantScope<'_>,
    message_id: Uuid,
    request: GenerateRequest,
    cancel: &CancelToken,
) -> Outcome {
    let room = &q.room;
    if cancel.is_cancelled() {
        return Outcome::empty(FinishReason::Cancelled);
    }
    let Some(engine) = service.0.model.engine() else {
        room.send(&mut room.lock(), &ApiError::ModelNotReady.to_event());
        return Outcome::empty(FinishReason::Error);
    };
    // Template and tokenizer run on a blocking worker, not on the engine thread.
    let submitted = match engine.prepare(request).await {
        Ok(prepared) => engine.submit(prepared, cancel.clone()),
        Err(e) => Err(e),
    };
    let mut generation = match submitted {
        Ok(g) => g,
        Err(e) => {
            room.send(&mut room.lock(), &ApiError::from(e).to_event());
            return Outcome::empty(FinishReason::Error);
        }
    };
    let interval = service.settings().save_interval;
    let mut last_save = Instant::now();
    let mut saving = true;
    let mut gaps = crate::metrics::TokenGaps::default();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerationEvent::Started { .. } => {}
            GenerationEvent::Delta { text, .. } => {
                gaps.tick();
                let snapshot = {
                    let mut st = room.lock();
                    let Some(index) = st
                        .reply
                        .as_ref()
                        .and_then(|r| r.view.stream.as_ref())
                        .map(|s| s.next_index)
                    else {
                        continue;
                    };
                    let token = Event::MessageStreamToken {
                        message_id,
                        token: text,
                        index,
                    };
                    room.send(&mut st, &token);
                    let due = saving && last_save.elapsed() >= interval;
                    st.reply
                        .as_ref()
                        .and_then(|r| r.view.stream.as_ref())
                        .filter(|_| due)
                        .map(|s| s.text.clone())
                };
                if let Some(content) = snapshot {
                    last_save = Instant::now();
                    let update = ReplyUpdate {
                        content,
                        status: MessageStatus::Streaming,
                        usage: None,
                    };
                    if let Err(e) = scope.update_reply(message_id, update).await {
                        // Gone (chat deleted): stop saving; the cancel is on its way.
                        saving = !matches!(e, StoreError::NotFound);
                        tracing::warn!(chat = %room.chat_id, error = %e, "partial reply not saved");
                    }
                }
            }
            GenerationEvent::Finished(summary) => {
                if let Some(error) = summary.error.clone() {
                    room.send(&mut room.lock(), &ApiError::from(error).to_event());
                }
                return Outcome {
                    finish: summary.finish_reason,
                    text: summary.text,
                    usage: Usage {
                        prompt_tokens: summary.prompt_tokens,
                        completion_tokens: summary.completion_tokens,
                    },
                    time_to_first_token: summary.time_to_first_token,
                    tokens_per_second: summary.tokens_per_second,
                };
            }
        }
    }
    // The engine dropped the stream without a summary (its thread died).
    let text = room
        .lock()
        .reply
        .as_ref()
        .and_then(|r| r.view.stream.as_ref())
        .map(|s| s.text.clone())
        .unwrap_or_default();
    Outcome {
        text,
        ..Outcome::empty(FinishReason::Error)
    }
}
