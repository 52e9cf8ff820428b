//! API-key authentication: the OpenAPI security scheme and a short-lived key cache.
//!
//! Keys are looked up by their SHA-256. Results (including "no such key") are cached for a
//! few seconds so a busy client does not cost a query per request, while a key revoked from
//! the command line stops working within that TTL. An expiry is compared at every request
//! (exact to the second), and a lookup records the key's last use (so that is exact to the
//! cache's lifetime).

use std::time::Duration;

use poem::Request;
use poem_openapi::auth::ApiKey;
use poem_openapi::SecurityScheme;

use crate::credentials;
use crate::error::ApiError;
use crate::store::{KeyAuth, Store, StoreError, TenantId};

/// Resolves API keys to tenants.
#[derive(Clone)]
pub struct Authenticator {
    store: Store,
    /// key hash → the key (None: no such working key).
    cache: moka::future::Cache<String, Option<KeyAuth>>,
}

impl Authenticator {
    pub fn new(store: Store, ttl: Duration, capacity: u64) -> Self {
        Authenticator {
            store,
            cache: moka::future::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .build(),
        }
    }

    /// The tenant of a key, or why there is none.
    pub async fn authenticate(&self, key: &str) -> Result<TenantId, ApiError> {
        if !credentials::plausible(key) {
            return Err(ApiError::InvalidApiKey);
        }
        let hash = credentials::hash_key(key);
        let store = self.store.clone();
        let found = self
            .cache
            .try_get_with(hash.clone(), async move {
                let found = store.authenticate(&hash).await?;
                if let Some(k) = found {
                    // Best effort, off the request's path: a lost update only ages "last used".
                    tokio::spawn(async move {
                        if let Err(e) = store.touch_key(k.key_id).await {
                            tracing::debug!(error = %e, "key use not recorded");
                        }
                    });
                }
                Ok(found)
            })
            .await
            .map_err(|e: std::sync::Arc<StoreError>| match &*e {
                StoreError::Unavailable(_) => ApiError::DatabaseUnavailable,
                other => {
                    tracing::error!(error = ?other, "key lookup failed");
                    ApiError::Internal
                }
            })?;
        let key = found.ok_or(ApiError::InvalidApiKey)?;
        match key.expires_at {
            Some(at) if at <= chrono::Utc::now() => Err(ApiError::ApiKeyExpired { expired_at: at }),
            _ => Ok(key.tenant),
        }
    }
}

/// The tenant API key, sent in the `X-API-Key` header.
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header",
    checker = "check_key"
)]
pub struct TenantAuth(pub TenantId);

async fn check_key(req: &Request, key: ApiKey) -> poem::Result<TenantId> {
    // The middleware authenticates every `/api` request before its quota check.
    if let Some(done) = req.extensions().get::<super::middleware::Authenticated>() {
        return Ok(done.0);
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
