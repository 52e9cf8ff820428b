//! Tenants as an operator manages them: create, list, find, rename, limits, disable, delete.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::entity::{api_key, tenant, usage, usage_by_key};
use super::keys::{insert_key, KeyInfo, KeySpec};
use super::{Store, StoreError, TenantId};
use crate::credentials::IssuedKey;
use crate::domain::{
    now, Page, PageRequest, TenantLimits, TenantLimitsPatch, TokenBudgets, TokenBudgetsPatch,
};

/// A tenant as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Keys that still work (neither revoked nor expired).
    pub active_keys: u64,
    pub limits: TenantLimits,
    /// Since when the tenant is disabled (its keys answer `tenant_disabled`); `None`: enabled.
    pub disabled_at: Option<DateTime<Utc>>,
    pub budgets: TokenBudgets,
}

impl TenantInfo {
    /// The tenant's id as the scoped store and the live services take it.
    pub fn tenant_id(&self) -> TenantId {
        TenantId(self.id)
    }
}

fn limit_of(v: Option<i32>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

fn budget_of(v: Option<i64>) -> Option<u64> {
    v.and_then(|n| u64::try_from(n).ok())
}

fn budgets_of(t: &tenant::Model) -> TokenBudgets {
    TokenBudgets {
        tokens_per_day: budget_of(t.tokens_per_day),
        tokens_per_month: budget_of(t.tokens_per_month),
        user_tokens_per_day: budget_of(t.user_tokens_per_day),
        user_tokens_per_month: budget_of(t.user_tokens_per_month),
    }
}

fn limits_of(t: &tenant::Model) -> TenantLimits {
    TenantLimits {
        requests_per_minute: limit_of(t.requests_per_minute),
        ws_messages_per_second: limit_of(t.ws_messages_per_second),
        max_connections: limit_of(t.max_connections),
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

/// Keys of `tenant` that work now: not revoked, not expired.
fn working_keys_of(tenant: Uuid) -> Condition {
    Condition::all()
        .add(api_key::Column::TenantId.eq(tenant))
        .add(api_key::Column::RevokedAt.is_null())
        .add(
            Condition::any()
                .add(api_key::Column::ExpiresAt.is_null())
                .add(api_key::Column::ExpiresAt.gt(Utc::now())),
        )
}

/// A name or an id, as an operator writes it.
fn by_name_or_id(tenant: &str) -> Condition {
    match Uuid::parse_str(tenant) {
        Ok(id) => Condition::all().add(tenant::Column::Id.eq(id)),
        Err(_) => Condition::all().add(tenant::Column::Name.eq(tenant)),
    }
}

impl Store {
    /// Creates a tenant with one API key.
    pub async fn create_tenant(
        &self,
        name: &str,
        key: &IssuedKey,
    ) -> Result<(TenantInfo, KeyInfo), StoreError> {
        validate_tenant_name(name).map_err(StoreError::Invalid)?;
        let name = name.to_string();
        let key = key.clone();
        self.db
            .transaction::<_, (TenantInfo, KeyInfo), StoreError>(|txn| {
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
                    let first = insert_key(txn, id, &key, &KeySpec::default()).await?;
                    let t = TenantInfo {
                        id,
                        name,
                        created_at,
                        active_keys: 1,
                        limits: TenantLimits::default(),
                        disabled_at: None,
                        budgets: TokenBudgets::default(),
                    };
                    Ok((t, first))
                })
            })
            .await
            .map_err(StoreError::from)
    }

    async fn info(&self, t: tenant::Model) -> Result<TenantInfo, StoreError> {
        let active_keys = api_key::Entity::find()
            .filter(working_keys_of(t.id))
            .count(&self.db)
            .await?;
        Ok(TenantInfo {
            limits: limits_of(&t),
            budgets: budgets_of(&t),
            id: t.id,
            name: t.name,
            created_at: t.created_at,
            active_keys,
            disabled_at: t.disabled_at,
        })
    }

    /// One page of the tenants, oldest first (`Order::Desc`: newest first).
    pub async fn list_tenants(&self, page: PageRequest) -> Result<Page<TenantInfo>, StoreError> {
        let total = tenant::Entity::find().count(&self.db).await?;
        let order = match page.order {
            crate::domain::Order::Asc => sea_orm::Order::Asc,
            crate::domain::Order::Desc => sea_orm::Order::Desc,
        };
        let tenants = tenant::Entity::find()
            .order_by(tenant::Column::CreatedAt, order.clone())
            .order_by(tenant::Column::Id, order)
            .offset(page.offset)
            .limit(page.limit)
            .all(&self.db)
            .await?;
        let mut items = Vec::with_capacity(tenants.len());
        for t in tenants {
            items.push(self.info(t).await?);
        }
        Ok(Page {
            items,
            total,
            offset: page.offset,
            limit: page.limit,
        })
    }

    /// The names of the tenants among `ids` that still exist.
    pub async fn tenant_names(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(tenant::Entity::find()
            .select_only()
            .column(tenant::Column::Id)
            .column(tenant::Column::Name)
            .filter(tenant::Column::Id.is_in(ids.to_vec()))
            .into_tuple::<(Uuid, String)>()
            .all(&self.db)
            .await?
            .into_iter()
            .collect())
    }

    /// Number of tenants; zero means a brand-new installation.
    pub async fn tenant_count(&self) -> Result<u64, StoreError> {
        Ok(tenant::Entity::find().count(&self.db).await?)
    }

    /// Finds a tenant by name or by id.
    pub async fn find_tenant(&self, name_or_id: &str) -> Result<TenantInfo, StoreError> {
        let t = tenant::Entity::find()
            .filter(by_name_or_id(name_or_id))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        self.info(t).await
    }

    /// Gives a tenant another name (its id, keys and data stay).
    pub async fn rename_tenant(
        &self,
        name_or_id: &str,
        new_name: &str,
    ) -> Result<TenantInfo, StoreError> {
        validate_tenant_name(new_name).map_err(StoreError::Invalid)?;
        let t = self.find_tenant(name_or_id).await?;
        if t.name == new_name {
            return Ok(t);
        }
        let taken = tenant::Entity::find()
            .filter(tenant::Column::Name.eq(new_name))
            .count(&self.db)
            .await?;
        if taken > 0 {
            return Err(StoreError::Conflict(format!(
                "tenant {new_name:?} already exists"
            )));
        }
        // The unique index still decides a race with another rename.
        tenant::Entity::update_many()
            .col_expr(tenant::Column::Name, Expr::value(new_name))
            .filter(tenant::Column::Id.eq(t.id))
            .exec(&self.db)
            .await
            .map_err(|e| match e.sql_err() {
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
                    StoreError::Conflict(format!("tenant {new_name:?} already exists"))
                }
                _ => StoreError::from(e),
            })?;
        Ok(TenantInfo {
            name: new_name.to_string(),
            ..t
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

    /// Changes a tenant's token budgets; returns the tenant as it is now.
    pub async fn set_tenant_budgets(
        &self,
        name_or_id: &str,
        patch: TokenBudgetsPatch,
    ) -> Result<TenantInfo, StoreError> {
        let t = self.find_tenant(name_or_id).await?;
        let mut budgets = t.budgets;
        budgets.apply(patch);
        let col = |v: Option<u64>| v.map(|n| n.min(i64::MAX as u64) as i64);
        tenant::Entity::update_many()
            .col_expr(
                tenant::Column::TokensPerDay,
                Expr::value(col(budgets.tokens_per_day)),
            )
            .col_expr(
                tenant::Column::TokensPerMonth,
                Expr::value(col(budgets.tokens_per_month)),
            )
            .col_expr(
                tenant::Column::UserTokensPerDay,
                Expr::value(col(budgets.user_tokens_per_day)),
            )
            .col_expr(
                tenant::Column::UserTokensPerMonth,
                Expr::value(col(budgets.user_tokens_per_month)),
            )
            .filter(tenant::Column::Id.eq(t.id))
            .exec(&self.db)
            .await?;
        Ok(TenantInfo { budgets, ..t })
    }

    /// The token budgets of an authenticated tenant.
    pub async fn tenant_budgets(&self, tenant: TenantId) -> Result<TokenBudgets, StoreError> {
        let t = tenant::Entity::find_by_id(tenant.0)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(budgets_of(&t))
    }

    /// Disables (`true`) or enables a tenant. Disabling one that already is keeps the time
    /// it was first disabled.
    pub async fn set_tenant_disabled(
        &self,
        name_or_id: &str,
        disabled: bool,
    ) -> Result<TenantInfo, StoreError> {
        let t = self.find_tenant(name_or_id).await?;
        let disabled_at = match (disabled, t.disabled_at) {
            (true, Some(_)) => return Ok(t),
            (true, None) => Some(now()),
            (false, _) => None,
        };
        tenant::Entity::update_many()
            .col_expr(tenant::Column::DisabledAt, Expr::value(disabled_at))
            .filter(tenant::Column::Id.eq(t.id))
            .exec(&self.db)
            .await?;
        Ok(TenantInfo { disabled_at, ..t })
    }

    /// Deletes a tenant with everything it owns: keys, users, chats, messages, usage.
    pub async fn delete_tenant(&self, name_or_id: &str) -> Result<TenantInfo, StoreError> {
        let t = self.find_tenant(name_or_id).await?;
        let id = t.id;
        self.db
            .transaction::<_, (), StoreError>(|txn| {
                Box::pin(async move {
                    // Usage rows have no foreign key (they outlive deleted chats and keys);
                    // the rest goes with the tenant's row by cascade.
                    usage::Entity::delete_many()
                        .filter(usage::Column::TenantId.eq(id))
                        .exec(txn)
                        .await?;
                    usage_by_key::Entity::delete_many()
                        .filter(usage_by_key::Column::TenantId.eq(id))
                        .exec(txn)
                        .await?;
                    tenant::Entity::delete_by_id(id).exec(txn).await?;
                    Ok(())
                })
            })
            .await
            .map_err(StoreError::from)?;
        Ok(t)
    }

    /// The limits of an authenticated tenant.
    pub async fn tenant_limits(&self, tenant: TenantId) -> Result<TenantLimits, StoreError> {
        let t = tenant::Entity::find_by_id(tenant.0)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(limits_of(&t))
    }

    /// Whether an authenticated tenant may still work: `Ok(None)` when it may, else since
    /// when it is disabled (`NotFound`: deleted).
    pub async fn tenant_disabled_at(
        &self,
        tenant: TenantId,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let t = tenant::Entity::find_by_id(tenant.0)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(t.disabled_at)
    }

    /// Of `tenants`, those that may no longer work, with since when they are disabled
    /// (`None`: deleted). One query, for the check of the tenants with open sockets.
    pub async fn inactive_tenants(
        &self,
        tenants: &[TenantId],
    ) -> Result<Vec<(TenantId, Option<DateTime<Utc>>)>, StoreError> {
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = tenants.iter().map(|t| t.0).collect();
        let found: HashMap<Uuid, Option<DateTime<Utc>>> = tenant::Entity::find()
            .select_only()
            .column(tenant::Column::Id)
            .column(tenant::Column::DisabledAt)
            .filter(tenant::Column::Id.is_in(ids))
            .into_tuple::<(Uuid, Option<DateTime<Utc>>)>()
            .all(&self.db)
            .await?
            .into_iter()
            .collect();
        Ok(tenants
            .iter()
            .filter_map(|t| match found.get(&t.0) {
                None => Some((*t, None)),
                Some(Some(since)) => Some((*t, Some(*since))),
                Some(None) => None,
            })
            .collect())
    }
}
