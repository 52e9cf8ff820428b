//! The storage layer's error, classified once here so that callers never inspect messages.

use sea_orm::{sqlx, DbErr, RuntimeErr};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist for this tenant (it may exist for another).
    #[error("not found")]
    NotFound,
    /// The chat exists but holds no message with this id.
    #[error("message {0} not found")]
    MessageNotFound(uuid::Uuid),
    /// The write collides with existing data, e.g. a tenant name already taken.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached right now; retrying later may work.
    #[error("database unavailable")]
    Unavailable(#[source] DbErr),
    /// The input breaks a rule the store enforces (e.g. the shape of a tenant name).
    #[error("{0}")]
    Invalid(String),
    /// The database URL or settings are wrong.
    #[error("{0}")]
    Config(String),
    /// A stored value does not decode; data was written by something else.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error")]
    Other(#[source] DbErr),
}

fn sqlx_is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    ) || matches!(e, sqlx::Error::Database(d) if is_unavailable_code(d.code().as_deref()))
}

/// Codes for "the database cannot do this now; the same statement may work shortly".
/// PostgreSQL: class 08 is connection exceptions, 57P01–57P03 shutdown and startup, 55P03 a
/// lock that could not be had (`lock_timeout`), 57014 a statement cancelled by
/// `statement_timeout`. SQLite (extended result codes, numeric): 5 `SQLITE_BUSY` ("database
/// is locked" after the busy timeout) with its extended forms 261, 517 and 773, 6
/// `SQLITE_LOCKED` and 262. The two sets cannot collide (five characters vs digits).
fn is_unavailable_code(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c.starts_with("08")
                || matches!(
                    c,
                    "57P01"
                        | "57P02"
                        | "57P03"
                        | "55P03"
                        | "57014"
                        | "5"
                        | "261"
                        | "517"
                        | "773"
                        | "6"
                        | "262"
                )
        }
        None => false,
    }
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        let unavailable = match &e {
            DbErr::ConnectionAcquire(_) => true,
            DbErr::Conn(RuntimeErr::SqlxError(s))
            | DbErr::Exec(RuntimeErr::SqlxError(s))
            | DbErr::Query(RuntimeErr::SqlxError(s)) => sqlx_is_unavailable(s),
            DbErr::Conn(_) => true,
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(e)
        } else {
            StoreError::Other(e)
        }
    }
}

impl From<sea_orm::TransactionError<StoreError>> for StoreError {
    fn from(e: sea_orm::TransactionError<StoreError>) -> Self {
        match e {
            sea_orm::TransactionError::Connection(db) => db.into(),
            sea_orm::TransactionError::Transaction(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_unavailable_code;

    #[test]
    fn lock_timeouts_are_unavailable_not_internal() {
        for c in ["5", "261", "517", "6", "55P03", "57014", "08006", "57P01"] {
            assert!(is_unavailable_code(Some(c)), "{c}");
        }
        for c in ["19", "2067", "23505", "42P01"] {
            assert!(!is_unavailable_code(Some(c)), "{c}");
        }
        assert!(!is_unavailable_code(None));
    }
}
