//! Full-text search over chat titles and message text, with each database's own engine.
//!
//! **SQLite**: an FTS5 table (`search_fts`, Porter stemmer over Unicode words, diacritics
//! folded) holds one document per chat title and per message. Its rowids come from
//! `search_docs`, an ordinary table whose `INTEGER PRIMARY KEY` maps each document to its chat
//! and message: `messages` has no integer key of its own (its implicit rowid may change on
//! `VACUUM`, which would silently detach an external-content index). Triggers keep both in
//! step with every insert, text change and delete, so no code path can forget to.
//!
//! **PostgreSQL**: GIN indexes on `to_tsvector('english', …)` of message text and titles;
//! queries use the same expression, so the planner takes the index.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000002_search"
    }
}

const SQLITE_UP: &[&str] = &[
    "CREATE TABLE search_docs ( \
       id INTEGER PRIMARY KEY, \
       chat_id BLOB NOT NULL, \
       message_id BLOB UNIQUE)",
    "CREATE INDEX idx_search_docs_chat ON search_docs (chat_id)",
    "CREATE VIRTUAL TABLE search_fts USING fts5(body, \
       tokenize = 'porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER search_message_insert AFTER INSERT ON messages BEGIN \
       INSERT INTO search_docs (chat_id, message_id) VALUES (new.chat_id, new.id); \
       INSERT INTO search_fts (rowid, body) VALUES (last_insert_rowid(), new.content); \
     END",
    "CREATE TRIGGER search_message_update AFTER UPDATE OF content ON messages \
     WHEN new.content IS NOT old.content BEGIN \
       UPDATE search_fts SET body = new.content \
       WHERE rowid = (SELECT id FROM search_docs WHERE message_id = new.id); \
     END",
    "CREATE TRIGGER search_message_delete AFTER DELETE ON messages BEGIN \
       DELETE FROM search_fts \
       WHERE rowid = (SELECT id FROM search_docs WHERE message_id = old.id); \
       DELETE FROM search_docs WHERE message_id = old.id; \
     END",
    "CREATE TRIGGER search_chat_insert AFTER INSERT ON chats BEGIN \
       INSERT INTO search_docs (chat_id, message_id) VALUES (new.id, NULL); \
       INSERT INTO search_fts (rowid, body) \
       VALUES (last_insert_rowid(), COALESCE(new.title, '')); \
     END",
    "CREATE TRIGGER search_chat_update AFTER UPDATE OF title ON chats \
     WHEN new.title IS NOT old.title BEGIN \
       UPDATE search_fts SET body = COALESCE(new.title, '') \
       WHERE rowid = (SELECT id FROM search_docs \
                      WHERE chat_id = new.id AND message_id IS NULL); \
     END",
    "CREATE TRIGGER search_chat_delete AFTER DELETE ON chats BEGIN \
       DELETE FROM search_fts \
       WHERE rowid IN (SELECT id FROM search_docs WHERE chat_id = old.id); \
       DELETE FROM search_docs WHERE chat_id = old.id; \
     END",
    // What is already stored.
    "INSERT INTO search_docs (chat_id, message_id) SELECT id, NULL FROM chats",
    "INSERT INTO search_docs (chat_id, message_id) SELECT chat_id, id FROM messages",
    "INSERT INTO search_fts (rowid, body) \
     SELECT d.id, COALESCE(c.title, '') FROM search_docs d JOIN chats c ON c.id = d.chat_id \
     WHERE d.message_id IS NULL",
    "INSERT INTO search_fts (rowid, body) \
     SELECT d.id, m.content FROM search_docs d JOIN messages m ON m.id = d.message_id",
];

const SQLITE_DOWN: &[&str] = &[
    "DROP TRIGGER IF EXISTS search_message_insert",
    "DROP TRIGGER IF EXISTS search_message_update",
    "DROP TRIGGER IF EXISTS search_message_delete",
    "DROP TRIGGER IF EXISTS search_chat_insert",
    "DROP TRIGGER IF EXISTS search_chat_update",
    "DROP TRIGGER IF EXISTS search_chat_delete",
    "DROP TABLE IF EXISTS search_fts",
    "DROP TABLE IF EXISTS search_docs",
];

const POSTGRES_UP: &[&str] = &[
    "CREATE INDEX idx_messages_fts ON messages \
     USING GIN (to_tsvector('english'::regconfig, content))",
    "CREATE INDEX idx_chats_title_fts ON chats \
     USING GIN (to_tsvector('english'::regconfig, COALESCE(title, '')))",
];

const POSTGRES_DOWN: &[&str] = &[
    "DROP INDEX IF EXISTS idx_messages_fts",
    "DROP INDEX IF EXISTS idx_chats_title_fts",
];

async fn run(m: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    let db = m.get_connection();
    for sql in statements {
        db.execute_unprepared(sql).await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        match m.get_database_backend() {
            DatabaseBackend::Sqlite => run(m, SQLITE_UP).await,
            DatabaseBackend::Postgres => run(m, POSTGRES_UP).await,
            other => Err(DbErr::Migration(format!(
                "full-text search is built for SQLite and PostgreSQL, not {other:?}"
            ))),
        }
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        match m.get_database_backend() {
            DatabaseBackend::Sqlite => run(m, SQLITE_DOWN).await,
            DatabaseBackend::Postgres => run(m, POSTGRES_DOWN).await,
            _ => Ok(()),
        }
    }
}
