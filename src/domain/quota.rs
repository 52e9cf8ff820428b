//! A tenant's own limits, set by the operator (`confab tenant set-limits`).

use serde::Serialize;

use super::Patch;

/// Limits of one tenant; `None` means "the server's default" (flags / environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantLimits {
    /// REST requests per minute.
    pub requests_per_minute: Option<u32>,
    /// WebSocket messages per second per connection.
    pub ws_messages_per_second: Option<u32>,
    /// Open WebSocket connections.
    pub max_connections: Option<u32>,
}

/// A change to a tenant's limits, field by field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantLimitsPatch {
    pub requests_per_minute: Patch<u32>,
    pub ws_messages_per_second: Patch<u32>,
    pub max_connections: Patch<u32>,
}

impl TenantLimits {
    pub fn apply(&mut self, p: TenantLimitsPatch) {
        p.requests_per_minute.apply(&mut self.requests_per_minute);
        p.ws_messages_per_second
            .apply(&mut self.ws_messages_per_second);
        p.max_connections.apply(&mut self.max_connections);
    }
}

/// A tenant's token budgets: prompt plus generated tokens per UTC day and per calendar month
/// (UTC), of the tenant as a whole and of each of its users; `None`: no budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenBudgets {
    pub tokens_per_day: Option<u64>,
    pub tokens_per_month: Option<u64>,
    pub user_tokens_per_day: Option<u64>,
    pub user_tokens_per_month: Option<u64>,
}

/// A change to a tenant's budgets, field by field (`Clear`: no budget).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenBudgetsPatch {
    pub tokens_per_day: Patch<u64>,
    pub tokens_per_month: Patch<u64>,
    pub user_tokens_per_day: Patch<u64>,
    pub user_tokens_per_month: Patch<u64>,
}

impl TokenBudgets {
    pub fn apply(&mut self, p: TokenBudgetsPatch) {
        p.tokens_per_day.apply(&mut self.tokens_per_day);
        p.tokens_per_month.apply(&mut self.tokens_per_month);
        p.user_tokens_per_day.apply(&mut self.user_tokens_per_day);
        p.user_tokens_per_month
            .apply(&mut self.user_tokens_per_month);
    }

    /// No budget at all: nothing to check or hold.
    pub fn is_unlimited(&self) -> bool {
        *self == TokenBudgets::default()
    }
}

/// Longest range one usage report may cover, in days.
pub const MAX_USAGE_DAYS: i64 = 366;
/// Range of a usage report when none is given: the last 30 days, today included.
pub const DEFAULT_USAGE_DAYS: i64 = 30;

/// The days a usage report covers: `to` defaults to `today`, `from` to 29 days before it; at
/// most [`MAX_USAGE_DAYS`], `from` not after `to`.
pub fn usage_range(
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    today: chrono::NaiveDate,
) -> Result<(chrono::NaiveDate, chrono::NaiveDate), String> {
    let to = to.unwrap_or(today);
    let from = from.unwrap_or_else(|| {
        to.checked_sub_signed(chrono::Duration::days(DEFAULT_USAGE_DAYS - 1))
            .unwrap_or(chrono::NaiveDate::MIN)
    });
    if from > to {
        return Err(format!("{from} is after to ({to})"));
    }
    if (to - from).num_days() >= MAX_USAGE_DAYS {
        return Err(format!("the range may cover at most {MAX_USAGE_DAYS} days"));
    }
    Ok((from, to))
}

/// The period a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }

    /// The first day of the period that holds `day`.
    pub fn start(self, day: chrono::NaiveDate) -> chrono::NaiveDate {
        use chrono::Datelike;
        match self {
            BudgetPeriod::Day => day,
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        }
    }

    /// When the period that holds `day` ends (midnight UTC): the budget is whole again.
    pub fn resets_at(self, day: chrono::NaiveDate) -> chrono::DateTime<chrono::Utc> {
        use chrono::Datelike;
        let next = match self {
            BudgetPeriod::Day => day.succ_opt(),
            BudgetPeriod::Month => {
                let (y, m) = if day.month() == 12 {
                    (day.year() + 1, 1)
                } else {
                    (day.year(), day.month() + 1)
                };
                chrono::NaiveDate::from_ymd_opt(y, m, 1)
            }
        };
        next.unwrap_or(day)
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn periods_start_and_reset() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        assert_eq!(BudgetPeriod::Month.start(d(2026, 12, 4)), d(2026, 12, 1));
        assert_eq!(BudgetPeriod::Day.start(d(2026, 12, 4)), d(2026, 12, 4));
        assert_eq!(
            BudgetPeriod::Day.resets_at(d(2026, 12, 31)).to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
        assert_eq!(
            BudgetPeriod::Month.resets_at(d(2026, 12, 4)).to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
        assert_eq!(
            BudgetPeriod::Month.resets_at(d(2027, 2, 28)).to_rfc3339(),
            "2027-03-01T00:00:00+00:00"
        );
    }

    #[test]
    fn budgets_patch_field_by_field() {
        let mut b = TokenBudgets {
            tokens_per_day: Some(10),
            ..Default::default()
        };
        assert!(!b.is_unlimited());
        b.apply(TokenBudgetsPatch {
            tokens_per_day: Patch::Clear,
            user_tokens_per_month: Patch::Set(5),
            ..Default::default()
        });
        assert_eq!(b.tokens_per_day, None);
        assert_eq!(b.user_tokens_per_month, Some(5));
    }
}
