//! Token usage of one tenant, per user and day and per key and day.

use chrono::NaiveDate;
use sea_orm::sea_query::{Expr, OnConflict, SimpleExpr};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, IdenStatic, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use uuid::Uuid;

use super::entity::{usage, usage_by_key};
use super::{StoreError, TenantScope};

/// Tokens used by one user over a period.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserUsage {
    pub user_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub replies: i64,
}

impl TenantScope<'_> {
    /// Adds one reply's tokens to its user's and its key's totals of `day` (one transaction:
    /// the two tables always agree).
    pub async fn record_usage(
        &self,
        user_id: &str,
        key_id: Uuid,
        day: NaiveDate,
        prompt_tokens: i64,
        completion_tokens: i64,
    ) -> Result<(), StoreError> {
        let tenant = self.tenant;
        let day = day.format("%Y-%m-%d").to_string();
        let user_id = user_id.to_string();
        self.db
            .transaction::<_, (), StoreError>(|txn| {
                Box::pin(async move {
                    let excluded = |c: &str| Expr::cust(format!("excluded.{c}"));
                    usage::Entity::insert(usage::ActiveModel {
                        tenant_id: Set(tenant),
                        day: Set(day.clone()),
                        user_id: Set(user_id),
                        prompt_tokens: Set(prompt_tokens),
                        completion_tokens: Set(completion_tokens),
                        replies: Set(1),
                    })
                    .on_conflict(
                        OnConflict::columns([
                            usage::Column::TenantId,
                            usage::Column::Day,
                            usage::Column::UserId,
                        ])
                        .values(
                            [
                                usage::Column::PromptTokens,
                                usage::Column::CompletionTokens,
                                usage::Column::Replies,
                            ]
                            .map(|c| (c, Expr::col((usage::Entity, c)).add(excluded(c.as_str())))),
                        )
                        .to_owned(),
                    )
                    .exec_without_returning(txn)
                    .await?;
                    usage_by_key::Entity::insert(usage_by_key::ActiveModel {
                        tenant_id: Set(tenant),
                        day: Set(day),
                        key_id: Set(key_id),
                        prompt_tokens: Set(prompt_tokens),
                        completion_tokens: Set(completion_tokens),
                        replies: Set(1),
                    })
                    .on_conflict(
                        OnConflict::columns([
                            usage_by_key::Column::TenantId,
                            usage_by_key::Column::Day,
                            usage_by_key::Column::KeyId,
                        ])
                        .values(
                            [
                                usage_by_key::Column::PromptTokens,
                                usage_by_key::Column::CompletionTokens,
                                usage_by_key::Column::Replies,
                            ]
                            .map(|c| {
                                (
                                    c,
                                    Expr::col((usage_by_key::Entity, c)).add(excluded(c.as_str())),
                                )
                            }),
                        )
                        .to_owned(),
                    )
                    .exec_without_returning(txn)
                    .await?;
                    Ok(())
                })
            })
            .await
            .map_err(StoreError::from)
    }

    /// Prompt plus generated tokens over the days `from..=to`, of the whole tenant or of one
    /// user: what a budget counts.
    pub async fn tokens_used(
        &self,
        user_id: Option<&str>,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<u64, StoreError> {
        let mut q = usage::Entity::find()
            .select_only()
            // SUM of a BIGINT is NUMERIC on PostgreSQL: cast back for one decoding on both.
            .column_as(
                Expr::cust("CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT)"),
                "used",
            )
            .filter(usage::Column::TenantId.eq(self.tenant))
            .filter(usage::Column::Day.gte(from.format("%Y-%m-%d").to_string()))
            .filter(usage::Column::Day.lte(to.format("%Y-%m-%d").to_string()));
        if let Some(u) = user_id {
            q = q.filter(usage::Column::UserId.eq(u));
        }
        let used: Option<i64> = q.into_tuple().one(self.db).await?;
        Ok(used.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    /// Totals per user over the days `from..=to`, optionally of one user; users in id order.
    pub async fn usage(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        user_id: Option<&str>,
    ) -> Result<Vec<UserUsage>, StoreError> {
        let mut q = usage::Entity::find()
            .filter(usage::Column::TenantId.eq(self.tenant))
            .filter(usage::Column::Day.gte(from.format("%Y-%m-%d").to_string()))
            .filter(usage::Column::Day.lte(to.format("%Y-%m-%d").to_string()));
        if let Some(u) = user_id {
            q = q.filter(usage::Column::UserId.eq(u));
        }
        let rows = q.order_by_asc(usage::Column::UserId).all(self.db).await?;
        let mut out: Vec<UserUsage> = Vec::new();
        for r in rows {
            match out.last_mut() {
                Some(u) if u.user_id == r.user_id => {
                    u.prompt_tokens += r.prompt_tokens;
                    u.completion_tokens += r.completion_tokens;
                    u.replies += r.replies;
                }
                _ => out.push(UserUsage {
                    user_id: r.user_id,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                    replies: r.replies,
                }),
            }
        }
        Ok(out)
    }
}

/// How the operator's usage report is broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Tenant,
    User,
    Key,
    Day,
}

/// One row of the operator's usage report: a tenant's tokens, for one user, key or day when
/// grouped so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant_id: Uuid,
    pub user_id: Option<String>,
    pub key_id: Option<Uuid>,
    pub day: Option<NaiveDate>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub replies: i64,
}

