//! Keys: tenant API keys, user-scoped tokens and admin keys, how they are made, listed,
//! revoked and recognised.
//!
//! The kinds live in separate tables (`api_keys`, `user_tokens`, `admin_keys`) so that no
//! query of one can return another; [`Store::authenticate`] is the one place that looks in
//! all.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use super::entity::{admin_key, api_key, user_token};
use super::{Store, StoreError, TenantId};
use crate::credentials::IssuedKey;
use crate::domain::now;

/// A key as an operator sees it (never the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub id: Uuid,
    /// The tenant the key acts for; `None` for an admin key.
    pub tenant_id: Option<Uuid>,
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

/// Whom a key acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOwner {
    Tenant(TenantId),
    /// A user-scoped token: one user of a tenant.
    User {
        tenant: TenantId,
        user_id: String,
    },
    /// The operator: `/admin/v1` only.
    Admin,
}

/// A working (not revoked) key, as authentication needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyAuth {
    pub owner: KeyOwner,
    pub key_id: Uuid,
    /// The key stops working at this time.
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeyAuth {
    /// The tenant of a tenant key or user token.
    pub fn tenant(&self) -> Option<TenantId> {
        match &self.owner {
            KeyOwner::Tenant(t) | KeyOwner::User { tenant: t, .. } => Some(*t),
            KeyOwner::Admin => None,
        }
    }
}

/// A user-scoped token as minted (never the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct UserToken {
    pub id: Uuid,
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
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
            tenant_id: Some(m.tenant_id),
            prefix: m.prefix,
            name: m.name,
            created_at: m.created_at,
            expires_at: m.expires_at,
            last_used_at: m.last_used_at,
            revoked_at: m.revoked_at,
        }
    }
}

impl From<admin_key::Model> for KeyInfo {
    fn from(m: admin_key::Model) -> Self {
        KeyInfo {
            id: m.id,
            tenant_id: None,
            prefix: m.prefix,
            name: m.name,
            created_at: m.created_at,
            expires_at: m.expires_at,
            last_used_at: m.last_used_at,
            revoked_at: m.revoked_at,
        }
    }
}

/// Of the keys matching a revocation, the one to revoke: exactly one must match.
fn the_one<T>(matches: Vec<T>, what: &str) -> Result<T, StoreError> {
    let n = matches.len();
    match matches.into_iter().next() {
        None => Err(StoreError::NotFound),
        Some(k) if n == 1 => Ok(k),
        Some(_) => Err(StoreError::Conflict(format!(
            "{n} working keys match {what:?}; revoke by key id"
        ))),
    }
}

/// A key id, or a key's prefix.
fn id_or_prefix(key: &str) -> Result<Uuid, &str> {
    Uuid::parse_str(key).map_err(|_| key)
}

