//! Token budgets and usage per key.
//!
//! A tenant may have token budgets (prompt + generated tokens) per UTC day and calendar
//! month, for itself and as a default for each of its users (NULL: no budget). Usage per key
//! is a table of its own beside `usage_daily` (per user): every reply adds to both, and
//! neither needs rewriting the other's rows.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000002_budgets"
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Tenants {
    Table,
    TokensPerDay,
    TokensPerMonth,
    UserTokensPerDay,
    UserTokensPerMonth,
}

#[derive(DeriveIden)]
enum UsageByKey {
    Table,
    TenantId,
    Day,
    KeyId,
    PromptTokens,
    CompletionTokens,
    Replies,
}

const BUDGETS: [Tenants; 4] = [
    Tenants::TokensPerDay,
    Tenants::TokensPerMonth,
    Tenants::UserTokensPerDay,
    Tenants::UserTokensPerMonth,
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one at a time.
        for col in BUDGETS {
            m.alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(ColumnDef::new(col).big_integer().null())
                    .to_owned(),
            )
            .await?;
        }
        let count = |c: UsageByKey| ColumnDef::new(c).big_integer().not_null().to_owned();
        m.create_table(
            Table::create()
                .table(UsageByKey::Table)
                .col(ColumnDef::new(UsageByKey::TenantId).uuid().not_null())
                // `YYYY-MM-DD`, as in `usage_daily`.
                .col(ColumnDef::new(UsageByKey::Day).string_len(10).not_null())
                .col(ColumnDef::new(UsageByKey::KeyId).uuid().not_null())
                .col(count(UsageByKey::PromptTokens))
                .col(count(UsageByKey::CompletionTokens))
                .col(count(UsageByKey::Replies))
                .primary_key(
                    Index::create()
                        .col(UsageByKey::TenantId)
                        .col(UsageByKey::Day)
                        .col(UsageByKey::KeyId),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(UsageByKey::Table).to_owned())
            .await?;
        for col in BUDGETS {
            m.alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
