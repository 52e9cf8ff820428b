//! Rooms across replicas (cluster mode): a chat's events reach its sockets on every replica,
//! in order, and at most one reply per chat runs in the whole cluster. Redis does the work;
//! there is no protocol of our own between replicas.
//!
//! - **One reply per chat**: a reply first takes the chat's *reply lock*, the Redis hash
//!   `{prefix}:reply:{chat}`, created only where absent (one script, atomic). It expires
//!   unless its replica renews it (every lease/3), so a dead replica's locks go with its
//!   lease.
//! - **The reply's state** (user message, place in the queue, streamed message and text so
//!   far) lives in that hash, changed by the same script call that publishes each event: a
//!   replica whose socket joins mid-reply subscribes, then reads it, and catches the socket
//!   up exactly as the generating replica would.
//! - **Events** are published on `{prefix}:chat:{chat}`, which a replica subscribes to while
//!   it has a room for the chat. A reply's events are numbered from 1; a replica that sees a
//!   gap (Redis dropped messages, for instance while reconnecting) reads the state again and
//!   tells its sockets what they missed.
//! - **Cancel and delete** go to every replica on `{prefix}:control`.
//!
//! One task publishes, in the order the rooms sent (a room sends under its lock), so the
//! order holds on every replica. A publish that fails (Redis away) makes the next one write
//! the whole state, so the state in Redis never lacks a piece its number claims.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::protocol::Event;
use super::room::{ReplyView, Streamed};
use crate::cluster::{Cluster, ClusterHealth};

/// A change of a reply's state; the generating replica sends one with each event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Change {
    None,
    Received { user_message: Uuid },
    Queued { position: usize },
    Started { message_id: Uuid },
    Token { text: String, index: usize },
    Ended,
}

impl Change {
    /// What an event of a reply changes.
    pub(crate) fn of(event: &Event) -> Change {
        match event {
            Event::MessageReceived { message_id, .. } => Change::Received {
                user_message: *message_id,
            },
            Event::MessageQueued { position, .. } => Change::Queued {
                position: *position,
            },
            Event::MessageStreamStarted { message_id, .. } => Change::Started {
                message_id: *message_id,
            },
            Event::MessageStreamToken { token, index, .. } => Change::Token {
                text: token.clone(),
                index: *index,
            },
            _ => Change::None,
        }
    }
}

/// A reply's event as published to the other replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Published {
    /// The replica generating the reply.
    pub from: String,
    pub reply: Uuid,
    /// The event's number in its reply, from 1.
    pub n: u64,
    /// When it was published (µs since the epoch): where the fan-out latency starts.
    pub at_us: i64,
    pub change: Change,
    /// The event as sockets receive it (`None`: a change alone, e.g. a reply that ended
    /// with its chat deleted).
    pub event: Option<String>,
}

/// What one replica tells all the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Control {
    /// Stop the reply (the replica generating it does).
    Cancel { chat: Uuid, reply: Uuid },
    /// The chat is gone: close its sockets (4404) and stop its reply.
    Deleted { tenant: Uuid, chat: Uuid },
    /// The tenant was disabled or deleted: close its sockets and stop its replies.
    TenantClosed {
        tenant: Uuid,
        why: super::TenantClosed,
    },
    /// Replica `from` wrote the chat's title: the other replicas tell their sockets.
    Titled {
        tenant: Uuid,
        chat: Uuid,
        title: String,
        from: String,
    },
}

/// A message from the other replicas.
#[derive(Debug)]
pub(crate) enum Incoming {
    Room { chat: Uuid, msg: Published },
    Control(Control),
}

/// A reply's state as kept in Redis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub owner: String,
    pub reply: Uuid,
    /// Number of the last event the state includes.
    pub n: u64,
    pub view: ReplyView,
}

/// The outcome of taking a chat's reply lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    Taken,
    /// Another reply holds it (on the replica named).
    Busy(String),
    /// Redis cannot tell: this replica serves alone meanwhile.
    Unknown,
}

