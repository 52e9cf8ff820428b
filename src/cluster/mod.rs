//! Cluster mode (`--redis-url`): several replicas on one PostgreSQL database, with Redis for
//! what they share.
//!
//! What this part does: each replica has an id and a lease in Redis (a key that expires
//! unless renewed). A reply's assistant message records the replica that generates it, so
//! - a replica that starts (or restarts) marks only its *own* unfinished replies
//!   `interrupted`, never the live ones of the others;
//! - a replica that died (`kill -9`, a lost machine) stops renewing its lease, and once it
//!   has expired any surviving replica marks that replica's unfinished replies `interrupted`,
//!   keeping the text saved so far.
//!
//! Redis is asked with short timeouts: while it is down a replica keeps serving what it can
//! alone, reports `degraded` in `/readyz`, and takes up its lease again by itself when Redis
//! is back (the lease loop is what finds out; requests do not wait on a Redis known to be
//! down). Dead replicas are only declared dead while
//! Redis answers (a missing lease then means the replica is gone, not that Redis is).
//!
//! The per-tenant REST rate is counted cluster-wide, in a window kept in Redis
//! ([`Cluster::count_request`]); without Redis each replica counts alone.
//!
//! Rooms across replicas (a chat's events to its sockets wherever they are, one reply per
//! chat, cancel and delete from anywhere) travel over Redis publish/subscribe: see
//! `crate::chat::relay`. This module holds the connections they use.
//!
//! A tenant's WebSocket connection cap and reply queue bound hold across the replicas too
//! ([`places`]).
//!
//! What stays per replica: the engine's batch, the fairness among the replies one replica
//! runs, and the server-wide overload bound (`--max-waiting-total`, a bound on one process's
//! memory).

mod places;
mod subscriptions;
pub use places::Place;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, PushInfo, RedisResult};
use tokio::sync::mpsc;

use crate::store::Store;

/// How a replica joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub redis_url: String,
    /// This replica's id: unique among the replicas, and the same across restarts of one
    /// replica if its unfinished replies are to be recovered at once by itself.
    pub replica_id: String,
    /// A replica not heard from for this long is dead; its unfinished replies are then
    /// marked `interrupted` by the others.
    pub lease: Duration,
    /// Prefix of every Redis key, so several clusters (or test runs) can share one Redis.
    pub key_prefix: String,
}

/// What `/readyz` says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterHealth {
    Ok,
    /// Redis cannot be reached: the replica serves alone.
    Degraded(String),
}

struct Inner {
    settings: ClusterSettings,
    redis: ConnectionManager,
    /// Requests to the task that (un)subscribes a second connection (RESP3) that only
    /// listens: its messages arrive on `pushes`, and it subscribes again by itself after a
    /// reconnect.
    subscriptions: mpsc::UnboundedSender<subscriptions::Request>,
    pushes: Mutex<Option<mpsc::UnboundedReceiver<PushInfo>>>,
    reports: places::Reports,
    health: Mutex<ClusterHealth>,
}

/// This replica's membership of the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

/// Bound on every Redis call: a slow Redis must not hold up the lease loop.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

