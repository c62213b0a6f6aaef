//! The SQLite backend: WAL mode, one file, migrations from `migrations/sqlite/`.
//!
//! Durability: `synchronous = NORMAL` in WAL mode makes a commit durable against a process
//! crash (`kill -9`) — the WAL frames are in the OS before the commit returns — while
//! skipping the fsync per commit that only a power loss would need.
//!
//! Every write of the ledger writer goes through one rusqlite connection on a thread of its
//! own (`record_conn.rs`), whose WAL a checkpointer thread moves into the database file
//! (`checkpointer.rs`); `ffi.rs` holds the calls into C they make. Queries and the
//! directory's writes (teams, keys) go through an sqlx pool.

mod checkpointer;
mod connection;
mod ffi;
mod record_conn;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use self::record_conn::{RecordConnection, Target};
use super::backend::Batch;
use super::sql::{from_i64, hash_from_hex, hash_to_hex, models_from_json, models_to_json, period_from_str, to_i64};
use super::{
    GroupBy, KeyRow, LedgerError, LogFilter, LogPage, RequestRecord, SpendFilter, SpendGroup, SpendTotals, TeamRow,
    UsageSource,
};
use crate::policy::budget::BudgetSpec;
use crate::policy::pricing::{NanoUsd, Usage};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct SqliteBackend {
    /// Queries, and the directory's writes.
    pool: SqlitePool,
    /// The ledger writer's own connection. Each connection has its own page cache, and
    /// SQLite empties it whenever another connection has written since: batches taking
    /// turns on the pool's connections would re-read their pages every time.
    records: Arc<RecordConnection>,
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
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        // The migrations created the file; an in-memory database has none.
        let file = options.get_filename();
        let target = if file.is_file() { Target::File(file.to_path_buf()) } else { Target::Memory(file.to_path_buf()) };
        Ok(SqliteBackend { pool, records: Arc::new(RecordConnection::new(target, busy_timeout)) })
    }

    pub async fn close(&self) {
        self.records.close().await;
        self.pool.close().await;
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies a batch (see `Backend::apply`) on the record connection.
    pub async fn apply(&self, batch: &Batch) -> Result<(), LedgerError> {
        self.records.apply(batch).await
    }

    pub async fn mark_interrupted(&self) -> Result<u64, LedgerError> {
        self.records.mark_interrupted().await
    }

    super::sql::directory_queries!(
        sqlx::Sqlite,
        // A transaction that reads and then writes takes the write lock up front: a deferred
        // one fails at once with SQLITE_BUSY (no busy wait) when another connection — the
        // server's ledger writer, while the CLI creates a key — commits between the two.
        begin_write = "BEGIN IMMEDIATE"
    );

    super::sql::report_queries!(sqlx::Sqlite, day = "strftime('%Y-%m-%d', time_ms / 1000, 'unixepoch')", int = "");
}

super::sql::row_mappers!(SqliteRow);

#[cfg(test)]
mod tests {
    use crate::ledger::{Backend, RequestRecord, SpendFilter, UsageSource};
    use crate::policy::pricing::{NanoUsd, Usage};

    fn record(id: &str, source: UsageSource) -> RequestRecord {
        RequestRecord {
            request_id: id.into(),
            time_ms: 1_700_000_000_000,
            key_id: "k".into(),
            team: "t".into(),
            endpoint: "chat.completions",
            model: "gpt-4o".into(),
            served_model: "gpt-4o".into(),
            usage: Usage { input_tokens: 1, cached_input_tokens: 0, output_tokens: 1 },
            cost: NanoUsd(5),
            usage_source: source,
            status: 200,
            latency_ms: 1,
            stream: false,
        }
    }

    /// An in-memory database is reached by the record connection too (shared cache, by the
    /// name sqlx gave it), on a current-thread runtime: what the writer writes, queries read.
    #[tokio::test]
    async fn an_in_memory_database_takes_the_writers_writes() {
        let db = Backend::connect("sqlite::memory:").await.unwrap();
        db.insert_records(&[record("req_a", UsageSource::Pending), record("req_b", UsageSource::Reported)])
            .await
            .unwrap();
        db.retract(&[record("req_a", UsageSource::Pending)]).await.unwrap();
        assert_eq!(db.mark_interrupted(&[]).await.unwrap(), 0, "the retracted entry is gone");
        assert_eq!(db.spend(&SpendFilter::default(), &[]).await.unwrap().0.requests, 1);
        db.close().await;
    }
}
