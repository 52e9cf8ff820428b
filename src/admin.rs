//! What an operator can do: tenants, their keys, admin keys. The `/admin/v1` API and the
//! `confab tenant|key|admin` commands both call this, so they cannot drift apart.
//!
//! A running server's instance is *live*: disabling or deleting a tenant also closes its
//! open sockets (4403) and stops its replies at once, here and (cluster mode) on every
//! replica, and a revoked key or changed limits are forgotten by the caches. The command
//! line's instance only changes the database; a running server notices within its cache
//! lifetime (keys, limits) or its tenant check interval (open sockets).

use crate::api::quota::Quotas;
use crate::api::Authenticator;
use crate::chat::{ChatService, TenantClosed};
use crate::credentials::{self, IssuedKey};
use crate::domain::{Actor, AuditAction, Page, PageRequest, TenantLimitsPatch, TokenBudgetsPatch};
use crate::error::ApiError;
use chrono::NaiveDate;
use serde_json::{json, Map, Value};

use crate::store::{
    AuditEntry, AuditFilter, AuditRecord, AuditTenant, KeyInfo, KeySpec, Store, StoreError,
    TenantInfo, UsageGroup, UsageRow,
};

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no tenant named {0:?} (see `confab tenant list`)")]
    TenantNotFound(String),
    #[error("no working key {0:?} (see `confab key list TENANT`)")]
    KeyNotFound(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::TenantNotFound(t) => ApiError::TenantNotFound(t),
            AdminError::KeyNotFound(k) => ApiError::ApiKeyNotFound(k),
            AdminError::Store(s) => s.into(),
        }
    }
}

/// A store failure of an operation on tenant `t`.
fn on_tenant(t: &str) -> impl FnOnce(StoreError) -> AdminError + '_ {
    move |e| match e {
        StoreError::NotFound => AdminError::TenantNotFound(t.to_string()),
        other => AdminError::Store(other),
    }
}

/// A store failure of an operation on key `k`.
fn on_key(k: &str) -> impl FnOnce(StoreError) -> AdminError + '_ {
    move |e| match e {
        StoreError::NotFound => AdminError::KeyNotFound(k.to_string()),
        other => AdminError::Store(other),
    }
}

/// A change to a tenant: its name, its limits, its budgets (each optional).
#[derive(Debug, Clone, Default)]
pub struct TenantUpdate {
    pub name: Option<String>,
    pub limits: TenantLimitsPatch,
    pub budgets: TokenBudgetsPatch,
}

/// The running server's parts that an admin action must reach.
#[derive(Clone)]
struct Live {
    chat: ChatService,
    auth: Authenticator,
    quotas: Quotas,
}

/// The operator's actions; cheap to clone. Each change is written to the audit log as the
/// act of [`Admin::by`]'s actor.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    live: Option<Live>,
    actor: Actor,
}

/// What changed between two states of a tenant, field by field: `{"name": {"from", "to"},
/// "limits.requests_per_minute": {…}, …}`.
fn changes(before: &TenantInfo, after: &TenantInfo) -> Map<String, Value> {
    let mut out = Map::new();
    if before.name != after.name {
        out.insert(
            "name".into(),
            json!({"from": before.name, "to": after.name}),
        );
    }
    let fields = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for (group, from, to) in [
        ("limits", json!(before.limits), json!(after.limits)),
        ("budgets", json!(before.budgets), json!(after.budgets)),
    ] {
        let to = fields(to);
        for (field, old) in fields(from) {
            let new = to.get(&field).cloned().unwrap_or(Value::Null);
            if old != new {
                out.insert(format!("{group}.{field}"), json!({"from": old, "to": new}));
            }
        }
    }
    out
}

/// An audit record about tenant `t`.
fn about(action: AuditAction, actor: &Actor, t: &TenantInfo) -> AuditRecord {
    AuditRecord::new(action, actor.clone()).tenant(t.id, &t.name)
}

impl Admin {
    /// For the command line: changes the database only; acts as the OS user that runs it.
    pub fn offline(store: Store) -> Admin {
        Admin {
            store,
            live: None,
            actor: Actor::cli(),
        }
    }

    /// For a running server: also reaches its sockets, replies and caches. Its actions are
    /// the server's until [`Admin::by`] says whose they are.
    pub fn live(store: Store, chat: ChatService, auth: Authenticator, quotas: Quotas) -> Admin {
        Admin {
            store,
            live: Some(Live { chat, auth, quotas }),
            actor: Actor::Server,
        }
    }

    /// The same service acting for `actor` (an admin key, say): the audit log names it.
    pub fn by(&self, actor: Actor) -> Admin {
        Admin {
            actor,
            ..self.clone()
        }
    }

    /// Appends to the audit log. The action is done by now, so a failure to record it is
    /// logged loudly rather than reported as the action failing.
    async fn record(&self, r: AuditRecord) {
        let action = r.action;
        tracing::info!(
            %action,
            actor = r.actor.kind(),
            actor_id = r.actor.id(),
            tenant = r.tenant.as_ref().map(|t| t.1.as_str()),
            target = r.target,
            "audit"
        );
        if let Err(e) = self.store.append_audit(vec![r]).await {
            tracing::error!(%action, error = %e, "audit record lost");
        }
    }