/// Takes a chat's reply lock if free: `''`, else the holder's replica.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGET', KEYS[1], 'owner') or '?'
end
redis.call('HSET', KEYS[1], 'reply', ARGV[1], 'owner', ARGV[2], 'n', 0, 'next_index', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return ''
";

/// Applies a change to a reply's state and publishes its event, if the reply still holds
/// the lock (else -1, nothing done). Mode `delta` applies one change; mode `full` writes the
/// whole state (taking the lock again if it has gone, e.g. with a restarted Redis) and is
/// also the renewal.
///
/// KEYS: state hash, text. ARGV: reply, owner, n, ttl ms, channel, payload ('' for none),
/// mode; then for `delta`: kind, argument, argument; for `full`: user message, queue
/// position, message id, next index, text, ended ('1'/'0') — empty strings for none.
const EMIT: &str = r"
local cur = redis.call('HGET', KEYS[1], 'reply')
if ARGV[7] == 'full' then
  if cur and cur ~= ARGV[1] then return -1 end
  redis.call('DEL', KEYS[1], KEYS[2])
  if ARGV[13] ~= '1' then
    redis.call('HSET', KEYS[1], 'reply', ARGV[1], 'owner', ARGV[2], 'n', ARGV[3], 'next_index', ARGV[11])
    if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'user_message', ARGV[8]) end
    if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'position', ARGV[9]) end
    if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'message_id', ARGV[10]) end
    redis.call('SET', KEYS[2], ARGV[12])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
else
  if cur ~= ARGV[1] then return -1 end
  local kind = ARGV[8]
  if kind == 'ended' then
    redis.call('DEL', KEYS[1], KEYS[2])
  else
    if kind == 'received' then redis.call('HSET', KEYS[1], 'user_message', ARGV[9])
    elseif kind == 'queued' then redis.call('HSET', KEYS[1], 'position', ARGV[9])
    elseif kind == 'started' then
      redis.call('HSET', KEYS[1], 'message_id', ARGV[9])
      redis.call('HDEL', KEYS[1], 'position')
    elseif kind == 'token' then
      redis.call('APPEND', KEYS[2], ARGV[9])
      redis.call('HSET', KEYS[1], 'next_index', ARGV[10])
    end
    redis.call('HSET', KEYS[1], 'n', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
";

/// A reply's state and text, read together.
const SNAPSHOT: &str = r"
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or ''}
";

/// What the publisher does, in order.
enum Outgoing {
    Event(Emitted),
    Claim {
        chat: Uuid,
        reply: Uuid,
        answer: tokio::sync::oneshot::Sender<Claim>,
    },
}

/// One event of a reply of this replica.
struct Emitted {
    chat: Uuid,
    reply: Uuid,
    n: u64,
    change: Change,
    event: Option<Arc<str>>,
}

/// The publisher's own copy of the state of each reply of this replica: what a `full`
/// write (after a failure, and at each renewal) puts in Redis.
struct Shadow {
    reply: Uuid,
    n: u64,
    view: ReplyView,
    ended: bool,
    /// A write failed: the next one writes the whole state.
    dirty: bool,
}

impl Shadow {
    fn new(reply: Uuid) -> Shadow {
        Shadow {
            reply,
            n: 0,
            view: ReplyView::default(),
            ended: false,
            dirty: false,
        }
    }
}

struct Inner {
    cluster: Cluster,
    outbox: mpsc::UnboundedSender<Outgoing>,
}

/// This replica's side of the rooms shared across replicas; cheap to clone.
#[derive(Clone)]
pub(crate) struct Relay(Arc<Inner>);

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("replica", &self.replica_id())
            .finish()
    }
}

impl Relay {
    /// Starts the publisher; the caller reads the other replicas' messages from
    /// [`Relay::incoming`].
    pub(crate) fn start(cluster: Cluster) -> Relay {
        let (outbox, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(cluster.clone(), rx));
        Relay(Arc::new(Inner { cluster, outbox }))
    }

    pub(crate) fn replica_id(&self) -> &str {
        self.0.cluster.replica_id()
    }

    pub(crate) fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    pub(crate) fn lease(&self) -> Duration {
        self.0.cluster.lease()
    }

    fn state_keys(&self, chat: Uuid) -> (String, String) {
        state_keys(&self.0.cluster, chat)
    }

    fn channel(&self, chat: Uuid) -> String {
        channel(&self.0.cluster, chat)
    }

    fn control_channel(&self) -> String {
        self.0.cluster.key("control")
    }

    /// Whether Redis is believed reachable (requests do not wait on one known to be down).
    fn up(&self) -> bool {
        self.0.cluster.health() == ClusterHealth::Ok
    }

