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
use crate::domain::{Page, PageRequest, TenantLimitsPatch, TokenBudgetsPatch};
use crate::error::ApiError;
use chrono::NaiveDate;

use crate::store::{KeyInfo, KeySpec, Store, StoreError, TenantInfo, UsageGroup, UsageRow};

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

/// The operator's actions; cheap to clone.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    live: Option<Live>,
}

impl Admin {
    /// For the command line: changes the database only.
    pub fn offline(store: Store) -> Admin {
        Admin { store, live: None }
    }

    /// For a running server: also reaches its sockets, replies and caches.
    pub fn live(store: Store, chat: ChatService, auth: Authenticator, quotas: Quotas) -> Admin {
        Admin {
            store,
            live: Some(Live { chat, auth, quotas }),
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
        let id = t.id.to_string();
        let t = self
            .update_tenant(
                &id,
                TenantUpdate {
                    name: None,
                    ..settings
                },
            )
            .await?;
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
        let mut t = self.tenant(tenant).await?;
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
        Ok(t)
    }

    /// Adds a key to a tenant (the secret is shown once).
    pub async fn create_key(
        &self,
        tenant: &str,
        spec: &KeySpec,
    ) -> Result<(KeyInfo, IssuedKey), AdminError> {
        let key = credentials::generate();
        let k = self
            .store
            .create_key(tenant, &key, spec)
            .await
            .map_err(on_tenant(tenant))?;
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
        let k = self
            .store
            .revoke_key(tenant, key)
            .await
            .map_err(on_key(key))?;
        if let Some(live) = &self.live {
            live.auth.forget_key(k.id);
        }
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
        let k = self
            .store
            .revoke_admin_key(key)
            .await
            .map_err(on_key(key))?;
        if let Some(live) = &self.live {
            live.auth.forget_key(k.id);
        }
        Ok(k)
    }
}
