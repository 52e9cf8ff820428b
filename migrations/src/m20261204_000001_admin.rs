//! Administration: a tenant can be disabled (its keys answer `tenant_disabled` until it is
//! enabled again; NULL: enabled), and admin keys, a second kind of key kept in a table of
//! their own so that no query of tenant keys can ever return one.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000001_admin"
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    DisabledAt,
}

#[derive(DeriveIden)]
enum AdminKeys {
    Table,
    Id,
    Prefix,
    KeyHash,
    Name,
    CreatedAt,
    ExpiresAt,
    LastUsedAt,
    RevokedAt,
}

fn optional_ts(col: impl IntoIden) -> ColumnDef {
    ColumnDef::new(col)
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .add_column(optional_ts(Tenants::DisabledAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(AdminKeys::Table)
                .col(
                    ColumnDef::new(AdminKeys::Id)
                        .uuid()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(AdminKeys::Prefix).string_len(16).not_null())
                .col(
                    ColumnDef::new(AdminKeys::KeyHash)
                        .string_len(64)
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(AdminKeys::Name).string().null())
                .col(
                    ColumnDef::new(AdminKeys::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(optional_ts(AdminKeys::ExpiresAt))
                .col(optional_ts(AdminKeys::LastUsedAt))
                .col(optional_ts(AdminKeys::RevokedAt))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(AdminKeys::Table).to_owned())
            .await?;
        m.alter_table(
            Table::alter()
                .table(Tenants::Table)
                .drop_column(Tenants::DisabledAt)
                .to_owned(),
        )
        .await
    }
}