    /// Creates a tenant with its first key (the secret is shown once) and optional limits
    /// and budgets (`settings.name` is not used).
    pub async fn create_tenant(
        &self,
        name: &str,
        settings: TenantUpdate,
    ) -> Result<(TenantInfo, KeyInfo, IssuedKey), AdminError> {
        let key = credentials::generate();
        let (t, first) = self
            .store
            .create_tenant(name, &key)
            .await
            .map_err(AdminError::Store)?;
        let created = t.clone();
        let t = self
            .apply(
                t,
                TenantUpdate {
                    name: None,
                    ..settings
                },
            )
            .await?;
        let mut r = about(AuditAction::TenantCreate, &self.actor, &t)
            .detail("first_key", json!({"id": first.id, "prefix": first.prefix}));
        let settings = changes(&created, &t);
        if !settings.is_empty() {
            r = r.detail("settings", Value::Object(settings));
        }
        self.record(r).await;
        Ok((t, first, key))
    }

    pub async fn list_tenants(&self, page: PageRequest) -> Result<Page<TenantInfo>, AdminError> {
        self.store
            .list_tenants(page)
            .await
            .map_err(AdminError::Store)
    }

    /// A tenant by name or id.
    pub async fn tenant(&self, tenant: &str) -> Result<TenantInfo, AdminError> {
        self.store
            .find_tenant(tenant)
            .await
            .map_err(on_tenant(tenant))
    }

    /// Renames a tenant and/or changes its limits and budgets.
    pub async fn update_tenant(
        &self,
        tenant: &str,
        update: TenantUpdate,
    ) -> Result<TenantInfo, AdminError> {
        let before = self.tenant(tenant).await?;
        let after = self.apply(before.clone(), update).await?;
        let changed = changes(&before, &after);
        if !changed.is_empty() {
            self.record(
                about(AuditAction::TenantUpdate, &self.actor, &after)
                    .detail("changes", Value::Object(changed)),
            )
            .await;
        }
        Ok(after)
    }

    /// Applies `update` to tenant `t` (as it is now), unrecorded.
    async fn apply(
        &self,
        mut t: TenantInfo,
        update: TenantUpdate,
    ) -> Result<TenantInfo, AdminError> {
        let id = t.id.to_string();
        if let Some(name) = &update.name {
            t = self
                .store
                .rename_tenant(&id, name)
                .await
                .map_err(on_tenant(&id))?;
        }
        if update.limits != TenantLimitsPatch::default() {
            t = self
                .store
                .set_tenant_limits(&id, update.limits)
                .await
                .map_err(on_tenant(&id))?;
            if let Some(live) = &self.live {
                live.quotas.forget(t.tenant_id()).await;
            }
        }
        if update.budgets != TokenBudgetsPatch::default() {
            t = self
                .store
                .set_tenant_budgets(&id, update.budgets)
                .await
                .map_err(on_tenant(&id))?;
            if let Some(live) = &self.live {
                live.chat.budgets().forget(t.tenant_id()).await;
            }
        }
        Ok(t)
    }

    /// Disables (`true`) or enables a tenant. Disabling closes its open sockets (4403) and
    /// stops its replies; its keys answer `tenant_disabled` until it is enabled again.
    pub async fn set_disabled(
        &self,
        tenant: &str,
        disabled: bool,
    ) -> Result<TenantInfo, AdminError> {
        let was_disabled = self.tenant(tenant).await?.disabled_at.is_some();
        let t = self
            .store
            .set_tenant_disabled(tenant, disabled)
            .await
            .map_err(on_tenant(tenant))?;
        if let Some(live) = &self.live {
            live.auth.forget_tenant(t.tenant_id()).await;
            if disabled {
                live.chat.tenant_closed(
                    t.tenant_id(),
                    TenantClosed::Disabled {
                        since: t.disabled_at,
                    },
                );
            }
        }
        // Disabling a disabled tenant (enabling an enabled one) changes nothing: no record.
        if was_disabled != disabled {
            let action = if disabled {
                AuditAction::TenantDisable
            } else {
                AuditAction::TenantEnable
            };
            self.record(about(action, &self.actor, &t)).await;
        }
        Ok(t)
    }

