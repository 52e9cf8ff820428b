//! `GET /ws/chat`: the WebSocket end of live chat.
//!
//! The upgrade is always accepted, even with bad credentials: browsers cannot read the
//! status of a refused handshake, so the refusal comes as one `error` event followed by a
//! close frame whose code says what went wrong (4400 bad or missing parameter, 4401 key,
//! 4404 chat, 4429 too many connections) and whose reason is the error code.
//!
//! After that the socket task is a loop over four sources: client frames, the chat room's
//! events, a ping timer and the server's shutdown phase. Everything a client sends is checked
//! by `chat::protocol`; the work is done by `chat::ChatService`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::web::Data;
use poem::{handler, IntoResponse, Request};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::AppState;
use crate::chat::protocol::{parse_client_message, ClientMessage, Credentials, Event, FrameError};
use crate::chat::{ChatError, ConnectionGuard, Membership, Outbound, Phase};
use crate::error::ApiError;
use crate::ratelimit::TokenBucket;
use crate::store::TenantId;

/// A refused connection: the event to send and the close code.
struct Refusal {
    event: Event,
    close: u16,
}

impl Refusal {
    fn api(e: ApiError) -> Refusal {
        let close = match e.code() {
            "missing_api_key" | "invalid_api_key" => 4401,
            "chat_not_found" => 4404,
            "validation_error" => 4400,
            _ => 1011,
        };
        Refusal {
            event: Event::Error {
                code: e.code(),
                message: e.message(),
                details: serde_json::Value::Object(e.details()),
            },
            close,
        }
    }

    fn chat(e: ChatError) -> Refusal {
        let close = match e {
            ChatError::TooManyConnections { .. } => 4429,
            ChatError::ChatNotFound | ChatError::Store(crate::store::StoreError::NotFound) => 4404,
            ChatError::ShuttingDown => 1001,
            _ => 1011,
        };
        Refusal {
            event: e.to_event(),
            close,
        }
    }
}

/// An accepted connection.
struct Session {
    tenant: TenantId,
    /// Messages per second this connection may send (the tenant's own, or the default).
    messages_per_second: u32,
    user_id: String,
    chat_id: Uuid,
    user_created: bool,
    _guard: ConnectionGuard,
}

async fn open(state: &AppState, creds: Credentials) -> Result<Session, Refusal> {
    let (key, user_id, chat_id) = creds
        .validate()
        .map_err(|(event, close)| Refusal { event, close })?;
    let tenant = state.auth.authenticate(&key).await.map_err(Refusal::api)?;
    let limits = state.quotas.limits(tenant).await;
    let guard = state
        .chat
        .connect(tenant, limits.max_connections as usize)
        .map_err(Refusal::chat)?;
    let scope = state.store.tenant(tenant);
    let chat = scope
        .get_chat(chat_id)
        .await
        .map_err(|e| Refusal::chat(e.into()))?;
    // Another user's chat is as invisible as another tenant's.
    if chat.user_id != user_id {
        return Err(Refusal::chat(ChatError::ChatNotFound));
    }
    let user_created = scope
        .ensure_user(&user_id)
        .await
        .map_err(|e| Refusal::chat(e.into()))?;
    Ok(Session {
        tenant,
        messages_per_second: limits.ws_messages_per_second,
        user_id,
        chat_id,
        user_created,
        _guard: guard,
    })
}

/// The upgrade handler.
#[handler]
pub async fn ws_chat(req: &Request, ws: WebSocket, state: Data<&AppState>) -> impl IntoResponse {
    let creds = Credentials::parse(req.uri().query(), |name| {
        req.headers().get(name).and_then(|v| v.to_str().ok())
    });
    let state = state.0.clone();
    let max_frame = state.chat.settings().messages.max_frame_bytes;
    // Frames a little over the limit are read and answered with `message_too_large`
    // (the connection stays usable); far larger ones end the connection (1009).
    let hard_limit = max_frame.saturating_mul(4).max(1024 * 1024);
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(hard_limit);
    config.max_frame_size = Some(hard_limit);
    ws.config(config).on_upgrade(move |socket| async move {
        run_socket(state, creds, socket).await;
    })
}

