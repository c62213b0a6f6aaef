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
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use super::{
    from_i64, latest_per_request, models_from_json, models_to_json, period_from_str, pow2_split, record_columns,
    to_i64, Column, GroupBy, KeyRow, LedgerError, LogFilter, LogPage, RequestRecord, SpendFilter, SpendGroup,
    SpendTotals, TeamRow, UsageSource, INSERT_INTO, RECORD_COLUMNS, UPSERT,
};
use crate::budget::BudgetSpec;
use crate::pricing::NanoUsd;
use crate::pricing::Usage;

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
/// statement binds the records where they lie (see [`Upsert`]). Writes are blocking
/// calls (see `SqliteBackend::write_records`). Opened by the first batch: only the server's
/// writer writes batches here, not the CLI or the tests' current-thread runtimes.
struct Rows {
    file: PathBuf,
    busy_timeout: Duration,
    conn: Mutex<Option<RecordConn>>,
    /// Started with the record connection; stops when this is dropped.
    checkpointer: OnceLock<Checkpointer>,
}

/// The record connection and its prepared upserts, one per statement size.
struct RecordConn {
    /// By the log2 of the statement's rows. Declared before `conn` because fields drop in
    /// order: a statement is finalized before its connection closes.
    upserts: [Option<Upsert>; UPSERT_SIZES],
    conn: rusqlite::Connection,
}

/// Statement sizes on the record connection: 1, 2, 4, … [`SLICE_ROWS`] rows.
const UPSERT_SIZES: usize = SLICE_ROWS.ilog2() as usize + 1;

impl Rows {
    fn new(file: &Path, busy_timeout: Duration) -> Rows {
        Rows { file: file.to_path_buf(), busy_timeout, conn: Mutex::new(None), checkpointer: OnceLock::new() }
    }

    fn open(&self) -> Result<RecordConn, LedgerError> {
        let conn = open_connection(&self.file, self.busy_timeout)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // A batch of several statements runs in one transaction, so each statement keeps a
        // statement journal (the pages it changes, as they were) and SQLite spills one past
        // 64 KiB to a temporary file: per batch a file created and removed and a `pwrite`
        // per page. In memory it is a copy of each page and nothing else, and the writer
        // needs no writable temporary folder (a container with a read-only root has none).
        // The CPU it saves is within the benchmark's noise (docs/benchmarks.md).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // The checkpointer thread moves the WAL into the database; this connection does it
        // itself only past the backstop (see `Checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
        self.checkpointer.get_or_init(|| Checkpointer::start(&self.file, self.busy_timeout));
        Ok(RecordConn { upserts: Default::default(), conn })
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
        let record_conn = match &mut *guard {
            Some(conn) => conn,
            // Not opened yet, or the last attempt failed (the writer retries the batch).
            empty => empty.insert(self.open()?),
        };
        let RecordConn { upserts, conn } = record_conn;
        if let [only] = chunks[..] {
            // One statement is atomic by itself, and outside a transaction it needs no
            // statement journal.
            return upsert(upserts, conn, only);
        }
        // Immediate: see `begin_write` above.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            upsert(upserts, &tx, chunk)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// WAL pages past which the record connection checkpoints at its own commit, as SQLite does
/// past 1,000 pages by default: a backstop for a checkpointer that gets no CPU for a while
/// (a machine busy to its last cycle). 16,384 pages are 64 MiB of WAL.
const WAL_BACKSTOP_PAGES: u32 = 16_384;

/// How often the checkpointer moves what the WAL gained into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A thread of its own that checkpoints the WAL (`PRAGMA wal_checkpoint(PASSIVE)`) on a
/// connection of its own, at the lowest CPU priority (`SCHED_IDLE` on Linux).
///
/// SQLite checkpoints at the commit that takes the WAL past 1,000 pages, on the committing
/// connection: the record connection, which then copied ~1,000 pages from the WAL into the
/// database and synced both, several milliseconds on one core with no point at which the
/// thread gave it up. With every core busy serving, a request worker waited that long for
/// its core, and so did every request on it (`perf sched`: the ledger thread ran 4–5 ms at a
/// stretch; c=64's p99 fell to ~nginx's with no database writes at all). An idle-class
/// thread gives its core up whenever any other thread wants it, so a checkpoint fills the
/// cores' idle moments instead. A passive checkpoint takes no lock a writer or reader waits
/// for, and its fsyncs, the only ones `synchronous = NORMAL` makes, leave the writer too.
struct Checkpointer {
    /// Dropped with the `Rows`: the thread sees the channel closed and ends.
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(file: &Path, busy_timeout: Duration) -> Checkpointer {
        let (stop, stopped) = std::sync::mpsc::channel();
        let file = file.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("tollgate-checkpoint".into())
            .spawn(move || Checkpointer::run(&file, busy_timeout, &stopped));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no checkpointer thread; the record connection checkpoints past its backstop");
        }
        Checkpointer { _stop: stop }
    }

    fn run(file: &Path, busy_timeout: Duration, stopped: &std::sync::mpsc::Receiver<()>) {
        lowest_priority();
        // A checkpoint syncs the WAL and the database file as `synchronous` says.
        let conn = match open_connection(file, busy_timeout) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "checkpointer cannot open the database; the record connection checkpoints past its backstop");
                return;
            }
        };
        let mut failing = false;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
            // A passive checkpoint copies what no reader still needs and never waits; what
            // it leaves, the next one takes. With nothing new in the WAL it reads only the
            // shared-memory index.
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                }
                Err(_) => {}
            }
        }
    }
}

