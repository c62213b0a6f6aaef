//! The record connection: one rusqlite connection, on a thread of its own, that does every
//! write of the ledger writer — record batches, retractions, a replay, the interrupted
//! marks — on every runtime, the tests' current-thread ones included.
//!
//! Why a thread: the writes are blocking calls, and a task that blocks holds its runtime
//! thread. On a current-thread runtime nothing else would run meanwhile, not even an sqlx
//! transaction holding the write lock the blocking call waits for; on the server's it would
//! take a worker from the requests. The writer task sends a job and awaits its answer,
//! so its runtime keeps running.
//!
//! Why rusqlite, not sqlx: through sqlx each text argument of a row is copied to be sent to
//! sqlx's connection thread and freed after the statement, for every record. Here the
//! upserts bind the records where they lie (see [`Upsert`]), which the shared batch (`Batch`,
//! an `Arc`) keeps alive for as long as this thread may read it.

use std::path::PathBuf;
use std::sync::{mpsc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use rusqlite::OpenFlags;
use tokio::sync::oneshot;

use super::checkpointer::Checkpointer;
use super::connection::open_connection;
use super::ffi::Upsert;
use crate::ledger::backend::Batch;
use crate::ledger::journal::LineOp;
use crate::ledger::sql::{latest_per_request, pow2_split, runs, upsert_sql, MARK_INTERRUPTED, RECORD_COLUMNS, RETRACT};
use crate::ledger::{LedgerError, RequestRecord};

/// SQLite binds at most 32,766 parameters a statement.
const MAX_ROWS: usize = 32_000 / RECORD_COLUMNS;

/// Rows per statement on the record connection. A batch is written in slices of this many,
/// and between two the thread yields its CPU (`sched_yield`): with every core busy serving,
/// a whole batch (up to 1,024 records) written in one go takes a core from a request worker
/// for milliseconds, and every request on that worker waits. Smaller slices cost more
/// statements; larger ones hold the core longer.
const SLICE_ROWS: usize = 128;
const _: () = assert!(SLICE_ROWS.is_power_of_two() && SLICE_ROWS <= MAX_ROWS);

/// Statement sizes on the record connection: 1, 2, 4, … [`SLICE_ROWS`] rows.
const UPSERT_SIZES: usize = SLICE_ROWS.ilog2() as usize + 1;

/// WAL pages past which the record connection checkpoints at its own commit, as SQLite does
/// past 1,000 pages by default: a backstop for a checkpointer that gets no CPU for a while
/// (a machine busy to its last cycle). 16,384 pages are 64 MiB of WAL.
const WAL_BACKSTOP_PAGES: u32 = 16_384;

/// Where the record connection's database is.
#[derive(Clone)]
pub(super) enum Target {
    /// A database file (WAL mode, checkpointed by a [`Checkpointer`]).
    File(PathBuf),
    /// An in-memory database, named as sqlx names it (`file:sqlx-in-memory-…`): shared-cache
    /// connections of this process reach it by that name; it has no WAL.
    Memory(PathBuf),
}

/// Work for the thread: run on its connection, or told why there is none.
type Job = Box<dyn FnOnce(Result<&mut RecordConn, LedgerError>) + Send>;

/// The handle every clone of a `SqliteBackend` shares. The thread is started by the first
/// write (so the CLI, which writes no records, never starts one), and again if it ever
/// stopped; it ends when this handle is dropped or closed.
pub(super) struct RecordConnection {
    target: Target,
    busy_timeout: Duration,
    thread: Mutex<Option<Thread>>,
}

struct Thread {
    jobs: mpsc::Sender<Job>,
    /// Closed (sender dropped) when the thread ends.
    ended: oneshot::Receiver<()>,
}

impl RecordConnection {
    pub(super) fn new(target: Target, busy_timeout: Duration) -> RecordConnection {
        RecordConnection { target, busy_timeout, thread: Mutex::new(None) }
    }

    /// Applies a batch in order, in one transaction (see `Backend::apply`).
    pub(super) async fn apply(&self, batch: &Batch) -> Result<(), LedgerError> {
        let batch = batch.clone();
        self.call(move |conn| conn.apply(&batch)).await
    }

    /// Marks every journal entry `interrupted`; returns how many.
    pub(super) async fn mark_interrupted(&self) -> Result<u64, LedgerError> {
        self.call(|conn| Ok(conn.conn.execute(MARK_INTERRUPTED, [])? as u64)).await
    }

    /// Ends the thread once it has done what was sent before, and waits for it.
    pub(super) async fn close(&self) {
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(Thread { jobs, ended }) = thread {
            drop(jobs);
            let _ = ended.await;
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut RecordConn) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let (answer, answered) = oneshot::channel();
        self.send(Box::new(move |conn| {
            let _ = answer.send(conn.and_then(f));
        }))?;
        answered.await.map_err(|_| LedgerError::RecordThread("it stopped before it answered".into()))?
    }

    fn send(&self, job: Job) -> Result<(), LedgerError> {
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match &*thread {
            Some(running) => match running.jobs.send(job) {
                Ok(()) => return Ok(()),
                // It stopped (a panic): start another.
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (jobs, received) = mpsc::channel();
        let (ended_tx, ended) = oneshot::channel::<()>();
        let (target, busy_timeout) = (self.target.clone(), self.busy_timeout);
        std::thread::Builder::new()
            .name("tollgate-ledger-sqlite".into())
            .spawn(move || {
                let _ended = ended_tx;
                serve(&target, busy_timeout, &received);
            })
            .map_err(|e| LedgerError::RecordThread(e.to_string()))?;
        // A fresh receiver is alive: this cannot fail.
        let _ = jobs.send(job);
        *thread = Some(Thread { jobs, ended });
        Ok(())
    }
}

/// The thread: runs jobs in order on its connection, opened on first need and again after
/// a failed open (the writer retries its batch).
fn serve(target: &Target, busy_timeout: Duration, jobs: &mpsc::Receiver<Job>) {
    let mut conn: Option<RecordConn> = None;
    // Started with the connection; stops when the thread ends.
    let checkpointer: OnceLock<Checkpointer> = OnceLock::new();
    for job in jobs {
        let opened = match &mut conn {
            Some(conn) => Ok(conn),
            empty => RecordConn::open(target, busy_timeout).map(|opened| &mut *empty.insert(opened)),
        };
        if let (Ok(_), Target::File(file)) = (&opened, target) {
            checkpointer.get_or_init(|| Checkpointer::start(file, busy_timeout));
        }
        job(opened);
    }
}

/// The record connection and its prepared upserts, one per statement size.
pub(super) struct RecordConn {
    /// By the log2 of the statement's rows. Declared before `conn` because fields drop in
    /// order: a statement is finalized before its connection closes.
    upserts: [Option<Upsert>; UPSERT_SIZES],
    conn: rusqlite::Connection,
}

impl RecordConn {
    fn open(target: &Target, busy_timeout: Duration) -> Result<RecordConn, LedgerError> {
        let conn = match target {
            Target::File(file) => {
                let conn = open_connection(file, busy_timeout)?;
                // The checkpointer thread moves the WAL into the database; this connection
                // does it itself only past the backstop (see `Checkpointer`).
                conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
                conn
            }
            Target::Memory(name) => {
                let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_MEMORY
                    | OpenFlags::SQLITE_OPEN_SHARED_CACHE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = rusqlite::Connection::open_with_flags(name, flags)?;
                conn.busy_timeout(busy_timeout)?;
                conn
            }
        };
        conn.pragma_update(None, "foreign_keys", true)?;
        // A batch of several statements runs in one transaction, so each statement keeps a
        // statement journal (the pages it changes, as they were) and SQLite spills one past
        // 64 KiB to a temporary file: per batch a file created and removed and a `pwrite`
        // per page. In memory it is a copy of each page and nothing else, and the writer
        // needs no writable temporary folder (a container with a read-only root has none).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        Ok(RecordConn { upserts: Default::default(), conn })
    }

    /// Applies `batch` in order: each run of writes as multi-row upserts of a power of two
    /// of rows, at most [`SLICE_ROWS`] each (the thread yields its CPU between two); each
    /// retraction as a delete. More than one statement runs in one transaction.
    fn apply(&mut self, batch: &[(LineOp, RequestRecord)]) -> Result<(), LedgerError> {
        // Each run's rows (for writes, one per request), then the statements over them.
        let runs: Vec<(LineOp, Vec<&RequestRecord>)> = runs(batch)
            .into_iter()
            .map(|(op, records)| match op {
                LineOp::Write => (op, latest_per_request(&records)),
                LineOp::Retract => (op, records),
            })
            .collect();
        let steps: Vec<Step<'_>> = runs
            .iter()
            .flat_map(|(op, rows)| match op {
                LineOp::Write => pow2_split(rows, SLICE_ROWS).into_iter().map(Step::Upsert).collect::<Vec<_>>(),
                LineOp::Retract => rows.iter().map(|&r| Step::Retract(r)).collect(),
            })
            .collect();
        let RecordConn { upserts, conn } = self;
        if let [only] = &steps[..] {
            // One statement is atomic by itself, and outside a transaction it needs no
            // statement journal.
            return only.run(upserts, conn);
        }
        // Immediate: the write lock is taken up front, as the backend's sqlx transactions
        // take it (see `begin_write` in `sqlite.rs`).
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (i, step) in steps.iter().enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            step.run(upserts, &tx)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// One statement of a batch.
enum Step<'a> {
    /// Rows to upsert (a power of two of them).
    Upsert(&'a [&'a RequestRecord]),
    Retract(&'a RequestRecord),
}

impl Step<'_> {
    fn run(
        &self,
        upserts: &mut [Option<Upsert>; UPSERT_SIZES],
        conn: &rusqlite::Connection,
    ) -> Result<(), LedgerError> {
        match self {
            Step::Upsert(chunk) => {
                let slot = &mut upserts[chunk.len().ilog2() as usize];
                let statement = match slot {
                    Some(statement) => statement,
                    empty => empty.insert(Upsert::prepare(conn, upsert_sql_for(chunk.len()))?),
                };
                statement.run(conn, chunk)
            }
            Step::Retract(r) => {
                conn.prepare_cached(RETRACT)?.execute([&r.request_id])?;
                Ok(())
            }
        }
    }
}

/// The upsert of `rows` records (a power of two), built once per size.
fn upsert_sql_for(rows: usize) -> &'static str {
    static SQL: [OnceLock<String>; UPSERT_SIZES] = [const { OnceLock::new() }; UPSERT_SIZES];
    SQL[rows.ilog2() as usize].get_or_init(|| upsert_sql(rows, '?'))
}
