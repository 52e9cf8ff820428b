//! Bodies of the `/admin/v1` API. The command line prints the same objects (`--json`), so
//! both say the same thing in the same words.

use chrono::{NaiveDate, Utc};
use poem_openapi::types::MaybeUndefined;
use poem_openapi::Object;
use uuid::Uuid;

use crate::api::types::{JsonObject, KeyNameRule, RuledText, TenantNameRule, Timestamp};
use crate::domain::{
    Page, Patch, TenantLimits, TenantLimitsPatch, TokenBudgets, TokenBudgetsPatch,
};
use crate::store::{AuditEntry, KeyInfo, KeySpec, TenantInfo, UsageGroup, UsageRow};

/// A tenant's own limits; `null` means the server's default.
#[derive(Debug, Clone, Object)]
#[oai(rename = "TenantLimits")]
pub struct TenantLimitsDto {
    /// REST requests per minute.
    #[oai(nullable)]
    pub requests_per_minute: Option<u32>,
    /// WebSocket messages per second per connection.
    #[oai(nullable)]
    pub ws_messages_per_second: Option<u32>,
    /// Open WebSocket connections.
    #[oai(nullable)]
    pub max_connections: Option<u32>,
}

impl From<TenantLimits> for TenantLimitsDto {
    fn from(l: TenantLimits) -> Self {
        TenantLimitsDto {
            requests_per_minute: l.requests_per_minute,
            ws_messages_per_second: l.ws_messages_per_second,
            max_connections: l.max_connections,
        }
    }
}

/// A change to a tenant's limits: an absent field stays, `null` goes back to the server's
/// default, a number (1 to 2147483647) sets it.
#[derive(Debug, Clone, Default, Object)]
#[oai(rename = "TenantLimitsPatch", nullable_all)]
pub struct TenantLimitsPatchDto {
    #[oai(validator(minimum(value = "1"), maximum(value = "2147483647")))]
    pub requests_per_minute: MaybeUndefined<u32>,
    #[oai(validator(minimum(value = "1"), maximum(value = "2147483647")))]
    pub ws_messages_per_second: MaybeUndefined<u32>,
    #[oai(validator(minimum(value = "1"), maximum(value = "2147483647")))]
    pub max_connections: MaybeUndefined<u32>,
}

fn patch<T>(m: MaybeUndefined<T>) -> Patch<T> {
    match m {
        MaybeUndefined::Undefined => Patch::Keep,
        MaybeUndefined::Null => Patch::Clear,
        MaybeUndefined::Value(v) => Patch::Set(v),
    }
}

impl From<TenantLimitsPatchDto> for TenantLimitsPatch {
    fn from(p: TenantLimitsPatchDto) -> Self {
        TenantLimitsPatch {
            requests_per_minute: patch(p.requests_per_minute),
            ws_messages_per_second: patch(p.ws_messages_per_second),
            max_connections: patch(p.max_connections),
        }
    }
}

/// A tenant's token budgets (prompt + generated tokens; days and months in UTC); `null`:
/// no budget. A reply or completion that could overrun one is refused before it starts.
#[derive(Debug, Clone, Object)]
#[oai(rename = "TokenBudgets")]
pub struct TokenBudgetsDto {
    /// The whole tenant, per day.
    #[oai(nullable)]
    pub tokens_per_day: Option<u64>,
    /// The whole tenant, per calendar month.
    #[oai(nullable)]
    pub tokens_per_month: Option<u64>,
    /// Each user of the tenant, per day.
    #[oai(nullable)]
    pub user_tokens_per_day: Option<u64>,
    /// Each user of the tenant, per calendar month.
    #[oai(nullable)]
    pub user_tokens_per_month: Option<u64>,
}

impl From<TokenBudgets> for TokenBudgetsDto {
    fn from(b: TokenBudgets) -> Self {
        TokenBudgetsDto {
            tokens_per_day: b.tokens_per_day,
            tokens_per_month: b.tokens_per_month,
            user_tokens_per_day: b.user_tokens_per_day,
            user_tokens_per_month: b.user_tokens_per_month,
        }
    }
}

