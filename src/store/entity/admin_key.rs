use sea_orm::entity::prelude::*;

/// An operator's key for `/admin/v1` (never a tenant's: those live in `api_keys`).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "admin_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The first characters of the key, kept in clear so an operator can tell keys apart.
    pub prefix: String,
    /// SHA-256 of the whole key, hex; the key itself is never stored.
    pub key_hash: String,
    pub name: Option<String>,
    pub created_at: DateTimeUtc,
    pub expires_at: Option<DateTimeUtc>,
    pub last_used_at: Option<DateTimeUtc>,
    pub revoked_at: Option<DateTimeUtc>,
    /// When the audit log recorded that it expired (once, by the server's sweep).
    pub expiry_audited_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
