//! A chat's live state: the sockets watching it and its one reply in progress.
//!
//! Every event for a chat goes through its room's broadcast channel, sent while the room's
//! lock is held; a socket that joins takes its snapshot and its subscription under the same
//! lock, so it sees every delta exactly once: the text so far, then the live ones.
//!
//! In cluster mode a room may also mirror a reply another replica generates
//! ([`RemoteReply`]): the other replica's events arrive numbered through the [`Relay`], are
//! applied to the mirrored state and passed on to this replica's sockets, so a socket joining
//! here is caught up the same way whichever replica generates.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use super::protocol::Event;
use super::relay::{Change, Published, Relay};
use crate::engine::CancelToken;
use crate::store::TenantId;

/// What a socket receives from its room.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A serialized event.
    Event(Arc<str>),
    /// Close the socket: the chat is gone or the server stops.
    Close { code: u16, reason: &'static str },
}

/// What a joining socket must be told about a reply: the part every replica knows, whether
/// it generates the reply or mirrors it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ReplyView {
    /// The user message it answers; `None` while that is being saved.
    pub user_message: Option<Uuid>,
    pub queue_position: Option<usize>,
    pub stream: Option<Streamed>,
}

/// The part of a reply already streamed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Streamed {
    pub message_id: Uuid,
    pub text: String,
    /// Index the next delta gets.
    pub next_index: usize,
}

impl ReplyView {
    /// Applies a change the generating replica announced (`Ended` is the caller's: the
    /// view then goes).
    pub(crate) fn apply(&mut self, change: &Change) {
        match change {
            Change::Received { user_message } => self.user_message = Some(*user_message),
            Change::Queued { position } => self.queue_position = Some(*position),
            Change::Started { message_id } => {
                self.queue_position = None;
                self.stream = Some(Streamed {
                    message_id: *message_id,
                    text: String::new(),
                    next_index: 0,
                });
            }
            Change::Token { text, index } => {
                if let Some(s) = self.stream.as_mut() {
                    s.text.push_str(text);
                    s.next_index = index + 1;
                }
            }
            Change::None | Change::Ended => {}
        }
    }

    /// The events that bring a socket that knows nothing of the reply up to date.
    pub(crate) fn catch_up(&self, chat_id: Uuid) -> Vec<Event> {
        let mut events = Vec::new();
        match (&self.stream, self.user_message) {
            (Some(s), Some(user_message)) => {
                events.push(Event::MessageStreamStarted {
                    message_id: s.message_id,
                    chat_id,
                    reply_to: user_message,
                });
                if s.next_index > 0 {
                    events.push(Event::MessageStreamToken {
                        message_id: s.message_id,
                        token: s.text.clone(),
                        index: s.next_index - 1,
                    });
                }
            }
            (None, Some(user_message)) => {
                if let Some(position) = self.queue_position {
                    events.push(Event::MessageQueued {
                        message_id: user_message,
                        position,
                    });
                }
            }
            _ => {}
        }
        events
    }

    /// The events that bring a socket that knew `self` up to `now` (the same reply): what a
    /// mirroring replica sends after it missed some of the generating one's events.
    pub(crate) fn catch_up_from(&self, now: &ReplyView, chat_id: Uuid) -> Vec<Event> {
        match (&self.stream, &now.stream) {
            (Some(was), Some(is)) if was.message_id == is.message_id => {
                match is.text.strip_prefix(was.text.as_str()) {
                    Some(missed) if is.next_index > was.next_index => {
                        vec![Event::MessageStreamToken {
                            message_id: is.message_id,
                            token: missed.to_string(),
                            index: is.next_index - 1,
                        }]
                    }
                    _ => Vec::new(),
                }
            }
            (None, _) => {
                let mut events = now.catch_up(chat_id);
                // Only a new place in the queue is news.
                if now.stream.is_none() && now.queue_position == self.queue_position {
                    events.clear();
                }
                events
            }
            (Some(_), _) => Vec::new(),
        }
    }
}

/// A reply in progress on this replica (queued or streaming).
#[derive(Debug)]
pub(super) struct Reply {
    /// Names the reply across the replicas: its lock and its events' numbers.
    pub id: Uuid,
    /// Number of the reply's events sent so far (they are numbered from 1).
    pub sent: u64,
    pub cancel: CancelToken,
    /// Set by a server shutdown that outlived its grace period: saved as `interrupted`.
    pub interrupted: bool,
    pub view: ReplyView,
}

impl Reply {
    pub(super) fn new() -> Reply {
        Reply {
            id: Uuid::new_v4(),
            sent: 0,
            cancel: CancelToken::default(),
            interrupted: false,
            view: ReplyView::default(),
        }
    }
}

/// A reply another replica generates, as mirrored here (cluster mode).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RemoteReply {
    pub id: Uuid,
    pub owner: String,
    /// Number of the last of its events applied.
    pub n: u64,
    pub view: ReplyView,
}

/// A numbered event did not follow the last one applied: some were missed, and the state
/// must be read again.
#[derive(Debug)]
pub(super) struct Gap;

#[derive(Debug, Default)]
pub(super) struct RoomState {
    pub reply: Option<Reply>,
    pub remote: Option<RemoteReply>,
    pub sockets: usize,
    /// The chat was deleted: no new replies, sockets are being closed.
    pub deleted: bool,
    /// Cluster mode: the mirrored state is being read from Redis; the other replicas'
    /// events wait here meanwhile, in order.
    pub syncing: Option<Vec<Published>>,
}

impl RoomState {
    /// What a joining socket is told about: this replica's reply, else a mirrored one.
    fn view(&self) -> Option<&ReplyView> {
        self.reply
            .as_ref()
            .map(|r| &r.view)
            .or(self.remote.as_ref().map(|r| &r.view))
    }
}