/// A change to a tenant's budgets: an absent field stays, `null` removes the budget, a
/// number (1 to 10^15) sets it.
#[derive(Debug, Clone, Default, Object)]
#[oai(rename = "TokenBudgetsPatch", nullable_all)]
pub struct TokenBudgetsPatchDto {
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000000000")))]
    pub tokens_per_day: MaybeUndefined<u64>,
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000000000")))]
    pub tokens_per_month: MaybeUndefined<u64>,
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000000000")))]
    pub user_tokens_per_day: MaybeUndefined<u64>,
    #[oai(validator(minimum(value = "1"), maximum(value = "1000000000000000")))]
    pub user_tokens_per_month: MaybeUndefined<u64>,
}

impl From<TokenBudgetsPatchDto> for TokenBudgetsPatch {
    fn from(p: TokenBudgetsPatchDto) -> Self {
        TokenBudgetsPatch {
            tokens_per_day: patch(p.tokens_per_day),
            tokens_per_month: patch(p.tokens_per_month),
            user_tokens_per_day: patch(p.user_tokens_per_day),
            user_tokens_per_month: patch(p.user_tokens_per_month),
        }
    }
}

/// A tenant as an operator sees it.
#[derive(Debug, Clone, Object)]
#[oai(rename = "Tenant")]
pub struct TenantDto {
    pub id: Uuid,
    pub name: String,
    pub created_at: Timestamp,
    /// Keys that work now (neither revoked nor expired).
    pub active_keys: u64,
    pub limits: TenantLimitsDto,
    pub budgets: TokenBudgetsDto,
    /// A disabled tenant's keys answer 403 `tenant_disabled`.
    pub disabled: bool,
    #[oai(nullable)]
    pub disabled_at: Option<Timestamp>,
}

impl From<TenantInfo> for TenantDto {
    fn from(t: TenantInfo) -> Self {
        TenantDto {
            id: t.id,
            name: t.name,
            created_at: t.created_at.into(),
            active_keys: t.active_keys,
            limits: t.limits.into(),
            budgets: t.budgets.into(),
            disabled: t.disabled_at.is_some(),
            disabled_at: t.disabled_at.map(Timestamp),
        }
    }
}

/// One page of tenants, oldest first.
#[derive(Debug, Object)]
#[oai(rename = "TenantList")]
pub struct TenantListDto {
    pub tenants: Vec<TenantDto>,
    /// All tenants.
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// True when more tenants follow this page.
    pub has_more: bool,
}

impl From<Page<TenantInfo>> for TenantListDto {
    fn from(p: Page<TenantInfo>) -> Self {
        TenantListDto {
            has_more: p.has_more(),
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            tenants: p.items.into_iter().map(TenantDto::from).collect(),
        }
    }
}

/// A new tenant (a `null` field is the same as an absent one).
#[derive(Debug, Object)]
#[oai(rename = "CreateTenantRequest")]
pub struct CreateTenantRequest {
    /// 1 to 64 characters from A-Z, a-z, 0-9, '-', '_', '.'; unique.
    pub name: RuledText<TenantNameRule>,
    /// Its own limits (absent fields: the server's defaults).
    #[oai(nullable)]
    pub limits: Option<TenantLimitsPatchDto>,
    /// Its token budgets (absent fields: none).
    #[oai(nullable)]
    pub budgets: Option<TokenBudgetsPatchDto>,
}

/// A change to a tenant; absent (or `null`) fields stay as they are.
#[derive(Debug, Object)]
#[oai(rename = "UpdateTenantRequest")]
pub struct UpdateTenantRequest {
    /// A new name (unique; the id, keys and data stay).
    #[oai(nullable)]
    pub name: Option<RuledText<TenantNameRule>>,
    #[oai(nullable)]
    pub limits: Option<TenantLimitsPatchDto>,
    #[oai(nullable)]
    pub budgets: Option<TokenBudgetsPatchDto>,
}