/// `SUM` of a BIGINT column as a BIGINT on both back-ends (PostgreSQL's is NUMERIC).
fn sum(col: &str) -> SimpleExpr {
    Expr::cust(format!("CAST(COALESCE(SUM({col}), 0) AS BIGINT)"))
}

impl super::Store {
    /// Usage of all tenants (or one) over the days `from..=to`, summed per tenant and, as
    /// `group` says, per user, key or day; in tenant then group order.
    pub async fn usage_report(
        &self,
        tenant: Option<super::TenantId>,
        from: NaiveDate,
        to: NaiveDate,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (from, to) = (
            from.format("%Y-%m-%d").to_string(),
            to.format("%Y-%m-%d").to_string(),
        );
        if group == UsageGroup::Key {
            let mut q = usage_by_key::Entity::find()
                .select_only()
                .column(usage_by_key::Column::TenantId)
                .column(usage_by_key::Column::KeyId)
                .column_as(sum("prompt_tokens"), "p")
                .column_as(sum("completion_tokens"), "c")
                .column_as(sum("replies"), "r")
                .filter(usage_by_key::Column::Day.gte(from))
                .filter(usage_by_key::Column::Day.lte(to));
            if let Some(t) = tenant {
                q = q.filter(usage_by_key::Column::TenantId.eq(t.as_uuid()));
            }
            let rows: Vec<(Uuid, Uuid, i64, i64, i64)> = q
                .group_by(usage_by_key::Column::TenantId)
                .group_by(usage_by_key::Column::KeyId)
                .order_by_asc(usage_by_key::Column::TenantId)
                .order_by_asc(usage_by_key::Column::KeyId)
                .into_tuple()
                .all(&self.db)
                .await?;
            return Ok(rows
                .into_iter()
                .map(|(tenant_id, key_id, p, c, r)| UsageRow {
                    tenant_id,
                    user_id: None,
                    key_id: Some(key_id),
                    day: None,
                    prompt_tokens: p,
                    completion_tokens: c,
                    replies: r,
                })
                .collect());
        }
        let dim = match group {
            UsageGroup::User => Some(usage::Column::UserId),
            UsageGroup::Day => Some(usage::Column::Day),
            UsageGroup::Tenant | UsageGroup::Key => None,
        };
        let mut q = usage::Entity::find()
            .select_only()
            .column(usage::Column::TenantId)
            .column_as(
                match dim {
                    Some(d) => Expr::col(d).into(),
                    None => Expr::cust("''"),
                },
                "dim",
            )
            .column_as(sum("prompt_tokens"), "p")
            .column_as(sum("completion_tokens"), "c")
            .column_as(sum("replies"), "r")
            .filter(usage::Column::Day.gte(from))
            .filter(usage::Column::Day.lte(to));
        if let Some(t) = tenant {
            q = q.filter(usage::Column::TenantId.eq(t.as_uuid()));
        }
        q = q.group_by(usage::Column::TenantId);
        if let Some(d) = dim {
            q = q.group_by(d);
        }
        q = q.order_by_asc(usage::Column::TenantId);
        if let Some(d) = dim {
            q = q.order_by_asc(d);
        }
        let rows: Vec<(Uuid, String, i64, i64, i64)> = q.into_tuple().all(&self.db).await?;
        rows.into_iter()
            .map(|(tenant_id, dim, p, c, r)| {
                let (user_id, day) =
                    match group {
                        UsageGroup::User => (Some(dim), None),
                        UsageGroup::Day => (
                            None,
                            Some(NaiveDate::parse_from_str(&dim, "%Y-%m-%d").map_err(|e| {
                                StoreError::Corrupt(format!("usage day {dim:?}: {e}"))
                            })?),
                        ),
                        UsageGroup::Tenant | UsageGroup::Key => (None, None),
                    };
                Ok(UsageRow {
                    tenant_id,
                    user_id,
                    key_id: None,
                    day,
                    prompt_tokens: p,
                    completion_tokens: c,
                    replies: r,
                })
            })
            .collect()
    }
}
