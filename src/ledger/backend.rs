//! `Backend`: the storage behind the ledger, one variant per database. Every backend has the
//! same methods; this enum dispatches, so a second backend is a new variant and a new file.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::Duration;

use super::journal::LineOp;
use super::{
    GroupBy, KeyRow, LedgerError, LogFilter, LogPage, PostgresBackend, RequestRecord, SpendFilter, SpendGroup,
    SpendTotals, SqliteBackend, TeamRow,
};
use crate::policy::pricing::NanoUsd;

/// Journal operations to apply in order, as the writer and a replay hand them over. Shared
/// (not borrowed) so that a backend may give it to a thread of its own without copying a
/// record: SQLite's record connection binds the texts where they lie, and the `Arc` keeps
/// them alive for as long as that thread may read them.
pub(crate) type Batch = Arc<Vec<(LineOp, RequestRecord)>>;

/// The storage behind the ledger.
#[derive(Clone)]
pub enum Backend {
    Sqlite(SqliteBackend),
    Postgres(PostgresBackend),
}

macro_rules! dispatch {
    ($self:expr, $b:ident => $body:expr) => {
        match $self {
            Backend::Sqlite($b) => $body,
            Backend::Postgres($b) => $body,
        }
    };
}

impl Backend {
    /// Opens (creating if needed) the database at `url` and applies migrations.
    pub async fn connect(url: &str) -> Result<Backend, LedgerError> {
        Backend::connect_with(url, Duration::from_secs(5)).await
    }

    /// Like `connect`; `busy_timeout` is how long a write waits for a lock held elsewhere.
    pub async fn connect_with(url: &str, busy_timeout: Duration) -> Result<Backend, LedgerError> {
        if url.starts_with("sqlite:") {
            return Ok(Backend::Sqlite(SqliteBackend::connect(url, busy_timeout).await?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(PostgresBackend::connect(url, busy_timeout).await?));
        }
        Err(LedgerError::UnsupportedUrl(redact_url(url)))
    }

    /// The PostgreSQL backend, which replicas share budgets through; None on SQLite.
    pub fn postgres(&self) -> Option<&PostgresBackend> {
        match self {
            Backend::Postgres(b) => Some(b),
            Backend::Sqlite(_) => None,
        }
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        dispatch!(self, b => b.ping().await)
    }

    /// Applies a batch in order, in one transaction: a write upserts its record (a journal
    /// entry never overwrites a row, a final record replaces one), a retraction deletes a
    /// request's journal entry. This is the ledger writer's one way to the database.
    pub(crate) async fn apply(&self, batch: &Batch) -> Result<(), LedgerError> {
        dispatch!(self, b => b.apply(batch).await)
    }

    /// Writes records as the ledger writer does (copied into a batch first: the writer
    /// hands over batches it owns).
    pub async fn insert_records<R: Borrow<RequestRecord>>(&self, records: &[R]) -> Result<(), LedgerError> {
        self.apply(&batch_of(LineOp::Write, records)).await
    }

    /// Deletes the journal entries (`pending` rows) of these records.
    pub async fn retract<R: Borrow<RequestRecord>>(&self, records: &[R]) -> Result<(), LedgerError> {
        self.apply(&batch_of(LineOp::Retract, records)).await
    }

    /// Marks requests journaled as in flight by a server that died as `interrupted`, at the
    /// cost their entry carries (their prompt). Only a starting server calls this, with the
    /// requests its journal left in flight: on SQLite, which one server owns, every entry in
    /// the database is its own; on PostgreSQL only `journaled` are (other replicas' entries
    /// are theirs, or the sweep's). Returns how many there were.
    pub async fn mark_interrupted(&self, journaled: &[String]) -> Result<u64, LedgerError> {
        match self {
            Backend::Sqlite(b) => b.mark_interrupted().await,
            Backend::Postgres(b) => b.mark_interrupted(journaled).await,
        }
    }

    pub async fn directory_version(&self) -> Result<i64, LedgerError> {
        dispatch!(self, b => b.directory_version().await)
    }
    pub async fn load_teams(&self) -> Result<Vec<TeamRow>, LedgerError> {
        dispatch!(self, b => b.load_teams().await)
    }
    pub async fn load_keys(&self) -> Result<Vec<KeyRow>, LedgerError> {
        dispatch!(self, b => b.load_keys().await)
    }
    pub async fn create_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
        dispatch!(self, b => b.create_team(team).await)
    }
    pub async fn update_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
        dispatch!(self, b => b.update_team(team).await)
    }
    /// Deletes a team and revokes its keys.
    pub async fn delete_team(&self, name: &str, now_ms: i64) -> Result<(), LedgerError> {
        dispatch!(self, b => b.delete_team(name, now_ms).await)
    }
    pub async fn create_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
        dispatch!(self, b => b.create_key(key).await)
    }
    pub async fn update_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
        dispatch!(self, b => b.update_key(key).await)
    }
    pub async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        dispatch!(self, b => b.revoke_key(id, now_ms).await)
    }
    /// Spend of a team (or of a key when `key` is true) since `since_ms`.
    pub async fn spent_since(&self, key: bool, id: &str, since_ms: i64) -> Result<NanoUsd, LedgerError> {
        dispatch!(self, b => b.spent_since(key, id, since_ms).await)
    }
    pub async fn spend(
        &self,
        filter: &SpendFilter,
        group_by: &[GroupBy],
    ) -> Result<(SpendTotals, Vec<SpendGroup>), LedgerError> {
        dispatch!(self, b => b.spend(filter, group_by).await)
    }
    pub async fn logs(&self, filter: &LogFilter) -> Result<LogPage, LedgerError> {
        dispatch!(self, b => b.logs(filter).await)
    }
    pub async fn close(&self) {
        dispatch!(self, b => b.close().await)
    }
}

fn batch_of<R: Borrow<RequestRecord>>(op: LineOp, records: &[R]) -> Batch {
    Arc::new(records.iter().map(|r| (op, r.borrow().clone())).collect())
}

/// A database URL with any password removed, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &url[..scheme], &url[at..]),
        _ => url.to_string(),
    }
}