/// Whether a key works now.
#[derive(Debug, Clone, Copy, poem_openapi::Enum)]
#[oai(rename = "KeyState", rename_all = "snake_case")]
pub enum KeyStateDto {
    Active,
    Expired,
    Revoked,
}

/// A key as an operator sees it: never the secret.
#[derive(Debug, Clone, Object)]
#[oai(rename = "ApiKey")]
pub struct KeyDto {
    pub id: Uuid,
    /// The tenant the key acts for (absent for an admin key).
    #[oai(nullable, skip_serializing_if_is_none)]
    pub tenant_id: Option<Uuid>,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    #[oai(nullable)]
    pub name: Option<String>,
    pub state: KeyStateDto,
    pub created_at: Timestamp,
    #[oai(nullable)]
    pub expires_at: Option<Timestamp>,
    /// When it last authenticated a request (to within the server's key-cache lifetime).
    #[oai(nullable)]
    pub last_used_at: Option<Timestamp>,
    #[oai(nullable)]
    pub revoked_at: Option<Timestamp>,
}

impl From<KeyInfo> for KeyDto {
    fn from(k: KeyInfo) -> Self {
        let state = if k.revoked_at.is_some() {
            KeyStateDto::Revoked
        } else if k.expires_at.is_some_and(|at| at <= Utc::now()) {
            KeyStateDto::Expired
        } else {
            KeyStateDto::Active
        };
        KeyDto {
            id: k.id,
            tenant_id: k.tenant_id,
            prefix: k.prefix,
            name: k.name,
            state,
            created_at: k.created_at.into(),
            expires_at: k.expires_at.map(Timestamp),
            last_used_at: k.last_used_at.map(Timestamp),
            revoked_at: k.revoked_at.map(Timestamp),
        }
    }
}

/// A tenant's keys, newest first.
#[derive(Debug, Object)]
#[oai(rename = "ApiKeyList")]
pub struct KeyListDto {
    pub keys: Vec<KeyDto>,
}

/// A new key (a `null` field is the same as an absent one).
#[derive(Debug, Default, Object)]
#[oai(rename = "CreateKeyRequest")]
pub struct CreateKeyRequest {
    /// What the key is for (1–100 characters, no control characters).
    #[oai(nullable)]
    pub name: Option<RuledText<KeyNameRule>>,
    /// When the key stops working (then 401 `api_key_expired`); must be in the future.
    #[oai(nullable)]
    pub expires_at: Option<Timestamp>,
}

impl From<CreateKeyRequest> for KeySpec {
    fn from(r: CreateKeyRequest) -> Self {
        KeySpec {
            name: r.name.map(|n| n.0),
            expires_at: r.expires_at.map(|t| t.0),
        }
    }
}

/// A key just made: its secret is shown this once and never again.
#[derive(Debug, Object)]
#[oai(rename = "CreatedApiKey")]
pub struct CreatedKeyDto {
    pub key: KeyDto,
    /// The secret, for `X-API-Key`. Store it now: only its hash is kept.
    pub api_key: String,
}

/// A tenant just made, with its first key.
#[derive(Debug, Object)]
#[oai(rename = "CreatedTenant")]
pub struct CreatedTenantDto {
    pub tenant: TenantDto,
    pub key: KeyDto,
    /// The first key's secret, shown this once.
    pub api_key: String,
}

/// How a usage report is broken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, poem_openapi::Enum)]
#[oai(rename = "UsageGroup", rename_all = "snake_case")]
pub enum UsageGroupDto {
    /// One row per tenant.
    #[default]
    Tenant,
    /// One row per tenant and user.
    User,
    /// One row per tenant and key (or user token).
    Key,
    /// One row per tenant and day.
    Day,
}