/// One chat's live state.
#[derive(Debug)]
pub struct Room {
    pub chat_id: Uuid,
    pub tenant: TenantId,
    events: broadcast::Sender<Outbound>,
    state: Mutex<RoomState>,
    /// Cluster mode: where this room's reply events also go.
    relay: Option<Relay>,
    /// `false` until the mirrored state has been read once (cluster mode): sockets join
    /// after that.
    ready: watch::Sender<bool>,
}

impl Room {
    pub(super) fn new(
        tenant: TenantId,
        chat_id: Uuid,
        capacity: usize,
        relay: Option<Relay>,
    ) -> Room {
        let (events, _) = broadcast::channel(capacity.max(16));
        let mirrored = relay.is_some();
        Room {
            chat_id,
            tenant,
            events,
            state: Mutex::new(RoomState {
                syncing: mirrored.then(Vec::new),
                ..RoomState::default()
            }),
            relay,
            ready: watch::channel(!mirrored).0,
        }
    }

    /// The state, even if a thread panicked while holding it (the data stays consistent:
    /// every update is a few field writes).
    pub(super) fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an event of this replica's reply to every socket of the chat, on every replica
    /// (call with the lock held: see the module docs). Without a reply here, to this
    /// replica's sockets only.
    pub(super) fn send(&self, st: &mut RoomState, event: &Event) {
        let json: Arc<str> = event.to_json().into();
        let _ = self.events.send(Outbound::Event(json.clone()));
        if let Some(reply) = st.reply.as_mut() {
            // The reply's state follows its events, here as on the replicas mirroring it.
            let change = Change::of(event);
            reply.view.apply(&change);
            if let Some(relay) = &self.relay {
                reply.sent += 1;
                relay.emit(self.chat_id, reply.id, reply.sent, change, Some(json));
            }
        }
    }

    /// Records the stored user message this replica's reply answers where no event says so
    /// (a regenerated reply saves none), here and on the replicas mirroring the reply: a
    /// socket that joins later is told whom the reply answers.
    pub(super) fn answering(&self, st: &mut RoomState, user_message: Uuid) {
        if let Some(reply) = st.reply.as_mut() {
            let change = Change::Received { user_message };
            reply.view.apply(&change);
            if let Some(relay) = &self.relay {
                reply.sent += 1;
                relay.emit(self.chat_id, reply.id, reply.sent, change, None);
            }
        }
    }

    /// Sends an event to this replica's sockets only (what every replica sends itself).
    pub(super) fn send_local(&self, event: &Event) {
        let _ = self.events.send(Outbound::Event(event.to_json().into()));
    }

    /// Ends this replica's reply, with its last event if any (in cluster mode the other
    /// replicas learn that it ended, and its lock is released).
    pub(super) fn finish(&self, st: &mut RoomState, event: Option<&Event>) {
        let Some(mut reply) = st.reply.take() else {
            return;
        };
        let json: Option<Arc<str>> = event.map(|e| e.to_json().into());
        if let Some(json) = &json {
            let _ = self.events.send(Outbound::Event(json.clone()));
        }
        if let Some(relay) = &self.relay {
            reply.sent += 1;
            relay.emit(self.chat_id, reply.id, reply.sent, Change::Ended, json);
        }
    }

    pub(super) fn close_all(&self, code: u16, reason: &'static str) {
        let _ = self.events.send(Outbound::Close { code, reason });
    }

    /// Subscribes a socket (already counted in `sockets`) once the room is ready; returns
    /// what it must be told first about a reply in progress. `None` when the chat was
    /// deleted meanwhile (its sockets' close was sent before this one listened).
    pub(super) async fn subscribe(&self) -> Option<(broadcast::Receiver<Outbound>, Vec<Event>)> {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
        let st = self.lock();
        if st.deleted {
            return None;
        }
        let rx = self.events.subscribe();
        let catch_up = st
            .view()
            .map(|v| v.catch_up(self.chat_id))
            .unwrap_or_default();
        Some((rx, catch_up))
    }

    /// A receiver of the room's events (a socket's real one comes with its catch-up from
    /// [`Room::subscribe`]).
    pub(super) fn receiver(&self) -> broadcast::Receiver<Outbound> {
        self.events.subscribe()
    }

    /// Sockets may join: the mirrored state has been read (or could not be).
    pub(super) fn set_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Applies another replica's numbered event and passes it on to this replica's sockets.
    pub(super) fn apply_remote(&self, st: &mut RoomState, msg: Published) -> Result<(), Gap> {
        match st.remote.as_mut() {
            Some(r) if r.id == msg.reply => {
                if msg.n <= r.n {
                    return Ok(());
                }
                if msg.n != r.n + 1 {
                    return Err(Gap);
                }
                r.n = msg.n;
            }
            _ if msg.n == 1 => {
                st.remote = Some(RemoteReply {
                    id: msg.reply,
                    owner: msg.from,
                    n: 1,
                    view: ReplyView::default(),
                });
            }
            _ => return Err(Gap),
        }
        if let Change::Token { .. } = msg.change {
            let ms = (chrono::Utc::now().timestamp_micros() - msg.at_us).max(0);
            crate::metrics::metrics()
                .cluster_fanout
                .observe(ms as f64 / 1e6);
        }
        if msg.change == Change::Ended {
            st.remote = None;
        } else if let Some(r) = st.remote.as_mut() {
            r.view.apply(&msg.change);
        }
        if let Some(event) = msg.event {
            let _ = self.events.send(Outbound::Event(event.into()));
        }
        Ok(())
    }
}
