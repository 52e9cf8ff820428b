use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Copied from the chat so that every message query can filter by tenant directly.
    pub tenant_id: Uuid,
    pub chat_id: Uuid,
    /// The order messages were written in, per chat (all branches).
    pub seq: i64,
    pub role: String,
    pub content: String,
    /// A JSON object, as text.
    pub metadata: String,
    pub status: String,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// The replica generating this reply (cluster mode; see `cluster`).
    pub replica_id: Option<String>,
    /// The message this one follows; NULL for a chat's first message (and its edits).
    pub parent_id: Option<Uuid>,
    /// Position in its branch, from 1: the parent's depth + 1.
    pub depth: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
