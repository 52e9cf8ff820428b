//! Live chat: user messages in, streamed replies out, everything saved.
//!
//! The [`ChatService`] sits between the WebSocket layer (`api::ws`), the store and the
//! engine. It owns:
//! - the rooms ([`room`]): per chat, the sockets watching it and its one reply in progress;
//! - the [`scheduler`]: per-tenant bounded queues of replies waiting for the engine, served
//!   least-recently-served tenant first;
//! - the reply tasks ([`reply`]): build the prompt from the stored history, stream the
//!   engine's tokens to the room, save the text as it grows and the outcome at the end;
//! - per-tenant connection counts and the shutdown sequence;
//! - in cluster mode, the [`relay`]: rooms shared with the other replicas through Redis.
//!
//! A reply is not tied to a socket: closing every socket does not stop it, so a client that
//! reconnects finds it finished in the history. Only `cancel`, deleting the chat or a
//! shutdown past its grace period stop it.

pub use confab_protocol::ws as protocol;
pub mod budget;
mod mirror;
pub(crate) mod relay;
mod reply;
mod room;
pub mod scheduler;
mod stateless;
mod title;
mod turn;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot, watch, Notify};
use uuid::Uuid;

use crate::cluster::{Cluster, Place};
use crate::domain::Role;
use crate::engine::{CancelToken, ModelSlot};
use crate::error::ApiError;
use crate::store::{Store, StoreError, TenantId};
use protocol::{Event, MessageLimits};
use relay::{Claim, Control, Relay};
pub use reply::sampling_for;
pub use room::{Outbound, Room};
use scheduler::{Refused, Scheduler, SchedulerLimits};
pub use stateless::Slot;
pub use turn::Turn;

/// Settings of live chat; every one has a flag and an environment variable.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// Replies a tenant may have waiting for the engine.
    pub queue_per_tenant: usize,
    /// Replies waiting for the engine, all tenants together (server overload beyond it).
    pub max_waiting_total: usize,
    /// Share of the slots one tenant may hold (at least one slot): an explicit hard cap.
    /// 1, the default, is none: a tenant may use every idle slot, and fairness comes from
    /// the order the scheduler hands out freed slots in. (The slots are the engine's batch:
    /// replies generated at the same time.)
    pub tenant_slot_share: f64,
    /// How often a growing reply's text is saved.
    pub save_interval: Duration,
    /// Most stored messages a prompt is built from (older ones are not even read).
    pub history_messages: u64,
    /// `max_tokens` of chats that set none.
    pub default_max_tokens: u32,
    /// On shutdown, how long the accepted replies (running or queued) may take to finish.
    pub shutdown_grace: Duration,
    /// Events buffered per socket before a slow one is dropped.
    pub socket_buffer: usize,
    pub messages: MessageLimits,
    /// The server pings a socket it has not heard from for this long...
    pub ping_interval: Duration,
    /// ...and drops it after this long without any frame.
    pub idle_timeout: Duration,
    /// How often the tenants with open sockets are checked for being disabled or deleted
    /// behind this server's back (the command line, another replica without Redis).
    pub tenant_check_interval: Duration,
    /// How long a tenant's token budgets are cached.
    pub budget_refresh: Duration,
    /// Whether chats created without a title get one from the model after their first reply.
    /// On in `confab serve` (unless `--no-auto-titles`); off in `Default`, so an embedding
    /// program (and a test counting tokens) spends no tokens it did not ask for.
    pub auto_titles: bool,
    /// Most tokens a generated title may take.
    pub title_max_tokens: u32,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            queue_per_tenant: 16,
            max_waiting_total: 256,
            tenant_slot_share: 1.0,
            save_interval: Duration::from_secs(1),
            history_messages: 200,
            default_max_tokens: 512,
            shutdown_grace: Duration::from_secs(10),
            socket_buffer: 4096,
            messages: MessageLimits {
                max_frame_bytes: 64 * 1024,
                max_content_chars: 16 * 1024,
                fields: Default::default(),
            },
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            tenant_check_interval: Duration::from_secs(5),
            budget_refresh: Duration::from_secs(5),
            auto_titles: false,
            title_max_tokens: 16,
        }
    }
}

impl ChatSettings {
    /// The scheduler's limits when the engine generates `slots` replies at once.
    fn scheduler_limits(&self, slots: usize) -> SchedulerLimits {
        let slots = slots.max(1);
        let share = (slots as f64 * self.tenant_slot_share.clamp(0.0, 1.0)).floor() as usize;
        SchedulerLimits {
            slots,
            queue_per_tenant: self.queue_per_tenant.max(1),
            max_running_per_tenant: share.clamp(1, slots),
            max_waiting_total: self.max_waiting_total.max(1),
        }
    }
}

