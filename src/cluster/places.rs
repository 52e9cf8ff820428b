//! Per-tenant counts that hold for all replicas together: open WebSocket connections and
//! replies waiting for an engine.
//!
//! Each replica's own count stays its own (in memory, exact for itself) and is mirrored into
//! a Redis hash per tenant and kind, `{prefix}:{kind}:{tenant}`, one field per replica,
//! rewritten whenever it changes (and every lease/3, which heals a restarted Redis).
//! Taking a place runs one script that adds up the fields of the *other* live replicas
//! (dropping those whose lease has gone), and raises this replica's field when the sum
//! leaves room: two replicas cannot both take the last place.
//!
//! While Redis cannot be reached every replica counts alone (each then allows the whole
//! limit), as the REST rate does.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;

use super::{Cluster, ClusterHealth};
use crate::store::TenantId;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// Open WebSocket connections.
    Connection,
    /// Replies waiting for an engine slot.
    Waiting,
}

impl Place {
    fn name(self) -> &'static str {
        match self {
            Place::Connection => "connections",
            Place::Waiting => "waiting",
        }
    }
}

/// Takes a place if the other live replicas' counts plus this one's leave room: 1 (and
/// this replica's field set to its count after taking), else 0.
/// KEYS: the hash. ARGV: this replica, its count before, the limit, the lease key prefix.
const TAKE: &str = r"
local others = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local r = all[i]
  if r ~= ARGV[1] then
    if redis.call('EXISTS', ARGV[4] .. r) == 1 then
      others = others + tonumber(all[i + 1])
    else
      redis.call('HDEL', KEYS[1], r)
    end
  end
end
if others + tonumber(ARGV[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1)
return 1
";

/// This replica's counts of one kind, as last reported.
pub(super) struct Reports(HashMap<Place, watch::Sender<HashMap<TenantId, usize>>>);

impl Reports {
    pub(super) fn new() -> Reports {
        Reports(
            [Place::Connection, Place::Waiting]
                .into_iter()
                .map(|p| (p, watch::channel(HashMap::new()).0))
                .collect(),
        )
    }
}

impl Cluster {
    fn place_key(&self, place: Place, tenant: TenantId) -> String {
        self.key(&format!("{}:{tenant}", place.name()))
    }

    /// Whether `tenant` may take one more `place` with `mine` taken on this replica and
    /// `limit` for the cluster; `None` when Redis cannot tell (the caller then counts on
    /// this replica alone).
    pub async fn take_place(
        &self,
        place: Place,
        tenant: TenantId,
        mine: usize,
        limit: usize,
    ) -> Option<bool> {
        if self.health() != ClusterHealth::Ok {
            return None;
        }
        let mut redis = self.redis();
        let query = redis::cmd("EVAL")
            .arg(TAKE)
            .arg(1)
            .arg(self.place_key(place, tenant))
            .arg(self.replica_id())
            .arg(mine)
            .arg(limit)
            .arg(self.key("replica:"))
            .to_owned();
        let taken: i64 = self.call(query.query_async(&mut redis)).await?;
        Some(taken == 1)
    }

    /// This replica's counts of `place` now (tenants not listed have none); written to
    /// Redis in the background, the latest only.
    pub fn report_places(&self, place: Place, counts: HashMap<TenantId, usize>) {
        if let Some(tx) = self.0.reports.0.get(&place) {
            tx.send_replace(counts);
        }
    }

    /// Writes this replica's counts whenever they change, and all of them every lease/3,
    /// until the cluster is dropped.
    pub(super) async fn write_places(self, place: Place) {
        let Some(mut rx) = self.0.reports.0.get(&place).map(|tx| tx.subscribe()) else {
            return;
        };
        let mut written: HashMap<TenantId, usize> = HashMap::new();
        let mut again = tokio::time::interval((self.lease() / 3).max(Duration::from_millis(100)));
        loop {
            let all = tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    false
                }
                _ = again.tick() => true,
            };
            if self.health() != ClusterHealth::Ok && !all {
                continue;
            }
            let now = rx.borrow_and_update().clone();
            let mut pipe = redis::pipe();
            let mut any = false;
            for (tenant, n) in &now {
                if all || written.get(tenant) != Some(n) {
                    pipe.hset(self.place_key(place, *tenant), self.replica_id(), *n)
                        .ignore();
                    any = true;
                }
            }
            for tenant in written.keys().filter(|t| !now.contains_key(t)) {
                pipe.hdel(self.place_key(place, *tenant), self.replica_id())
                    .ignore();
                any = true;
            }
            if !any {
                continue;
            }
            let mut redis = self.redis();
            if self
                .call(pipe.query_async::<()>(&mut redis))
                .await
                .is_some()
            {
                written = now;
            }
        }
    }
}