    /// Takes the chat's reply lock for `reply`. It goes through the publisher, after the
    /// events already sent: the end of this replica's previous reply in the chat (which
    /// releases the lock) is written first, so a client answering at once to
    /// `message_stream_ended` is not told `generation_in_progress`.
    pub(crate) async fn claim(&self, chat: Uuid, reply: Uuid) -> Claim {
        if !self.up() {
            return Claim::Unknown;
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        let _ = self.0.outbox.send(Outgoing::Claim {
            chat,
            reply,
            answer,
        });
        answered.await.unwrap_or(Claim::Unknown)
    }

    /// Queues a reply's event for the other replicas (in order; never waits).
    pub(crate) fn emit(
        &self,
        chat: Uuid,
        reply: Uuid,
        n: u64,
        change: Change,
        event: Option<Arc<str>>,
    ) {
        let _ = self.0.outbox.send(Outgoing::Event(Emitted {
            chat,
            reply,
            n,
            change,
            event,
        }));
    }

    /// The chat's reply state: `Some(None)` when no reply is in progress, `None` when
    /// Redis cannot tell.
    pub(crate) async fn snapshot(&self, chat: Uuid) -> Option<Option<Snapshot>> {
        if !self.up() {
            return None;
        }
        let (hash, text) = self.state_keys(chat);
        let mut redis = self.0.cluster.redis();
        let query = redis::cmd("EVAL")
            .arg(SNAPSHOT)
            .arg(2)
            .arg(hash)
            .arg(text)
            .to_owned();
        let (fields, text): (HashMap<String, String>, String) =
            self.0.cluster.call(query.query_async(&mut redis)).await?;
        Some(parse_snapshot(&fields, text))
    }

    /// Whether `reply` still holds the chat's lock (`None`: Redis cannot tell).
    pub(crate) async fn holds(&self, chat: Uuid, reply: Uuid) -> Option<bool> {
        if !self.up() {
            return None;
        }
        let (hash, _) = self.state_keys(chat);
        let mut redis = self.0.cluster.redis();
        let query = redis::cmd("HGET").arg(hash).arg("reply").to_owned();
        let holder: Option<String> = self.0.cluster.call(query.query_async(&mut redis)).await?;
        Some(holder.as_deref() == Some(reply.to_string().as_str()))
    }

    /// Starts receiving the chat's events (one more holder: see [`Cluster::subscribe`]);
    /// the answer says whether Redis confirmed.
    pub(crate) fn watch(&self, chat: Uuid) -> tokio::sync::oneshot::Receiver<bool> {
        self.0.cluster.subscribe(self.channel(chat))
    }

    pub(crate) fn unwatch(&self, chat: Uuid) {
        self.0.cluster.unsubscribe(self.channel(chat))
    }

    /// Starts receiving the other replicas' control messages.
    pub(crate) async fn watch_control(&self) -> bool {
        self.0
            .cluster
            .subscribe(self.control_channel())
            .await
            .unwrap_or(false)
    }

    /// Tells every replica (this one included) `control`.
    pub(crate) async fn tell(&self, control: &Control) {
        if !self.up() {
            return;
        }
        let Ok(payload) = serde_json::to_string(control) else {
            return;
        };
        let mut redis = self.0.cluster.redis();
        let query = redis::cmd("PUBLISH")
            .arg(self.control_channel())
            .arg(payload)
            .to_owned();
        self.0
            .cluster
            .call(query.query_async::<i64>(&mut redis))
            .await;
    }

    /// The other replicas' messages, decoded; taken once.
    pub(crate) fn incoming(&self) -> Option<mpsc::UnboundedReceiver<Incoming>> {
        let mut pushes = self.0.cluster.take_pushes()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let relay = self.clone();
        tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                if let Some(incoming) = relay.decode(push) {
                    if tx.send(incoming).is_err() {
                        break;
                    }
                }
            }
        });
        Some(rx)
    }

    fn decode(&self, push: PushInfo) -> Option<Incoming> {
        if push.kind != PushKind::Message {
            return None;
        }
        let [channel, payload] = <[Value; 2]>::try_from(push.data).ok()?;
        let channel: String = redis::from_redis_value(channel).ok()?;
        let payload: String = redis::from_redis_value(payload).ok()?;
        let decoded = if channel == self.control_channel() {
            serde_json::from_str(&payload).map(Incoming::Control)
        } else {
            let chat = channel
                .strip_prefix(&self.0.cluster.key("chat:"))
                .and_then(|c| c.parse().ok())?;
            serde_json::from_str(&payload).map(|msg| Incoming::Room { chat, msg })
        };
        match decoded {
            Ok(incoming) => Some(incoming),
            Err(e) => {
                tracing::warn!(%channel, error = %e, "unreadable message from another replica");
                None
            }
        }
    }
}