/// Why the chat service refused a request. Codes, messages, HTTP statuses and close codes
/// are the client-facing error's (`crate::error::ApiError`, one `From`).
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("a reply is already being generated in this chat")]
    GenerationInProgress,
    #[error("the tenant's reply queue is full")]
    QueueFull { capacity: usize },
    #[error("the server is overloaded")]
    ServerBusy,
    #[error("the model is not loaded")]
    ModelNotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("chat {0} does not exist")]
    ChatNotFound(Uuid),
    #[error("no reply to cancel")]
    NothingToCancel,
    #[error("too many connections")]
    TooManyConnections { limit: usize },
    /// The reply could overrun a token budget.
    #[error("token budget reached")]
    QuotaExceeded(budget::QuotaExceeded),
    /// The turn does not fit the chat's tree (e.g. editing a reply).
    #[error(transparent)]
    Invalid(crate::domain::ValidationError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

impl From<Refused> for ChatError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::QueueFull { capacity } => ChatError::QueueFull { capacity },
            Refused::Overloaded { .. } => ChatError::ServerBusy,
        }
    }
}

/// Who sent a chat message: the user and the key (or user token) it came through.
#[derive(Debug, Clone)]
pub struct Sender {
    pub user_id: String,
    pub key_id: Uuid,
}

/// A waiting reply.
struct Queued {
    room: Arc<Room>,
    user_message: Uuid,
    enqueued_at: Instant,
    /// The key (or user token) the message came through: its usage is recorded against it.
    key_id: Uuid,
    /// Tokens held against the budgets until the reply's usage is recorded.
    hold: Option<budget::Hold>,
}

/// What waits in the scheduler's queues.
enum Waiting {
    /// A chat's reply (WebSocket).
    Reply(Queued),
    /// A stateless generation (the OpenAI-compatible API): its request handler waits for
    /// the slot, then generates itself.
    Slot {
        id: u64,
        grant: oneshot::Sender<Slot>,
        /// Background work (a chat title): it gets a slot only when no reply waits.
        background: bool,
    },
}

/// A slot given back: a tenant's item's, or background work's.
#[derive(Debug, Clone, Copy)]
enum Freed {
    Of(TenantId),
    Background,
}

impl Waiting {
    fn is_reply_of(&self, chat: Uuid) -> bool {
        matches!(self, Waiting::Reply(q) if q.room.chat_id == chat)
    }

    fn is_slot(&self, wanted: u64) -> bool {
        matches!(self, Waiting::Slot { id, .. } if *id == wanted)
    }
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// No new messages; accepted replies (running or queued) get their grace period.
    Draining,
    /// Sockets are told to close.
    Closed,
}

struct Inner {
    store: Store,
    model: ModelSlot,
    /// Token budgets and what running replies hold against them.
    budgets: budget::Budgets,
    settings: ChatSettings,
    rooms: Mutex<HashMap<Uuid, Arc<Room>>>,
    scheduler: Mutex<Scheduler<Waiting>>,
    /// Tenants whose queue depth the metrics show.
    queue_reported: Mutex<HashSet<TenantId>>,
    /// Cancel switches of the stateless generations holding slots, by slot id.
    stateless: Mutex<HashMap<u64, CancelToken>>,
    next_slot: AtomicU64,
    /// Set once the scheduler's slots are the loaded engine's batch.
    sized: OnceLock<()>,
    connections: Mutex<HashMap<TenantId, usize>>,
    phase: watch::Sender<Phase>,
    /// Notified whenever a reply ends (shutdown waits on it).
    reply_ended: Notify,
    /// Cluster mode: the rooms' link to the other replicas.
    relay: Option<Relay>,
}