impl From<UsageGroupDto> for UsageGroup {
    fn from(g: UsageGroupDto) -> Self {
        match g {
            UsageGroupDto::Tenant => UsageGroup::Tenant,
            UsageGroupDto::User => UsageGroup::User,
            UsageGroupDto::Key => UsageGroup::Key,
            UsageGroupDto::Day => UsageGroup::Day,
        }
    }
}

/// A tenant's tokens over the report's range (for one user, key or day when grouped so).
#[derive(Debug, Object)]
#[oai(rename = "AdminUsageRow")]
pub struct AdminUsageRowDto {
    pub tenant_id: Uuid,
    /// The tenant's name (`null`: deleted since).
    #[oai(nullable)]
    pub tenant: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub user_id: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub key_id: Option<Uuid>,
    #[oai(skip_serializing_if_is_none)]
    pub day: Option<NaiveDate>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Replies and completions.
    pub replies: i64,
}

impl From<(UsageRow, Option<String>)> for AdminUsageRowDto {
    fn from((r, tenant): (UsageRow, Option<String>)) -> Self {
        AdminUsageRowDto {
            tenant_id: r.tenant_id,
            tenant,
            user_id: r.user_id,
            key_id: r.key_id,
            day: r.day,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            replies: r.replies,
        }
    }
}

/// Usage over `from..=to` (UTC days), in tenant then group order.
#[derive(Debug, Object)]
#[oai(rename = "AdminUsageReport")]
pub struct AdminUsageDto {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub group_by: UsageGroupDto,
    pub rows: Vec<AdminUsageRowDto>,
}

/// Who took an audited action.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AuditActor")]
pub struct AuditActorDto {
    /// `admin_key` (a request to `/admin/v1`), `cli` (the command line), `server` (a bootstrap
    /// key, an expiry, a budget) or `client` (a failed authentication).
    pub kind: String,
    /// The admin key's id, the OS user that ran the command, or the client's address.
    #[oai(nullable)]
    pub id: Option<String>,
}

/// One audit record.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AuditRecord")]
pub struct AuditEntryDto {
    pub id: Uuid,
    /// When it happened (a count's last occurrence; a key's expiry time).
    pub at: Timestamp,
    /// `tenant.create`, `tenant.update`, `tenant.disable`, `tenant.enable`, `tenant.delete`,
    /// `key.create`, `key.revoke`, `key.expire`, `admin_key.create`, `admin_key.revoke`,
    /// `admin_key.expire`, `auth.fail` or `budget.refuse`.
    pub action: String,
    pub actor: AuditActorDto,
    /// The tenant acted on.
    #[oai(nullable)]
    pub tenant_id: Option<Uuid>,
    /// Its name at the time.
    #[oai(nullable)]
    pub tenant_name: Option<String>,
    /// What else was acted on: a key's id, `user:<id>`.
    #[oai(nullable)]
    pub target: Option<String>,
    /// The specifics: what changed (`changes`), a key's `prefix` and `name`, and for counted
    /// records (`auth.fail`, `budget.refuse`) `count`, `first_at`, `last_at`.
    pub details: JsonObject,
}

impl From<AuditEntry> for AuditEntryDto {
    fn from(e: AuditEntry) -> Self {
        AuditEntryDto {
            id: e.id,
            at: e.at.into(),
            action: e.action,
            actor: AuditActorDto {
                kind: e.actor,
                id: e.actor_id,
            },
            tenant_id: e.tenant_id,
            tenant_name: e.tenant_name,
            target: e.target,
            details: JsonObject(e.details),
        }
    }
}

/// One page of the audit log, newest first.
#[derive(Debug, Object)]
#[oai(rename = "AuditLog")]
pub struct AuditPageDto {
    pub records: Vec<AuditEntryDto>,
    /// All records that match.
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// True when more records follow this page.
    pub has_more: bool,
}

impl From<Page<AuditEntry>> for AuditPageDto {
    fn from(p: Page<AuditEntry>) -> Self {
        AuditPageDto {
            has_more: p.has_more(),
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            records: p.items.into_iter().map(AuditEntryDto::from).collect(),
        }
    }
}
