//! The audit log: append-only, one row per operator action, key expiry, or window of failed
//! authentications / budget refusals. No foreign key: a tenant's rows outlive the tenant
//! (its name is copied into them), and only the retention sweep deletes rows.
//!
//! Keys get `expiry_audited_at`, set in the same transaction that records their expiry, so
//! each expiry is recorded once however many replicas sweep.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000004_audit"
    }
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    Action,
    Actor,
    ActorId,
    TenantId,
    TenantName,
    Target,
    Details,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    ExpiryAuditedAt,
}

#[derive(DeriveIden)]
enum AdminKeys {
    Table,
    ExpiryAuditedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AuditLog::Table)
                // UUIDv7: ordered by time.
                .col(ColumnDef::new(AuditLog::Id).uuid().not_null().primary_key())
                .col(
                    ColumnDef::new(AuditLog::At)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(ColumnDef::new(AuditLog::Action).string_len(32).not_null())
                .col(ColumnDef::new(AuditLog::Actor).string_len(16).not_null())
                .col(ColumnDef::new(AuditLog::ActorId).string_len(128).null())
                .col(ColumnDef::new(AuditLog::TenantId).uuid().null())
                .col(ColumnDef::new(AuditLog::TenantName).string_len(64).null())
                .col(ColumnDef::new(AuditLog::Target).string_len(160).null())
                .col(ColumnDef::new(AuditLog::Details).text().not_null())
                .to_owned(),
        )
        .await?;
        for (name, cols) in [
            ("idx_audit_log_at", vec![AuditLog::At]),
            (
                "idx_audit_log_tenant",
                vec![AuditLog::TenantId, AuditLog::At],
            ),
            ("idx_audit_log_action", vec![AuditLog::Action, AuditLog::At]),
        ] {
            let mut idx = Index::create();
            idx.name(name).table(AuditLog::Table);
            for c in cols {
                idx.col(c);
            }
            m.create_index(idx.to_owned()).await?;
        }
        m.alter_table(
            Table::alter()
                .table(ApiKeys::Table)
                .add_column(
                    ColumnDef::new(ApiKeys::ExpiryAuditedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(AdminKeys::Table)
                .add_column(
                    ColumnDef::new(AdminKeys::ExpiryAuditedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(AdminKeys::Table)
                .drop_column(AdminKeys::ExpiryAuditedAt)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(ApiKeys::Table)
                .drop_column(ApiKeys::ExpiryAuditedAt)
                .to_owned(),
        )
        .await?;
        m.drop_table(Table::drop().table(AuditLog::Table).to_owned())
            .await
    }
}
