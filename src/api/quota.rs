//! Per-tenant quotas: the REST request rate (a fixed one-minute window per tenant, kept in
//! Redis for all replicas together in cluster mode, reported
//! in the `X-RateLimit-*` and IETF `RateLimit-Policy` / `RateLimit` headers) and the limits
//! the WebSocket layer applies (messages per second, open connections).
//!
//! Each tenant may override the server-wide defaults (`confab tenant set-limits`); the
//! overrides are read from the database at most once per cache period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::TenantLimits;
use crate::store::{Store, TenantId};

/// The length of a REST rate window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Server-wide defaults, from flags and environment: the only place these limits are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDefaults {
    /// REST requests per minute per tenant.
    pub requests_per_minute: u32,
    /// WebSocket messages per second per connection (a token bucket whose burst is the
    /// same number).
    pub ws_messages_per_second: u32,
    /// Open WebSocket connections per tenant.
    pub max_connections: u32,
}

impl Default for QuotaDefaults {
    fn default() -> Self {
        QuotaDefaults {
            requests_per_minute: 100,
            ws_messages_per_second: 10,
            max_connections: 50,
        }
    }
}

/// A tenant's limits with the defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub requests_per_minute: u32,
    pub ws_messages_per_second: u32,
    pub max_connections: u32,
}

/// The verdict on one REST request, with what the headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds until the window resets (at least 1).
    pub reset_secs: u64,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    used: u32,
}

struct Inner {
    store: Store,
    /// In cluster mode, the REST windows are the cluster's (in Redis).
    cluster: Option<crate::cluster::Cluster>,
    defaults: QuotaDefaults,
    overrides: moka::future::Cache<TenantId, TenantLimits>,
    windows: Mutex<HashMap<TenantId, Window>>,
}

/// The quota keeper; cheap to clone.
#[derive(Clone)]
pub struct Quotas(Arc<Inner>);

impl Quotas {
    /// `refresh`: how long a tenant's overrides are cached (changes apply within it).
    /// `cluster`: count REST requests across the replicas (each replica alone without it, or
    /// while Redis cannot be reached).
    pub fn new(
        store: Store,
        defaults: QuotaDefaults,
        refresh: Duration,
        cluster: Option<crate::cluster::Cluster>,
    ) -> Quotas {
        Quotas(Arc::new(Inner {
            store,
            cluster,
            defaults,
            overrides: moka::future::Cache::builder()
                .time_to_live(refresh)
                .max_capacity(100_000)
                .build(),
            windows: Mutex::new(HashMap::new()),
        }))
    }

    /// The tenant's limits. If the database cannot be read, the defaults apply (the request
    /// itself will then fail with `database_unavailable` where it needs the database).
    pub async fn limits(&self, tenant: TenantId) -> Effective {
        let store = self.0.store.clone();
        let own = self
            .0
            .overrides
            .try_get_with(tenant, async move { store.tenant_limits(tenant).await })
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "tenant limits not readable; using defaults");
                TenantLimits::default()
            });
        let d = self.0.defaults;
        Effective {
            requests_per_minute: own.requests_per_minute.unwrap_or(d.requests_per_minute),
            ws_messages_per_second: own
                .ws_messages_per_second
                .unwrap_or(d.ws_messages_per_second),
            max_connections: own.max_connections.unwrap_or(d.max_connections),
        }
    }

    /// Forgets a tenant's cached limits (an operator just changed them here).
    pub async fn forget(&self, tenant: TenantId) {
        self.0.overrides.invalidate(&tenant).await;
    }

    /// Counts one REST request of `tenant` against its per-minute quota.
    pub async fn check_rest(&self, tenant: TenantId) -> Decision {
        let limit = self.limits(tenant).await.requests_per_minute.max(1);
        if let Some(cluster) = &self.0.cluster {
            if let Some((used, left)) = cluster.count_request(tenant, WINDOW).await {
                let used = u32::try_from(used).unwrap_or(u32::MAX);
                return Decision {
                    allowed: used <= limit,
                    limit,
                    remaining: limit.saturating_sub(used),
                    reset_secs: left.as_secs_f64().ceil().max(1.0) as u64,
                };
            }
        }
        let mut windows = self.0.windows.lock().unwrap_or_else(|e| e.into_inner());
        count(&mut windows, tenant, limit, Instant::now())
    }
}

/// Counts one request in the tenant's current window (starting a new one when it is over).
fn count(
    windows: &mut HashMap<TenantId, Window>,
    tenant: TenantId,
    limit: u32,
    now: Instant,
) -> Decision {
    // Forget finished windows now and then, so the map holds only active tenants.
    if windows.len() > 1024 {
        windows.retain(|_, w| now.saturating_duration_since(w.started) < WINDOW);
    }
    let w = windows.entry(tenant).or_insert(Window {
        started: now,
        used: 0,
    });
    if now.saturating_duration_since(w.started) >= WINDOW {
        *w = Window {
            started: now,
            used: 0,
        };
    }
    let left = WINDOW.saturating_sub(now.saturating_duration_since(w.started));
    let reset_secs = left.as_secs_f64().ceil().max(1.0) as u64;
    if w.used >= limit {
        return Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_secs,
        };
    }
    w.used += 1;
    Decision {
        allowed: true,
        limit,
        remaining: limit - w.used,
        reset_secs,
    }
}

impl Decision {
    /// The rate-limit headers of a response.
    pub fn headers(&self) -> [(&'static str, String); 5] {
        [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", self.reset_secs.to_string()),
            (
                "ratelimit-policy",
                format!("\"tenant\";q={};w={}", self.limit, WINDOW.as_secs()),
            ),
            (
                "ratelimit",
                format!("\"tenant\";r={};t={}", self.remaining, self.reset_secs),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_window_allows_the_limit_then_resets() {
        let mut w = HashMap::new();
        let (a, b) = (
            TenantId::from_uuid(Uuid::new_v4()),
            TenantId::from_uuid(Uuid::new_v4()),
        );
        let t0 = Instant::now();
        for i in 0..3 {
            let d = count(&mut w, a, 3, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i);
            assert_eq!(d.reset_secs, 60);
        }
        let d = count(&mut w, a, 3, t0 + Duration::from_millis(20_500));
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (false, 0, 40));
        assert!(count(&mut w, b, 3, t0).allowed, "tenants are counted apart");
        let d = count(&mut w, a, 3, t0 + WINDOW);
        assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 2, 60));
        let h = d.headers();
        assert_eq!(h[3].1, "\"tenant\";q=3;w=60");
        assert_eq!(h[4].1, "\"tenant\";r=2;t=60");
    }
}
