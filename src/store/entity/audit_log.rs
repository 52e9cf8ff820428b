use sea_orm::entity::prelude::*;

/// One audit record (see the migration `m20261204_000004_audit`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_log")]
pub struct Model {
    /// UUIDv7, so ids order like times.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub at: DateTimeUtc,
    /// `family.verb`, e.g. `tenant.disable` (`domain::AuditAction`).
    pub action: String,
    /// `cli`, `admin_key`, `server` or `client` (`domain::Actor`).
    pub actor: String,
    pub actor_id: Option<String>,
    pub tenant_id: Option<Uuid>,
    /// The tenant's name when the row was written (it may be renamed or deleted since).
    pub tenant_name: Option<String>,
    /// What was acted on, e.g. a key's id.
    pub target: Option<String>,
    /// A JSON object.
    pub details: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
