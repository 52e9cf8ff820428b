//! Operator actions that are not scoped to one tenant: tenants, API keys, authentication.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use uuid::Uuid;

use super::entity::{api_key, tenant};
use super::{Store, StoreError, TenantId};
use crate::credentials::IssuedKey;
use crate::domain::{now, TenantLimits, TenantLimitsPatch};

/// A tenant as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Keys that still work.
    pub active_keys: u64,
    pub limits: TenantLimits,
}

fn limit_of(v: Option<i32>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

fn limits_of(t: &tenant::Model) -> TenantLimits {
    TenantLimits {
        requests_per_minute: limit_of(t.requests_per_minute),
        ws_messages_per_second: limit_of(t.ws_messages_per_second),
        max_connections: limit_of(t.max_connections),
    }
}

/// An API key as an operator sees it (never the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub prefix: String,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a new key is for and how long it works (both optional).
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub name: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A working (not revoked) key, as authentication needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyAuth {
    pub tenant: TenantId,
    pub key_id: Uuid,
    /// The key stops working at this time.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Key names: what an operator writes to tell keys apart.
pub const MAX_KEY_NAME_CHARS: usize = 100;

impl KeySpec {
    /// Checks the name (1–100 characters, no control characters) and that the expiry is in
    /// the future.
    pub fn validate(&self) -> Result<(), StoreError> {
        if let Some(name) = &self.name {
            let n = name.chars().count();
            if n == 0 || n > MAX_KEY_NAME_CHARS || name.chars().any(char::is_control) {
                return Err(StoreError::Invalid(format!(
                    "a key name has 1 to {MAX_KEY_NAME_CHARS} characters and no control characters"
                )));
            }
        }
        if let Some(at) = self.expires_at {
            if at <= Utc::now() {
                return Err(StoreError::Invalid(format!(
                    "the expiry {} is not in the future",
                    at.to_rfc3339()
                )));
            }
        }
        Ok(())
    }
}

impl From<api_key::Model> for KeyInfo {
    fn from(m: api_key::Model) -> Self {
        KeyInfo {
            id: m.id,
            tenant_id: m.tenant_id,
            prefix: m.prefix,
            name: m.name,
            created_at: m.created_at,
            expires_at: m.expires_at,
            last_used_at: m.last_used_at,
            revoked_at: m.revoked_at,
        }
    }
}

/// Tenant names are short identifiers an operator types on the command line.
pub fn validate_tenant_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=64).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid tenant name {name:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '-', '_', '.'"
        ))
    }
}

fn key_row(tenant_id: Uuid, key: &IssuedKey, spec: &KeySpec) -> api_key::ActiveModel {
    api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id),
        prefix: Set(key.prefix.clone()),
        key_hash: Set(key.hash.clone()),
        created_at: Set(now()),
        revoked_at: Set(None),
        name: Set(spec.name.clone()),
        expires_at: Set(spec.expires_at),
        last_used_at: Set(None),
    }
}

