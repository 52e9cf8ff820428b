//! The first schema: tenants, their API keys, users, chats and messages.
//!
//! JSON values (`metadata`, `config`) are stored as text: PostgreSQL's `json`/`jsonb`
//! bindings go through jsonb, which reorders object keys, and clients get their metadata
//! back exactly as they sent it.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000001_init"
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    TenantId,
    Prefix,
    KeyHash,
    CreatedAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    TenantId,
    UserId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Chats {
    Table,
    Id,
    TenantId,
    UserId,
    Title,
    Metadata,
    Config,
    MessageCount,
    CreatedAt,
    UpdatedAt,
    LastActivityAt,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Id,
    TenantId,
    ChatId,
    Seq,
    Role,
    Content,
    Metadata,
    Status,
    PromptTokens,
    CompletionTokens,
    CreatedAt,
    UpdatedAt,
}

fn ts(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Tenants::Table)
                .col(ColumnDef::new(Tenants::Id).uuid().not_null().primary_key())
                .col(
                    ColumnDef::new(Tenants::Name)
                        .string_len(64)
                        .not_null()
                        .unique_key(),
                )
                .col(ts(Tenants::CreatedAt))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ApiKeys::Table)
                .col(ColumnDef::new(ApiKeys::Id).uuid().not_null().primary_key())
                .col(ColumnDef::new(ApiKeys::TenantId).uuid().not_null())
                .col(ColumnDef::new(ApiKeys::Prefix).string_len(16).not_null())
                .col(
                    ColumnDef::new(ApiKeys::KeyHash)
                        .string_len(64)
                        .not_null()
                        .unique_key(),
                )
                .col(ts(ApiKeys::CreatedAt))
                .col(
                    ColumnDef::new(ApiKeys::RevokedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(ApiKeys::Table, ApiKeys::TenantId)
                        .to(Tenants::Table, Tenants::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_api_keys_prefix")
                .table(ApiKeys::Table)
                .col(ApiKeys::Prefix)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Users::Table)
                .col(ColumnDef::new(Users::Id).uuid().not_null().primary_key())
                .col(ColumnDef::new(Users::TenantId).uuid().not_null())
                .col(ColumnDef::new(Users::UserId).string_len(128).not_null())
                .col(ts(Users::CreatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Users::Table, Users::TenantId)
                        .to(Tenants::Table, Tenants::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_users_tenant_user")
                .table(Users::Table)
                .col(Users::TenantId)
                .col(Users::UserId)
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Chats::Table)
                .col(ColumnDef::new(Chats::Id).uuid().not_null().primary_key())
                .col(ColumnDef::new(Chats::TenantId).uuid().not_null())
                .col(ColumnDef::new(Chats::UserId).string_len(128).not_null())
                .col(ColumnDef::new(Chats::Title).text().null())
                .col(ColumnDef::new(Chats::Metadata).text().not_null())
                .col(ColumnDef::new(Chats::Config).text().not_null())
                .col(
                    ColumnDef::new(Chats::MessageCount)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ts(Chats::CreatedAt))
                .col(ts(Chats::UpdatedAt))
                .col(ts(Chats::LastActivityAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Chats::Table, Chats::TenantId)
                        .to(Tenants::Table, Tenants::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from_tbl(Chats::Table)
                        .from_col(Chats::TenantId)
                        .from_col(Chats::UserId)
                        .to_tbl(Users::Table)
                        .to_col(Users::TenantId)
                        .to_col(Users::UserId)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_chats_tenant_user_created")
                .table(Chats::Table)
                .col(Chats::TenantId)
                .col(Chats::UserId)
                .col(Chats::CreatedAt)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Messages::Table)
                .col(ColumnDef::new(Messages::Id).uuid().not_null().primary_key())
                .col(ColumnDef::new(Messages::TenantId).uuid().not_null())
                .col(ColumnDef::new(Messages::ChatId).uuid().not_null())
                .col(ColumnDef::new(Messages::Seq).big_integer().not_null())
                .col(ColumnDef::new(Messages::Role).string_len(16).not_null())
                .col(ColumnDef::new(Messages::Content).text().not_null())
                .col(ColumnDef::new(Messages::Metadata).text().not_null())
                .col(ColumnDef::new(Messages::Status).string_len(16).not_null())
                .col(ColumnDef::new(Messages::PromptTokens).integer().null())
                .col(ColumnDef::new(Messages::CompletionTokens).integer().null())
                .col(ts(Messages::CreatedAt))
                .col(ts(Messages::UpdatedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(Messages::Table, Messages::ChatId)
                        .to(Chats::Table, Chats::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_messages_chat_seq")
                .table(Messages::Table)
                .col(Messages::ChatId)
                .col(Messages::Seq)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_messages_status")
                .table(Messages::Table)
                .col(Messages::Status)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Messages::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Chats::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Users::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Tenants::Table).to_owned())
            .await?;
        Ok(())
    }
}