    /// Deletes a tenant with all its data. Its sockets are closed and its replies stopped
    /// first, so none writes into what is being deleted.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<TenantInfo, AdminError> {
        let t = self.tenant(tenant).await?;
        if let Some(live) = &self.live {
            live.chat
                .tenant_closed(t.tenant_id(), TenantClosed::Deleted);
        }
        let t = self
            .store
            .delete_tenant(&t.id.to_string())
            .await
            .map_err(on_tenant(tenant))?;
        if let Some(live) = &self.live {
            live.auth.forget_tenant(t.tenant_id()).await;
            live.quotas.forget(t.tenant_id()).await;
        }
        self.record(about(AuditAction::TenantDelete, &self.actor, &t))
            .await;
        Ok(t)
    }

    /// Adds a key to a tenant (the secret is shown once).
    pub async fn create_key(
        &self,
        tenant: &str,
        spec: &KeySpec,
    ) -> Result<(KeyInfo, IssuedKey), AdminError> {
        let t = self.tenant(tenant).await?;
        let key = credentials::generate();
        let k = self
            .store
            .create_key(&t.id.to_string(), &key, spec)
            .await
            .map_err(on_tenant(tenant))?;
        self.record(
            AuditRecord::about_key(AuditAction::KeyCreate, self.actor.clone(), &k)
                .tenant(t.id, &t.name),
        )
        .await;
        Ok((k, key))
    }

    /// A tenant's keys, newest first, revoked ones included.
    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, AdminError> {
        self.store
            .list_keys(tenant)
            .await
            .map_err(on_tenant(tenant))
    }

    /// Revokes a tenant key given by id or prefix; `tenant`, when given, must own it.
    pub async fn revoke_key(&self, tenant: Option<&str>, key: &str) -> Result<KeyInfo, AdminError> {
        if let Some(t) = tenant {
            self.tenant(t).await?;
        }
        let (k, revoked) = self
            .store
            .revoke_key(tenant, key)
            .await
            .map_err(on_key(key))?;
        if let Some(live) = &self.live {
            live.auth.forget_key(k.id);
        }
        // Revoking a revoked key changes nothing: no record.
        if !revoked {
            return Ok(k);
        }
        let mut r = AuditRecord::about_key(AuditAction::KeyRevoke, self.actor.clone(), &k);
        if let Some(id) = k.tenant_id {
            let name = self
                .store
                .tenant_names(&[id])
                .await
                .ok()
                .and_then(|mut n| n.remove(&id));
            r = r.tenant(id, name.as_deref().unwrap_or(""));
        }
        self.record(r).await;
        Ok(k)
    }

    /// Usage over the days `from..=to` of all tenants (or one, by name or id), per tenant
    /// and as `group` says; each row with its tenant's name (`None`: deleted since).
    pub async fn usage(
        &self,
        tenant: Option<&str>,
        from: NaiveDate,
        to: NaiveDate,
        group: UsageGroup,
    ) -> Result<Vec<(UsageRow, Option<String>)>, AdminError> {
        let only = match tenant {
            Some(t) => Some(self.tenant(t).await?.tenant_id()),
            None => None,
        };
        let rows = self
            .store
            .usage_report(only, from, to, group)
            .await
            .map_err(AdminError::Store)?;
        let mut ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.tenant_id).collect();
        ids.dedup();
        let names = self
            .store
            .tenant_names(&ids)
            .await
            .map_err(AdminError::Store)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let name = names.get(&r.tenant_id).cloned();
                (r, name)
            })
            .collect())
    }

    /// Adds an admin key (the secret is shown once).
    pub async fn create_admin_key(
        &self,
        spec: &KeySpec,
    ) -> Result<(KeyInfo, IssuedKey), AdminError> {
        let key = credentials::generate_admin();
        let k = self
            .store
            .create_admin_key(&key, spec)
            .await
            .map_err(AdminError::Store)?;
        self.record(AuditRecord::about_key(
            AuditAction::AdminKeyCreate,
            self.actor.clone(),
            &k,
        ))
        .await;
        Ok((k, key))
    }

    pub async fn list_admin_keys(&self) -> Result<Vec<KeyInfo>, AdminError> {
        self.store
            .list_admin_keys()
            .await
            .map_err(AdminError::Store)
    }

    /// Revokes an admin key given by id or prefix.
    pub async fn revoke_admin_key(&self, key: &str) -> Result<KeyInfo, AdminError> {
        let (k, revoked) = self
            .store
            .revoke_admin_key(key)
            .await
            .map_err(on_key(key))?;
        if let Some(live) = &self.live {
            live.auth.forget_key(k.id);
        }
        if revoked {
            self.record(AuditRecord::about_key(
                AuditAction::AdminKeyRevoke,
                self.actor.clone(),
                &k,
            ))
            .await;
        }
        Ok(k)
    }

    /// One page of the audit log, newest first. `tenant` is a name or id: an existing
    /// tenant's records under any name it had, else a deleted tenant's by its last name.
    pub async fn audit(
        &self,
        tenant: Option<&str>,
        mut filter: AuditFilter,
        page: PageRequest,
    ) -> Result<Page<AuditEntry>, AdminError> {
        filter.tenant = match tenant {
            None => None,
            Some(t) => Some(match self.store.find_tenant(t).await {
                Ok(found) => AuditTenant::Id(found.id),
                Err(StoreError::NotFound) => match uuid::Uuid::parse_str(t) {
                    Ok(id) => AuditTenant::Id(id),
                    Err(_) => {
                        crate::store::validate_tenant_name(t)
                            .map_err(|e| AdminError::Store(StoreError::Invalid(e)))?;
                        AuditTenant::FormerName(t.to_string())
                    }
                },
                Err(e) => return Err(AdminError::Store(e)),
            }),
        };
        self.store
            .audit_log(&filter, page)
            .await
            .map_err(AdminError::Store)
    }
}
