//! Messages form a tree: each has a `parent_id` (NULL for a chat's first message) and a
//! `depth` (its position in its branch, from 1), and a chat has an active leaf
//! (`active_message_id`). Regenerating a reply or editing a message adds a sibling instead of
//! replacing anything, and the active leaf says which branch the chat shows and answers from.
//!
//! `chats.message_count` now counts the active branch (= the active leaf's depth);
//! `chats.last_seq` takes over its old second job, numbering messages in the order they were
//! written.
//!
//! Existing chats become one branch: messages in sequence order, each the child of the one
//! before, the newest one active. The statements are plain SQL both back-ends run alike.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000001_message_tree"
    }
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    ChatId,
    ParentId,
    Depth,
}

#[derive(DeriveIden)]
enum Chats {
    Table,
    ActiveMessageId,
    LastSeq,
}

const INDEX: &str = "idx_messages_chat_parent";

/// Fills the new columns of existing rows (one branch per chat).
const BACKFILL: [&str; 3] = [
    "UPDATE messages SET \
       parent_id = (SELECT p.id FROM messages p \
                    WHERE p.chat_id = messages.chat_id AND p.seq < messages.seq \
                    ORDER BY p.seq DESC LIMIT 1), \
       depth = (SELECT COUNT(*) FROM messages p \
                WHERE p.chat_id = messages.chat_id AND p.seq <= messages.seq)",
    "UPDATE chats SET \
       last_seq = COALESCE((SELECT MAX(m.seq) FROM messages m WHERE m.chat_id = chats.id), 0), \
       message_count = (SELECT COUNT(*) FROM messages m WHERE m.chat_id = chats.id)",
    "UPDATE chats SET active_message_id = \
       (SELECT m.id FROM messages m WHERE m.chat_id = chats.id ORDER BY m.seq DESC LIMIT 1)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        m.alter_table(
            Table::alter()
                .table(Messages::Table)
                .add_column(ColumnDef::new(Messages::ParentId).uuid().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Messages::Table)
                .add_column(
                    ColumnDef::new(Messages::Depth)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Chats::Table)
                .add_column(ColumnDef::new(Chats::ActiveMessageId).uuid().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Chats::Table)
                .add_column(
                    ColumnDef::new(Chats::LastSeq)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        // Children of a message: switching branches walks down, paging walks up by id.
        m.create_index(
            Index::create()
                .name(INDEX)
                .table(Messages::Table)
                .col(Messages::ChatId)
                .col(Messages::ParentId)
                .to_owned(),
        )
        .await?;
        let db = m.get_connection();
        for sql in BACKFILL {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Back to one list per chat: the seed's API pages every message by `seq`, which
        // keeps all branches, so nothing is lost; the count goes back to counting them all.
        m.get_connection()
            .execute_unprepared(
                "UPDATE chats SET message_count = \
                   (SELECT COUNT(*) FROM messages m WHERE m.chat_id = chats.id)",
            )
            .await?;
        m.drop_index(Index::drop().name(INDEX).table(Messages::Table).to_owned())
            .await?;
        for (table, col) in [
            (Messages::Table.into_iden(), Messages::ParentId.into_iden()),
            (Messages::Table.into_iden(), Messages::Depth.into_iden()),
            (Chats::Table.into_iden(), Chats::ActiveMessageId.into_iden()),
            (Chats::Table.into_iden(), Chats::LastSeq.into_iden()),
        ] {
            m.alter_table(Table::alter().table(table).drop_column(col).to_owned())
                .await?;
        }
        Ok(())
    }
}
