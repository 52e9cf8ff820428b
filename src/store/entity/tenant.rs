use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "tenants")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTimeUtc,
    pub requests_per_minute: Option<i32>,
    pub ws_messages_per_second: Option<i32>,
    pub max_connections: Option<i32>,
    /// While set, the tenant's keys answer `tenant_disabled`.
    pub disabled_at: Option<DateTimeUtc>,
    /// Token budgets (prompt + generated) of the tenant and, as a default, of each of its
    /// users; NULL: none.
    pub tokens_per_day: Option<i64>,
    pub tokens_per_month: Option<i64>,
    pub user_tokens_per_day: Option<i64>,
    pub user_tokens_per_month: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
