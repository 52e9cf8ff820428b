use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "chats")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: String,
    pub title: Option<String>,
    /// A JSON object, as text.
    pub metadata: String,
    /// A JSON object (`domain::ChatConfig`), as text.
    pub config: String,
    /// Messages on the active branch (the active leaf's depth).
    pub message_count: i64,
    /// The active branch's leaf; NULL while the chat has no messages.
    pub active_message_id: Option<Uuid>,
    /// The last `seq` given to a message of this chat.
    pub last_seq: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub last_activity_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
