//! The SQLite backend's calls into C, and the only `unsafe` code of its side of the ledger:
//! a multi-row upsert driven through SQLite's statement API, and the scheduler call that
//! puts the checkpointer in the idle class.

use std::ffi::{c_int, CStr};
use std::ptr::NonNull;

use rusqlite::ffi;

use crate::ledger::sql::{record_columns, Column, RECORD_COLUMNS};
use crate::ledger::{LedgerError, RequestRecord};

/// A prepared multi-row upsert on the record connection, driven through SQLite's C API
/// because rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite then copies each of a
/// row's seven texts into memory of its own (`malloc` under its allocator's mutex) and frees
/// the copies when the statement is reset, once per text of every record written. Bound as
/// `SQLITE_STATIC`, SQLite reads them where they lie while the statement runs, and
/// [`Upsert::run`] unbinds them before it returns.
///
/// Not `Send`: it is prepared, used and finalized on the record connection's thread.
pub(super) struct Upsert(NonNull<ffi::sqlite3_stmt>);

impl Upsert {
    pub(super) fn prepare(conn: &rusqlite::Connection, sql: &str) -> Result<Upsert, LedgerError> {
        let len = c_int::try_from(sql.len()).map_err(|_| too_big())?;
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
        NonNull::new(statement).map(Upsert).ok_or_else(|| failure(conn, ffi::SQLITE_MISUSE))
    }

    /// Binds `chunk`'s records (as many as the statement has rows) and runs the statement.
    pub(super) fn run(&mut self, conn: &rusqlite::Connection, chunk: &[&RequestRecord]) -> Result<(), LedgerError> {
        let statement = self.0.as_ptr();
        // Reset and unbound on every way out of here, so that no pointer into `chunk` stays
        // with the statement once its texts may be freed.
        let _unbind = Unbind(statement);
        for (row, r) in chunk.iter().enumerate() {
            for (i, column) in record_columns(r).into_iter().enumerate() {
                // Parameters count from 1.
                let at = c_int::try_from(row * RECORD_COLUMNS + i + 1).map_err(|_| too_big())?;
                let rc = match column {
                    Column::Text(v) => {
                        let len = c_int::try_from(v.len()).map_err(|_| too_big())?;
                        // An empty text as rusqlite binds one: a pointer that is always valid.
                        let text = if v.is_empty() { c"".as_ptr() } else { v.as_ptr().cast() };
                        // SAFETY: `statement` is live; `text` is valid for `len` bytes and stays
                        // so (it is borrowed from `chunk`) until `_unbind` unbinds it, after the
                        // statement has run.
                        unsafe { ffi::sqlite3_bind_text(statement, at, text, len, ffi::SQLITE_STATIC()) }
                    }
                    // SAFETY: `statement` is live; an integer is copied.
                    Column::Int(v) => unsafe { ffi::sqlite3_bind_int64(statement, at, v) },
                    // SAFETY: as above.
                    Column::Bool(v) => unsafe { ffi::sqlite3_bind_int64(statement, at, i64::from(v)) },
                };
                if rc != ffi::SQLITE_OK {
                    return Err(failure(conn, rc));
                }
            }
        }
        // SAFETY: `statement` is live and every parameter is bound (it has `chunk.len()` rows).
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
        unsafe { ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

/// Resets a statement and clears its bindings when dropped.
struct Unbind(*mut ffi::sqlite3_stmt);

impl Drop for Unbind {
    fn drop(&mut self) {
        // SAFETY: the statement is live (its `Upsert` outlives this guard). The codes these
        // return repeat the step's, already reported.
        unsafe {
            ffi::sqlite3_reset(self.0);
            ffi::sqlite3_clear_bindings(self.0);
        }
    }
}

/// The error SQLite reported for `rc` on `conn`, with its message.
fn failure(conn: &rusqlite::Connection, rc: c_int) -> LedgerError {
    // SAFETY: the handle is the live connection's; the message is copied at once, before
    // any other call on the connection could change it.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(conn.handle());
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message).into()
}

fn too_big() -> LedgerError {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_TOOBIG), None).into()
}

/// Puts the calling thread in the idle scheduling class: it runs only on a core that
/// nothing else wants, and any other thread that wakes there preempts it.
pub(super) fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid `sched_param` that outlives
        // the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "checkpointer keeps its priority");
        }
    }
}
