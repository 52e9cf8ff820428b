//! The audit log: appended to, read a page at a time (newest first), pruned by age, and
//! the one place that notices keys expiring.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::entity::{admin_key, api_key, audit_log, tenant};
use super::json::{decode_object, encode_object};
use super::{Store, StoreError};
use crate::domain::{now, Actor, AuditAction, Page, PageRequest};

/// A record to append.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub at: DateTime<Utc>,
    pub action: AuditAction,
    pub actor: Actor,
    /// The tenant acted on (or whose key or budget it was): its id and name.
    pub tenant: Option<(Uuid, String)>,
    /// What was acted on, when it is not the tenant itself (a key's id, a user).
    pub target: Option<String>,
    pub details: Map<String, Value>,
}

impl AuditRecord {
    /// `action` by `actor`, now, on nothing in particular yet.
    pub fn new(action: AuditAction, actor: Actor) -> AuditRecord {
        AuditRecord {
            at: now(),
            action,
            actor,
            tenant: None,
            target: None,
            details: Map::new(),
        }
    }

    /// `action` on key `k` (its id is the target; its prefix, name and expiry are details).
    pub fn about_key(action: AuditAction, actor: Actor, k: &super::KeyInfo) -> AuditRecord {
        let r = AuditRecord::new(action, actor)
            .target(k.id.to_string())
            .detail("prefix", k.prefix.as_str())
            .detail("name", json!(k.name));
        match k.expires_at {
            Some(at) => r.detail("expires_at", at.to_rfc3339()),
            None => r,
        }
    }

    pub fn tenant(mut self, id: Uuid, name: &str) -> Self {
        self.tenant = Some((id, name.to_string()));
        self
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.details.insert(name.to_string(), value.into());
        self
    }

    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.at = at;
        self
    }

    fn into_row(self) -> audit_log::ActiveModel {
        let (tenant_id, tenant_name) = match self.tenant {
            Some((id, name)) => (Some(id), Some(name)),
            None => (None, None),
        };
        audit_log::ActiveModel {
            id: Set(Uuid::now_v7()),
            at: Set(self.at),
            action: Set(self.action.as_str().to_string()),
            actor: Set(self.actor.kind().to_string()),
            actor_id: Set(self.actor.id().map(|a| clip(&a, 128))),
            tenant_id: Set(tenant_id),
            tenant_name: Set(tenant_name),
            target: Set(self.target.map(|t| clip(&t, 160))),
            details: Set(encode_object(&self.details)),
        }
    }
}

/// At most `max` characters of `s` (columns are bounded; PostgreSQL refuses longer text).
fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A record as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// An [`AuditAction`]'s name (kept as text: a newer server may write names this one
    /// does not know).
    pub action: String,
    /// An [`Actor`]'s kind and id.
    pub actor: String,
    pub actor_id: Option<String>,
    pub tenant_id: Option<Uuid>,
    pub tenant_name: Option<String>,
    pub target: Option<String>,
    pub details: Map<String, Value>,
}

/// Which tenant's records: by id (any name it had), or by name for a tenant that no longer
/// exists.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditTenant {
    Id(Uuid),
    FormerName(String),
}

/// Which records to read; every field narrows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub tenant: Option<AuditTenant>,
    /// Any of these actions.
    pub actions: Option<Vec<AuditAction>>,
    /// At or after.
    pub since: Option<DateTime<Utc>>,
    /// Before.
    pub until: Option<DateTime<Utc>>,
}

impl AuditFilter {
    fn condition(&self) -> Condition {
        let mut c = Condition::all();
        match &self.tenant {
            Some(AuditTenant::Id(id)) => c = c.add(audit_log::Column::TenantId.eq(*id)),
            Some(AuditTenant::FormerName(n)) => {
                c = c.add(audit_log::Column::TenantName.eq(n.as_str()))
            }
            None => {}
        }
        if let Some(actions) = &self.actions {
            c = c.add(audit_log::Column::Action.is_in(actions.iter().map(|a| a.as_str())));
        }
        if let Some(since) = self.since {
            c = c.add(audit_log::Column::At.gte(since));
        }
        if let Some(until) = self.until {
            c = c.add(audit_log::Column::At.lt(until));
        }
        c
    }
}

/// Keys whose expiry one sweep records at most (the next sweep takes the rest).
const EXPIRY_BATCH: u64 = 500;

impl Store {
    /// Appends records (one statement per few hundred).
    pub async fn append_audit(&self, records: Vec<AuditRecord>) -> Result<(), StoreError> {
        append(&self.db, records).await
    }

