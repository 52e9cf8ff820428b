//! `/api/v1/usage`: the tenant's token usage over a date range, in total and per user.

use chrono::{Duration, NaiveDate, Utc};
use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::auth::TenantAuth;
use super::types::Day;
use super::{ApiTags, AppState};
use crate::domain;
use crate::error::{ApiError, Authed, Failure};

/// Longest range one request may cover, in days.
const MAX_DAYS: i64 = 366;
/// Range when none is given: the last 30 days, today included.
const DEFAULT_DAYS: i64 = 30;

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

/// Usage over `from..=to` (UTC days).
#[derive(Debug, Object)]
#[oai(rename = "UsageReport")]
pub struct UsageReportDto {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub totals: UsageTotalsDto,
    /// Users with any usage in the range, by id.
    pub users: Vec<UserUsageDto>,
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
    /// (inclusive; at most 366 days; default: the last 30 days), in total and per user.
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
        let to = to.0.map_or_else(|| Utc::now().date_naive(), |d| d.0);
        let from = from.0.map(|d| d.0).unwrap_or_else(|| {
            to.checked_sub_signed(Duration::days(DEFAULT_DAYS - 1))
                .unwrap_or(NaiveDate::MIN)
        });
        if from > to {
            return Err(ApiError::InvalidParameter {
                name: "from".into(),
                reason: format!("{from} is after to ({to})"),
            }
            .into());
        }
        if (to - from).num_days() >= MAX_DAYS {
            return Err(ApiError::InvalidParameter {
                name: "from".into(),
                reason: format!("the range may cover at most {MAX_DAYS} days"),
            }
            .into());
        }
        if let Some(u) = &user_id.0 {
            domain::validate_user_id("user_id", u).map_err(|v| ApiError::InvalidParameter {
                name: "user_id".into(),
                reason: v.message,
            })?;
        }
        let users = state
            .store
            .tenant(auth.0)
            .usage(from, to, user_id.0.as_deref())
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
        })))
    }
}