/// The live chat service; cheap to clone.
#[derive(Clone)]
pub struct ChatService(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a tenant's sockets are being closed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum TenantClosed {
    /// Disabled by an operator: `tenant_disabled` (4403).
    Disabled {
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Deleted with its data: its keys are gone, `invalid_api_key` (4401).
    Deleted,
}

impl TenantClosed {
    pub fn error(&self) -> ApiError {
        match self {
            TenantClosed::Disabled { since } => ApiError::TenantDisabled { since: *since },
            TenantClosed::Deleted => ApiError::InvalidApiKey,
        }
    }
}

/// Every `tenant_check_interval`, closes the sockets of tenants that were disabled or
/// deleted without this server being told (see [`ChatSettings::tenant_check_interval`]).
async fn check_tenants(service: std::sync::Weak<Inner>) {
    let every = match service.upgrade() {
        Some(inner) => inner.settings.tenant_check_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = service.upgrade() else {
            break;
        };
        let service = ChatService(inner);
        let tenants = service.connected_tenants();
        match service.0.store.inactive_tenants(&tenants).await {
            Ok(closed) => {
                for (tenant, disabled_at) in closed {
                    let why = match disabled_at {
                        Some(since) => TenantClosed::Disabled { since: Some(since) },
                        None => TenantClosed::Deleted,
                    };
                    service.tenant_closed_here(tenant.as_uuid(), &why);
                }
            }
            Err(e) => tracing::debug!(error = %e, "tenant check skipped"),
        }
    }
}

/// One open connection of a tenant; dropping it frees the place.
pub struct ConnectionGuard {
    service: ChatService,
    tenant: TenantId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.service.0.connections);
        if let Some(n) = c.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.tenant);
            }
        }
        self.service.report(Place::Connection, &c);
    }
}

/// A socket's membership of a room; dropping it leaves.
pub struct Membership {
    service: ChatService,
    pub room: Arc<Room>,
    pub events: broadcast::Receiver<Outbound>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.room.lock().sockets -= 1;
        self.service.forget_room_if_idle(&self.room);
    }
}

impl ChatService {
    /// `cluster`: share the rooms with the other replicas (see [`relay`]); `audit`: where
    /// budget refusals are tallied.
    pub fn new(
        store: Store,
        model: ModelSlot,
        settings: ChatSettings,
        cluster: Option<Cluster>,
        audit: crate::audit::Audit,
    ) -> ChatService {
        // One slot until the engine is loaded (nothing is submitted before), then its batch.
        let scheduler = Scheduler::new(settings.scheduler_limits(1));
        let relay = cluster.map(Relay::start);
        let service = ChatService(Arc::new(Inner {
            budgets: budget::Budgets::new(store.clone(), settings.budget_refresh, audit),
            store,
            model,
            settings,
            rooms: Mutex::new(HashMap::new()),
            scheduler: Mutex::new(scheduler),
            stateless: Mutex::new(HashMap::new()),
            queue_reported: Mutex::new(HashSet::new()),
            next_slot: AtomicU64::new(1),
            sized: OnceLock::new(),
            connections: Mutex::new(HashMap::new()),
            phase: watch::channel(Phase::Serving).0,
            reply_ended: Notify::new(),
            relay,
        }));
        tokio::spawn(check_tenants(Arc::downgrade(&service.0)));
        if let Some(relay) = &service.0.relay {
            tokio::spawn(mirror::listen(relay.clone(), Arc::downgrade(&service.0)));
            tokio::spawn(mirror::check(relay.clone(), Arc::downgrade(&service.0)));
        }
        service
    }

