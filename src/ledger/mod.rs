//! The ledger: the only code that speaks SQL. It holds teams, keys and one record per
//! forwarded request.
//!
//! A record is made durable by appending it to the write-ahead journal (`journal.rs`: a copy
//! into a mapped segment, which survives the process dying), and queued in memory for the
//! database. One group-commit task (`writer.rs`) writes whatever has queued up in a single
//! transaction, off the request path, and a journal segment is deleted once all its records
//! are committed; a starting server replays what is left (`recovery.rs`). A request's
//! in-flight entry lives only in the journal; the database gets one row per request, its
//! final record. The queue is bounded.
//!
//! The map:
//! - `records.rs` — what is stored and read back: [`RequestRecord`], teams, keys, request
//!   ids, the filters and sums of spend and log queries.
//! - `writer.rs` — [`Ledger`]: queue slots, journaling, the group-commit writer, `sync`.
//! - `recovery.rs` — [`recover`]: replaying the journal at start-up.
//! - `journal.rs` — the write-ahead journal (`journal/line.rs` its lines, `journal/segment.rs`
//!   its segment files).
//! - `backend.rs` — [`Backend`]: one variant per database, each with the same methods.
//! - `sqlite.rs` — SQLite: an sqlx pool for queries, and one rusqlite connection on a
//!   thread of its own for every write of the writer (`sqlite/record_conn.rs`), its WAL
//!   moved into the file by an idle-priority checkpointer (`sqlite/checkpointer.rs`).
//! - `postgres.rs` — PostgreSQL, through sqlx; `shared.rs` the budgets and rate windows
//!   replicas share through it, `redis.rs` the same through Redis (Lua scripts), and
//!   `shared_store.rs` the one of the two a server uses (`replicas` decides when to call).
//! - `sql/` — SQL both backends share, by concern (record writes, rows, directory, reports).
//!
//! The ledger imports money and usage (`pricing`), budget specs (`budget`), endpoint names
//! (`request`) — nothing of the HTTP layer, metering, upstream or routing.

mod backend;
mod error;
pub mod journal;
mod postgres;
mod records;
mod recovery;
mod redis;
pub mod shared;
mod shared_store;
mod sql;
mod sqlite;
mod writer;

pub use backend::{redact_url, Backend};
pub use error::LedgerError;
pub use journal::Pin;
pub use postgres::PostgresBackend;
pub(crate) use records::request_id_floor;
pub use records::{
    is_request_id, new_request_id, now_ms, GroupBy, KeyRow, LogFilter, LogPage, RequestRecord, SpendFilter, SpendGroup,
    SpendTotals, TeamRow, UsageSource,
};
pub use recovery::recover;
pub use redis::RedisShared;
pub use shared_store::SharedStore;
pub use sqlite::SqliteBackend;
pub use writer::{Ledger, LedgerHealth, NotJournaled, Slot};
