//! How the ledger's own rusqlite connections (the record connection, the checkpointer's) open
//! the database file.

use std::path::Path;
use std::time::Duration;

use rusqlite::OpenFlags;

/// A rusqlite connection to the ledger's file, set up as sqlx's connections are in
/// `SqliteBackend::connect` (WAL mode is the file's, set by them; these are each
/// connection's own).
pub(super) fn open_connection(file: &Path, busy_timeout: Duration) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}