    /// The scheduler, its slots kept equal to the engine's batch: the engine handle is the
    /// one owner of that number (replies are only queued once the engine is loaded).
    /// The engine never changes once loaded, so this is done once (`sized`); until then
    /// the lock costs no engine lookup after it.
    fn scheduler(&self) -> MutexGuard<'_, Scheduler<Waiting>> {
        let mut sched = lock(&self.0.scheduler);
        if self.0.sized.get().is_none() {
            if let Some(engine) = self.0.model.engine() {
                sched.set_limits(self.0.settings.scheduler_limits(engine.max_batch()));
                let _ = self.0.sized.set(());
            }
        }
        sched
    }

    pub fn settings(&self) -> &ChatSettings {
        &self.0.settings
    }

    /// The shutdown has passed its grace: nothing more will be waited for.
    pub fn is_closed(&self) -> bool {
        *self.0.phase.borrow() == Phase::Closed
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// Follows the server's phase (sockets close when it becomes `Closed`).
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.0.phase.subscribe()
    }

    /// Counts a new connection of `tenant`, refusing it when the tenant already has `limit`
    /// (in a cluster, on all replicas together).
    pub async fn connect(
        &self,
        tenant: TenantId,
        limit: usize,
    ) -> Result<ConnectionGuard, ChatError> {
        if *self.0.phase.borrow() != Phase::Serving {
            return Err(ChatError::ShuttingDown);
        }
        if let Some(relay) = &self.0.relay {
            let mine = lock(&self.0.connections).get(&tenant).copied().unwrap_or(0);
            let cluster = relay.cluster();
            if cluster
                .take_place(Place::Connection, tenant, mine, limit)
                .await
                == Some(false)
            {
                return Err(ChatError::TooManyConnections { limit });
            }
        }
        let mut c = lock(&self.0.connections);
        let n = c.entry(tenant).or_insert(0);
        if *n >= limit {
            return Err(ChatError::TooManyConnections { limit });
        }
        *n += 1;
        self.report(Place::Connection, &c);
        Ok(ConnectionGuard {
            service: self.clone(),
            tenant,
        })
    }

    /// Mirrors this replica's counts of `place` to the cluster (cluster mode).
    fn report(&self, place: Place, counts: &HashMap<TenantId, usize>) {
        if let Some(relay) = &self.0.relay {
            let counts = counts.iter().filter(|(_, n)| **n > 0);
            let counts = counts.map(|(t, n)| (*t, *n)).collect();
            relay.cluster().report_places(place, counts);
        }
    }

    /// Joins a chat's room (the caller checked the chat belongs to the tenant and user).
    /// Returns the membership and the events that bring the socket up to date. In cluster
    /// mode a new room first subscribes to the chat's events and reads the state of a reply
    /// another replica may be generating. `ChatNotFound` when the chat was deleted while
    /// the socket was joining.
    pub async fn join(
        &self,
        tenant: TenantId,
        chat_id: Uuid,
    ) -> Result<(Membership, Vec<Event>), ChatError> {
        // Counted under the map's lock: a room is only forgotten with no sockets, so it must
        // not be seen empty between being found here and being joined.
        let (room, created) = {
            let mut rooms = lock(&self.0.rooms);
            let mut created = false;
            let room = rooms
                .entry(chat_id)
                .or_insert_with(|| {
                    created = true;
                    Arc::new(Room::new(
                        tenant,
                        chat_id,
                        self.0.settings.socket_buffer,
                        self.0.relay.clone(),
                    ))
                })
                .clone();
            room.lock().sockets += 1;
            (room, created)
        };
        // The membership exists from here, so a socket dropped while waiting still leaves.
        let mut membership = Membership {
            service: self.clone(),
            events: room.receiver(),
            room: room.clone(),
        };
        if created {
            if let Some(relay) = &self.0.relay {
                // Subscribed before the state is read, so no event falls between. Its own
                // task: the room must become ready even if this join is abandoned (other
                // sockets wait for it).
                let subscribed = relay.watch(chat_id);
                let (service, room) = (self.clone(), room.clone());
                tokio::spawn(async move {
                    let _ = subscribed.await;
                    service.sync(&room).await;
                });
            }
        }
        let (events, catch_up) = room
            .subscribe()
            .await
            .ok_or(ChatError::ChatNotFound(chat_id))?;
        membership.events = events;
        Ok((membership, catch_up))
    }

    fn forget_room_if_idle(&self, room: &Arc<Room>) {
        let mut rooms = lock(&self.0.rooms);
        let st = room.lock();
        if st.sockets == 0 && st.reply.is_none() {
            if let Some(r) = rooms.get(&room.chat_id) {
                if Arc::ptr_eq(r, room) {
                    rooms.remove(&room.chat_id);
                    if let Some(relay) = &self.0.relay {
                        relay.unwatch(room.chat_id);
                    }
                }
            }
        }
    }

    /// Starts a turn: saves its user message (none for a regenerated reply) where the
    /// tree says and queues the reply. Refused (and nothing saved) when the turn does not fit
    /// the tree, the chat already has a reply in progress, the tenant's queue is full, the
    /// model is not loaded or the server is stopping.
    pub async fn submit(
        &self,
        room: &Arc<Room>,
        sender: &Sender,
        turn: Turn,
    ) -> Result<(), ChatError> {
        if *self.0.phase.borrow() != Phase::Serving {
            return Err(ChatError::ShuttingDown);
        }
        let Some(engine) = self.0.model.engine() else {
            return Err(ChatError::ModelNotReady);
        };
        {
            let st = room.lock();
            if st.deleted {
                return Err(ChatError::ChatNotFound(room.chat_id));
            }
            if st.reply.is_some() || st.remote.is_some() {
                return Err(ChatError::GenerationInProgress);
            }
        }
        let scope = self.0.store.tenant(room.tenant);
        let not_found = |e| match e {
            StoreError::NotFound => ChatError::ChatNotFound(room.chat_id),
            other => other.into(),
        };
        let chat = scope.get_chat(room.chat_id).await.map_err(not_found)?;
        let placed = turn::place(&scope, &chat, turn).await?;
        // Before the message is saved: a refused one is not stored, so sending it again
        // after the reset does not repeat it.
        let hold = self
            .hold_for_reply(&engine, room, &scope, &chat, sender, &placed)
            .await?;
        self.cluster_queue_place(room.tenant).await?;
        {
            let mut st = room.lock();
            if st.reply.is_some() || st.remote.is_some() {
                return Err(ChatError::GenerationInProgress);
            }
            let mut sched = self.scheduler();
            let reserved = sched.reserve(room.tenant);
            self.report(Place::Waiting, &sched.queued_by_tenant());
            reserved?;
            st.reply = Some(room::Reply::new());
        }
        // In a cluster the chat may have a reply on another replica this one has not heard
        // of yet: the chat's reply lock decides.
        if let Some(relay) = &self.0.relay {
            let id = room.lock().reply.as_ref().map(|r| r.id);
            if let Some(id) = id {
                if let Claim::Busy(holder) = relay.claim(room.chat_id, id).await {
                    tracing::debug!(chat = %room.chat_id, %holder, "reply refused: one runs elsewhere");
                    room.lock().reply = None;
                    self.unreserve(room.tenant);
                    self.forget_room_if_idle(room);
                    return Err(ChatError::GenerationInProgress);
                }
            }
        }
        let user_message = match (placed.save, placed.answers) {
            (Some(new), _) => match scope.append_message(room.chat_id, new).await {
                Ok(m) => {
                    room.send(
                        &mut room.lock(),
                        &Event::MessageReceived {
                            message_id: m.id,
                            chat_id: room.chat_id,
                            parent_id: m.parent_id,
                        },
                    );
                    m.id
                }
                Err(e) => {
                    room.finish(&mut room.lock(), None);
                    self.unreserve(room.tenant);
                    self.forget_room_if_idle(room);
                    return Err(not_found(e));
                }
            },
            (None, Some(answers)) => {
                room.answering(&mut room.lock(), answers);
                answers
            }
            (None, None) => unreachable!("a placed turn saves a message or answers one"),
        };
        self.scheduler().enqueue(
            room.tenant,
            Waiting::Reply(Queued {
                room: room.clone(),
                user_message,
                enqueued_at: Instant::now(),
                key_id: sender.key_id,
                hold,
            }),
        );
        self.pump();
        Ok(())
    }

    /// In a cluster, whether the tenant's queue has a place for one more on all replicas
    /// together (this replica's own bound is checked by the scheduler's `reserve`).
    async fn cluster_queue_place(&self, tenant: TenantId) -> Result<(), ChatError> {
        let Some(relay) = &self.0.relay else {
            return Ok(());
        };
        let (mine, allowed) = self.scheduler().queue_use(tenant);
        let cluster = relay.cluster();
        match cluster
            .take_place(Place::Waiting, tenant, mine, allowed)
            .await
        {
            Some(false) => Err(ChatError::QueueFull {
                capacity: self.0.settings.queue_per_tenant,
            }),
            _ => Ok(()),
        }
    }

    fn unreserve(&self, tenant: TenantId) {
        let mut sched = self.scheduler();
        sched.unreserve(tenant);
        self.report(Place::Waiting, &sched.queued_by_tenant());
    }

    /// The token budgets (their standing, and holds for stateless completions).
    pub fn budgets(&self) -> &budget::Budgets {
        &self.0.budgets
    }

    /// Holds tokens for a reply of `user` (prompt plus `max_tokens`), or says which budget
    /// it could overrun; `None` when the tenant has no budget.
    pub async fn hold_budget(
        &self,
        tenant: TenantId,
        user: &str,
        tokens: usize,
    ) -> Result<Option<budget::Hold>, ChatError> {
        self.0
            .budgets
            .hold(tenant, user, tokens as u64)
            .await?
            .map_err(ChatError::QuotaExceeded)
    }

    /// For a tenant with budgets: the reply's prompt (the chat's history plus `content`) is
    /// built now to count its tokens, and those plus its `max_tokens` are held.
    async fn hold_for_reply(
        &self,
        engine: &crate::engine::EngineHandle,
        room: &Room,
        scope: &crate::store::TenantScope<'_>,
        chat: &crate::domain::Chat,
        sender: &Sender,
        placed: &turn::Placed,
    ) -> Result<Option<budget::Hold>, ChatError> {
        if self.0.budgets.of(room.tenant).await?.is_unlimited() {
            return Ok(None);
        }
        let history = match placed.history_leaf {
            Some(leaf) => {
                scope
                    .branch_history(chat.id, leaf, self.0.settings.history_messages)
                    .await?
            }
            None => Vec::new(),
        };
        let mut request = reply::request_for(chat, history, self.0.settings.default_max_tokens);
        if let Some(new) = &placed.save {
            request.messages.push(crate::engine::ChatMessage::new(
                Role::User,
                new.content.clone(),
            ));
        }
        let max_tokens = request.max_tokens;
        // A prompt that cannot fit fails the reply later with its own error; only its
        // `max_tokens` is held meanwhile.
        let tokens = match engine.prepare(request).await {
            Ok(p) => p.prompt_tokens() + max_tokens,
            Err(_) => max_tokens,
        };
        self.hold_budget(room.tenant, &sender.user_id, tokens).await
    }

    /// Counts a finished generation's tokens: metrics, and the tenant's usage for `user_id`
    /// and `key_id` today. Tokens spent count whatever the outcome (a cancelled reply still
    /// cost its prompt).
    pub async fn account(
        &self,
        tenant: TenantId,
        user_id: &str,
        key_id: Uuid,
        prompt_tokens: usize,
        completion_tokens: usize,
        time_to_first_token: Option<Duration>,
    ) {
        let m = crate::metrics::metrics();
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        m.generated_tokens.inc_by(completion_tokens as u64);
        if let Some(t) = time_to_first_token {
            m.time_to_first_token.observe(t.as_secs_f64());
        }
        if prompt_tokens + completion_tokens == 0 {
            return;
        }
        if let Err(e) = self
            .0
            .store
            .tenant(tenant)
            .record_usage(
                user_id,
                key_id,
                chrono::Utc::now().date_naive(),
                prompt_tokens as i64,
                completion_tokens as i64,
            )
            .await
        {
            tracing::error!(error = %e, "usage not recorded");
        }
    }

    /// Cancels the chat's reply: a waiting one ends at once (saved as an empty cancelled
    /// reply, so every user message gets its start and end events); a streaming one stops
    /// at the next token, keeping its text.
    /// In a cluster, a reply another replica generates is cancelled there.
    pub fn cancel(&self, room: &Arc<Room>) -> Result<(), ChatError> {
        let dequeued = {
            let st = room.lock();
            let Some(reply) = st.reply.as_ref() else {
                let (Some(relay), Some(remote)) = (&self.0.relay, st.remote.as_ref()) else {
                    return Err(ChatError::NothingToCancel);
                };
                let (relay, chat, reply) = (relay.clone(), room.chat_id, remote.id);
                tokio::spawn(async move { relay.tell(&Control::Cancel { chat, reply }).await });
                return Ok(());
            };
            reply.cancel.cancel();
            if reply.view.stream.is_some() {
                None
            } else {
                let chat = room.chat_id;
                self.scheduler()
                    .remove(room.tenant, |w| w.is_reply_of(chat))
            }
        };
        // Not found in the queue: still being saved (`submit` will queue it and the reply
        // task sees the cancel) or just dispatched (the reply task sees it).
        if let Some(Waiting::Reply(q)) = dequeued {
            self.spawn_reply(q, false);
            self.pump();
        }
        Ok(())
    }

    /// The chat's settings changed (REST): its kept attention state is dropped. (It could
    /// not be misused anyway, reuse needs matching tokens; this frees the memory early.)
    pub fn chat_changed(&self, chat_id: Uuid) {
        if let Some(engine) = self.0.model.engine() {
            engine.forget_chat(chat_id);
        }
    }

    /// The chat was deleted (REST): cancel its reply, close its sockets and drop its kept
    /// attention state, here and (cluster mode) on every replica.
    pub fn chat_deleted(&self, tenant: TenantId, chat_id: Uuid) {
        self.chat_deleted_here(tenant, chat_id);
        if let Some(relay) = self.0.relay.clone() {
            let control = Control::Deleted {
                tenant: tenant.as_uuid(),
                chat: chat_id,
            };
            tokio::spawn(async move { relay.tell(&control).await });
        }
    }

    /// The model wrote the chat's title: its sockets get `chat_updated`, here and (cluster
    /// mode) on every replica.
    pub(super) fn chat_titled(&self, tenant: TenantId, chat_id: Uuid, title: String) {
        self.chat_titled_here(tenant.as_uuid(), chat_id, title.clone());
        if let Some(relay) = self.0.relay.clone() {
            let control = Control::Titled {
                tenant: tenant.as_uuid(),
                chat: chat_id,
                title,
                from: relay.replica_id().to_string(),
            };
            tokio::spawn(async move { relay.tell(&control).await });
        }
    }

    fn chat_titled_here(&self, tenant: Uuid, chat_id: Uuid, title: String) {
        let room = lock(&self.0.rooms).get(&chat_id).cloned();
        if let Some(room) = room.filter(|r| r.tenant.as_uuid() == tenant) {
            room.send_local(&Event::ChatUpdated {
                chat_id,
                title: Some(title),
            });
        }
    }

    /// The tenant was disabled or deleted (admin API): its replies stop and its sockets are
    /// closed with `why`'s error, here and (cluster mode) on every replica.
    pub fn tenant_closed(&self, tenant: TenantId, why: TenantClosed) {
        self.tenant_closed_here(tenant.as_uuid(), &why);
        if let Some(relay) = self.0.relay.clone() {
            let control = Control::TenantClosed {
                tenant: tenant.as_uuid(),
                why,
            };
            tokio::spawn(async move { relay.tell(&control).await });
        }
    }

    pub(crate) fn tenant_closed_here(&self, tenant: Uuid, why: &TenantClosed) {
        let rooms: Vec<Arc<Room>> = lock(&self.0.rooms)
            .values()
            .filter(|r| r.tenant.as_uuid() == tenant)
            .cloned()
            .collect();
        let error = why.error();
        for room in rooms {
            let chat_id = room.chat_id;
            let dequeued = {
                let mut st = room.lock();
                // A deleted tenant's rows are going: nothing may be written for it.
                if matches!(why, TenantClosed::Deleted) {
                    st.deleted = true;
                }
                if let Some(reply) = &st.reply {
                    reply.cancel.cancel();
                }
                room.send_local(&error.to_event());
                room.close_all(error.close_code(), error.code());
                self.scheduler()
                    .remove(room.tenant, |w| w.is_reply_of(chat_id))
            };
            if let Some(Waiting::Reply(q)) = dequeued {
                self.spawn_reply(q, false);
                self.pump();
            }
        }
    }

    /// The tenants that have open sockets here.
    fn connected_tenants(&self) -> Vec<TenantId> {
        lock(&self.0.connections).keys().copied().collect()
    }

    fn chat_deleted_here(&self, tenant: TenantId, chat_id: Uuid) {
        self.chat_changed(chat_id);
        let room = {
            let mut rooms = lock(&self.0.rooms);
            match rooms.get(&chat_id) {
                Some(r) if r.tenant == tenant => rooms.remove(&chat_id),
                _ => None,
            }
        };
        let Some(room) = room else { return };
        // Forgotten here, not by its last socket: its subscription goes now too.
        if let Some(relay) = &self.0.relay {
            relay.unwatch(chat_id);
        }
        let dequeued = {
            let mut st = room.lock();
            st.deleted = true;
            if let Some(reply) = &st.reply {
                reply.cancel.cancel();
            }
            let gone = ApiError::ChatNotFound(chat_id);
            room.send_local(&gone.to_event());
            room.close_all(gone.close_code(), gone.code());
            self.scheduler()
                .remove(room.tenant, |w| w.is_reply_of(chat_id))
        };
        if let Some(Waiting::Reply(q)) = dequeued {
            self.spawn_reply(q, false);
            self.pump();
        }
    }

    /// Starts waiting replies while slots are free, then tells the ones still waiting
    /// their new places.
    fn pump(&self) {
        self.finish_and_pump(None)
    }

    /// Background work still waiting is dropped (a shutdown; its tasks end).
    fn drop_background(&self) {
        let mut sched = self.scheduler();
        while sched
            .remove_background(|w| matches!(w, Waiting::Slot { .. }))
            .is_some()
        {}
    }

    /// Frees the slot of a reply of `finished` (if any) and refills it in one step, so no
    /// one sees a free slot that a waiting reply is about to take.
    fn finish_and_pump(&self, finished: Option<Freed>) {
        // While draining, the replies already accepted still start (a stopping replica of a
        // rolling update answers what it took); once closed, nothing does.
        let starting = *self.0.phase.borrow() != Phase::Closed;
        let mut started = Vec::new();
        let mut moved = Vec::new();
        {
            let mut sched = self.scheduler();
            match finished {
                Some(Freed::Of(t)) => sched.finish(t),
                Some(Freed::Background) => sched.finish_background(),
                None => {}
            }
            if !starting {
                return;
            }
            while let Some(next) = sched.dispatch() {
                started.push(next);
            }
            for (w, position) in sched.positions() {
                if let Waiting::Reply(q) = w {
                    moved.push((q.room.clone(), q.user_message, position));
                }
            }
            let m = crate::metrics::metrics();
            m.running_generations.set(sched.running() as i64);
            // Only this server's tenants are touched (the registry is process-wide): the
            // ones waiting now are set, the ones that stopped waiting are removed.
            let mut reported = lock(&self.0.queue_reported);
            let now: HashMap<TenantId, usize> = sched.waiting_by_tenant().into_iter().collect();
            for gone in reported.iter().filter(|t| !now.contains_key(t)) {
                let _ = m.queue_depth.remove_label_values(&[&gone.to_string()]);
            }
            for (tenant, n) in &now {
                m.queue_depth
                    .with_label_values(&[&tenant.to_string()])
                    .set(*n as i64);
            }
            *reported = now.into_keys().collect();
            self.report(Place::Waiting, &sched.queued_by_tenant());
        }
        for (tenant, w) in started {
            match w {
                Waiting::Reply(q) => {
                    if let Some(r) = q.room.lock().reply.as_mut() {
                        r.view.queue_position = None;
                    }
                    self.spawn_reply(q, true);
                }
                Waiting::Slot {
                    id,
                    grant,
                    background,
                } => {
                    // A request that went away meanwhile drops the slot, which frees it.
                    let _ = grant.send(Slot::granted(self, tenant, id, background));
                }
            }
        }
        for (room, user_message, position) in moved {
            let st = &mut *room.lock();
            let moved = st.reply.as_ref().is_some_and(|r| {
                r.view.queue_position != Some(position) && r.view.stream.is_none()
            });
            if moved {
                room.send(
                    st,
                    &Event::MessageQueued {
                        message_id: user_message,
                        position,
                    },
                );
            }
        }
    }

    fn spawn_reply(&self, q: Queued, holds_slot: bool) {
        let service = self.clone();
        tokio::spawn(async move {
            let room = q.room.clone();
            // Ends the room's reply on every path.
            reply::run(&service, q).await;
            service.forget_room_if_idle(&room);
            service.finish_and_pump(holds_slot.then_some(Freed::Of(room.tenant)));
            service.0.reply_ended.notify_waiters();
        });
    }

    /// Stops taking messages, gives the replies already accepted (running or queued)
    /// `shutdown_grace` to finish, then stops the rest (saved as `interrupted`) and closes
    /// every socket with 1001.
    pub async fn shutdown(&self) {
        self.0.phase.send_replace(Phase::Draining);
        // Stateless requests still waiting are turned away (their handlers answer
        // `shutting_down`); chat replies waiting still start, in the grace period.
        let turned_away = self
            .scheduler()
            .remove_all(|w| matches!(w, Waiting::Slot { .. }));
        drop(turned_away);
        self.drop_background();
        let deadline = tokio::time::Instant::now() + self.0.settings.shutdown_grace;
        let mut interrupted = false;
        loop {
            let ended = self.0.reply_ended.notified();
            // Queued replies count: they start while draining.
            let busy = lock(&self.0.rooms)
                .values()
                .any(|r| r.lock().reply.is_some())
                || self.scheduler().running() > 0;
            // A reply stuck on the database gets a few more seconds, not forever.
            if !busy || tokio::time::Instant::now() >= deadline + Duration::from_secs(5) {
                break;
            }
            if tokio::time::Instant::now() >= deadline && !interrupted {
                interrupted = true;
                for room in lock(&self.0.rooms).values() {
                    if let Some(reply) = room.lock().reply.as_mut() {
                        reply.interrupted = true;
                        reply.cancel.cancel();
                    }
                }
                for cancel in lock(&self.0.stateless).values() {
                    cancel.cancel();
                }
            }
            // Re-check at least every 100 ms: replies end on their own threads.
            let _ = tokio::time::timeout(Duration::from_millis(100), ended).await;
        }
        self.0.phase.send_replace(Phase::Closed);
        for room in lock(&self.0.rooms).values() {
            room.close_all(protocol::close::GOING_AWAY, "server_shutdown");
        }
    }
}