    /// One page of the records that match, newest first.
    pub async fn audit_log(
        &self,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> Result<Page<AuditEntry>, StoreError> {
        let total = audit_log::Entity::find()
            .filter(filter.condition())
            .count(&self.db)
            .await?;
        let rows = audit_log::Entity::find()
            .filter(filter.condition())
            .order_by_desc(audit_log::Column::At)
            .order_by_desc(audit_log::Column::Id)
            .offset(page.offset)
            .limit(page.limit)
            .all(&self.db)
            .await?;
        let mut items = Vec::with_capacity(rows.len());
        for r in rows {
            let details = decode_object(&r.details, &format_args!("audit record {}", r.id))?;
            items.push(AuditEntry {
                id: r.id,
                at: r.at,
                action: r.action,
                actor: r.actor,
                actor_id: r.actor_id,
                tenant_id: r.tenant_id,
                tenant_name: r.tenant_name,
                target: r.target,
                details,
            });
        }
        Ok(Page {
            items,
            total,
            offset: page.offset,
            limit: page.limit,
        })
    }

    /// Deletes the records older than `before` (the retention sweep; nothing else deletes
    /// audit records). Returns how many went.
    pub async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(audit_log::Entity::delete_many()
            .filter(audit_log::Column::At.lt(before))
            .exec(&self.db)
            .await?
            .rows_affected)
    }

    /// Records `key.expire` / `admin_key.expire` for the keys (not revoked) whose expiry
    /// has passed by `at` and is not recorded yet, each exactly once: the mark and the record
    /// are one transaction, and a key another replica marked first is skipped. Returns how
    /// many were recorded.
    pub async fn audit_key_expiries(&self, at: DateTime<Utc>) -> Result<u64, StoreError> {
        let recorded = self
            .db
            .transaction::<_, u64, StoreError>(|txn| {
                Box::pin(async move {
                    let mut records = Vec::new();
                    let keys = api_key::Entity::find()
                        .filter(api_key::Column::ExpiresAt.lte(at))
                        .filter(api_key::Column::ExpiryAuditedAt.is_null())
                        .filter(api_key::Column::RevokedAt.is_null())
                        .limit(EXPIRY_BATCH)
                        .all(txn)
                        .await?;
                    let ids: Vec<Uuid> = keys.iter().map(|k| k.tenant_id).collect();
                    let names: std::collections::HashMap<Uuid, String> = tenant::Entity::find()
                        .select_only()
                        .column(tenant::Column::Id)
                        .column(tenant::Column::Name)
                        .filter(tenant::Column::Id.is_in(ids))
                        .into_tuple::<(Uuid, String)>()
                        .all(txn)
                        .await?
                        .into_iter()
                        .collect();
                    for k in keys {
                        let marked = api_key::Entity::update_many()
                            .col_expr(api_key::Column::ExpiryAuditedAt, Expr::value(at))
                            .filter(api_key::Column::Id.eq(k.id))
                            .filter(api_key::Column::ExpiryAuditedAt.is_null())
                            .exec(txn)
                            .await?
                            .rows_affected;
                        if marked == 0 {
                            continue;
                        }
                        let tenant_id = k.tenant_id;
                        let mut r = expiry(AuditAction::KeyExpire, &k.into());
                        if let Some(name) = names.get(&tenant_id) {
                            r = r.tenant(tenant_id, name);
                        }
                        records.push(r);
                    }
                    let admin = admin_key::Entity::find()
                        .filter(admin_key::Column::ExpiresAt.lte(at))
                        .filter(admin_key::Column::ExpiryAuditedAt.is_null())
                        .filter(admin_key::Column::RevokedAt.is_null())
                        .limit(EXPIRY_BATCH)
                        .all(txn)
                        .await?;
                    for k in admin {
                        let marked = admin_key::Entity::update_many()
                            .col_expr(admin_key::Column::ExpiryAuditedAt, Expr::value(at))
                            .filter(admin_key::Column::Id.eq(k.id))
                            .filter(admin_key::Column::ExpiryAuditedAt.is_null())
                            .exec(txn)
                            .await?
                            .rows_affected;
                        if marked > 0 {
                            records.push(expiry(AuditAction::AdminKeyExpire, &k.into()));
                        }
                    }
                    let n = records.len() as u64;
                    append(txn, records).await?;
                    Ok(n)
                })
            })
            .await?;
        Ok(recorded)
    }
}

/// The record of a key's expiry, dated when it expired.
fn expiry(action: AuditAction, k: &super::KeyInfo) -> AuditRecord {
    let r = AuditRecord::about_key(action, Actor::Server, k);
    match k.expires_at {
        Some(at) => r.at(at),
        None => r,
    }
}

async fn append<C: ConnectionTrait>(db: &C, records: Vec<AuditRecord>) -> Result<(), StoreError> {
    let mut rows = records.into_iter().map(AuditRecord::into_row).peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(200).collect();
        audit_log::Entity::insert_many(chunk)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}
