//! `/api/v1/usage`: the tenant's token usage over a date range, in total, per user and per
//! key, and where its token budgets stand now.

use chrono::{NaiveDate, Utc};
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::auth::TenantAuth;
use super::types::{Day, Timestamp};
use super::{ApiTags, AppState};
use crate::chat::budget::BudgetScope;
use crate::domain;
use crate::error::{ApiError, Authed, Failure};
use crate::store::UsageGroup;

/// Tokens used.
#[derive(Debug, Object)]
#[oai(rename = "UsageTotals")]
pub struct UsageTotalsDto {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Replies generated (including cancelled and failed ones).
    pub replies: i64,
}

/// One user's usage.
#[derive(Debug, Object)]
#[oai(rename = "UserUsage")]
pub struct UserUsageDto {
    pub user_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub replies: i64,
}

/// What came through one key (or user token).
#[derive(Debug, Object)]
#[oai(rename = "KeyUsage")]
pub struct KeyUsageDto {
    pub key_id: uuid::Uuid,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub replies: i64,
}

/// Where one token budget stands in its current period.
#[derive(Debug, Object)]
#[oai(rename = "BudgetStatus")]
pub struct BudgetDto {
    /// `tenant` (the whole tenant) or `user` (the user asked about).
    pub scope: String,
    /// The user, for a `user` budget.
    #[oai(nullable, skip_serializing_if_is_none)]
    pub user_id: Option<String>,
    /// `day` (UTC) or `month` (calendar, UTC).
    pub period: String,
    /// The budget, in prompt plus generated tokens.
    pub limit: u64,
    /// Used this period.
    pub used: u64,
    /// Held by replies running now (their prompt plus `max_tokens`, until they end).
    pub held: u64,
    /// What a new reply may still use: `limit - used - held`.
    pub remaining: u64,
    pub resets_at: Timestamp,
}

/// Usage over `from..=to` (UTC days).
#[derive(Debug, Object)]
#[oai(rename = "UsageReport")]
pub struct UsageReportDto {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub totals: UsageTotalsDto,
    /// Users with any usage in the range, by id.
    pub users: Vec<UserUsageDto>,
    /// Keys with any usage in the range, by id.
    pub keys: Vec<KeyUsageDto>,
    /// The tenant's budgets now (and the user's, with `user_id`); empty when it has none.
    pub budgets: Vec<BudgetDto>,
}

/// The days a usage report covers (see [`domain::usage_range`]).
pub(super) fn date_range(
    from: Option<Day>,
    to: Option<Day>,
) -> Result<(NaiveDate, NaiveDate), ApiError> {
    domain::usage_range(from.map(|d| d.0), to.map(|d| d.0), Utc::now().date_naive()).map_err(
        |reason| ApiError::InvalidParameter {
            name: "from".into(),
            reason,
        },
    )
}

#[derive(ApiResponse)]
pub enum UsageResponse {
    /// The tenant's usage.
    #[oai(status = 200)]
    Ok(Json<UsageReportDto>),
}

/// The usage operation.
pub struct UsageApi;

#[OpenApi(tag = "ApiTags::Usage")]
impl UsageApi {
    /// Token usage
    ///
    /// Prompt and completion tokens of the tenant's replies between two UTC dates
    /// (inclusive; at most 366 days; default: the last 30 days), in total, per user and per
    /// key, and what is left of the tenant's token budgets now (with `user_id`, of that
    /// user's too).
    #[oai(path = "/api/v1/usage", method = "get", operation_id = "get_usage")]
    async fn usage(
        &self,
        state: Data<&AppState>,
        auth: TenantAuth,
        /// First day, `YYYY-MM-DD` (default: 29 days before `to`).
        from: Query<Option<Day>>,
        /// Last day, `YYYY-MM-DD` (default: today, UTC).
        to: Query<Option<Day>>,
        /// Only this user.
        #[oai(validator(min_length = 1, max_length = 128))]
        user_id: Query<Option<String>>,
    ) -> Result<UsageResponse, Failure<Authed>> {
        let (from, to) = date_range(from.0, to.0)?;
        if let Some(u) = &user_id.0 {
            domain::validate_user_id("user_id", u).map_err(|v| ApiError::InvalidParameter {
                name: "user_id".into(),
                reason: v.message,
            })?;
        }
        // The tenant's usage is the tenant's business, not one user's.
        auth.0.tenant_key_only()?;
        let tenant = auth.0.tenant;
        let scope = state.store.tenant(tenant);
        let users = scope.usage(from, to, user_id.0.as_deref()).await?;
        let keys = state
            .store
            .usage_report(Some(tenant), from, to, UsageGroup::Key)
            .await?;
        let budgets = state
            .chat
            .budgets()
            .states(tenant, user_id.0.as_deref(), Utc::now().date_naive())
            .await?;
        let totals = UsageTotalsDto {
            prompt_tokens: users.iter().map(|u| u.prompt_tokens).sum(),
            completion_tokens: users.iter().map(|u| u.completion_tokens).sum(),
            replies: users.iter().map(|u| u.replies).sum(),
        };
        Ok(UsageResponse::Ok(Json(UsageReportDto {
            from,
            to,
            totals,
            users: users
                .into_iter()
                .map(|u| UserUsageDto {
                    user_id: u.user_id,
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    replies: u.replies,
                })
                .collect(),
            keys: keys
                .into_iter()
                .filter_map(|k| {
                    Some(KeyUsageDto {
                        key_id: k.key_id?,
                        prompt_tokens: k.prompt_tokens,
                        completion_tokens: k.completion_tokens,
                        replies: k.replies,
                    })
                })
                .collect(),
            budgets: budgets
                .into_iter()
                .map(|b| BudgetDto {
                    scope: b.scope.as_str().into(),
                    user_id: match b.scope {
                        BudgetScope::User => user_id.0.clone(),
                        BudgetScope::Tenant => None,
                    },
                    period: b.period.as_str().into(),
                    limit: b.limit,
                    used: b.used,
                    held: b.held,
                    remaining: b.remaining(),
                    resets_at: b.resets_at.into(),
                })
                .collect(),
        })))
    }
}