impl Store {
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
            .order_by_desc(api_key::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(KeyInfo::from)
            .collect())
    }

    /// Revokes one working tenant key, given by id or by prefix; `tenant` (name or id), when
    /// given, must own it. Revoking a revoked key by id changes nothing and returns it.
    /// Also says whether this call revoked it.
    pub async fn revoke_key(
        &self,
        tenant: Option<&str>,
        key: &str,
    ) -> Result<(KeyInfo, bool), StoreError> {
        let mut q = api_key::Entity::find();
        if let Some(t) = tenant {
            q = q.filter(api_key::Column::TenantId.eq(self.find_tenant(t).await?.id));
        }
        q = match id_or_prefix(key) {
            Ok(id) => q.filter(api_key::Column::Id.eq(id)),
            Err(prefix) => q
                .filter(api_key::Column::Prefix.eq(prefix))
                .filter(api_key::Column::RevokedAt.is_null()),
        };
        let found = the_one(q.all(&self.db).await?, key)?;
        self.mark_revoked(found.into()).await
    }

    /// Marks a key of either kind revoked now, and says whether this call did: one revoked
    /// already (even a moment ago, by another caller) stays as it was.
    async fn mark_revoked(&self, k: KeyInfo) -> Result<(KeyInfo, bool), StoreError> {
        if k.revoked_at.is_some() {
            return Ok((k, false));
        }
        let at = now();
        let marked = match k.tenant_id {
            Some(_) => {
                api_key::Entity::update_many()
                    .col_expr(api_key::Column::RevokedAt, Expr::value(at))
                    .filter(api_key::Column::Id.eq(k.id))
                    .filter(api_key::Column::RevokedAt.is_null())
                    .exec(&self.db)
                    .await?
            }
            None => {
                admin_key::Entity::update_many()
                    .col_expr(admin_key::Column::RevokedAt, Expr::value(at))
                    .filter(admin_key::Column::Id.eq(k.id))
                    .filter(admin_key::Column::RevokedAt.is_null())
                    .exec(&self.db)
                    .await?
            }
        }
        .rows_affected
            > 0;
        Ok((
            KeyInfo {
                revoked_at: Some(at),
                ..k
            },
            marked,
        ))
    }

    /// Adds an admin key.
    pub async fn create_admin_key(
        &self,
        key: &IssuedKey,
        spec: &KeySpec,
    ) -> Result<KeyInfo, StoreError> {
        spec.validate()?;
        let inserted = admin_key::Entity::insert(admin_key::ActiveModel {
            id: Set(Uuid::now_v7()),
            prefix: Set(key.prefix.clone()),
            key_hash: Set(key.hash.clone()),
            name: Set(spec.name.clone()),
            created_at: Set(now()),
            expires_at: Set(spec.expires_at),
            last_used_at: Set(None),
            revoked_at: Set(None),
            expiry_audited_at: Set(None),
        })
        .on_conflict(
            OnConflict::column(admin_key::Column::KeyHash)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.db)
        .await?;
        if inserted == 0 {
            return Err(StoreError::Conflict("this admin key already exists".into()));
        }
        let row = admin_key::Entity::find()
            .filter(admin_key::Column::KeyHash.eq(key.hash.as_str()))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(row.into())
    }

    /// The admin keys, newest first, revoked ones included.
    pub async fn list_admin_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        Ok(admin_key::Entity::find()
            .order_by_desc(admin_key::Column::CreatedAt)
            .order_by_desc(admin_key::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(KeyInfo::from)
            .collect())
    }

    /// Revokes one working admin key, given by id or by prefix; also says whether this call
    /// revoked it.
    pub async fn revoke_admin_key(&self, key: &str) -> Result<(KeyInfo, bool), StoreError> {
        let q = match id_or_prefix(key) {
            Ok(id) => admin_key::Entity::find().filter(admin_key::Column::Id.eq(id)),
            Err(prefix) => admin_key::Entity::find()
                .filter(admin_key::Column::Prefix.eq(prefix))
                .filter(admin_key::Column::RevokedAt.is_null()),
        };
        let found = the_one(q.all(&self.db).await?, key)?;
        self.mark_revoked(found.into()).await
    }

    /// Mints a token acting for `user_id` of `tenant` until `expires_at`, recording the key
    /// that minted it; tokens of the tenant expired for a day are purged on the way.
    pub async fn create_user_token(
        &self,
        tenant: TenantId,
        minted_by: Uuid,
        user_id: &str,
        token: &IssuedKey,
        expires_at: DateTime<Utc>,
    ) -> Result<UserToken, StoreError> {
        let id = Uuid::now_v7();
        user_token::Entity::insert(user_token::ActiveModel {
            id: Set(id),
            tenant_id: Set(tenant.0),
            key_id: Set(minted_by),
            user_id: Set(user_id.to_string()),
            prefix: Set(token.prefix.clone()),
            token_hash: Set(token.hash.clone()),
            created_at: Set(now()),
            expires_at: Set(expires_at),
            last_used_at: Set(None),
        })
        .exec_without_returning(&self.db)
        .await?;
        user_token::Entity::delete_many()
            .filter(user_token::Column::TenantId.eq(tenant.0))
            .filter(user_token::Column::ExpiresAt.lt(Utc::now() - chrono::Duration::days(1)))
            .exec(&self.db)
            .await?;
        Ok(UserToken {
            id,
            user_id: user_id.to_string(),
            expires_at,
        })
    }

    /// The key of any kind with this hash, if it exists and is not revoked (expired or
    /// not: the caller compares `expires_at` with the time of each request).
    pub async fn authenticate(&self, key_hash: &str) -> Result<Option<KeyAuth>, StoreError> {
        let tenant_key = api_key::Entity::find()
            .filter(api_key::Column::KeyHash.eq(key_hash))
            .filter(api_key::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?;
        if let Some(k) = tenant_key {
            return Ok(Some(KeyAuth {
                owner: KeyOwner::Tenant(TenantId(k.tenant_id)),
                key_id: k.id,
                expires_at: k.expires_at,
            }));
        }
        let token = user_token::Entity::find()
            .filter(user_token::Column::TokenHash.eq(key_hash))
            .one(&self.db)
            .await?;
        if let Some(t) = token {
            return Ok(Some(KeyAuth {
                owner: KeyOwner::User {
                    tenant: TenantId(t.tenant_id),
                    user_id: t.user_id,
                },
                key_id: t.id,
                expires_at: Some(t.expires_at),
            }));
        }
        Ok(admin_key::Entity::find()
            .filter(admin_key::Column::KeyHash.eq(key_hash))
            .filter(admin_key::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?
            .map(|k| KeyAuth {
                owner: KeyOwner::Admin,
                key_id: k.id,
                expires_at: k.expires_at,
            }))
    }

    /// Records that a key was just used.
    pub async fn touch_key(&self, key: &KeyAuth) -> Result<(), StoreError> {
        let at = now();
        match key.owner {
            KeyOwner::Tenant(_) => {
                api_key::Entity::update_many()
                    .col_expr(api_key::Column::LastUsedAt, Expr::value(at))
                    .filter(api_key::Column::Id.eq(key.key_id))
                    .exec(&self.db)
                    .await?
            }
            KeyOwner::User { .. } => {
                user_token::Entity::update_many()
                    .col_expr(user_token::Column::LastUsedAt, Expr::value(at))
                    .filter(user_token::Column::Id.eq(key.key_id))
                    .exec(&self.db)
                    .await?
            }
            KeyOwner::Admin => {
                admin_key::Entity::update_many()
                    .col_expr(admin_key::Column::LastUsedAt, Expr::value(at))
                    .filter(admin_key::Column::Id.eq(key.key_id))
                    .exec(&self.db)
                    .await?
            }
        };
        Ok(())
    }
}

pub(super) async fn insert_key<C: sea_orm::ConnectionTrait>(
    db: &C,
    tenant_id: Uuid,
    key: &IssuedKey,
    spec: &KeySpec,
) -> Result<KeyInfo, StoreError> {
    let inserted = api_key::Entity::insert(api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id),
        prefix: Set(key.prefix.clone()),
        key_hash: Set(key.hash.clone()),
        created_at: Set(now()),
        revoked_at: Set(None),
        name: Set(spec.name.clone()),
        expires_at: Set(spec.expires_at),
        last_used_at: Set(None),
        expiry_audited_at: Set(None),
    })
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
