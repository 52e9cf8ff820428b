//! Key authentication: the two OpenAPI security schemes (tenant key, admin key) and
//! short-lived caches of keys and of tenants' state.
//!
//! Keys are looked up by their SHA-256. Results (including "no such key") are cached for a
//! few seconds so a busy client does not cost a query per request, while a key revoked from
//! the command line stops working within that TTL (at once when revoked through this
//! server's admin API, which forgets it here). An expiry is compared at every request (exact
//! to the second), and a lookup records the key's last use (so that is exact to the cache's
//! lifetime). Whether a tenant is disabled is cached the same way, per tenant, so disabling
//! one takes effect for all its keys together.

use std::time::Duration;

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::auth::ApiKey;
use poem_openapi::SecurityScheme;
use uuid::Uuid;

use crate::credentials;
use crate::error::{ApiError, KeyKind};
use crate::store::{KeyAuth, KeyOwner, Store, StoreError, TenantId};

/// A tenant key's or user token's holder: the tenant, which key or token (usage is recorded
/// per key), and for a token the one user it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    pub key_id: Uuid,
    /// A user-scoped token's user: only that user's chats exist for it.
    pub user: Option<String>,
}

impl Caller {
    /// The store as this caller may see it: its tenant, narrowed to its user for a token.
    pub fn scope<'a>(&'a self, store: &'a Store) -> crate::store::TenantScope<'a> {
        store.tenant(self.tenant).only_user(self.user.as_deref())
    }