/// The Redis keys of a chat's reply lock and state, and of its text so far.
fn state_keys(cluster: &Cluster, chat: Uuid) -> (String, String) {
    let hash = cluster.key(&format!("reply:{chat}"));
    let text = format!("{hash}:text");
    (hash, text)
}

/// The channel of a chat's events.
fn channel(cluster: &Cluster, chat: Uuid) -> String {
    cluster.key(&format!("chat:{chat}"))
}

fn parse_snapshot(fields: &HashMap<String, String>, text: String) -> Option<Snapshot> {
    let reply = fields.get("reply")?.parse().ok()?;
    let uuid = |k: &str| fields.get(k).and_then(|v| v.parse::<Uuid>().ok());
    let number = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let stream = uuid("message_id").map(|message_id| Streamed {
        message_id,
        text,
        next_index: number("next_index").unwrap_or(0) as usize,
    });
    Some(Snapshot {
        owner: fields.get("owner").cloned().unwrap_or_default(),
        reply,
        n: number("n").unwrap_or(0),
        view: ReplyView {
            user_message: uuid("user_message"),
            queue_position: number("position").map(|p| p as usize),
            stream,
        },
    })
}

/// Publishes this replica's reply events in the order they were sent, and renews the locks
/// of its replies (a `full` write of each, every lease/3), until the relay is dropped.
async fn publish(cluster: Cluster, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut shadows: HashMap<Uuid, Shadow> = HashMap::new();
    let lease = cluster.lease();
    let mut renew = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            next = rx.recv() => {
                let out = match next {
                    None => break,
                    Some(Outgoing::Claim { chat, reply, answer }) => {
                        let claim = take_lock(&cluster, chat, reply).await;
                        if claim == Claim::Taken {
                            // Renewed from now on, even before its first event.
                            shadows.insert(chat, Shadow::new(reply));
                        }
                        let _ = answer.send(claim);
                        continue;
                    }
                    Some(Outgoing::Event(out)) => out,
                };
                let shadow = shadows
                    .entry(out.chat)
                    .or_insert_with(|| Shadow::new(out.reply));
                if shadow.reply != out.reply {
                    // A new reply of the chat (the last one's end was already written).
                    *shadow = Shadow::new(out.reply);
                }
                shadow.n = out.n;
                shadow.view.apply(&out.change);
                shadow.ended = out.change == Change::Ended;
                let written = if cluster.health() != ClusterHealth::Ok {
                    false
                } else {
                    let published = Published {
                        from: cluster.replica_id().to_string(),
                        reply: out.reply,
                        n: out.n,
                        at_us: chrono::Utc::now().timestamp_micros(),
                        change: out.change.clone(),
                        event: out.event.map(|e| e.to_string()),
                    };
                    let payload = serde_json::to_string(&published).unwrap_or_default();
                    write(&cluster, out.chat, shadow, Some(&out.change), &payload).await
                };
                shadow.dirty = !written;
                if shadow.ended {
                    // A lock whose release failed expires with its lease.
                    shadows.remove(&out.chat);
                }
            }
            _ = renew.tick() => {
                // Redis away: the first write once it is back rewrites the whole state.
                if cluster.health() != ClusterHealth::Ok {
                    for shadow in shadows.values_mut() {
                        shadow.dirty = true;
                    }
                    continue;
                }
                for (chat, shadow) in shadows.iter_mut() {
                    shadow.dirty = !write(&cluster, *chat, shadow, None, "").await;
                }
            }
        }
    }
}

/// The `CLAIM` script.
async fn take_lock(cluster: &Cluster, chat: Uuid, reply: Uuid) -> Claim {
    if cluster.health() != ClusterHealth::Ok {
        return Claim::Unknown;
    }
    let mut redis = cluster.redis();
    let query = redis::cmd("EVAL")
        .arg(CLAIM)
        .arg(1)
        .arg(state_keys(cluster, chat).0)
        .arg(reply.to_string())
        .arg(cluster.replica_id())
        .arg(cluster.lease().as_millis() as u64)
        .to_owned();
    match cluster.call(query.query_async::<String>(&mut redis)).await {
        Some(holder) if holder.is_empty() => Claim::Taken,
        Some(holder) => Claim::Busy(holder),
        None => Claim::Unknown,
    }
}

