//! Token budgets, enforced before a reply or completion starts.
//!
//! A reply may start only if what its tenant (and its user) used this day and month, plus
//! what replies already running hold, plus this reply's prompt tokens and its `max_tokens`,
//! stays within every budget. The amount is *held* until the reply's real usage is recorded
//! (the [`Hold`] is dropped then), so replies running together cannot overrun a budget
//! between them: at most the one reply whose usage lands while another is being checked
//! (the check reads the recorded usage, then the holds) can be counted late.
//!
//! Holds are this process's: replicas of a cluster each hold their own, so there a budget
//! may be overrun by up to one reply per replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use crate::audit::Audit;
use crate::domain::{BudgetPeriod, TokenBudgets};
use crate::store::{Store, StoreError, TenantId};

/// Whose budget: the tenant's, or one user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Tenant,
    User,
}

impl BudgetScope {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::Tenant => "tenant",
            BudgetScope::User => "user",
        }
    }
}

/// A reply refused because it could overrun a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub scope: BudgetScope,
    pub period: BudgetPeriod,
    /// The budget, in tokens.
    pub limit: u64,
    /// Used this period plus held by running replies.
    pub used: u64,
    /// What this reply could use: its prompt plus its `max_tokens`.
    pub requested: u64,
    /// When the period ends and the budget is whole again.
    pub resets_at: DateTime<Utc>,
}

/// One scope's standing in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    pub scope: BudgetScope,
    pub period: BudgetPeriod,
    pub limit: u64,
    /// Recorded usage this period (not counting holds).
    pub used: u64,
    /// Held by replies running now.
    pub held: u64,
    pub resets_at: DateTime<Utc>,
}

impl BudgetState {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used + self.held)
    }
}

/// Tokens held per tenant (`None`) and per user of a tenant.
type Held = HashMap<(TenantId, Option<String>), u64>;

/// The budgets and what running replies hold against them; cheap to clone.
#[derive(Clone)]
pub struct Budgets {
    store: Store,
    /// Refusals are tallied there.
    audit: Audit,
    budgets: moka::future::Cache<TenantId, TokenBudgets>,
    held: Arc<Mutex<Held>>,
}

fn lock(m: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What running replies hold against the tenant's (or `user`'s) budgets.
fn held_by(held: &Held, tenant: TenantId, scope: BudgetScope, user: Option<&str>) -> u64 {
    let key = match scope {
        BudgetScope::Tenant => (tenant, None),
        BudgetScope::User => (tenant, user.map(str::to_string)),
    };
    held.get(&key).copied().unwrap_or(0)
}

/// Tokens held for one running reply; dropping it (after the reply's usage is recorded)
/// gives them back.
pub struct Hold {
    held: Arc<Mutex<Held>>,
    tenant: TenantId,
    user: String,
    tokens: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        for key in [(self.tenant, None), (self.tenant, Some(self.user.clone()))] {
            if let Some(n) = held.get_mut(&key) {
                *n = n.saturating_sub(self.tokens);
                if *n == 0 {
                    held.remove(&key);
                }
            }
        }
    }
}

impl Budgets {
    /// `refresh`: how long a tenant's budgets are cached (a change made elsewhere applies
    /// within it; one made through this server's admin API at once).
    pub fn new(store: Store, refresh: Duration, audit: Audit) -> Budgets {
        Budgets {
            store,
            audit,
            budgets: moka::future::Cache::builder()
                .time_to_live(refresh)
                .max_capacity(100_000)
                .build(),
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The tenant's budgets (cached).
    pub async fn of(&self, tenant: TenantId) -> Result<TokenBudgets, StoreError> {
        let store = self.store.clone();
        self.budgets
            .try_get_with(tenant, async move { store.tenant_budgets(tenant).await })
            .await
            .map_err(|e| match &*e {
                StoreError::NotFound => StoreError::NotFound,
                StoreError::Unavailable(d) => {
                    StoreError::Unavailable(sea_orm::DbErr::Custom(d.to_string()))
                }
                other => StoreError::Other(sea_orm::DbErr::Custom(other.to_string())),
            })
    }

    /// Forgets a tenant's cached budgets (an operator just changed them here).
    pub async fn forget(&self, tenant: TenantId) {
        self.budgets.invalidate(&tenant).await;
    }

    /// Every budget of the tenant (and of `user`, when given) that is set, with what is
    /// used and held now.
    pub async fn states(
        &self,
        tenant: TenantId,
        user: Option<&str>,
        today: NaiveDate,
    ) -> Result<Vec<BudgetState>, StoreError> {
        let budgets = self.of(tenant).await?;
        let mut out = self.recorded(tenant, &budgets, user, today).await?;
        let held = lock(&self.held);
        for s in &mut out {
            s.held = held_by(&held, tenant, s.scope, user);
        }
        Ok(out)
    }

    /// The budgets that are set, with their recorded usage this period (`held` left 0).
    async fn recorded(
        &self,
        tenant: TenantId,
        budgets: &TokenBudgets,
        user: Option<&str>,
        today: NaiveDate,
    ) -> Result<Vec<BudgetState>, StoreError> {
        let scope = self.store.tenant(tenant);
        let mut wanted = vec![
            (
                BudgetScope::Tenant,
                BudgetPeriod::Day,
                budgets.tokens_per_day,
            ),
            (
                BudgetScope::Tenant,
                BudgetPeriod::Month,
                budgets.tokens_per_month,
            ),
        ];
        if user.is_some() {
            wanted.push((
                BudgetScope::User,
                BudgetPeriod::Day,
                budgets.user_tokens_per_day,
            ));
            wanted.push((
                BudgetScope::User,
                BudgetPeriod::Month,
                budgets.user_tokens_per_month,
            ));
        }
        let mut out = Vec::new();
        for (who, period, limit) in wanted {
            let Some(limit) = limit else { continue };
            let of_user = match who {
                BudgetScope::Tenant => None,
                BudgetScope::User => user,
            };
            let used = scope
                .tokens_used(of_user, period.start(today), today)
                .await?;
            out.push(BudgetState {
                scope: who,
                period,
                limit,
                used,
                held: 0,
                resets_at: period.resets_at(today),
            });
        }
        Ok(out)
    }

    /// Holds `tokens` for a reply of `user` if every budget allows it; `Ok(None)` when the
    /// tenant has no budget (nothing to hold).
    pub async fn hold(
        &self,
        tenant: TenantId,
        user: &str,
        tokens: u64,
    ) -> Result<Result<Option<Hold>, QuotaExceeded>, StoreError> {
        let budgets = self.of(tenant).await?;
        if budgets.is_unlimited() {
            return Ok(Ok(None));
        }
        let today = Utc::now().date_naive();
        let recorded = self.recorded(tenant, &budgets, Some(user), today).await?;
        let mut held = lock(&self.held);
        for s in &recorded {
            let used = s.used + held_by(&held, tenant, s.scope, Some(user));
            if used.saturating_add(tokens) > s.limit {
                let refused = QuotaExceeded {
                    scope: s.scope,
                    period: s.period,
                    limit: s.limit,
                    used,
                    requested: tokens,
                    resets_at: s.resets_at,
                };
                self.audit.budget_refused(tenant, user, &refused);
                return Ok(Err(refused));
            }
        }
        let tenant_key = (tenant, None);
        let user_key = (tenant, Some(user.to_string()));
        *held.entry(tenant_key).or_insert(0) += tokens;
        *held.entry(user_key).or_insert(0) += tokens;
        Ok(Ok(Some(Hold {
            held: self.held.clone(),
            tenant,
            user: user.to_string(),
            tokens,
        })))
    }
}
