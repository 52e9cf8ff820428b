//! `/admin/v1`: tenants and their keys, for operators with an admin key. Thin: every
//! operation is one call of [`crate::admin::Admin`], which the command line calls too.

pub mod dto;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};
use uuid::Uuid;

use super::auth::AdminAuth;
use super::types::{Day, RuledText, TenantNameRule};
use super::{ApiTags, AppState};
use crate::admin::TenantUpdate;
use crate::domain::{Actor, AuditAction, Order, PageRequest, TenantLimitsPatch, TokenBudgetsPatch};
use crate::error::{
    AdminAuthed, AdminOnTenant, AdminOnTenantWithBody, AdminWithBody, ApiError, Failure,
};
use crate::store::AuditFilter;
use dto::{
    AdminUsageDto, AuditPageDto, CreateKeyRequest, CreateTenantRequest, CreatedKeyDto,
    CreatedTenantDto, KeyDto, KeyListDto, TenantDto, TenantListDto, UpdateTenantRequest,
    UsageGroupDto,
};

#[derive(ApiResponse)]
pub enum CreatedTenant {
    /// The tenant and its first key (the secret is shown this once).
    #[oai(status = 201)]
    Created(Json<CreatedTenantDto>),
}

#[derive(ApiResponse)]
pub enum OneTenant {
    /// The tenant as it is now.
    #[oai(status = 200)]
    Ok(Json<TenantDto>),
}

#[derive(ApiResponse)]
pub enum TenantPage {
    /// One page of tenants, oldest first.
    #[oai(status = 200)]
    Ok(Json<TenantListDto>),
}

#[derive(ApiResponse)]
pub enum TenantDeleted {
    /// The tenant and all its data (keys, users, chats, messages, usage) are deleted.
    #[oai(status = 204)]
    NoContent,
}

#[derive(ApiResponse)]
pub enum CreatedKey {
    /// The key (the secret is shown this once).
    #[oai(status = 201)]
    Created(Json<CreatedKeyDto>),
}

#[derive(ApiResponse)]
pub enum KeyList {
    /// The tenant's keys, newest first, revoked and expired ones included.
    #[oai(status = 200)]
    Ok(Json<KeyListDto>),
}

#[derive(ApiResponse)]
pub enum UsageReport {
    /// The usage.
    #[oai(status = 200)]
    Ok(Json<AdminUsageDto>),
}

#[derive(ApiResponse)]
pub enum AuditPage {
    /// One page of the audit log, newest first.
    #[oai(status = 200)]
    Ok(Json<AuditPageDto>),
}

#[derive(ApiResponse)]
pub enum OneKey {
    /// The key as it is now.
    #[oai(status = 200)]
    Ok(Json<KeyDto>),
}

fn default_limit() -> u64 {
    50
}

/// The admin service acting for the request's admin key (the audit log names it).
fn admin(state: &AppState, auth: &AdminAuth) -> crate::admin::Admin {
    state.admin.by(Actor::AdminKey(auth.0))
}

/// The admin operations.
pub struct AdminApi;