/// One `EMIT` call: `change` as a delta (unless the shadow is dirty or there is no change:
/// then the whole state), publishing `payload` if not empty. `false` when it did not
/// happen.
async fn write(
    cluster: &Cluster,
    chat: Uuid,
    shadow: &Shadow,
    change: Option<&Change>,
    payload: &str,
) -> bool {
    let (hash, text) = state_keys(cluster, chat);
    let mut query = redis::cmd("EVAL");
    query
        .arg(EMIT)
        .arg(2)
        .arg(hash)
        .arg(text)
        .arg(shadow.reply.to_string())
        .arg(cluster.replica_id())
        .arg(shadow.n)
        .arg(cluster.lease().as_millis() as u64)
        .arg(channel(cluster, chat));
    query.arg(payload);
    match change {
        Some(change) if !shadow.dirty => {
            let (kind, a, b) = match change {
                Change::None => ("none", String::new(), String::new()),
                Change::Received { user_message } => {
                    ("received", user_message.to_string(), String::new())
                }
                Change::Queued { position } => ("queued", position.to_string(), String::new()),
                Change::Started { message_id } => {
                    ("started", message_id.to_string(), String::new())
                }
                Change::Token { text, index } => ("token", text.clone(), (index + 1).to_string()),
                Change::Ended => ("ended", String::new(), String::new()),
            };
            query.arg("delta").arg(kind).arg(a).arg(b);
        }
        _ => {
            let v = &shadow.view;
            let opt = |x: Option<String>| x.unwrap_or_default();
            query
                .arg("full")
                .arg(opt(v.user_message.map(|u| u.to_string())))
                .arg(opt(v.queue_position.map(|p| p.to_string())))
                .arg(opt(v.stream.as_ref().map(|s| s.message_id.to_string())))
                .arg(v.stream.as_ref().map_or(0, |s| s.next_index))
                .arg(v.stream.as_ref().map_or("", |s| s.text.as_str()))
                .arg(if shadow.ended { "1" } else { "0" });
        }
    }
    let mut redis = cluster.redis();
    match cluster.call(query.query_async::<i64>(&mut redis)).await {
        Some(1) => true,
        Some(_) => {
            tracing::warn!(%chat, reply = %shadow.reply, "the chat's reply lock is held by another reply");
            // Written as far as it can be: retrying would not change that.
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_back_what_the_script_writes() {
        let message = Uuid::new_v4();
        let user = Uuid::new_v4();
        let reply = Uuid::new_v4();
        let fields: HashMap<String, String> = [
            ("reply", reply.to_string()),
            ("owner", "a".into()),
            ("n", "7".into()),
            ("next_index", "3".into()),
            ("user_message", user.to_string()),
            ("message_id", message.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let snap = parse_snapshot(&fields, "Hello".into()).unwrap();
        assert_eq!(snap.n, 7);
        assert_eq!(snap.owner, "a");
        assert_eq!(snap.view.user_message, Some(user));
        let s = snap.view.stream.unwrap();
        assert_eq!(
            (s.message_id, s.text.as_str(), s.next_index),
            (message, "Hello", 3)
        );
        assert!(parse_snapshot(&HashMap::new(), String::new()).is_none());
    }

    #[test]
    fn events_change_the_view_as_the_mirror_applies_them() {
        let (user, message) = (Uuid::new_v4(), Uuid::new_v4());
        let chat = Uuid::new_v4();
        let mut view = ReplyView::default();
        for e in [
            Event::MessageReceived {
                message_id: user,
                chat_id: chat,
                parent_id: None,
            },
            Event::MessageQueued {
                message_id: user,
                position: 2,
            },
            Event::MessageStreamStarted {
                message_id: message,
                chat_id: chat,
                reply_to: user,
            },
            Event::MessageStreamToken {
                message_id: message,
                token: "Hi".into(),
                index: 0,
            },
            Event::MessageStreamToken {
                message_id: message,
                token: " there".into(),
                index: 1,
            },
        ] {
            view.apply(&Change::of(&e));
        }
        assert_eq!(view.queue_position, None);
        let s = view.stream.clone().unwrap();
        assert_eq!((s.text.as_str(), s.next_index), ("Hi there", 2));
        let was = ReplyView {
            stream: Some(Streamed {
                text: "Hi".into(),
                next_index: 1,
                ..s
            }),
            ..view.clone()
        };
        let missed = was.catch_up_from(&view, chat);
        assert!(matches!(
            &missed[..],
            [Event::MessageStreamToken { token, index: 1, .. }] if token == " there"
        ));
    }
}
