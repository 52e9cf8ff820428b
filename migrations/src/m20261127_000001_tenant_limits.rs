//! Per-tenant limits: each column overrides the server-wide default when set (NULL = use
//! the default, so a later change of the default reaches every tenant that never chose).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261127_000001_tenant_limits"
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    RequestsPerMinute,
    WsMessagesPerSecond,
    MaxConnections,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for col in [
            Tenants::RequestsPerMinute,
            Tenants::WsMessagesPerSecond,
            Tenants::MaxConnections,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(ColumnDef::new(col).integer().null())
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for col in [
            Tenants::RequestsPerMinute,
            Tenants::WsMessagesPerSecond,
            Tenants::MaxConnections,
        ] {
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