/// Puts the calling thread in the idle scheduling class: it runs only on a core that
/// nothing else wants, and any other thread that wakes there preempts it.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param`.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "checkpointer keeps its priority");
        }
    }
}

/// A rusqlite connection to the ledger's file, set up as sqlx's connections are in
/// `connect` (WAL mode is the file's, set by them; these are each connection's own).
fn open_connection(file: &Path, busy_timeout: Duration) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Runs the upsert of `chunk.len()` rows (a power of two), preparing it on first use.
fn upsert(
    upserts: &mut [Option<Upsert>; UPSERT_SIZES],
    conn: &rusqlite::Connection,
    chunk: &[&RequestRecord],
) -> Result<(), LedgerError> {
    let slot = &mut upserts[chunk.len().ilog2() as usize];
    let statement = match slot {
        Some(statement) => statement,
        empty => empty.insert(Upsert::prepare(conn, SqliteBackend::insert_sql(chunk.len()))?),
    };
    statement.run(conn, chunk)
}

/// A prepared multi-row upsert on the record connection, driven through SQLite's C API
/// because rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite then copies each of a
/// row's seven texts into memory of its own (`malloc` under its allocator's mutex) and frees
/// the copies when the statement is reset. Bound as `SQLITE_STATIC`, SQLite reads them
/// where they lie while the statement runs, and [`Upsert::run`] unbinds them before it
/// returns. (callgrind: the binding and unbinding were ~19% of the ledger thread's
/// instructions; see docs/benchmarks.md.)
struct Upsert(std::ptr::NonNull<rusqlite::ffi::sqlite3_stmt>);

// SAFETY: a statement belongs to its connection, which is `Send` and opened with
// SQLITE_OPEN_NO_MUTEX; both only move between threads together, inside `Rows`' mutex,
// and are used by one thread at a time.
unsafe impl Send for Upsert {}

impl Upsert {
    fn prepare(conn: &rusqlite::Connection, sql: &str) -> Result<Upsert, LedgerError> {
        use rusqlite::ffi;
        let len = std::ffi::c_int::try_from(sql.len()).map_err(|_| too_big())?;
        let mut statement = std::ptr::null_mut();
        // SAFETY: the handle is the live connection's; `sql` is valid for `len` bytes.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                conn.handle(),
                sql.as_ptr().cast(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut statement,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(failure(conn, rc));
        }
        std::ptr::NonNull::new(statement).map(Upsert).ok_or_else(|| failure(conn, ffi::SQLITE_MISUSE))
    }

    /// Binds `chunk`'s records (as many as the statement has rows) and runs the statement.
    fn run(&mut self, conn: &rusqlite::Connection, chunk: &[&RequestRecord]) -> Result<(), LedgerError> {
        use rusqlite::ffi;
        use std::ffi::c_int;
        let statement = self.0.as_ptr();
        // Reset and unbound on every way out of here, so that no pointer into `chunk` stays
        // with the statement once its texts may be freed.
        let _unbind = Unbind(statement);
        for (row, r) in chunk.iter().enumerate() {
            for (i, column) in record_columns(r).into_iter().enumerate() {
                // Parameters count from 1.
                let at = c_int::try_from(row * RECORD_COLUMNS + i + 1).map_err(|_| too_big())?;
                // SAFETY: `statement` is live; a text stays valid (it is borrowed from
                // `chunk`) until `_unbind` unbinds it, after the statement has run.
                let rc = match column {
                    Column::Text(v) => {
                        let len = c_int::try_from(v.len()).map_err(|_| too_big())?;
                        // An empty text as rusqlite binds one: a pointer that is always valid.
                        let text = if v.is_empty() { c"".as_ptr() } else { v.as_ptr().cast() };
                        unsafe { ffi::sqlite3_bind_text(statement, at, text, len, ffi::SQLITE_STATIC()) }
                    }
                    Column::Int(v) => unsafe { ffi::sqlite3_bind_int64(statement, at, v) },
                    Column::Bool(v) => unsafe { ffi::sqlite3_bind_int64(statement, at, i64::from(v)) },
                };
                if rc != ffi::SQLITE_OK {
                    return Err(failure(conn, rc));
                }
            }
        }
        // SAFETY: every parameter is bound (the statement has `chunk.len()` rows).
        match unsafe { ffi::sqlite3_step(statement) } {
            ffi::SQLITE_DONE => Ok(()),
            rc => Err(failure(conn, rc)),
        }
    }
}

impl Drop for Upsert {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once; its connection is still open
        // (`RecordConn` drops its statements first).
        unsafe { rusqlite::ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

/// Resets a statement and clears its bindings when dropped.
struct Unbind(*mut rusqlite::ffi::sqlite3_stmt);

impl Drop for Unbind {
    fn drop(&mut self) {
        // SAFETY: the statement is live (its `Upsert` outlives this guard). The codes these
        // return repeat the step's, already reported.
        unsafe {
            rusqlite::ffi::sqlite3_reset(self.0);
            rusqlite::ffi::sqlite3_clear_bindings(self.0);
        }
    }
}

/// The error SQLite reported for `rc` on `conn`, with its message.
fn failure(conn: &rusqlite::Connection, rc: std::ffi::c_int) -> LedgerError {
    // SAFETY: the handle is the live connection's; the message is copied at once.
    let message = unsafe {
        let text = rusqlite::ffi::sqlite3_errmsg(conn.handle());
        (!text.is_null()).then(|| std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rc), message).into()
}

fn too_big() -> LedgerError {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG), None).into()
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
