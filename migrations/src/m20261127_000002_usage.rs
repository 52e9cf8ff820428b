//! Token usage per tenant, user and day (UTC), kept apart from the messages so deleting a
//! chat does not erase what it cost.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000002_usage"
    }
}

#[derive(DeriveIden)]
enum UsageDaily {
    Table,
    TenantId,
    UserId,
    Day,
    PromptTokens,
    CompletionTokens,
    Replies,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(UsageDaily::Table)
                .col(ColumnDef::new(UsageDaily::TenantId).uuid().not_null())
                .col(ColumnDef::new(UsageDaily::UserId).string().not_null())
                // `YYYY-MM-DD`: sorts and compares as text on both back-ends.
                .col(ColumnDef::new(UsageDaily::Day).string_len(10).not_null())
                .col(
                    ColumnDef::new(UsageDaily::PromptTokens)
                        .big_integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(UsageDaily::CompletionTokens)
                        .big_integer()
                        .not_null(),
                )
                .col(ColumnDef::new(UsageDaily::Replies).big_integer().not_null())
                .primary_key(
                    Index::create()
                        .col(UsageDaily::TenantId)
                        .col(UsageDaily::Day)
                        .col(UsageDaily::UserId),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(UsageDaily::Table).to_owned())
            .await
    }
}