async fn send(sink: &mut (impl SinkExt<Message> + Unpin), event: &Event) -> bool {
    sink.send(Message::Text(event.to_json())).await.is_ok()
}

async fn close(sink: &mut (impl SinkExt<Message> + Unpin), code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some((
            CloseCode::from(code),
            reason.to_string(),
        ))))
        .await;
}

async fn run_socket(state: AppState, creds: Credentials, socket: WebSocketStream) {
    let (mut sink, mut stream) = socket.split();
    let session = match open(&state, creds).await {
        Ok(s) => s,
        Err(r) => {
            let reason = match &r.event {
                Event::Error { code, .. } => *code,
                _ => "error",
            };
            send(&mut sink, &r.event).await;
            close(&mut sink, r.close, reason).await;
            return;
        }
    };
    let service = state.chat.clone();
    let metrics = crate::metrics::metrics();
    metrics.ws_connections.inc();
    // Decremented however the socket ends.
    struct Open;
    impl Drop for Open {
        fn drop(&mut self) {
            crate::metrics::metrics().ws_connections.dec();
        }
    }
    let _open = Open;
    let established = Event::ConnectionEstablished {
        user_id: session.user_id.clone(),
        chat_id: session.chat_id,
        tenant_id: session.tenant.as_uuid(),
    };
    if !send(&mut sink, &established).await {
        return;
    }
    if session.user_created
        && !send(
            &mut sink,
            &Event::UserCreated {
                user_id: session.user_id.clone(),
            },
        )
        .await
    {
        return;
    }
    let (mut membership, catch_up): (Membership, _) = service.join(session.tenant, session.chat_id);
    for e in catch_up {
        if !send(&mut sink, &e).await {
            return;
        }
    }
    let settings = service.settings().clone();
    let room = membership.room.clone();
    // A tenant's own rate comes with a burst of the same size; the default keeps its burst.
    let (rate, burst) = if f64::from(session.messages_per_second) == settings.messages_per_second {
        (settings.messages_per_second, settings.message_burst)
    } else {
        (
            f64::from(session.messages_per_second),
            session.messages_per_second,
        )
    };
    let mut bucket = TokenBucket::new(rate, burst);
    // Frames refused in a row before the socket is closed (1008): each refused frame still
    // gets its `rate_limited` answer, so a client knows which were dropped, but a client
    // that ignores them is not answered forever.
    let max_refused_in_row = (burst as usize).max(4) * 5;
    let mut refused_in_row = 0usize;
    let mut phase = service.phase();
    let mut last_heard = Instant::now();
    let tick = settings
        .ping_interval
        .min(settings.idle_timeout)
        .max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(tick);
    ticker.reset();
    loop {
        tokio::select! {
            // Room events first: what a reply said before a close must reach the client.
            biased;
            out = membership.events.recv() => match out {
                Ok(Outbound::Event(json)) => {
                    if sink.send(Message::Text(json.to_string())).await.is_err() {
                        break;
                    }
                }
                Ok(Outbound::Close { code, reason }) => {
                    close(&mut sink, code, reason).await;
                    break;
                }
                Err(RecvError::Lagged(missed)) => {
                    // The client reads too slowly to keep up; it can reconnect and catch up.
                    let event = Event::error(
                        "slow_consumer",
                        "The connection fell too far behind the reply stream; reconnect to catch up.",
                        json!({"missed_events": missed}),
                    );
                    send(&mut sink, &event).await;
                    close(&mut sink, 1008, "slow_consumer").await;
                    break;
                }
                Err(RecvError::Closed) => break,
            },
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        // The stream ends with its error: nothing more to read.
                        if is_too_large(&e) {
                            close(&mut sink, 1009, "message_too_large").await;
                        }
                        break;
                    }
                    None => break,
                };
                last_heard = Instant::now();
                if matches!(frame, Message::Close(_)) {
                    break;
                }
                if matches!(frame, Message::Ping(_) | Message::Pong(_)) {
                    continue;
                }
                // Every data frame costs a token, whatever it holds: a client cannot get
                // more answers (errors included) than its rate allows.
                if let Err(wait) = bucket.take() {
                    metrics.rate_limited.with_label_values(&["ws"]).inc();
                    refused_in_row += 1;
                    if refused_in_row > max_refused_in_row {
                        send(&mut sink, &rate_limited(wait, rate, burst)).await;
                        close(&mut sink, 1008, "rate_limited").await;
                        linger(&mut stream).await;
                        break;
                    }
                    if !send(&mut sink, &rate_limited(wait, rate, burst)).await {
                        break;
                    }
                    continue;
                }
                refused_in_row = 0;
                let reply = match frame {
                    Message::Text(text) => match parse_client_message(&text, &settings.messages) {
                        Err(e) => Some(e.into_event()),
                        Ok(ClientMessage::Cancel) => service.cancel(&room).err().map(|e| e.to_event()),
                        Ok(ClientMessage::Ping) => Some(Event::Pong),
                        Ok(ClientMessage::Message { content, metadata }) => service
                            .submit(&room, content, metadata)
                            .await
                            .err()
                            .map(|e| e.to_event()),
                    },
                    Message::Binary(data) => Some(
                        if data.len() > settings.messages.max_frame_bytes {
                            FrameError::too_large(data.len(), &settings.messages)
                        } else {
                            FrameError::binary()
                        }
                        .into_event(),
                    ),
                    Message::Close(_) | Message::Ping(_) | Message::Pong(_) => None,
                };
                if let Some(event) = reply {
                    if !send(&mut sink, &event).await {
                        break;
                    }
                }
            }
            _ = ticker.tick() => {
                let quiet = last_heard.elapsed();
                if quiet >= settings.idle_timeout {
                    tracing::debug!(chat = %session.chat_id, "dropping a silent socket");
                    break;
                }
                if quiet >= settings.ping_interval && sink.send(Message::Ping(Vec::new())).await.is_err() {
                    break;
                }
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Closed {
                    // Events sent before the phase changed still go out first.
                    while let Ok(Outbound::Event(json)) = membership.events.try_recv() {
                        if sink.send(Message::Text(json.to_string())).await.is_err() {
                            break;
                        }
                    }
                    close(&mut sink, 1001, "server_shutdown").await;
                    break;
                }
            }
        }
    }
    drop(membership);
}

/// After closing on a client that is still sending: reads and drops what it sends for a
/// moment (bounded by time and frames), so that unread data does not make the kernel answer
/// with a reset that could destroy the close frame before the client reads it.
async fn linger(stream: &mut (impl StreamExt<Item = std::io::Result<Message>> + Unpin)) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        for _ in 0..10_000 {
            match stream.next().await {
                None | Some(Ok(Message::Close(_))) => break,
                _ => {}
            }
        }
    })
    .await;
}

/// Whether a read failed because a frame was over the hard size limit. poem hands
/// tungstenite's errors over as `io::Error::other(message)`, so the message is all there is;
/// `a_frame_over_the_hard_limit_closes_with_1009` fails if it changes.
fn is_too_large(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Other && e.to_string().starts_with("Space limit exceeded")
}

fn rate_limited(wait: Duration, rate: f64, burst: u32) -> Event {
    let retry_after_ms = wait.as_millis().min(u64::MAX as u128) as u64;
    Event::error(
        "rate_limited",
        format!(
            "Too many messages: at most {rate} per second on one connection. The message was not processed."
        ),
        json!({
            "retry_after_ms": retry_after_ms.max(1),
            "limit_per_second": rate,
            "burst": burst,
        }),
    )
}
