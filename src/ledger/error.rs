//! The ledger's one error type.

/// A ledger failure. The message is for logs; clients get a generic error.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the SQLite connection that does the ledger writer's writes (`sqlite/record_conn.rs`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The thread of the SQLite record connection could not be started, or stopped (a
    /// panic) before it answered; the next write starts it again.
    #[error("the SQLite record connection's thread stopped: {0}")]
    RecordThread(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("journal: {0}")]
    Journal(#[from] std::io::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// This replica's lease on its reservations ran out (it could not renew it in time); it
    /// holds nothing more until it renews.
    #[error("this replica's reservation lease has run out")]
    LeaseExpired,
    /// Redis, which holds budgets and rate windows when `redis_url` is set.
    #[error("redis: {0}")]
    Redis(String),
    #[error("unsupported database url: {0}")]
    UnsupportedUrl(String),
}
