//! The replica that generates a reply (cluster mode): recorded on its assistant message while
//! it streams, so a restarting replica interrupts only its own unfinished replies and the
//! others can recover those of a replica that died. NULL for everything else. Indexed with
//! the status: replicas look for `streaming` rows every few seconds.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000001_replica"
    }
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Status,
    ReplicaId,
}

const INDEX: &str = "idx_messages_status_replica";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Messages::Table)
                .add_column(ColumnDef::new(Messages::ReplicaId).string().null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name(INDEX)
                .table(Messages::Table)
                .col(Messages::Status)
                .col(Messages::ReplicaId)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name(INDEX).table(Messages::Table).to_owned())
            .await?;
        m.alter_table(
            Table::alter()
                .table(Messages::Table)
                .drop_column(Messages::ReplicaId)
                .to_owned(),
        )
        .await
    }
}
