use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// The first characters of the key, kept in clear so an operator can tell keys apart.
    pub prefix: String,
    /// SHA-256 of the whole key, hex; the key itself is never stored.
    pub key_hash: String,
    pub created_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
    /// What the key is for, as its creator said.
    pub name: Option<String>,
    /// After this the key answers `api_key_expired`.
    pub expires_at: Option<DateTimeUtc>,
    /// When it last authenticated a request (to within the key cache's lifetime).
    pub last_used_at: Option<DateTimeUtc>,
    /// When the audit log recorded that it expired (once, by the server's sweep).
    pub expiry_audited_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
