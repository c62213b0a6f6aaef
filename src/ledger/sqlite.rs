//! The SQLite backend: WAL mode, one file, migrations from `migrations/sqlite/`.
//!
//! Durability: `synchronous = NORMAL` in WAL mode makes a commit durable against a process
//! crash (`kill -9`) — the WAL frames are in the OS before the commit returns — while
//! skipping the fsync per commit that only a power loss would need.
//!
//! Record batches, the one write on the hot path, go through a connection of their own
//! opened with rusqlite (see [`Rows`]); everything else goes through sqlx.

use std::borrow::Borrow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use super::{
    from_i64, latest_per_request, pow2_split, record_columns, to_i64, Column, INSERT_INTO, RECORD_COLUMNS, UPSERT, models_from_json, models_to_json, period_from_str, GroupBy, KeyRow, LedgerError, LogFilter, LogPage,
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
    /// The connection record batches are written on; `None` for an in-memory database,
    /// which only sqlx's connections share (batches then go through `writer`).
    rows: Option<Arc<Rows>>,
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
        // The migrations created the file; an in-memory database has none.
        let file = options.get_filename();
        let rows = file.is_file().then(|| Arc::new(Rows::new(file, busy_timeout)));
        Ok(SqliteBackend { pool, writer, rows })
    }

    /// Writes a batch of records as `insert_records` does: on the record connection, as a
    /// blocking call, when this runs on a multi-threaded runtime (the server's), where the
    /// worker hands its other tasks to another thread meanwhile. On a current-thread runtime
    /// (tests, the CLI) nothing else would run while it blocks, not even an sqlx transaction
    /// holding the write lock it waits for: the batch goes through sqlx there.
    pub async fn write_records<R: Borrow<RequestRecord> + Sync>(&self, records: &[R]) -> Result<(), LedgerError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi_threaded = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        match &self.rows {
            Some(rows) if multi_threaded => {
                let records = latest_per_request(records);
                tokio::task::block_in_place(|| rows.insert(&records))
            }
            _ => self.insert_records(records).await,
        }
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
        max_rows = MAX_ROWS,
        // A transaction that reads and then writes takes the write lock up front: a deferred
        // one fails at once with SQLITE_BUSY (no busy wait) when another connection — the
        // server's ledger writer, while the CLI creates a key — commits between the two.
        begin_write = "BEGIN IMMEDIATE"
    );
}

super::row_mappers!(SqliteRow);

/// SQLite binds at most 32,766 parameters a statement.
const MAX_ROWS: usize = 32_000 / RECORD_COLUMNS;

/// Rows per statement on the record connection. A batch is written in slices of this
/// many, and between two the writer thread yields its CPU (`sched_yield`): with every core
/// busy serving, a whole batch (up to 1,024 records, ~3 ms of CPU) written in one go took a
/// core from a request worker for milliseconds, and every request on that worker waited.
/// `bench/ab.sh` at c=64, non-streamed (three runs): p99 4.24 → 3.27, 4.31 → 3.27 and
/// 4.52 → 3.81 ms, requests/s +3–6%; streamed, 5.20 → 4.77 ms. Slices of 128 rows without
/// the yield: 4.04 ms; of 32 with it: 3.73 ms. (With no database writes at all: 3.03 ms.)
const SLICE_ROWS: usize = 128;
const _: () = assert!(SLICE_ROWS.is_power_of_two() && SLICE_ROWS <= MAX_ROWS);

/// The connection that writes record batches, with rusqlite. Through sqlx, each text
/// argument of a row was copied to be sent to sqlx's connection thread, and the copy freed
/// after the statement (callgrind: ~3k instructions a proxied request, 3% of all). Here the
/// statement binds the records where they lie. Writes are blocking
/// calls (see `SqliteBackend::write_records`). Opened by the first batch: only the server's
/// writer writes batches here, not the CLI or the tests' current-thread runtimes.
struct Rows {
    file: PathBuf,
    busy_timeout: Duration,
    conn: Mutex<Option<rusqlite::Connection>>,
}

impl Rows {
    fn new(file: &Path, busy_timeout: Duration) -> Rows {
        Rows { file: file.to_path_buf(), busy_timeout, conn: Mutex::new(None) }
    }

    fn open(&self) -> Result<rusqlite::Connection, LedgerError> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.file,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // As sqlx's connections are set up in `connect` (WAL mode is the file's, set by them;
        // these are each connection's own).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // A batch of several statements runs in one transaction, so each statement keeps a
        // statement journal (the pages it changes, as they were) and SQLite spills one past
        // 64 KiB to a temporary file: per batch a file created and removed and a `pwrite`
        // per page. In memory it is a copy of each page and nothing else, and the writer
        // needs no writable temporary folder (a container with a read-only root has none).
        // The CPU it saves is within the benchmark's noise (docs/benchmarks.md).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }

    /// Writes `records` (one per request) as multi-row upserts of a power of two of rows,
    /// at most [`SLICE_ROWS`] each; more than one statement runs in one transaction, and
    /// the thread yields its CPU between them.
    fn insert(&self, records: &[&RequestRecord]) -> Result<(), LedgerError> {
        let chunks = pow2_split(records, SLICE_ROWS);
        if chunks.is_empty() {
            return Ok(());
        }
        // A panic while holding the lock leaves no open transaction: dropping one rolls it back.
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = match &mut *guard {
            Some(conn) => conn,
            // Not opened yet, or the last attempt failed (the writer retries the batch).
            empty => empty.insert(self.open()?),
        };
        if let [only] = chunks[..] {
            // One statement is atomic by itself, and outside a transaction it needs no
            // statement journal.
            return insert_chunk(conn, only);
        }
        // Immediate: see `begin_write` above.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            insert_chunk(&tx, chunk)?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn insert_chunk(conn: &rusqlite::Connection, chunk: &[&RequestRecord]) -> Result<(), LedgerError> {
    let mut statement = conn.prepare_cached(SqliteBackend::insert_sql(chunk.len()))?;
    for (row, r) in chunk.iter().enumerate() {
        for (i, column) in record_columns(r).into_iter().enumerate() {
            // Parameters count from 1.
            let at = row * RECORD_COLUMNS + i + 1;
            match column {
                Column::Text(v) => statement.raw_bind_parameter(at, v),
                Column::Int(v) => statement.raw_bind_parameter(at, v),
                Column::Bool(v) => statement.raw_bind_parameter(at, v),
            }?;
        }
    }
    statement.raw_execute()?;
    Ok(())
}

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
