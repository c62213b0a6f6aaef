//! The WAL checkpointer: a thread of its own that moves the WAL into the database file, on a
//! connection of its own, at the lowest CPU priority.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::connection::open_connection;
use super::ffi::lowest_priority;

/// How often the checkpointer moves what the WAL gained into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A thread of its own that checkpoints the WAL (`PRAGMA wal_checkpoint(PASSIVE)`) on a
/// connection of its own, at the lowest CPU priority (`SCHED_IDLE` on Linux).
///
/// SQLite checkpoints at the commit that takes the WAL past 1,000 pages, on the committing
/// connection: the record connection would then copy ~1,000 pages from the WAL into the
/// database and sync both, milliseconds on one core with no point at which its thread gives
/// the core up. With every core busy serving, a request worker waits that long for its core,
/// and so does every request on it. An idle-class thread gives its core up whenever any
/// other thread wants it, so a checkpoint fills the cores' idle moments instead. A passive
/// checkpoint takes no lock a writer or reader waits for, and its fsyncs, the only ones
/// `synchronous = NORMAL` makes, leave the writer too.
pub(super) struct Checkpointer {
    /// Dropped with the record connection's thread: the checkpointer sees the channel
    /// closed and ends.
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    pub(super) fn start(file: &Path, busy_timeout: Duration) -> Checkpointer {
        let (stop, stopped) = mpsc::channel();
        let file = file.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("tollgate-checkpoint".into())
            .spawn(move || Checkpointer::run(&file, busy_timeout, &stopped));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no checkpointer thread; the record connection checkpoints past its backstop");
        }
        Checkpointer { _stop: stop }
    }

    fn run(file: &Path, busy_timeout: Duration, stopped: &mpsc::Receiver<()>) {
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
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
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
