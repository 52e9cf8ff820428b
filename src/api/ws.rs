//! `GET /ws/chat`: the WebSocket end of live chat.
//!
//! The upgrade is always accepted, even with bad credentials: browsers cannot read the
//! status of a refused handshake, so the refusal comes as one `error` event followed by a
//! close frame whose code says what went wrong (4400 bad or missing parameter, 4401 key,
//! 4404 chat, 4429 too many connections; `ApiError::close_code` decides) and whose reason
//! is the error code.
//!
//! After that a [`Socket`] handles four sources of events, one method each: client frames,
//! the chat room's events, a timer tick and the server's shutdown phase. Each returns whether
//! the socket goes on. Everything a client sends is checked by `chat::protocol`; the work is
//! done by `chat::ChatService`; every error goes out through `ApiError`.

use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::web::Data;
use poem::{handler, IntoResponse, Request};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::AppState;
use crate::chat::protocol::{parse_client_message, ClientMessage, Credentials, Event, FrameError};
use crate::chat::{
    ChatService, ChatSettings, ConnectionGuard, Membership, Outbound, Phase, Sender,
};
use crate::error::ApiError;
use crate::ratelimit::TokenBucket;
use crate::store::TenantId;

/// An accepted connection.
struct Session {
    tenant: TenantId,
    /// The key the socket authenticated with (its replies' usage is recorded against it).
    key_id: Uuid,
    /// Messages per second this connection may send (and its burst): the tenant's quota.
    messages_per_second: u32,
    user_id: String,
    chat_id: Uuid,
    user_created: bool,
    _guard: ConnectionGuard,
}

/// Checks the credentials, the tenant's connection cap and the chat.
async fn open(state: &AppState, creds: Credentials) -> Result<Session, ApiError> {
    let (key, user_id, chat_id) = creds.validate()?;
    let caller = state.auth.authenticate(&key).await?;
    // A user token's socket is its user's: another user's chats do not exist for it.
    if caller.user.as_deref().is_some_and(|u| u != user_id) {
        return Err(ApiError::ChatNotFound(chat_id));
    }
    let tenant = caller.tenant;
    let limits = state.quotas.limits(tenant).await;
    let guard = state
        .chat
        .connect(tenant, limits.max_connections as usize)
        .await?;
    let scope = caller.scope(&state.store);
    let chat = scope
        .get_chat(chat_id)
        .await
        .map_err(ApiError::for_chat(chat_id))?;
    // Another user's chat is as invisible as another tenant's.
    if chat.user_id != user_id {
        return Err(ApiError::ChatNotFound(chat_id));
    }
    let user_created = scope.ensure_user(&user_id).await?;
    Ok(Session {
        tenant,
        key_id: caller.key_id,
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
    let address = req.remote_addr().as_socket_addr().map(|a| a.ip());
    let max_frame = state.chat.settings().messages.max_frame_bytes;
    // Frames a little over the limit are read and answered with `message_too_large`
    // (the connection stays usable); far larger ones end the connection (1009).
    let hard_limit = max_frame.saturating_mul(4).max(1024 * 1024);
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(hard_limit);
    config.max_frame_size = Some(hard_limit);
    ws.config(config).on_upgrade(move |socket| async move {
        run_socket(state, creds, address, socket).await;
    })
}

type Sink = SplitSink<WebSocketStream, Message>;
type Stream = SplitStream<WebSocketStream>;

async fn send(sink: &mut Sink, event: &Event) -> bool {
    sink.send(Message::Text(event.to_json())).await.is_ok()
}

async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some((
            CloseCode::from(code),
            reason.to_string(),
        ))))
        .await;
}

/// Sends the error's event, then closes with its close code and its code as the reason.
async fn send_and_close(sink: &mut Sink, e: &ApiError) {
    send(sink, &e.to_event()).await;
    close(sink, e.close_code(), e.code()).await;
}