impl Store {
    /// Creates a tenant with one API key.
    pub async fn create_tenant(
        &self,
        name: &str,
        key: &IssuedKey,
    ) -> Result<TenantInfo, StoreError> {
        validate_tenant_name(name).map_err(StoreError::Invalid)?;
        let name = name.to_string();
        let key = key.clone();
        self.db
            .transaction::<_, TenantInfo, StoreError>(|txn| {
                Box::pin(async move {
                    let id = Uuid::now_v7();
                    let created_at = now();
                    let inserted = tenant::Entity::insert(tenant::ActiveModel {
                        id: Set(id),
                        name: Set(name.clone()),
                        created_at: Set(created_at),
                        ..Default::default()
                    })
                    .on_conflict(
                        OnConflict::column(tenant::Column::Name)
                            .do_nothing()
                            .to_owned(),
                    )
                    .exec_without_returning(txn)
                    .await?;
                    if inserted == 0 {
                        return Err(StoreError::Conflict(format!(
                            "tenant {name:?} already exists"
                        )));
                    }
                    insert_key(txn, id, &key, &KeySpec::default()).await?;
                    Ok(TenantInfo {
                        id,
                        name,
                        created_at,
                        active_keys: 1,
                        limits: TenantLimits::default(),
                    })
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// All tenants, oldest first, with their number of working keys.
    pub async fn list_tenants(&self) -> Result<Vec<TenantInfo>, StoreError> {
        let tenants = tenant::Entity::find()
            .order_by_asc(tenant::Column::CreatedAt)
            .order_by_asc(tenant::Column::Id)
            .all(&self.db)
            .await?;
        let mut out = Vec::with_capacity(tenants.len());
        for t in tenants {
            let active_keys = api_key::Entity::find()
                .filter(api_key::Column::TenantId.eq(t.id))
                .filter(api_key::Column::RevokedAt.is_null())
                .count(&self.db)
                .await?;
            out.push(TenantInfo {
                limits: limits_of(&t),
                id: t.id,
                name: t.name,
                created_at: t.created_at,
                active_keys,
            });
        }
        Ok(out)
    }

    /// Number of tenants; zero means a brand-new installation.
    pub async fn tenant_count(&self) -> Result<u64, StoreError> {
        Ok(tenant::Entity::find().count(&self.db).await?)
    }

    /// Finds a tenant by name or by id.
    pub async fn find_tenant(&self, name_or_id: &str) -> Result<TenantInfo, StoreError> {
        let cond = match Uuid::parse_str(name_or_id) {
            Ok(id) => tenant::Column::Id.eq(id),
            Err(_) => tenant::Column::Name.eq(name_or_id),
        };
        let t = tenant::Entity::find()
            .filter(cond)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        let active_keys = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(t.id))
            .filter(api_key::Column::RevokedAt.is_null())
            .count(&self.db)
            .await?;
        Ok(TenantInfo {
            limits: limits_of(&t),
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            active_keys,
        })
    }

    /// Changes a tenant's own limits; returns the tenant as it is now.
    pub async fn set_tenant_limits(
        &self,
        name_or_id: &str,
        patch: TenantLimitsPatch,
    ) -> Result<TenantInfo, StoreError> {
        let t = self.find_tenant(name_or_id).await?;
        let mut limits = t.limits;
        limits.apply(patch);
        let col = |v: Option<u32>| v.map(|n| n.min(i32::MAX as u32) as i32);
        tenant::Entity::update_many()
            .col_expr(
                tenant::Column::RequestsPerMinute,
                Expr::value(col(limits.requests_per_minute)),
            )
            .col_expr(
                tenant::Column::WsMessagesPerSecond,
                Expr::value(col(limits.ws_messages_per_second)),
            )
            .col_expr(
                tenant::Column::MaxConnections,
                Expr::value(col(limits.max_connections)),
            )
            .filter(tenant::Column::Id.eq(t.id))
            .exec(&self.db)
            .await?;
        Ok(TenantInfo { limits, ..t })
    }

    /// The limits of an authenticated tenant.
    pub async fn tenant_limits(&self, tenant: TenantId) -> Result<TenantLimits, StoreError> {
        let t = tenant::Entity::find_by_id(tenant.0)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(limits_of(&t))
    }

    /// Adds a key to a tenant (named or by id), with an optional name and expiry.
    pub async fn create_key(
        &self,
        tenant: &str,
        key: &IssuedKey,
        spec: &KeySpec,
    ) -> Result<KeyInfo, StoreError> {
        spec.validate()?;
        let t = self.find_tenant(tenant).await?;
        insert_key(&self.db, t.id, key, spec).await
    }

    /// The keys of a tenant, newest first, revoked ones included.
    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, StoreError> {
        let t = self.find_tenant(tenant).await?;
        Ok(api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(t.id))
            .order_by_desc(api_key::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(KeyInfo::from)
            .collect())
    }

    /// Revokes the one working key whose prefix is `prefix`.
    pub async fn revoke_key(&self, prefix: &str) -> Result<KeyInfo, StoreError> {
        let matches = api_key::Entity::find()
            .filter(api_key::Column::Prefix.eq(prefix))
            .filter(api_key::Column::RevokedAt.is_null())
            .all(&self.db)
            .await?;
        let key = match matches.len() {
            0 => return Err(StoreError::NotFound),
            1 => matches.into_iter().next().ok_or(StoreError::NotFound)?,
            n => {
                return Err(StoreError::Conflict(format!(
                    "{n} working keys share the prefix {prefix:?}; revoke them by creating new keys first"
                )))
            }
        };
        let revoked_at = now();
        api_key::Entity::update_many()
            .col_expr(api_key::Column::RevokedAt, Expr::value(revoked_at))
            .filter(api_key::Column::Id.eq(key.id))
            .exec(&self.db)
            .await?;
        Ok(KeyInfo {
            revoked_at: Some(revoked_at),
            ..KeyInfo::from(key)
        })
    }

    /// The key with this hash, if it exists and is not revoked (expired or not: the caller
    /// compares `expires_at` with the time of each request).
    pub async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>, StoreError> {
        Ok(api_key::Entity::find()
            .filter(api_key::Column::KeyHash.eq(key_hash))
            .filter(api_key::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?
            .map(|k| KeyAuth {
                tenant: TenantId(k.tenant_id),
                key_id: k.id,
                expires_at: k.expires_at,
            }))
    }

    /// Records that a key was just used.
    pub async fn touch_key(&self, key_id: Uuid) -> Result<(), StoreError> {
        api_key::Entity::update_many()
            .col_expr(api_key::Column::LastUsedAt, Expr::value(now()))
            .filter(api_key::Column::Id.eq(key_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

async fn insert_key<C: sea_orm::ConnectionTrait>(
    db: &C,
    tenant_id: Uuid,
    key: &IssuedKey,
    spec: &KeySpec,
) -> Result<KeyInfo, StoreError> {
    let inserted = api_key::Entity::insert(key_row(tenant_id, key, spec))
        .on_conflict(
            OnConflict::column(api_key::Column::KeyHash)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    if inserted == 0 {
        return Err(StoreError::Conflict(
            "this API key is already in use".into(),
        ));
    }
    let row = api_key::Entity::find()
        .filter(api_key::Column::KeyHash.eq(key.hash.as_str()))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(row.into())
}