impl Cluster {
    /// Connects to Redis (lazily: a Redis that is down at start-up leaves the replica
    /// `degraded`, not stopped) and takes the lease.
    pub async fn join(settings: ClusterSettings) -> Result<Cluster, String> {
        let bad_url = |e: redis::RedisError| format!("--redis-url: {e}");
        let info = redis::IntoConnectionInfo::into_connection_info(settings.redis_url.as_str())
            .map_err(bad_url)?;
        let config = || {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2))
        };
        let redis = redis::Client::open(info.clone())
            .and_then(|c| c.get_connection_manager_lazy(config()))
            .map_err(bad_url)?;
        // Pushes (subscribed messages) need RESP3 (Redis 6 or later).
        let resp3 = info.clone().set_redis_settings(
            info.redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3),
        );
        let (push_tx, pushes) = mpsc::unbounded_channel();
        let subscriber = redis::Client::open(resp3)
            .and_then(|c| {
                c.get_connection_manager_lazy(
                    config()
                        .set_push_sender(push_tx)
                        .set_automatic_resubscription(),
                )
            })
            .map_err(bad_url)?;
        let (subscriptions, requests) = mpsc::unbounded_channel();
        let cluster = Cluster(Arc::new(Inner {
            settings,
            redis,
            subscriptions,
            pushes: Mutex::new(Some(pushes)),
            reports: places::Reports::new(),
            health: Mutex::new(ClusterHealth::Degraded(
                "not yet in touch with Redis".into(),
            )),
        }));
        tokio::spawn(subscriptions::run(cluster.clone(), subscriber, requests));
        cluster.renew().await;
        for place in [Place::Connection, Place::Waiting] {
            tokio::spawn(cluster.clone().write_places(place));
        }
        if let ClusterHealth::Degraded(why) = cluster.health() {
            tracing::warn!(%why, "Redis is not reachable: serving alone until it is");
        }
        Ok(cluster)
    }

    pub fn replica_id(&self) -> &str {
        &self.0.settings.replica_id
    }

    /// How long a replica not heard from stays alive (also the life of a reply lock not
    /// renewed).
    pub fn lease(&self) -> Duration {
        self.0.settings.lease
    }

    pub fn health(&self) -> ClusterHealth {
        self.0
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_health(&self, health: ClusterHealth) {
        let mut h = self.0.health.lock().unwrap_or_else(|e| e.into_inner());
        if *h != health {
            match &health {
                ClusterHealth::Ok => {
                    tracing::info!("in touch with Redis");
                    // Subscriptions asked for while Redis was away never took.
                    let _ = self.0.subscriptions.send(subscriptions::Request::Renew);
                }
                ClusterHealth::Degraded(why) => tracing::warn!(%why, "Redis lost: serving alone"),
            }
            *h = health;
        }
    }

    fn lease_key(&self, replica: &str) -> String {
        self.key(&format!("replica:{replica}"))
    }

    /// A Redis key (or channel) of this cluster: `{prefix}:{name}`.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.0.settings.key_prefix)
    }

    /// The connection for commands (cheap to clone; calls go through [`Cluster::call`]).
    pub(crate) fn redis(&self) -> ConnectionManager {
        self.0.redis.clone()
    }

    /// The messages of the subscribed channels (and the library's connection notices);
    /// taken once, by the one reader.
    pub(crate) fn take_pushes(&self) -> Option<mpsc::UnboundedReceiver<PushInfo>> {
        self.0
            .pushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Subscribes to `channel` for one more holder (in the order asked: see
    /// [`subscriptions`]); the answer says whether Redis confirmed it (a reconnect, or Redis
    /// coming back, subscribes again, so a holder may still get its messages later).
    pub(crate) fn subscribe(&self, channel: String) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self
            .0
            .subscriptions
            .send(subscriptions::Request::Subscribe(channel, tx));
        rx
    }

    /// One holder of `channel` leaves; the last one unsubscribes.
    pub(crate) fn unsubscribe(&self, channel: String) {
        let _ = self
            .0
            .subscriptions
            .send(subscriptions::Request::Unsubscribe(channel));
    }

    /// Runs a Redis call with the timeout, recording whether Redis answered.
    pub(crate) async fn call<T>(
        &self,
        f: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        let outcome = match tokio::time::timeout(REDIS_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
        };
        match outcome {
            Ok(v) => {
                self.set_health(ClusterHealth::Ok);
                Some(v)
            }
            Err(why) => {
                self.set_health(ClusterHealth::Degraded(why));
                None
            }
        }
    }

    /// Sets (or extends) this replica's lease.
    async fn renew(&self) {
        let mut redis = self.0.redis.clone();
        let key = self.lease_key(self.replica_id());
        let ms = self.0.settings.lease.as_millis().max(1) as u64;
        let now = chrono::Utc::now().to_rfc3339();
        self.call(redis.pset_ex::<_, _, ()>(key, now, ms)).await;
    }

    /// Whether `replica` holds a lease; `None` when Redis cannot tell.
    async fn is_alive(&self, replica: &str) -> Option<bool> {
        let mut redis = self.0.redis.clone();
        let key = self.lease_key(replica);
        self.call(redis.exists::<_, bool>(key)).await
    }

    /// Marks the unfinished replies of every replica whose lease has expired `interrupted`
    /// (several survivors may do it at once: the update is the same).
    pub async fn recover_dead_replicas(&self, store: &Store) {
        let replicas = match store.streaming_replicas().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the replicas with unfinished replies");
                return;
            }
        };
        for replica in replicas.iter().filter(|r| *r != self.replica_id()) {
            if self.is_alive(replica).await != Some(false) {
                continue;
            }
            match store.interrupt_streaming_of(replica).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    %replica,
                    replies = n,
                    "a replica's lease expired: its unfinished replies are marked interrupted"
                ),
                Err(e) => {
                    tracing::warn!(%replica, error = %e, "cannot recover a dead replica's replies")
                }
            }
        }
    }

    /// Renews the lease and looks for dead replicas until `stop` fires; then gives the
    /// lease up, so the others need not wait for it to expire.
    pub async fn run(self, store: Store, mut stop: tokio::sync::watch::Receiver<bool>) {
        let lease = self.0.settings.lease;
        let mut renew = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
        let mut reap = tokio::time::interval((lease / 2).max(Duration::from_millis(200)));
        loop {
            tokio::select! {
                _ = renew.tick() => self.renew().await,
                _ = reap.tick() => self.recover_dead_replicas(&store).await,
                _ = stop.changed() => break,
            }
        }
        let mut redis = self.0.redis.clone();
        let key = self.lease_key(self.replica_id());
        self.call(redis.del::<_, usize>(key)).await;
    }
}

/// Counts a request in a fixed window kept in Redis: the count after this one and the
/// milliseconds the window has left. One round trip, atomic (the window starts with its first
/// request and expires by itself).
const COUNT_IN_WINDOW: &str = r"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

impl Cluster {
    /// Counts one REST request of `tenant` in its cluster-wide window of `window`: how many
    /// the window has seen (this one included) and how long it has left; `None` when Redis
    /// cannot tell (the caller then counts on this replica alone).
    pub async fn count_request(
        &self,
        tenant: crate::store::TenantId,
        window: Duration,
    ) -> Option<(u64, Duration)> {
        // Known to be down: no request waits for a timeout (the lease loop notices the return).
        if self.health() != ClusterHealth::Ok {
            return None;
        }
        let mut redis = self.0.redis.clone();
        let key = format!("{}:rate:{tenant}", self.0.settings.key_prefix);
        let ms = window.as_millis() as u64;
        let query = redis::cmd("EVAL")
            .arg(COUNT_IN_WINDOW)
            .arg(1)
            .arg(key)
            .arg(ms)
            .to_owned();
        let (used, left): (u64, i64) = self.call(query.query_async(&mut redis)).await?;
        Some((used, Duration::from_millis(left.max(0) as u64)))
    }
}

/// A default replica id: the host name and a random suffix (unique, but a new one at every
/// start: set `--replica-id` for a replica that should recover its own replies at once).
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}