    /// Refuses acting for another user than a token's (403 `forbidden`).
    pub fn may_act_for(&self, user_id: &str) -> Result<(), ApiError> {
        match &self.user {
            Some(u) if u != user_id => Err(ApiError::OtherUser {
                token_user: u.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Refuses a user token where only a tenant key will do (minting tokens, the tenant's
    /// usage): 403 `forbidden`.
    pub fn tenant_key_only(&self) -> Result<(), ApiError> {
        match self.user {
            Some(_) => Err(ApiError::Forbidden {
                needs: KeyKind::Tenant,
            }),
            None => Ok(()),
        }
    }
}

/// Resolves keys to tenants or to the operator.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    /// key hash → the key (None: no such working key).
    keys: moka::future::Cache<String, Option<KeyAuth>>,
    /// tenant → since when it is disabled (None: enabled). A deleted tenant is not cached:
    /// its keys are gone with it.
    tenants: moka::future::Cache<TenantId, Option<DateTime<Utc>>>,
}

fn store_failure(e: std::sync::Arc<StoreError>) -> ApiError {
    match &*e {
        StoreError::Unavailable(_) => ApiError::DatabaseUnavailable,
        other => {
            tracing::error!(error = ?other, "key lookup failed");
            ApiError::Internal
        }
    }
}

impl Authenticator {
    pub fn new(store: Store, ttl: Duration, capacity: u64) -> Self {
        Authenticator {
            store,
            keys: moka::future::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .support_invalidation_closures()
                .build(),
            tenants: moka::future::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .build(),
        }
    }

    /// The working key `key` is, of either kind, or why there is none.
    async fn key(&self, key: &str) -> Result<KeyAuth, ApiError> {
        if !credentials::plausible(key) {
            return Err(ApiError::InvalidApiKey);
        }
        let hash = credentials::hash_key(key);
        let store = self.store.clone();
        let found = self
            .keys
            .try_get_with(hash.clone(), async move {
                let found = store.authenticate(&hash).await?;
                if let Some(k) = found.clone() {
                    // Best effort, off the request's path: a lost update only ages "last used".
                    tokio::spawn(async move {
                        if let Err(e) = store.touch_key(&k).await {
                            tracing::debug!(error = %e, "key use not recorded");
                        }
                    });
                }
                Ok(found)
            })
            .await
            .map_err(store_failure)?;
        let key = found.ok_or(ApiError::InvalidApiKey)?;
        match key.expires_at {
            Some(at) if at <= Utc::now() => Err(ApiError::ApiKeyExpired { expired_at: at }),
            _ => Ok(key),
        }
    }

    /// The tenant and key of a tenant key, or why there are none (an admin key is
    /// `forbidden` here; a disabled tenant's key `tenant_disabled`).
    pub async fn authenticate(&self, key: &str) -> Result<Caller, ApiError> {
        let k = self.key(key).await?;
        let (tenant, user) = match k.owner {
            KeyOwner::Tenant(t) => (t, None),
            KeyOwner::User { tenant, user_id } => (tenant, Some(user_id)),
            KeyOwner::Admin => {
                return Err(ApiError::Forbidden {
                    needs: KeyKind::Tenant,
                })
            }
        };
        self.check_tenant(tenant).await?;
        Ok(Caller {
            tenant,
            key_id: k.key_id,
            user,
        })
    }

    /// Whether an authenticated tenant may still work.
    pub async fn check_tenant(&self, tenant: TenantId) -> Result<(), ApiError> {
        let store = self.store.clone();
        let disabled = self
            .tenants
            .try_get_with(
                tenant,
                async move { store.tenant_disabled_at(tenant).await },
            )
            .await;
        match disabled {
            Ok(None) => Ok(()),
            Ok(Some(since)) => Err(ApiError::TenantDisabled { since: Some(since) }),
            Err(e) if matches!(*e, StoreError::NotFound) => Err(ApiError::InvalidApiKey),
            Err(e) => Err(store_failure(e)),
        }
    }

    /// The id of an admin key, or why it is not one (a tenant key is `forbidden` here).
    pub async fn authenticate_admin(&self, key: &str) -> Result<Uuid, ApiError> {
        let k = self.key(key).await?;
        match k.owner {
            KeyOwner::Admin => Ok(k.key_id),
            KeyOwner::Tenant(_) | KeyOwner::User { .. } => Err(ApiError::Forbidden {
                needs: KeyKind::Admin,
            }),
        }
    }

    /// Forgets what is cached about a tenant (it was just disabled, enabled or deleted).
    pub async fn forget_tenant(&self, tenant: TenantId) {
        self.tenants.invalidate(&tenant).await;
        let _ = self.keys.invalidate_entries_if(move |_, k| {
            k.as_ref().is_some_and(|k| k.tenant() == Some(tenant))
        });
    }

    /// Forgets a key (it was just revoked).
    pub fn forget_key(&self, key_id: Uuid) {
        let _ = self
            .keys
            .invalidate_entries_if(move |_, k| k.as_ref().is_some_and(|k| k.key_id == key_id));
    }
}

/// The tenant API key (or a user-scoped token, `POST /api/v1/tokens`), sent in the
/// `X-API-Key` header.
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    checker = "check_key"
)]
pub struct TenantAuth(pub Caller);

async fn check_key(req: &Request, key: ApiKey) -> poem::Result<Caller> {
    // The middleware authenticates every `/api` request before its quota check.
    if let Some(done) = req.extensions().get::<super::middleware::Authenticated>() {
        return Ok(done.0.clone());
    }
    let state = req.data::<super::AppState>().ok_or_else(|| {
        poem::Error::from(crate::error::Failure::<crate::error::Authed>::from(
            ApiError::Internal,
        ))
    })?;
    state
        .auth
        .authenticate(&key.key)
        .await
        .map_err(|e| crate::error::Failure::<crate::error::Authed>::from(e).into())
}

/// An admin key (`confab admin key create`), sent in the `X-API-Key` header; only
/// `/admin/v1` takes it.
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    checker = "check_admin_key"
)]
pub struct AdminAuth(pub Uuid);

async fn check_admin_key(req: &Request, key: ApiKey) -> poem::Result<Uuid> {
    let state = req.data::<super::AppState>().ok_or_else(|| {
        poem::Error::from(crate::error::Failure::<crate::error::AdminAuthed>::from(
            ApiError::Internal,
        ))
    })?;
    state
        .auth
        .authenticate_admin(&key.key)
        .await
        .map_err(|e| crate::error::Failure::<crate::error::AdminAuthed>::from(e).into())
}
