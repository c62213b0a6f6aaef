//! The ledger: the only code that speaks SQL. It holds teams, keys and one record per
//! forwarded request.
//!
//! Request records go through a group-commit writer: callers enqueue a record and await its
//! acknowledgement, and one task writes whatever has queued up meanwhile in a single
//! transaction. So a burst of N requests costs one commit, not N, and a caller learns its
//! record is durable before it releases the response's last byte. The queue is bounded.
//!
//! Backends: SQLite (`sqlite.rs`) and PostgreSQL (`postgres.rs`). Every backend implements the same methods; `Backend`
//! dispatches, so a second backend is a new variant and a new file.

mod postgres;
mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{BudgetSpec, Period};
use crate::metering::usage::Usage;
use crate::pricing::NanoUsd;

pub use postgres::PostgresBackend;
pub use sqlite::SqliteBackend;

/// A ledger failure. The message is for logs; clients get a generic error.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the ledger writer has stopped")]
    WriterGone,
    #[error("the ledger queue is full")]
    QueueFull,
    #[error("the record is queued but not yet durable (the database is failing)")]
    NotYetDurable,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("unsupported database url: {0}")]
    UnsupportedUrl(String),
}

/// Where a record's token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The upstream's `usage`, as reported.
    Reported,
    /// Counted locally with the model's tokenizer because the upstream reported none.
    Estimated,
    /// In flight: journaled when forwarded, replaced by the final record when it settles.
    Pending,
    /// Was in flight when the server died: charged its reservation (the worst case).
    Interrupted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Pending => "pending",
            UsageSource::Interrupted => "interrupted",
        }
    }
}

/// One forwarded request, as recorded.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub request_id: String,
    /// Start of the request, Unix ms.
    pub time_ms: i64,
    pub key_id: String,
    pub team: String,
    pub endpoint: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// The model that served it (after downgrade or fallback).
    pub served_model: String,
    pub usage: Usage,
    pub cost: NanoUsd,
    pub usage_source: UsageSource,
    /// The HTTP status the client received.
    pub status: u16,
    pub latency_ms: u64,
    pub stream: bool,
}

/// A team as stored.
#[derive(Clone, Debug)]
pub struct TeamRow {
    pub name: String,
    pub budget: BudgetSpec,
    pub created_ms: i64,
}

/// A virtual key as stored (never the secret).
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub team: String,
    pub name: String,
    /// SHA-256 of the secret.
    pub key_hash: [u8; 32],
    /// The first characters of the secret, for display (`tg-AbC1…`).
    pub prefix: String,
    pub budget: BudgetSpec,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Filters for spend queries. Times are Unix ms; `to` is exclusive.
#[derive(Clone, Debug, Default)]
pub struct SpendFilter {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
}

/// Columns spend can be grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Team,
    Key,
    Model,
    Day,
}

/// Sums over a set of records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost: NanoUsd,
}

/// One group of a grouped spend query: its labels in `GroupBy` order, and its sums.
#[derive(Clone, Debug)]
pub struct SpendGroup {
    pub labels: Vec<(GroupBy, String)>,
    pub totals: SpendTotals,
}

/// A page of request records, newest first.
#[derive(Clone, Debug)]
pub struct LogPage {
    pub records: Vec<RequestRecord>,
    pub next_before: Option<String>,
}

/// Filters for the request log.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    pub before: Option<String>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub limit: u32,
}

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

    pub async fn ping(&self) -> Result<(), LedgerError> {
        dispatch!(self, b => b.ping().await)
    }
    pub async fn insert_records(&self, records: &[RequestRecord]) -> Result<(), LedgerError> {
        dispatch!(self, b => b.insert_records(records).await)
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
    /// Marks requests journaled as in flight by a server that died as `interrupted`.
    /// Only a starting server calls this. Returns how many there were.
    pub async fn mark_interrupted(&self) -> Result<u64, LedgerError> {
        dispatch!(self, b => b.mark_interrupted().await)
    }
}

/// A database URL with any password removed, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &url[..scheme], &url[at..]),
        _ => url.to_string(),
    }
}