/// Whether a socket goes on after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Flow {
    fn from_sent(sent: bool) -> Flow {
        if sent {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

/// `address`: the client's, for the audit log's count of failed authentications.
async fn run_socket(
    state: AppState,
    creds: Credentials,
    address: Option<std::net::IpAddr>,
    socket: WebSocketStream,
) {
    let (mut sink, mut stream) = socket.split();
    let session = match open(&state, creds).await {
        Ok(s) => s,
        Err(e) => {
            if e.is_auth_failure() {
                state
                    .audit
                    .auth_failed(address, crate::audit::Via::WebSocket, e.code());
            }
            return send_and_close(&mut sink, &e).await;
        }
    };
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
    let Some(mut socket) = Socket::start(state.chat.clone(), session, sink).await else {
        return;
    };
    let mut phase = state.chat.phase();
    let settings = state.chat.settings();
    let tick = settings
        .ping_interval
        .min(settings.idle_timeout)
        .max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(tick);
    ticker.reset();
    loop {
        let flow = tokio::select! {
            // Room events first: what a reply said before a close must reach the client.
            biased;
            out = socket.membership.events.recv() => socket.on_room_event(out).await,
            frame = stream.next() => socket.on_frame(frame, &mut stream).await,
            _ = ticker.tick() => socket.on_tick().await,
            changed = phase.changed() => {
                let closed = changed.is_err() || *phase.borrow() == Phase::Closed;
                socket.on_phase(closed).await
            }
        };
        if flow == Flow::Stop {
            break;
        }
    }
}

/// An open socket of one chat: the connection's state and its rules.
struct Socket {
    service: ChatService,
    /// The user and key its messages come from.
    sender: Sender,
    settings: ChatSettings,
    session: Session,
    membership: Membership,
    sink: Sink,
    bucket: TokenBucket,
    /// Data frames refused for their rate since the last one accepted.
    refused_in_row: usize,
    /// Beyond this many refused in a row the socket is closed (1008): each refused frame
    /// still gets its `rate_limited` answer, so a client knows which were dropped, but a
    /// client that ignores them is not answered forever.
    max_refused_in_row: usize,
    last_heard: Instant,
}

impl Socket {
    /// Greets the client, joins the chat's room and sends the catch-up; `None` when the
    /// client is already gone.
    async fn start(service: ChatService, session: Session, mut sink: Sink) -> Option<Socket> {
        let established = Event::ConnectionEstablished {
            user_id: session.user_id.clone(),
            chat_id: session.chat_id,
            tenant_id: session.tenant.as_uuid(),
        };
        if !send(&mut sink, &established).await {
            return None;
        }
        if session.user_created {
            let created = Event::UserCreated {
                user_id: session.user_id.clone(),
            };
            if !send(&mut sink, &created).await {
                return None;
            }
        }
        let (membership, catch_up) = match service.join(session.tenant, session.chat_id).await {
            Ok(joined) => joined,
            Err(e) => {
                send_and_close(&mut sink, &e.into()).await;
                return None;
            }
        };
        for e in catch_up {
            if !send(&mut sink, &e).await {
                return None;
            }
        }
        let rate = session.messages_per_second;
        Some(Socket {
            sender: Sender {
                user_id: session.user_id.clone(),
                key_id: session.key_id,
            },
            settings: service.settings().clone(),
            service,
            bucket: TokenBucket::new(f64::from(rate), rate),
            max_refused_in_row: (rate as usize).max(4) * 5,
            refused_in_row: 0,
            last_heard: Instant::now(),
            session,
            membership,
            sink,
        })
    }

    /// An event of the chat's room (a reply's progress, or the room closing).
    async fn on_room_event(&mut self, out: Result<Outbound, RecvError>) -> Flow {
        match out {
            Ok(Outbound::Event(json)) => Flow::from_sent(
                self.sink
                    .send(Message::Text(json.to_string()))
                    .await
                    .is_ok(),
            ),
            Ok(Outbound::Close { code, reason }) => {
                close(&mut self.sink, code, reason).await;
                Flow::Stop
            }
            Err(RecvError::Lagged(missed)) => {
                // The client reads too slowly to keep up; it can reconnect and catch up.
                send_and_close(&mut self.sink, &ApiError::SlowConsumer { missed }).await;
                Flow::Stop
            }
            Err(RecvError::Closed) => Flow::Stop,
        }
    }

    /// A frame from the client (`None`: it went away).
    async fn on_frame(
        &mut self,
        frame: Option<std::io::Result<Message>>,
        stream: &mut Stream,
    ) -> Flow {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // The stream ends with its error: nothing more to read.
                if is_too_large(&e) {
                    let e = ApiError::from(FrameError::over_hard_limit());
                    close(&mut self.sink, e.close_code(), e.code()).await;
                }
                return Flow::Stop;
            }
            None => return Flow::Stop,
        };
        self.last_heard = Instant::now();
        let answer = match frame {
            Message::Close(_) => return Flow::Stop,
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            data => {
                // Every data frame costs a token, whatever it holds: a client cannot get
                // more answers (errors included) than its rate allows.
                if let Err(wait) = self.bucket.take() {
                    return self.refuse_for_rate(wait, stream).await;
                }
                self.refused_in_row = 0;
                self.answer(data).await
            }
        };
        match answer {
            Some(event) => Flow::from_sent(send(&mut self.sink, &event).await),
            None => Flow::Continue,
        }
    }

    /// What a data frame gets back, if anything (the events of a reply it starts come
    /// through the room).
    async fn answer(&self, frame: Message) -> Option<Event> {
        let limits = &self.settings.messages;
        let room = &self.membership.room;
        let result: Result<Option<Event>, ApiError> = match frame {
            Message::Text(text) => match parse_client_message(&text, limits) {
                Err(e) => Err(e.into()),
                Ok(ClientMessage::Ping) => Ok(Some(Event::Pong)),
                Ok(ClientMessage::Cancel) => self
                    .service
                    .cancel(room)
                    .map(|()| None)
                    .map_err(ApiError::from),
                Ok(ClientMessage::Turn(turn)) => self
                    .service
                    .submit(room, &self.sender, turn)
                    .await
                    .map(|()| None)
                    .map_err(ApiError::from),
            },
            Message::Binary(data) if data.len() > limits.max_frame_bytes => {
                Err(FrameError::too_large(data.len(), limits).into())
            }
            _ => Err(FrameError::binary().into()),
        };
        result.unwrap_or_else(|e| Some(e.to_event()))
    }

    /// A data frame over the connection's rate: answered `rate_limited`, and after too many
    /// in a row, the socket is closed.
    async fn refuse_for_rate(&mut self, wait: Duration, stream: &mut Stream) -> Flow {
        crate::metrics::metrics()
            .rate_limited
            .with_label_values(&["ws"])
            .inc();
        let rate = self.session.messages_per_second;
        let refused = ApiError::MessageRateLimited {
            per_second: f64::from(rate),
            burst: rate,
            retry_after_ms: (wait.as_millis().min(u64::MAX as u128) as u64).max(1),
        };
        self.refused_in_row += 1;
        if self.refused_in_row > self.max_refused_in_row {
            send_and_close(&mut self.sink, &refused).await;
            linger(stream).await;
            return Flow::Stop;
        }
        Flow::from_sent(send(&mut self.sink, &refused.to_event()).await)
    }

    /// The timer: pings a quiet client, drops a silent one.
    async fn on_tick(&mut self) -> Flow {
        let quiet = self.last_heard.elapsed();
        if quiet >= self.settings.idle_timeout {
            tracing::debug!(chat = %self.session.chat_id, "dropping a silent socket");
            return Flow::Stop;
        }
        if quiet >= self.settings.ping_interval {
            return Flow::from_sent(self.sink.send(Message::Ping(Vec::new())).await.is_ok());
        }
        Flow::Continue
    }

    /// The server's phase changed; once it is closed, so is the socket (1001).
    async fn on_phase(&mut self, closed: bool) -> Flow {
        if !closed {
            return Flow::Continue;
        }
        // Events sent before the phase changed still go out first.
        while let Ok(Outbound::Event(json)) = self.membership.events.try_recv() {
            if self
                .sink
                .send(Message::Text(json.to_string()))
                .await
                .is_err()
            {
                break;
            }
        }
        close(
            &mut self.sink,
            crate::chat::protocol::close::GOING_AWAY,
            "server_shutdown",
        )
        .await;
        Flow::Stop
    }
}

/// After closing on a client that is still sending: reads and drops what it sends for a
/// moment (bounded by time and frames), so that unread data does not make the kernel answer
/// with a reset that could destroy the close frame before the client reads it.
async fn linger(stream: &mut Stream) {
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
