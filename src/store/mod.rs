//! Persistence on sea-orm, for SQLite and PostgreSQL with the same code.
//!
//! Tenant data is reached only through [`TenantScope`], which every query of chats, users and
//! messages goes through and which adds the tenant filter itself. A [`TenantId`] cannot be
//! made outside this crate except by authenticating a key, so a handler cannot reach another
//! tenant's rows, and code that forgets the tenant does not compile.

mod audit;
mod chats;
mod entity;
mod error;
mod json;
mod keys;
mod messages;
mod search;
mod tenants;
mod transfer;
mod usage;

pub use audit::{AuditEntry, AuditFilter, AuditRecord, AuditTenant};
pub use error::StoreError;
pub use keys::{KeyAuth, KeyInfo, KeyOwner, KeySpec, UserToken, MAX_KEY_NAME_CHARS};
pub use messages::ReplyUpdate;
pub use search::{ChatMatch, SearchQuery};
pub use tenants::{validate_tenant_name, TenantInfo};
pub use usage::{UsageGroup, UsageRow, UserUsage};

use std::sync::Arc;
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use uuid::Uuid;

/// The id of an authenticated tenant. Only the store hands these out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId(Uuid);

impl TenantId {
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Unit tests of code above the store need ids without a database.
    #[cfg(test)]
    pub(crate) fn from_uuid(id: Uuid) -> TenantId {
        TenantId(id)
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Connection settings for [`Store::connect`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before it is told the database is
    /// unavailable; keeps an outage from turning into hung requests.
    pub acquire_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The database, migrated and ready. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// This process's replica id in cluster mode (recorded on the replies it generates).
    replica: Option<Arc<str>>,
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Puts a SQLite database in WAL mode (persistent in the file), retrying briefly: the switch
/// needs a moment without other connections in a transaction (another process, say).
async fn enable_wal(url: &str) -> Result<(), StoreError> {
    let mut co = ConnectOptions::new(url.to_string());
    co.max_connections(1).min_connections(0).sqlx_logging(false);
    co.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .create_if_missing(true)
    });
    let mut last = None;
    for attempt in 0..50u64 {
        match Database::connect(co.clone()).await {
            Ok(db) => {
                db.close().await.ok();
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20 * (attempt + 1).min(10))).await;
    }
    Err(StoreError::from(last.unwrap_or_else(|| {
        sea_orm::DbErr::Custom("cannot open the SQLite database".into())
    })))
}

/// The PostgreSQL advisory lock migrations run under ("confab" in ASCII).
const MIGRATION_LOCK: i64 = 0x63_6f_6e_66_61_62;

/// Applies pending migrations holding [`MIGRATION_LOCK`], so replicas starting together on
/// one database migrate it once: the first applies them, the others wait and then find
/// nothing to do. (Without it, concurrent `CREATE TABLE`s failed every replica but one.)
/// A session-level lock, so it runs on a connection of its own, released by closing it
/// even if a migration fails.
async fn migrate_locked(url: &str, opts: &StoreOptions) -> Result<(), StoreError> {
    let mut co = ConnectOptions::new(url.to_string());
    co.max_connections(1)
        .min_connections(1)
        .acquire_timeout(opts.acquire_timeout)
        .connect_timeout(opts.acquire_timeout)
        .sqlx_logging(false);
    let db = Database::connect(co).await.map_err(StoreError::from)?;
    let migrated = async {
        db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
            .await?;
        Migrator::up(&db, None).await?;
        db.execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
            .await?;
        Ok::<_, sea_orm::DbErr>(())
    }
    .await;
    db.close().await.ok();
    migrated.map_err(StoreError::from)
}

impl Store {
    /// Connects, applies pending migrations and returns the store.
    ///
    /// SQLite runs in WAL mode (readers never wait for the writer) with a busy timeout, and
    /// with foreign keys on so that deleting a chat takes its messages along.
    pub async fn connect(url: &str, opts: &StoreOptions) -> Result<Store, StoreError> {
        let backend = Backend::of_url(url).ok_or_else(|| {
            StoreError::Config(format!(
                "unsupported database URL {:?}: use sqlite://PATH?mode=rwc or postgres://USER@HOST/DB",
                redact_url(url)
            ))
        })?;
        let mut co = ConnectOptions::new(url.to_string());
        co.max_connections(opts.max_connections)
            .min_connections(1)
            .acquire_timeout(opts.acquire_timeout)
            .connect_timeout(opts.acquire_timeout)
            .sqlx_logging(false);
        if backend == Backend::Sqlite {
            enable_wal(url).await?;
            // No journal_mode here: it is set once above. Setting it on every new pool
            // connection needs a lock that busy_timeout does not wait for, and fails with
            // "database is locked" when a connection opens while another one writes.
            co.map_sqlx_sqlite_opts(|o| {
                o.synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    .create_if_missing(true)
            });
        }
        let db = Database::connect(co).await.map_err(StoreError::from)?;
        match backend {
            Backend::Sqlite => Migrator::up(&db, None).await.map_err(StoreError::from)?,
            Backend::Postgres => migrate_locked(url, opts).await?,
        }
        Ok(Store { db, replica: None })
    }

    /// The same store, recording `replica` as the generator of the replies it saves.
    pub fn for_replica(mut self, replica: &str) -> Store {
        self.replica = Some(replica.into());
        self
    }

    /// The store seen by one tenant.
    pub fn tenant(&self, tenant: TenantId) -> TenantScope<'_> {
        TenantScope {
            db: &self.db,
            tenant: tenant.0,
            user: None,
            replica: self.replica.as_deref(),
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await.map_err(StoreError::from)
    }

    /// Closes the pool (used at shutdown so SQLite checkpoints its WAL).
    pub async fn close(self) -> Result<(), StoreError> {
        self.db.close().await.map_err(StoreError::from)
    }
}

/// Every read and write of one tenant's chats, users and messages.
pub struct TenantScope<'a> {
    db: &'a DatabaseConnection,
    tenant: Uuid,
    /// Only this user's chats exist (a user-scoped token): another user's chat is as
    /// invisible as another tenant's.
    user: Option<&'a str>,
    replica: Option<&'a str>,
}

impl<'a> TenantScope<'a> {
    /// The same scope narrowed to one user's chats (`None`: all the tenant's).
    pub fn only_user(mut self, user: Option<&'a str>) -> Self {
        self.user = user;
        self
    }

    /// Whose chats this scope reaches, as the chat queries take it.
    fn owner(&self) -> chats::Owner {
        chats::Owner {
            tenant: self.tenant,
            user: self.user.map(str::to_string),
        }
    }
}

/// Hides the password of a database URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
