//! The SQLite backend: WAL mode, one file, migrations from `migrations/sqlite/`.
//!
//! Durability: `synchronous = NORMAL` in WAL mode makes a commit durable against a process
//! crash (`kill -9`) — the WAL frames are in the OS before the commit returns — while
//! skipping the fsync per commit that only a power loss would need.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use super::{
    from_i64, latest_per_request, pow2_chunks, to_i64, RECORD_COLUMNS, UPSERT, models_from_json, models_to_json, period_from_str, GroupBy, KeyRow, LedgerError, LogFilter, LogPage,
    RequestRecord, SpendFilter, SpendGroup, SpendTotals, TeamRow, UsageSource,
};
use crate::budget::BudgetSpec;
use crate::metering::usage::Usage;
use crate::pricing::NanoUsd;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct SqliteBackend {
    pool: SqlitePool,
    /// The ledger writer's own connection (record batches, retractions). Each connection
    /// has its own page cache, and SQLite empties it whenever another connection has
    /// written since; batches taking turns on the pool's connections re-read their pages
    /// every time.
    writer: SqlitePool,
}

impl SqliteBackend {
    pub async fn connect(url: &str, busy_timeout: Duration) -> Result<SqliteBackend, LedgerError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout)
            .foreign_keys(true);
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| LedgerError::Db(sqlx::Error::Io(e)))?;
            }
        }
        let pool_of = |max_connections| {
            SqlitePoolOptions::new()
                .max_connections(max_connections)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
        };
        let pool = pool_of(4).await?;
        MIGRATOR.run(&pool).await?;
        let writer = pool_of(1).await?;
        Ok(SqliteBackend { pool, writer })
    }

    /// Where record batches go.
    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    super::shared_queries!(
        sqlx::Sqlite,
        day = "strftime('%Y-%m-%d', time_ms / 1000, 'unixepoch')",
        int = "",
        // SQLite binds at most 32,766 parameters a statement.
        max_rows = 32_000 / RECORD_COLUMNS,
        // A transaction that reads and then writes takes the write lock up front: a deferred
        // one fails at once with SQLITE_BUSY (no busy wait) when another connection — the
        // server's ledger writer, while the CLI creates a key — commits between the two.
        begin_write = "BEGIN IMMEDIATE"
    );
}

super::row_mappers!(SqliteRow);



pub(crate) fn hash_to_hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn hash_from_hex(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = hex.get(i * 2..i * 2 + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    out
}
