//! Token usage of one tenant, per user and day.

use chrono::NaiveDate;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, IdenStatic, QueryFilter, QueryOrder};

use super::entity::usage;
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
    /// Adds one reply's tokens to its user's total of `day`.
    pub async fn record_usage(
        &self,
        user_id: &str,
        day: NaiveDate,
        prompt_tokens: i64,
        completion_tokens: i64,
    ) -> Result<(), StoreError> {
        let excluded = |c: usage::Column| Expr::cust(format!("excluded.{}", c.as_str()));
        let add = |c: usage::Column| Expr::col((usage::Entity, c)).add(excluded(c));
        usage::Entity::insert(usage::ActiveModel {
            tenant_id: Set(self.tenant),
            day: Set(day.format("%Y-%m-%d").to_string()),
            user_id: Set(user_id.to_string()),
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
            .value(
                usage::Column::PromptTokens,
                add(usage::Column::PromptTokens),
            )
            .value(
                usage::Column::CompletionTokens,
                add(usage::Column::CompletionTokens),
            )
            .value(usage::Column::Replies, add(usage::Column::Replies))
            .to_owned(),
        )
        .exec_without_returning(self.db)
        .await?;
        Ok(())
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