struct WriteJob {
    record: RequestRecord,
    /// `None` for a journal entry nobody waits on.
    ack: Option<oneshot::Sender<Result<(), Arc<LedgerError>>>>,
}

/// The ledger handle the server holds: the backend plus the group-commit writer.
#[derive(Clone)]
pub struct Ledger {
    backend: Backend,
    queue: mpsc::Sender<WriteJob>,
    health: Arc<LedgerHealth>,
}

/// Observed state of the writer, for readiness, metrics and the `on_ledger_error` policy.
#[derive(Default)]
pub struct LedgerHealth {
    failing: AtomicBool,
    written: AtomicU64,
    batches: AtomicU64,
    queued: AtomicU64,
}

impl LedgerHealth {
    /// Whether the last write attempt failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Records waiting in the queue.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Most records written in one transaction.
const MAX_BATCH: usize = 1024;

impl Ledger {
    /// Starts the writer on `tracker`. Once `stop` is cancelled (or every handle is dropped)
    /// it refuses new records, writes everything queued, and exits: waiting on the tracker
    /// then is a flush.
    pub fn start(backend: Backend, capacity: usize, tracker: &TaskTracker, stop: CancellationToken) -> Ledger {
        let (queue, rx) = mpsc::channel(capacity);
        let health = Arc::new(LedgerHealth::default());
        tracker.spawn(writer(backend.clone(), rx, health.clone(), stop));
        Ledger { backend, queue, health }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn health(&self) -> &LedgerHealth {
        &self.health
    }

    /// Enqueues `record` and waits, at most `ack_timeout`, until it is committed. On a
    /// timeout the record stays queued (it is written once the database recovers) and the
    /// caller learns it is not durable yet.
    pub async fn record(&self, record: RequestRecord, ack_timeout: Duration) -> Result<(), Arc<LedgerError>> {
        let (ack, done) = oneshot::channel();
        let job = WriteJob { record, ack: Some(ack) };
        self.health.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.queue.send(job).await {
            self.health.queued.fetch_sub(1, Ordering::Relaxed);
            drop(e);
            return Err(Arc::new(LedgerError::WriterGone));
        }
        match tokio::time::timeout(ack_timeout, done).await {
            Ok(result) => result.unwrap_or_else(|_| Err(Arc::new(LedgerError::WriterGone))),
            Err(_) => Err(Arc::new(LedgerError::NotYetDurable)),
        }
    }

    /// Journals a request as in flight (`usage_source = pending`), without waiting: if the
    /// process dies before the request settles, the next start marks it `interrupted` and
    /// it stays charged at its reservation. The final record replaces it.
    pub fn journal(&self, record: RequestRecord) {
        let job = WriteJob { record, ack: None };
        if self.queue.try_send(job).is_ok() {
            self.health.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the queue has room for more records (it is bounded; when it is full the
    /// server refuses new requests rather than hold their records in unbounded memory).
    pub fn has_room(&self) -> bool {
        self.queue.capacity() > 0
    }

    /// Free places in the queue.
    pub fn capacity_left(&self) -> usize {
        self.queue.capacity()
    }
}

/// The group-commit loop: take one record, then everything else already queued (up to a
/// batch), write them in one transaction, acknowledge each. A failed batch is retried with
/// backoff and never dropped: its callers keep waiting, and the bounded queue pushes back.
async fn writer(backend: Backend, mut rx: mpsc::Receiver<WriteJob>, health: Arc<LedgerHealth>, stop: CancellationToken) {
    let mut jobs: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH);
    let mut records: Vec<RequestRecord> = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    loop {
        let received = if closing {
            rx.recv_many(&mut jobs, MAX_BATCH).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut jobs, MAX_BATCH) => n,
                () = stop.cancelled() => {
                    rx.close();
                    closing = true;
                    continue;
                }
            }
        };
        if received == 0 {
            return;
        }
        records.clear();
        records.extend(jobs.iter().map(|j| j.record.clone()));
        let mut backoff = Duration::from_millis(10);
        let result;
        let mut gave_up_at = None;
        loop {
            match backend.insert_records(&records).await {
                Ok(()) => {
                    health.failing.store(false, Ordering::Relaxed);
                    result = Ok(());
                    break;
                }
                Err(e) => {
                    if !health.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, records = records.len(), "ledger write failed; retrying");
                    }
                    // While serving, a failed batch is retried until it lands (callers wait,
                    // the bounded queue pushes back). At shutdown, retrying stops after a while.
                    if closing || stop.is_cancelled() {
                        closing = true;
                        let since = *gave_up_at.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > SHUTDOWN_RETRY {
                            tracing::error!(records = records.len(), "ledger unavailable at shutdown; records not written");
                            result = Err(Arc::new(e));
                            break;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let n = jobs.len() as u64;
        if result.is_ok() {
            health.written.fetch_add(n, Ordering::Relaxed);
            health.batches.fetch_add(1, Ordering::Relaxed);
        }
        health.queued.fetch_sub(n, Ordering::Relaxed);
        for job in jobs.drain(..) {
            // The caller may have gone (client disconnected); the record is written either way.
            if let Some(ack) = job.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

/// How long the writer keeps retrying a failing database once shutdown has begun.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(10);

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Column values shared by teams and keys, for the backends.
pub(crate) fn models_to_json(models: &[String]) -> String {
    serde_json::to_string(models).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn models_from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(crate) fn period_from_str(text: &str) -> Period {
    text.parse().unwrap_or(Period::Monthly)
}

/// Row → type mapping shared by every backend (their row types differ; the code does not).
macro_rules! row_mappers {
    ($row:ty) => {
        fn budget_from_row(r: &$row) -> Result<BudgetSpec, sqlx::Error> {
            let period: String = r.try_get("period")?;
            let models: String = r.try_get("models")?;
            Ok(BudgetSpec {
                limit: r.try_get::<Option<i64>, _>("limit_nano")?.map(NanoUsd),
                period: period_from_str(&period),
                downgrade_at: r.try_get("downgrade_at")?,
                models: models_from_json(&models),
                rpm: r.try_get::<Option<i64>, _>("rpm")?.map(from_i64),
                tpm: r.try_get::<Option<i64>, _>("tpm")?.map(from_i64),
            })
        }

        fn totals_from_row(r: &$row) -> Result<SpendTotals, sqlx::Error> {
            Ok(SpendTotals {
                requests: from_i64(r.try_get("requests")?),
                input_tokens: from_i64(r.try_get("input_tokens")?),
                cached_input_tokens: from_i64(r.try_get("cached_input_tokens")?),
                output_tokens: from_i64(r.try_get("output_tokens")?),
                cost: NanoUsd(r.try_get("cost_nano")?),
            })
        }

        fn record_from_row(r: &$row) -> Result<RequestRecord, sqlx::Error> {
            let source: String = r.try_get("usage_source")?;
            let endpoint: String = r.try_get("endpoint")?;
            Ok(RequestRecord {
                request_id: r.try_get("request_id")?,
                time_ms: r.try_get("time_ms")?,
                key_id: r.try_get("key_id")?,
                team: r.try_get("team")?,
                endpoint: crate::request::Endpoint::from_name(&endpoint),
                model: r.try_get("model")?,
                served_model: r.try_get("served_model")?,
                usage: Usage {
                    input_tokens: from_i64(r.try_get("input_tokens")?),
                    cached_input_tokens: from_i64(r.try_get("cached_input_tokens")?),
                    output_tokens: from_i64(r.try_get("output_tokens")?),
                },
                cost: NanoUsd(r.try_get("cost_nano")?),
                usage_source: match source.as_str() {
                    "estimated" => UsageSource::Estimated,
                    "pending" => UsageSource::Pending,
                    "interrupted" => UsageSource::Interrupted,
                    _ => UsageSource::Reported,
                },
                status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(0),
                latency_ms: from_i64(r.try_get("latency_ms")?),
                stream: r.try_get("stream")?,
            })
        }
    };
}
pub(crate) use row_mappers;