#[OpenApi(tag = "ApiTags::Admin")]
impl AdminApi {
    /// Create a tenant
    ///
    /// Creates a tenant with its first API key, shown in the answer this once.
    #[oai(
        path = "/admin/v1/tenants",
        method = "post",
        operation_id = "admin_create_tenant"
    )]
    async fn create_tenant(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        body: Json<CreateTenantRequest>,
    ) -> Result<CreatedTenant, Failure<AdminWithBody>> {
        let body = body.0;
        let settings = TenantUpdate {
            name: None,
            limits: body.limits.map(TenantLimitsPatch::from).unwrap_or_default(),
            budgets: body
                .budgets
                .map(TokenBudgetsPatch::from)
                .unwrap_or_default(),
        };
        let body_name = body.name.0;
        let (t, k, key) = admin(&state, &auth)
            .create_tenant(&body_name, settings)
            .await?;
        Ok(CreatedTenant::Created(Json(CreatedTenantDto {
            tenant: t.into(),
            key: k.into(),
            api_key: key.secret,
        })))
    }

    /// List tenants
    ///
    /// All tenants, oldest first, a page at a time.
    #[oai(
        path = "/admin/v1/tenants",
        method = "get",
        operation_id = "admin_list_tenants"
    )]
    async fn list_tenants(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        /// Number of tenants to skip.
        #[oai(
            default,
            validator(minimum(value = "0"), maximum(value = "1000000000"))
        )]
        offset: Query<u64>,
        /// Page size, 1 to 200.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "200"))
        )]
        limit: Query<u64>,
    ) -> Result<TenantPage, Failure<AdminAuthed>> {
        let page = PageRequest {
            offset: offset.0,
            limit: limit.0,
            order: Order::Asc,
        };
        let p = state.admin.list_tenants(page).await?;
        Ok(TenantPage::Ok(Json(p.into())))
    }

    /// Get a tenant
    #[oai(
        path = "/admin/v1/tenants/:tenant",
        method = "get",
        operation_id = "admin_get_tenant"
    )]
    async fn get_tenant(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
    ) -> Result<OneTenant, Failure<AdminOnTenant>> {
        let t = state.admin.tenant(&tenant.0 .0).await?;
        Ok(OneTenant::Ok(Json(t.into())))
    }

    /// Rename a tenant or change its limits and budgets
    ///
    /// Absent fields stay; in `limits`, `null` goes back to the server's default, in
    /// `budgets` it removes the budget.
    #[oai(
        path = "/admin/v1/tenants/:tenant",
        method = "patch",
        operation_id = "admin_update_tenant"
    )]
    async fn update_tenant(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
        body: Json<UpdateTenantRequest>,
    ) -> Result<OneTenant, Failure<AdminOnTenantWithBody>> {
        let body = body.0;
        let update = TenantUpdate {
            name: body.name.map(|n| n.0),
            limits: body.limits.map(TenantLimitsPatch::from).unwrap_or_default(),
            budgets: body
                .budgets
                .map(TokenBudgetsPatch::from)
                .unwrap_or_default(),
        };
        let t = admin(&state, &auth)
            .update_tenant(&tenant.0 .0, update)
            .await?;
        Ok(OneTenant::Ok(Json(t.into())))
    }

    /// Disable a tenant
    ///
    /// Its keys answer 403 `tenant_disabled` and its open WebSocket connections are closed
    /// (4403) until it is enabled again; its data stays. Disabling a disabled tenant
    /// changes nothing.
    #[oai(
        path = "/admin/v1/tenants/:tenant/disable",
        method = "post",
        operation_id = "admin_disable_tenant"
    )]
    async fn disable_tenant(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
    ) -> Result<OneTenant, Failure<AdminOnTenant>> {
        let t = admin(&state, &auth)
            .set_disabled(&tenant.0 .0, true)
            .await?;
        Ok(OneTenant::Ok(Json(t.into())))
    }

    /// Enable a tenant
    #[oai(
        path = "/admin/v1/tenants/:tenant/enable",
        method = "post",
        operation_id = "admin_enable_tenant"
    )]
    async fn enable_tenant(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
    ) -> Result<OneTenant, Failure<AdminOnTenant>> {
        let t = admin(&state, &auth)
            .set_disabled(&tenant.0 .0, false)
            .await?;
        Ok(OneTenant::Ok(Json(t.into())))
    }

    /// Delete a tenant with all its data
    ///
    /// Its open connections are closed and its replies stopped first. Cannot be undone.
    #[oai(
        path = "/admin/v1/tenants/:tenant",
        method = "delete",
        operation_id = "admin_delete_tenant"
    )]
    async fn delete_tenant(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
    ) -> Result<TenantDeleted, Failure<AdminOnTenant>> {
        admin(&state, &auth).delete_tenant(&tenant.0 .0).await?;
        Ok(TenantDeleted::NoContent)
    }

    /// Create a key for a tenant
    ///
    /// With an optional name and expiry; the secret is in the answer this once.
    #[oai(
        path = "/admin/v1/tenants/:tenant/keys",
        method = "post",
        operation_id = "admin_create_key"
    )]
    async fn create_key(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
        body: Json<CreateKeyRequest>,
    ) -> Result<CreatedKey, Failure<AdminOnTenantWithBody>> {
        let (k, key) = admin(&state, &auth)
            .create_key(&tenant.0 .0, &body.0.into())
            .await?;
        Ok(CreatedKey::Created(Json(CreatedKeyDto {
            key: k.into(),
            api_key: key.secret,
        })))
    }

    /// List a tenant's keys
    ///
    /// Names, prefixes and dates; never the secrets.
    #[oai(
        path = "/admin/v1/tenants/:tenant/keys",
        method = "get",
        operation_id = "admin_list_keys"
    )]
    async fn list_keys(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
    ) -> Result<KeyList, Failure<AdminOnTenant>> {
        let keys = state.admin.list_keys(&tenant.0 .0).await?;
        Ok(KeyList::Ok(Json(KeyListDto {
            keys: keys.into_iter().map(KeyDto::from).collect(),
        })))
    }

    /// Revoke a tenant's key
    ///
    /// It stops working at once on this server (within the key-cache lifetime on other
    /// replicas). Revoking a revoked key changes nothing.
    #[oai(
        path = "/admin/v1/tenants/:tenant/keys/:key_id",
        method = "delete",
        operation_id = "admin_revoke_key"
    )]
    async fn revoke_key(
        &self,
        state: Data<&AppState>,
        auth: AdminAuth,
        /// The tenant's name or id.
        tenant: Path<RuledText<TenantNameRule>>,
        /// The key's id (from the key list).
        key_id: Path<Uuid>,
    ) -> Result<OneKey, Failure<AdminOnTenant>> {
        let k = admin(&state, &auth)
            .revoke_key(Some(&tenant.0 .0), &key_id.0.to_string())
            .await?;
        Ok(OneKey::Ok(Json(k.into())))
    }

    /// Token usage
    ///
    /// Prompt and completion tokens of all tenants (or one) between two UTC dates
    /// (inclusive; at most 366 days; default: the last 30 days), per tenant and, with
    /// `group_by`, per user, key or day.
    #[oai(path = "/admin/v1/usage", method = "get", operation_id = "admin_usage")]
    async fn usage(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        /// First day, `YYYY-MM-DD` (default: 29 days before `to`).
        from: Query<Option<Day>>,
        /// Last day, `YYYY-MM-DD` (default: today, UTC).
        to: Query<Option<Day>>,
        /// Only this tenant (name or id).
        tenant: Query<Option<RuledText<TenantNameRule>>>,
        /// The breakdown: `tenant` (default), `user`, `key` or `day`.
        #[oai(default)]
        group_by: Query<UsageGroupDto>,
    ) -> Result<UsageReport, Failure<AdminOnTenant>> {
        let (from, to) = super::usage::date_range(from.0, to.0)?;
        let tenant = tenant.0.map(|t| t.0);
        let rows = state
            .admin
            .usage(tenant.as_deref(), from, to, group_by.0.into())
            .await?;
        Ok(UsageReport::Ok(Json(AdminUsageDto {
            from,
            to,
            group_by: group_by.0,
            rows: rows.into_iter().map(Into::into).collect(),
        })))
    }

    /// Audit log
    ///
    /// Who did what, newest first: operator actions (by admin key or from the command
    /// line), key expiries, and counts of failed authentications (per client address and
    /// reason) and of budget refusals (per tenant, user and budget), one record per counting
    /// window. Kept for the server's `--audit-retention-days`.
    #[oai(path = "/admin/v1/audit", method = "get", operation_id = "admin_audit")]
    // One argument per query parameter: that is how poem-openapi documents them.
    #[allow(clippy::too_many_arguments)]
    async fn audit(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        /// Only this tenant's records (name or id; a deleted tenant by its last name).
        tenant: Query<Option<RuledText<TenantNameRule>>>,
        /// Only this action (`tenant.disable`) or family (`tenant`, `key`, `admin_key`,
        /// `auth`, `budget`).
        action: Query<Option<String>>,
        /// Only records at or after this time (RFC 3339).
        since: Query<Option<DateTime<Utc>>>,
        /// Only records before this time (RFC 3339).
        until: Query<Option<DateTime<Utc>>>,
        /// Number of records to skip.
        #[oai(
            default,
            validator(minimum(value = "0"), maximum(value = "1000000000"))
        )]
        offset: Query<u64>,
        /// Page size, 1 to 200.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "200"))
        )]
        limit: Query<u64>,
    ) -> Result<AuditPage, Failure<AdminAuthed>> {
        let actions = action
            .0
            .as_deref()
            .map(AuditAction::matching)
            .transpose()
            .map_err(|reason| ApiError::InvalidParameter {
                name: "action".into(),
                reason,
            })?;
        let filter = AuditFilter {
            tenant: None,
            actions,
            since: since.0,
            until: until.0,
        };
        let page = PageRequest {
            offset: offset.0,
            limit: limit.0,
            order: Order::Desc,
        };
        let tenant = tenant.0.map(|t| t.0);
        let p = state.admin.audit(tenant.as_deref(), filter, page).await?;
        Ok(AuditPage::Ok(Json(p.into())))
    }
}
