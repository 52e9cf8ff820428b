//! User-scoped tokens: short-lived credentials a tenant's backend mints for one of its users,
//! so a browser never holds the tenant key. Stored hashed like keys; they go with their
//! tenant.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000003_user_tokens"
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum UserTokens {
    Table,
    Id,
    TenantId,
    KeyId,
    UserId,
    Prefix,
    TokenHash,
    CreatedAt,
    ExpiresAt,
    LastUsedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let ts = |c: UserTokens| {
            ColumnDef::new(c)
                .timestamp_with_time_zone()
                .not_null()
                .to_owned()
        };
        m.create_table(
            Table::create()
                .table(UserTokens::Table)
                .col(
                    ColumnDef::new(UserTokens::Id)
                        .uuid()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(UserTokens::TenantId).uuid().not_null())
                // The tenant key that minted it.
                .col(ColumnDef::new(UserTokens::KeyId).uuid().not_null())
                .col(
                    ColumnDef::new(UserTokens::UserId)
                        .string_len(128)
                        .not_null(),
                )
                .col(ColumnDef::new(UserTokens::Prefix).string_len(16).not_null())
                .col(
                    ColumnDef::new(UserTokens::TokenHash)
                        .string_len(64)
                        .not_null()
                        .unique_key(),
                )
                .col(ts(UserTokens::CreatedAt))
                .col(ts(UserTokens::ExpiresAt))
                .col(
                    ColumnDef::new(UserTokens::LastUsedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(UserTokens::Table, UserTokens::TenantId)
                        .to(Tenants::Table, Tenants::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_user_tokens_expires_at")
                .table(UserTokens::Table)
                .col(UserTokens::ExpiresAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(UserTokens::Table).to_owned())
            .await
    }
}
