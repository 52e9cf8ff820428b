//! The server's side of the audit log: what is counted rather than written one row at a
//! time, and the sweeps.
//!
//! Operator actions are written by [`crate::admin::Admin`] as they happen. Failed
//! authentications and budget refusals can come in floods, so they are *tallied* here per
//! source (address and reason; tenant, user and budget) and written as one row per tally
//! every `flush_interval`, with the count and the first and last time; the tallies are
//! bounded, past `max_tallies` distinct sources the rest are counted under one `other` row.
//! The same periodic task records key expiries (once each, see
//! [`Store::audit_key_expiries`]) and deletes records older than the retention.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::chat::budget::QuotaExceeded;
use crate::domain::{now, Actor, AuditAction};
use crate::store::{AuditRecord, Store, TenantId};

/// How the audit log is kept.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Records older than this are deleted; `None`: kept forever.
    pub retention: Option<chrono::Duration>,
    /// How often tallies are written and expiries looked for.
    pub flush_interval: Duration,
    /// Distinct sources tallied between two flushes before the rest are lumped together.
    pub max_tallies: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            retention: Some(chrono::Duration::days(180)),
            flush_interval: Duration::from_secs(60),
            max_tallies: 10_000,
        }
    }
}

/// Where a refused credential was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    /// `/api` or `/v1`.
    Rest,
    /// `/admin/v1`.
    Admin,
    /// `/ws/chat`.
    WebSocket,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Rest => "rest",
            Via::Admin => "admin",
            Via::WebSocket => "websocket",
        }
    }
}

/// What one tally counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    AuthFail {
        /// The client's address, or `other` once the tallies are full.
        address: String,
        reason: &'static str,
    },
    BudgetRefuse {
        tenant: TenantId,
        user: String,
        scope: &'static str,
        period: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    via: BTreeSet<Via>,
    /// A budget refusal's budget and reset, as last seen.
    budget: Option<(u64, DateTime<Utc>)>,
}

struct Inner {
    store: Store,
    settings: AuditSettings,
    tallies: Mutex<HashMap<Source, Tally>>,
}

/// The tallies and sweeps; cheap to clone.
#[derive(Clone)]
pub struct Audit(Arc<Inner>);

impl Audit {
    /// Starts the periodic task (it ends when the last handle is dropped).
    pub fn start(store: Store, settings: AuditSettings) -> Audit {
        let audit = Audit(Arc::new(Inner {
            store,
            settings,
            tallies: Mutex::new(HashMap::new()),
        }));
        tokio::spawn(sweep(Arc::downgrade(&audit.0)));
        audit
    }

    fn count(&self, source: Source, via: Option<Via>, budget: Option<(u64, DateTime<Utc>)>) {
        let at = now();
        let mut tallies = self.0.tallies.lock().unwrap_or_else(|e| e.into_inner());
        let source =
            if tallies.len() >= self.0.settings.max_tallies && !tallies.contains_key(&source) {
                match source {
                    Source::AuthFail { reason, .. } => Source::AuthFail {
                        address: "other".into(),
                        reason,
                    },
                    Source::BudgetRefuse {
                        tenant,
                        scope,
                        period,
                        ..
                    } => Source::BudgetRefuse {
                        tenant,
                        user: "other".into(),
                        scope,
                        period,
                    },
                }
            } else {
                source
            };
        let t = tallies.entry(source).or_insert_with(|| Tally {
            count: 0,
            first: at,
            last: at,
            via: BTreeSet::new(),
            budget: None,
        });
        t.count += 1;
        t.last = at;
        t.via.extend(via);
        if budget.is_some() {
            t.budget = budget;
        }
    }

    /// Counts a request or socket refused for its credentials (`reason`: the error code,
    /// e.g. `invalid_api_key`).
    pub fn auth_failed(&self, address: Option<std::net::IpAddr>, via: Via, reason: &'static str) {
        let address = address.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        self.count(Source::AuthFail { address, reason }, Some(via), None);
    }

    /// Counts a reply or completion refused by a budget.
    pub fn budget_refused(&self, tenant: TenantId, user: &str, q: &QuotaExceeded) {
        self.count(
            Source::BudgetRefuse {
                tenant,
                user: user.to_string(),
                scope: q.scope.as_str(),
                period: q.period.as_str(),
            },
            None,
            Some((q.limit, q.resets_at)),
        );
    }

    /// Writes the tallies (one record each) and starts new ones.
    pub async fn flush(&self) {
        let tallies =
            std::mem::take(&mut *self.0.tallies.lock().unwrap_or_else(|e| e.into_inner()));
        if tallies.is_empty() {
            return;
        }
        let tenants: Vec<uuid::Uuid> = tallies
            .keys()
            .filter_map(|s| match s {
                Source::BudgetRefuse { tenant, .. } => Some(tenant.as_uuid()),
                Source::AuthFail { .. } => None,
            })
            .collect();
        let names = match self.0.store.tenant_names(&tenants).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "audit: tenant names not read");
                HashMap::new()
            }
        };
        let records = tallies
            .into_iter()
            .map(|(source, t)| {
                let r = match source {
                    Source::AuthFail { address, reason } => {
                        AuditRecord::new(AuditAction::AuthFail, Actor::Client { address })
                            .detail("reason", reason)
                            .detail(
                                "via",
                                json!(t.via.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
                            )
                    }
                    Source::BudgetRefuse {
                        tenant,
                        user,
                        scope,
                        period,
                    } => {
                        let id = tenant.as_uuid();
                        let mut r = AuditRecord::new(AuditAction::BudgetRefuse, Actor::Server)
                            .target(format!("user:{user}"))
                            .detail("user_id", user)
                            .detail("scope", scope)
                            .detail("period", period);
                        if let Some(name) = names.get(&id) {
                            r = r.tenant(id, name);
                        }
                        if let Some((limit, resets_at)) = t.budget {
                            r = r
                                .detail("limit", limit)
                                .detail("resets_at", resets_at.to_rfc3339());
                        }
                        r
                    }
                };
                r.at(t.last)
                    .detail("count", t.count)
                    .detail("first_at", t.first.to_rfc3339())
                    .detail("last_at", t.last.to_rfc3339())
            })
            .collect();
        if let Err(e) = self.0.store.append_audit(records).await {
            tracing::error!(error = %e, "audit: tallies of failed authentications and budget refusals lost");
        }
    }

    /// Records key expiries and deletes records past the retention.
    async fn maintain(&self) {
        let at = now();
        match self.0.store.audit_key_expiries(at).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "audit: key expiries recorded"),
            Err(e) => tracing::warn!(error = %e, "audit: key expiries not recorded"),
        }
        if let Some(keep) = self.0.settings.retention {
            match self.0.store.prune_audit(at - keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(records = n, "audit: records past the retention deleted"),
                Err(e) => tracing::warn!(error = %e, "audit: old records not deleted"),
            }
        }
    }
}

/// Every `flush_interval`: writes the tallies and maintains the log, until the audit is
/// dropped.
async fn sweep(audit: Weak<Inner>) {
    let every = match audit.upgrade() {
        Some(a) => a.settings.flush_interval,
        None => return,
    };
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        ticker.tick().await;
        let Some(inner) = audit.upgrade() else { return };
        let audit = Audit(inner);
        audit.flush().await;
        audit.maintain().await;
    }
}
