//! A chat's live state: the sockets watching it and its one reply in progress.
//!
//! Every event for a chat goes through its room's broadcast channel, sent while the room's
//! lock is held; a socket that joins takes its snapshot and its subscription under the same
//! lock, so it sees every delta exactly once: the text so far, then the live ones.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use uuid::Uuid;

use super::protocol::Event;
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

/// A reply in progress (queued or streaming).
#[derive(Debug)]
pub(super) struct Reply {
    /// The user message it answers; `None` while that is being saved.
    pub user_message: Option<Uuid>,
    pub cancel: CancelToken,
    /// Set by a server shutdown that outlived its grace period: saved as `interrupted`.
    pub interrupted: bool,
    pub queue_position: Option<usize>,
    pub stream: Option<Streamed>,
}

/// The part of a reply already streamed.
#[derive(Debug)]
pub(super) struct Streamed {
    pub message_id: Uuid,
    pub text: String,
    /// Index the next delta gets.
    pub next_index: usize,
}

#[derive(Debug, Default)]
pub(super) struct RoomState {
    pub reply: Option<Reply>,
    pub sockets: usize,
    /// The chat was deleted: no new replies, sockets are being closed.
    pub deleted: bool,
}

/// One chat's live state.
#[derive(Debug)]
pub struct Room {
    pub chat_id: Uuid,
    pub tenant: TenantId,
    events: broadcast::Sender<Outbound>,
    state: Mutex<RoomState>,
}

impl Room {
    pub(super) fn new(tenant: TenantId, chat_id: Uuid, capacity: usize) -> Room {
        let (events, _) = broadcast::channel(capacity.max(16));
        Room {
            chat_id,
            tenant,
            events,
            state: Mutex::new(RoomState::default()),
        }
    }

    /// The state, even if a thread panicked while holding it (the data stays consistent:
    /// every update is a few field writes).
    pub(super) fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends an event to every socket of the chat. Call with the lock held when the event
    /// changes what a joining socket must be told (see the module docs).
    pub(super) fn send(&self, event: &Event) {
        let _ = self.events.send(Outbound::Event(event.to_json().into()));
    }

    pub(super) fn close_all(&self, code: u16, reason: &'static str) {
        let _ = self.events.send(Outbound::Close { code, reason });
    }

    /// Subscribes a socket; returns what it must be told first about a reply in progress.
    pub(super) fn join(&self) -> (broadcast::Receiver<Outbound>, Vec<Event>) {
        let mut st = self.lock();
        st.sockets += 1;
        let rx = self.events.subscribe();
        let mut catch_up = Vec::new();
        if let Some(reply) = &st.reply {
            match (&reply.stream, reply.user_message) {
                (Some(s), Some(user_message)) => {
                    catch_up.push(Event::MessageStreamStarted {
                        message_id: s.message_id,
                        chat_id: self.chat_id,
                        reply_to: user_message,
                    });
                    if s.next_index > 0 {
                        catch_up.push(Event::MessageStreamToken {
                            message_id: s.message_id,
                            token: s.text.clone(),
                            index: s.next_index - 1,
                        });
                    }
                }
                (None, Some(user_message)) => {
                    if let Some(position) = reply.queue_position {
                        catch_up.push(Event::MessageQueued {
                            message_id: user_message,
                            position,
                        });
                    }
                }
                _ => {}
            }
        }
        (rx, catch_up)
    }
}
