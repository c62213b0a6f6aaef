//! The ledger: the only code that speaks SQL. It holds teams, keys and one record per
//! forwarded request.
//!
//! A record is made durable by appending it to the write-ahead journal (`journal.rs`: a copy
//! into a mapped segment, which survives the process dying), and queued in memory for the database. One
//! group-commit task writes whatever has queued up in a single transaction, off the request
//! path, and a journal segment is deleted once all its records are committed; a starting
//! server replays what is left. A request's in-flight entry lives only in the journal; the
//! database gets one row per request, its final record. The queue is bounded.
//!
//! Backends: SQLite (`sqlite.rs`) and PostgreSQL (`postgres.rs`). Every backend implements the same methods; `Backend`
//! dispatches, so a second backend is a new variant and a new file.

pub mod journal;
mod postgres;
mod sqlite;

use std::borrow::Borrow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::{BudgetSpec, Period};
use crate::pricing::NanoUsd;
use crate::pricing::Usage;

pub use postgres::PostgresBackend;
pub use sqlite::SqliteBackend;

/// A ledger failure. The message is for logs; clients get a generic error.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the SQLite connection that writes record batches (`sqlite::Rows`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("journal: {0}")]
    Journal(#[from] std::io::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("unsupported database url: {0}")]
    UnsupportedUrl(String),
}

/// Where a record's token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Hex digits of the start time in a request id.
const ID_TIME_DIGITS: usize = 12;

/// A new request id: `req_`, the start time (Unix ms) as 12 lower-case hex digits, then 64
/// random bits in hex. Ids therefore sort by start time: the requests table's primary key
/// serves as its time index (spend queries over a time range) and as the logs' cursor.
pub fn new_request_id(time_ms: i64) -> String {
    request_id_with(time_ms, rand::random::<u64>())
}

/// The id of a request started at `time_ms` with `random` as its random bits, written digit
/// by digit (`format!` with padded hex fields was ~1.5% of a request's instructions).
fn request_id_with(time_ms: i64, random: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Clamped into 0..=max_id_time(): non-negative, and 12 hex digits hold it.
    let time = time_ms.clamp(0, max_id_time()).unsigned_abs();
    let mut id = String::with_capacity(4 + ID_TIME_DIGITS + 16);
    id.push_str("req_");
    let digits = (0..ID_TIME_DIGITS)
        .rev()
        .map(|i| (time >> (4 * i)) & 0xf)
        .chain((0..16).rev().map(|i| (random >> (4 * i)) & 0xf));
    id.extend(digits.map(|d| char::from(HEX[d as usize])));
    id
}

fn max_id_time() -> i64 {
    (1i64 << (4 * ID_TIME_DIGITS)) - 1
}

/// The smallest id a request started at `time_ms` can have; `None` past the ids' range.
pub(crate) fn request_id_floor(time_ms: i64) -> Option<String> {
    (time_ms <= max_id_time()).then(|| format!("req_{:0width$x}", time_ms.max(0), width = ID_TIME_DIGITS))
}

/// One forwarded request, as recorded.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// See [`new_request_id`]: the time it starts with is `time_ms`.
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
    pub async fn insert_records<R: Borrow<RequestRecord> + Sync>(&self, records: &[R]) -> Result<(), LedgerError> {
        match self {
            Backend::Sqlite(b) => b.write_records(records).await,
            Backend::Postgres(b) => b.insert_records(records).await,
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
    /// Deletes the journal entries (`pending` rows) of these records.
    pub async fn retract<R: Borrow<RequestRecord> + Sync>(&self, records: &[R]) -> Result<(), LedgerError> {
        dispatch!(self, b => b.retract(records).await)
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

pub use journal::Pin;
use journal::{Journal, LineOp as Op};

struct WriteJob {
    op: Op,
    record: RequestRecord,
    /// The record's hold on its journal segment; `None` when the append failed.
    pin: Option<Pin>,
    /// The hold of the request's journal entry, released with this record.
    entry: Option<Pin>,
}

/// A record that is queued for the database but could not be journaled.
#[derive(Debug)]
pub struct NotJournaled {
    pub error: Arc<LedgerError>,
    /// A copy of the record as queued (boxed: the `Ok` path stays small).
    pub record: Box<RequestRecord>,
}

/// A place in the bounded write queue, claimed when a request is admitted so that writing
/// its records later never waits for room (and a full queue refuses requests up front).
pub struct Slot(mpsc::OwnedPermit<WriteJob>);

/// The ledger handle the server holds: the backend, the journal, and the writer's queue.
#[derive(Clone)]
pub struct Ledger {
    backend: Backend,
    journal: Arc<Journal>,
    queue: mpsc::Sender<WriteJob>,
    health: Arc<LedgerHealth>,
    /// Jobs committed to the database so far (the writer's count).
    committed: watch::Receiver<u64>,
    /// Wakes the writer from its pause between batches (a query is waiting).
    wanted: Arc<Notify>,
    /// Longest a query waits in `sync` (`ledger_ack_timeout_ms`).
    sync_timeout: Duration,
}

/// Observed state of the writer, for readiness, metrics and the `on_ledger_error` policy.
#[derive(Default)]
pub struct LedgerHealth {
    failing: AtomicBool,
    written: AtomicU64,
    batches: AtomicU64,
    queued: AtomicU64,
    /// Jobs handed to the queue so far (counted before each send).
    enqueued: AtomicU64,
}

impl LedgerHealth {
    /// Whether the last database write failed.
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
    /// it refuses new records, writes everything queued — and the records of slots still
    /// claimed, if they come within [`STRAGGLER_WAIT`] — and exits: waiting on the tracker
    /// then is a flush.
    /// `sync_timeout` bounds how long [`Ledger::sync`] waits.
    pub fn start(
        backend: Backend,
        journal: Journal,
        capacity: usize,
        sync_timeout: Duration,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Ledger {
        let (queue, rx) = mpsc::channel(capacity);
        let health = Arc::new(LedgerHealth::default());
        let (committed_tx, committed) = watch::channel(0);
        let wanted = Arc::new(Notify::new());
        tracker.spawn(writer(backend.clone(), rx, health.clone(), committed_tx, wanted.clone(), stop));
        Ledger { backend, journal: Arc::new(journal), queue, health, committed, wanted, sync_timeout }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn health(&self) -> &LedgerHealth {
        &self.health
    }

    /// Whether the last journal append failed (records are then held in memory only).
    pub fn journal_failing(&self) -> bool {
        self.journal.failing()
    }

    /// Claims a place in the queue, or `None` when it is full.
    pub fn claim(&self) -> Option<Slot> {
        self.queue.clone().try_reserve_owned().ok().map(Slot)
    }

    /// Journals a request as in flight (`record` is its `pending` entry). The entry lives
    /// only in the journal — the database never sees it unless the process dies before the
    /// request settles (then a start replays it and marks it `interrupted`) — so it costs a
    /// copy into a mapped journal segment, not a database row. The returned pin keeps the
    /// entry's segment on disk; pass it to [`Ledger::write`] or [`Ledger::amend`] with the
    /// request's last record.
    pub fn journal(&self, record: &RequestRecord) -> (Option<Pin>, Result<(), Arc<LedgerError>>) {
        self.append(Op::Write, record)
    }

    /// Makes `record` durable — appended to the journal, which survives the process dying —
    /// and queues it for the database through its claimed slot, releasing `entry` (the
    /// request's journal entry) once it is committed. Never waits for room or the database:
    /// an error means the journal could not be written (the record is queued all the same,
    /// in memory), and hands back a copy of the record, to amend if the client is answered
    /// otherwise.
    pub fn write(&self, slot: Slot, record: RequestRecord, entry: Option<Pin>) -> Result<(), NotJournaled> {
        let (pin, result) = self.append(Op::Write, &record);
        let result = result.map_err(|error| NotJournaled { error, record: Box::new(record.clone()) });
        self.health.queued.fetch_add(1, Ordering::Relaxed);
        self.health.enqueued.fetch_add(1, Ordering::Release);
        slot.0.send(WriteJob { op: Op::Write, record, pin, entry });
        result
    }

    /// Queues a correction without a claimed slot: a final record that supersedes an earlier
    /// one of the same request (e.g. the status the client really received), or, with
    /// `retract`, the withdrawal of the journal entry of a request that was never forwarded
    /// (journal only: the database never had it). Best effort: with the queue full it is
    /// dropped and logged (the journal still has it, for the next start).
    pub fn amend(&self, record: RequestRecord, retract: bool, entry: Option<Pin>) {
        let op = if retract { Op::Retract } else { Op::Write };
        let (pin, _) = self.append(op, &record);
        self.health.queued.fetch_add(1, Ordering::Relaxed);
        self.health.enqueued.fetch_add(1, Ordering::Release);
        if self.queue.try_send(WriteJob { op, record, pin, entry }).is_err() {
            self.health.queued.fetch_sub(1, Ordering::Relaxed);
            // Never arriving, it must not hold queries waiting in `sync` for it.
            self.health.enqueued.fetch_sub(1, Ordering::Release);
            tracing::error!("ledger queue full; a record correction waits in the journal for the next start");
        }
    }

    fn append(&self, op: Op, record: &RequestRecord) -> (Option<Pin>, Result<(), Arc<LedgerError>>) {
        match self.journal.append(&journal::encode(op, record)) {
            Ok(pin) => (Some(pin), Ok(())),
            Err(e) => (None, Err(Arc::new(LedgerError::Journal(e)))),
        }
    }

    /// Waits, at most the sync timeout, until every record queued before this call is
    /// committed to the database, so a query sees the requests already answered. Returns at
    /// once while the database is failing (the query then shows what is committed).
    pub async fn sync(&self) {
        let target = self.health.enqueued.load(Ordering::Acquire);
        if self.health.failing() || *self.committed.borrow() >= target {
            return;
        }
        self.wanted.notify_one();
        let mut committed = self.committed.clone();
        let _ = tokio::time::timeout(self.sync_timeout, committed.wait_for(|&n| n >= target)).await;
    }
}

/// Applies what an earlier run left in the journal, in order, then marks requests still in
/// flight then as `interrupted`. Returns (lines replayed, torn lines, requests interrupted).
pub async fn recover(
    backend: &Backend,
    journal_dir: &std::path::Path,
    segment_bytes: u64,
) -> Result<(Journal, (usize, usize, u64)), LedgerError> {
    let (journal, leftovers) = Journal::open(journal_dir, segment_bytes)?;
    let replayed = leftovers.lines.len();
    for chunk in leftovers.lines.chunks(MAX_BATCH) {
        let jobs: Vec<(Op, &RequestRecord)> = chunk.iter().map(|(op, r)| (*op, r)).collect();
        write_batch(backend, &jobs).await?;
    }
    let torn = leftovers.torn;
    let interrupted = backend.mark_interrupted().await?;
    leftovers.discard();
    Ok((journal, (replayed, torn, interrupted)))
}

/// The group-commit loop: take one record, then everything else already queued (up to a
/// batch), write them in one transaction, release their journal pins. A failed batch is
/// retried with backoff and never dropped (the journal has it, and the bounded queue pushes
/// back on new requests).
async fn writer(
    backend: Backend,
    mut rx: mpsc::Receiver<WriteJob>,
    health: Arc<LedgerHealth>,
    committed: watch::Sender<u64>,
    wanted: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut jobs: Vec<WriteJob> = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    let mut total = 0u64;
    loop {
        let received = if closing {
            // What was queued before the stop comes at once; past that, only a request that
            // has not settled still holds a slot (the server waits for them all before it
            // stops the ledger, so one that overran even the cut at shutdown). Its journal
            // entry is on disk: the next start marks it interrupted. Waiting for it longer
            // would let one stuck request hold up the exit.
            match tokio::time::timeout(STRAGGLER_WAIT, rx.recv_many(&mut jobs, MAX_BATCH)).await {
                Ok(n) => n,
                Err(_) => {
                    tracing::error!(
                        "a request still unsettled at shutdown holds a ledger slot; leaving it to the journal"
                    );
                    0
                }
            }
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
        let started = tokio::time::Instant::now();
        // A retraction withdraws a journal entry, which never reached the database: it
        // only releases pins. (Replaying a journal applies both, in order.)
        let batch: Vec<(Op, &RequestRecord)> =
            jobs.iter().filter(|j| j.op == Op::Write).map(|j| (j.op, &j.record)).collect();
        let mut backoff = Duration::from_millis(10);
        let mut gave_up_at = None;
        let landed = loop {
            let written = if batch.is_empty() { Ok(()) } else { write_batch(&backend, &batch).await };
            match written {
                Ok(()) => {
                    health.failing.store(false, Ordering::Relaxed);
                    break true;
                }
                Err(e) => {
                    if !health.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, records = batch.len(), "ledger write failed; retrying");
                    }
                    // While serving, a failed batch is retried until it lands. At shutdown,
                    // retrying stops after a while: the journal keeps the records for the
                    // next start.
                    if closing || stop.is_cancelled() {
                        closing = true;
                        let since = *gave_up_at.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > SHUTDOWN_RETRY {
                            tracing::error!(
                                records = batch.len(),
                                "ledger unavailable at shutdown; records left in the journal for the next start"
                            );
                            break false;
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        // `written` counts records; retractions leave no row.
        let records = batch.len() as u64;
        drop(batch);
        let n = jobs.len() as u64;
        health.queued.fetch_sub(n, Ordering::Relaxed);
        if landed {
            health.written.fetch_add(records, Ordering::Relaxed);
            health.batches.fetch_add(1, Ordering::Relaxed);
            for job in jobs.drain(..) {
                for pin in [job.pin, job.entry].into_iter().flatten() {
                    pin.commit();
                }
            }
            total += n;
            committed.send_replace(total);
        } else {
            // Dropped uncommitted: their segments stay on disk.
            jobs.clear();
        }
        // Records are durable in the journal already; nobody waits on a commit but a query
        // (which asks for one). Pacing commits lets records gather into larger batches:
        // fewer statements, and a journal entry and its final record often meet in one
        // batch and become one row.
        // A query waiting in `Ledger::sync` cuts the pause short.
        if !closing && received < MAX_BATCH {
            tokio::select! {
                () = tokio::time::sleep_until(started + COMMIT_PACE) => {}
                () = wanted.notified() => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

/// The shortest time between the starts of two batches while the queue is not full and no
/// query waits for them.
const COMMIT_PACE: Duration = Duration::from_millis(20);

/// Applies a batch in order, one backend call per run of the same operation.
async fn write_batch(backend: &Backend, jobs: &[(Op, &RequestRecord)]) -> Result<(), LedgerError> {
    let mut start = 0;
    let mut run: Vec<&RequestRecord> = Vec::with_capacity(jobs.len());
    while start < jobs.len() {
        let op = jobs[start].0;
        run.clear();
        run.extend(jobs[start..].iter().take_while(|j| j.0 == op).map(|j| j.1));
        match op {
            Op::Write => backend.insert_records(&run).await?,
            Op::Retract => backend.retract(&run).await?,
        }
        start += run.len();
    }
    Ok(())
}

/// How long the writer keeps retrying a failing database once shutdown has begun.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(10);

/// How long the writer, once stopped, waits for a record from a request that has not
/// settled yet (see the writer).
const STRAGGLER_WAIT: Duration = Duration::from_secs(1);

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
                endpoint: crate::policy::request::Endpoint::from_name(&endpoint),
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

/// The queries whose SQL both backends share, generated into each backend's `impl`:
/// `$db` is the sqlx database, `$day` the expression for a record's UTC day, `$int` the cast
/// that makes a SUM an i64 (PostgreSQL sums BIGINT as NUMERIC), `$max_rows` the rows per
/// INSERT statement.
macro_rules! shared_queries {
    (
        $db:ty,
        day = $day:literal,
        int = $int:literal,
        max_rows = $max_rows:expr,
        begin_write = $begin_write:literal
    ) => {
        /// Writes a batch as multi-row upserts: a journal entry (`pending`) never overwrites
        /// a row, a final record replaces its journal entry. Statements hold a power of two
        /// of rows (at most `$max_rows`, the backend's bound-parameter limit), so a handful of
        /// statement texts serve every batch size from the prepared-statement cache instead
        /// of a new one being parsed for each size. One statement needs no transaction.
        pub async fn insert_records<R: std::borrow::Borrow<RequestRecord> + Sync>(&self, records: &[R]) -> Result<(), LedgerError> {
            let records = latest_per_request(records);
            let chunks = pow2_split(&records, $max_rows);
            match chunks[..] {
                [] => return Ok(()),
                [only] => return Self::insert_chunk(self.writer(), only).await,
                _ => {}
            }
            let mut tx = self.writer().begin_with($begin_write).await?;
            for chunk in chunks {
                Self::insert_chunk(&mut *tx, chunk).await?;
            }
            tx.commit().await?;
            Ok(())
        }

        async fn insert_chunk<'e, E>(executor: E, chunk: &[&RequestRecord]) -> Result<(), LedgerError>
        where
            E: sqlx::Executor<'e, Database = $db>,
        {
            use sqlx::Arguments as _;
            let mut args = <$db as sqlx::Database>::Arguments::default();
            args.reserve(chunk.len() * RECORD_COLUMNS, 0);
            for r in chunk {
                for column in record_columns(r) {
                    let bound = match column {
                        Column::Text(v) => args.add(v),
                        Column::Int(v) => args.add(v),
                        Column::Bool(v) => args.add(v),
                    };
                    bound.map_err(sqlx::Error::Encode)?;
                }
            }
            sqlx::query_with(Self::insert_sql(chunk.len()), args).execute(executor).await?;
            Ok(())
        }

        /// The text of an INSERT of `rows` records (a power of two), built once per size:
        /// building it per batch (a placeholder formatted per bound value) cost ~2% of the
        /// instructions a proxied request costs.
        fn insert_sql(rows: usize) -> &'static str {
            static SQL: [std::sync::OnceLock<String>; 16] = [const { std::sync::OnceLock::new() }; 16];
            debug_assert!(rows.is_power_of_two() && rows.ilog2() < 16);
            SQL[rows.ilog2() as usize].get_or_init(|| {
                let mut qb = QueryBuilder::<$db>::new(INSERT_INTO);
                qb.push_values(0..rows, |mut row, _| {
                    for _ in 0..RECORD_COLUMNS {
                        row.push_bind(0_i64);
                    }
                });
                qb.push(UPSERT);
                qb.into_sql()
            })
        }

        pub async fn ping(&self) -> Result<(), LedgerError> {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        }

        pub async fn retract<R: std::borrow::Borrow<RequestRecord> + Sync>(&self, records: &[R]) -> Result<(), LedgerError> {
            let mut tx = self.writer().begin_with($begin_write).await?;
            for r in records.iter().map(std::borrow::Borrow::borrow) {
                sqlx::query("DELETE FROM requests WHERE request_id = $1 AND usage_source = 'pending'")
                    .bind(&r.request_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }

        pub async fn mark_interrupted(&self) -> Result<u64, LedgerError> {
            let done = sqlx::query("UPDATE requests SET usage_source = 'interrupted' WHERE usage_source = 'pending'")
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        pub async fn directory_version(&self) -> Result<i64, LedgerError> {
            Ok(sqlx::query_scalar("SELECT version FROM directory_version WHERE id = 1").fetch_one(&self.pool).await?)
        }

        pub async fn load_teams(&self) -> Result<Vec<TeamRow>, LedgerError> {
            let rows = sqlx::query(
                "SELECT name, limit_nano, period, downgrade_at, models, rpm, tpm, created_ms FROM teams ORDER BY name",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| Ok(TeamRow { name: r.try_get("name")?, budget: budget_from_row(r)?, created_ms: r.try_get("created_ms")? }))
                .collect()
        }

        pub async fn load_keys(&self) -> Result<Vec<KeyRow>, LedgerError> {
            let rows = sqlx::query(
                "SELECT id, team, name, key_hash, prefix, limit_nano, period, downgrade_at, models, rpm, tpm, \
                 created_ms, revoked_ms FROM keys ORDER BY created_ms, id",
            )
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    let hash_hex: String = r.try_get("key_hash")?;
                    Ok(KeyRow {
                        id: r.try_get("id")?,
                        team: r.try_get("team")?,
                        name: r.try_get("name")?,
                        key_hash: hash_from_hex(&hash_hex),
                        prefix: r.try_get("prefix")?,
                        budget: budget_from_row(r)?,
                        created_ms: r.try_get("created_ms")?,
                        revoked_ms: r.try_get("revoked_ms")?,
                    })
                })
                .collect()
        }

        pub async fn create_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let b = &team.budget;
            let result = sqlx::query(
                "INSERT INTO teams (name, limit_nano, period, downgrade_at, models, rpm, tpm, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&team.name)
            .bind(b.limit.map(|l| l.0))
            .bind(b.period.as_str())
            .bind(b.downgrade_at)
            .bind(models_to_json(&b.models))
            .bind(b.rpm.map(to_i64))
            .bind(b.tpm.map(to_i64))
            .bind(team.created_ms)
            .execute(&mut *tx)
            .await;
            if let Err(sqlx::Error::Database(e)) = &result {
                if e.is_unique_violation() {
                    return Err(LedgerError::Conflict(format!("team {:?} already exists", team.name)));
                }
            }
            result?;
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn update_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let b = &team.budget;
            let done = sqlx::query(
                "UPDATE teams SET limit_nano = $2, period = $3, downgrade_at = $4, models = $5, rpm = $6, tpm = $7 \
                 WHERE name = $1",
            )
            .bind(&team.name)
            .bind(b.limit.map(|l| l.0))
            .bind(b.period.as_str())
            .bind(b.downgrade_at)
            .bind(models_to_json(&b.models))
            .bind(b.rpm.map(to_i64))
            .bind(b.tpm.map(to_i64))
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("team {:?} does not exist", team.name)));
            }
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn delete_team(&self, name: &str, now_ms: i64) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let done = sqlx::query("DELETE FROM teams WHERE name = $1").bind(name).execute(&mut *tx).await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("team {name:?} does not exist")));
            }
            sqlx::query("UPDATE keys SET revoked_ms = $2 WHERE team = $1 AND revoked_ms IS NULL")
                .bind(name)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn create_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let exists: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM teams WHERE name = $1").bind(&key.team).fetch_one(&mut *tx).await?;
            if exists == 0 {
                return Err(LedgerError::NotFound(format!("team {:?} does not exist", key.team)));
            }
            let b = &key.budget;
            sqlx::query(
                "INSERT INTO keys (id, team, name, key_hash, prefix, limit_nano, period, downgrade_at, models, rpm, tpm, \
                 created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL)",
            )
            .bind(&key.id)
            .bind(&key.team)
            .bind(&key.name)
            .bind(hash_to_hex(&key.key_hash))
            .bind(&key.prefix)
            .bind(b.limit.map(|l| l.0))
            .bind(b.period.as_str())
            .bind(b.downgrade_at)
            .bind(models_to_json(&b.models))
            .bind(b.rpm.map(to_i64))
            .bind(b.tpm.map(to_i64))
            .bind(key.created_ms)
            .execute(&mut *tx)
            .await?;
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn update_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let b = &key.budget;
            let done = sqlx::query(
                "UPDATE keys SET name = $2, limit_nano = $3, period = $4, downgrade_at = $5, models = $6, rpm = $7, \
                 tpm = $8 WHERE id = $1",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(b.limit.map(|l| l.0))
            .bind(b.period.as_str())
            .bind(b.downgrade_at)
            .bind(models_to_json(&b.models))
            .bind(b.rpm.map(to_i64))
            .bind(b.tpm.map(to_i64))
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("key {:?} does not exist", key.id)));
            }
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let done = sqlx::query("UPDATE keys SET revoked_ms = COALESCE(revoked_ms, $2) WHERE id = $1")
                .bind(id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("key {id:?} does not exist")));
            }
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn spent_since(&self, key: bool, id: &str, since_ms: i64) -> Result<NanoUsd, LedgerError> {
            let sql = if key {
                concat!("SELECT COALESCE(SUM(cost_nano), 0)", $int, " FROM requests WHERE key_id = $1 AND time_ms >= $2 AND usage_source <> 'pending'")
            } else {
                concat!("SELECT COALESCE(SUM(cost_nano), 0)", $int, " FROM requests WHERE team = $1 AND time_ms >= $2 AND usage_source <> 'pending'")
            };
            let sum: i64 = sqlx::query_scalar(sql).bind(id).bind(since_ms).fetch_one(&self.pool).await?;
            Ok(NanoUsd(sum))
        }

        pub async fn spend(
            &self,
            filter: &SpendFilter,
            group_by: &[GroupBy],
        ) -> Result<(SpendTotals, Vec<SpendGroup>), LedgerError> {
            let column = |g: GroupBy| match g {
                GroupBy::Team => "team",
                GroupBy::Key => "key_id",
                GroupBy::Model => "served_model",
                GroupBy::Day => $day,
            };
            let mut qb = QueryBuilder::<$db>::new("SELECT ");
            for (i, g) in group_by.iter().enumerate() {
                qb.push(column(*g)).push(format!(" AS g{i}, "));
            }
            qb.push(
                concat!(
                    "COUNT(*) AS requests, COALESCE(SUM(input_tokens), 0)", $int, " AS input_tokens, ",
                    "COALESCE(SUM(cached_input_tokens), 0)", $int, " AS cached_input_tokens, ",
                    "COALESCE(SUM(output_tokens), 0)", $int, " AS output_tokens, ",
                    "COALESCE(SUM(cost_nano), 0)", $int, " AS cost_nano FROM requests WHERE usage_source <> 'pending'"
                ),
            );
            Self::push_spend_filter(&mut qb, filter);
            if !group_by.is_empty() {
                qb.push(" GROUP BY ");
                for i in 0..group_by.len() {
                    if i > 0 {
                        qb.push(", ");
                    }
                    qb.push(format!("g{i}"));
                }
                qb.push(" ORDER BY ");
                for i in 0..group_by.len() {
                    if i > 0 {
                        qb.push(", ");
                    }
                    qb.push(format!("g{i}"));
                }
            }
            let rows = qb.build().fetch_all(&self.pool).await?;
            let mut groups = Vec::with_capacity(rows.len());
            let mut total = SpendTotals::default();
            for row in &rows {
                let totals = totals_from_row(row)?;
                total.requests += totals.requests;
                total.input_tokens += totals.input_tokens;
                total.cached_input_tokens += totals.cached_input_tokens;
                total.output_tokens += totals.output_tokens;
                total.cost += totals.cost;
                let mut labels = Vec::with_capacity(group_by.len());
                for (i, g) in group_by.iter().enumerate() {
                    labels.push((*g, row.try_get::<String, _>(format!("g{i}").as_str())?));
                }
                groups.push(SpendGroup { labels, totals });
            }
            if group_by.is_empty() {
                // No grouping: the single row is the total.
                groups.clear();
            }
            Ok((total, groups))
        }

        pub async fn logs(&self, filter: &LogFilter) -> Result<LogPage, LedgerError> {
            let mut qb = QueryBuilder::<$db>::new(
                "SELECT request_id, time_ms, key_id, team, endpoint, model, served_model, input_tokens, \
                 cached_input_tokens, output_tokens, cost_nano, usage_source, status, latency_ms, stream \
                 FROM requests WHERE 1 = 1",
            );
            if let Some(before) = &filter.before {
                qb.push(" AND request_id < ").push_bind(before.clone());
            }
            if let Some(team) = &filter.team {
                qb.push(" AND team = ").push_bind(team.clone());
            }
            if let Some(key) = &filter.key_id {
                qb.push(" AND key_id = ").push_bind(key.clone());
            }
            let limit = i64::from(filter.limit.max(1));
            qb.push(" ORDER BY request_id DESC LIMIT ").push_bind(limit + 1);
            let rows = qb.build().fetch_all(&self.pool).await?;
            let mut records = rows.iter().map(record_from_row).collect::<Result<Vec<_>, _>>()?;
            let next_before = if records.len() as i64 > limit {
                records.truncate(limit as usize);
                records.last().map(|r| r.request_id.clone())
            } else {
                None
            };
            Ok(LogPage { records, next_before })
        }

        fn push_spend_filter(qb: &mut QueryBuilder<'_, $db>, filter: &SpendFilter) {
            // A time range is also put as a range of request ids (which begin with their
            // time): the primary key's index then finds it, with no index on time_ms to keep
            // up on every insert.
            if let Some(from) = filter.from_ms {
                if let Some(floor) = crate::ledger::request_id_floor(from) {
                    qb.push(" AND request_id >= ").push_bind(floor);
                }
                qb.push(" AND time_ms >= ").push_bind(from);
            }
            if let Some(to) = filter.to_ms {
                if let Some(floor) = crate::ledger::request_id_floor(to) {
                    qb.push(" AND request_id < ").push_bind(floor);
                }
                qb.push(" AND time_ms < ").push_bind(to);
            }
            if let Some(team) = &filter.team {
                qb.push(" AND team = ").push_bind(team.clone());
            }
            if let Some(key) = &filter.key_id {
                qb.push(" AND key_id = ").push_bind(key.clone());
            }
            if let Some(model) = &filter.model {
                qb.push(" AND (served_model = ").push_bind(model.clone()).push(" OR model = ").push_bind(model.clone()).push(")");
            }
        }

        async fn bump_version(tx: &mut sqlx::Transaction<'_, $db>) -> Result<(), LedgerError> {
            sqlx::query("UPDATE directory_version SET version = version + 1 WHERE id = 1").execute(&mut **tx).await?;
            Ok(())
        }
    };
}
pub(crate) use shared_queries;

/// The conflict clause of every record insert (same SQL on both backends): a final record
/// replaces the row, a journal entry never does.
pub(crate) const UPSERT: &str = " ON CONFLICT (request_id) DO UPDATE SET time_ms = excluded.time_ms, \
    key_id = excluded.key_id, team = excluded.team, endpoint = excluded.endpoint, model = excluded.model, \
    served_model = excluded.served_model, input_tokens = excluded.input_tokens, \
    cached_input_tokens = excluded.cached_input_tokens, output_tokens = excluded.output_tokens, \
    cost_nano = excluded.cost_nano, usage_source = excluded.usage_source, status = excluded.status, \
    latency_ms = excluded.latency_ms, stream = excluded.stream \
    WHERE excluded.usage_source <> 'pending'";

/// One row per request of a batch, in order of first appearance: the last final record wins,
/// and a journal entry counts only while no final record of its request is in the batch
/// (one statement may not touch a row twice, and this is what applying them in order means).
pub(crate) fn latest_per_request<R: Borrow<RequestRecord>>(records: &[R]) -> Vec<&RequestRecord> {
    let mut out: Vec<&RequestRecord> = Vec::with_capacity(records.len());
    let mut at: foldhash::HashMap<&str, usize> = foldhash::HashMapExt::with_capacity(records.len());
    for r in records.iter().map(Borrow::borrow) {
        match at.get(r.request_id.as_str()) {
            None => {
                at.insert(&r.request_id, out.len());
                out.push(r);
            }
            Some(&i) if r.usage_source != UsageSource::Pending => out[i] = r,
            Some(_) => {}
        }
    }
    out
}

/// `rows` split into consecutive statements of the sizes [`pow2_chunks`] gives.
pub(crate) fn pow2_split<T>(rows: &[T], max: usize) -> Vec<&[T]> {
    let mut rest = rows;
    pow2_chunks(rows.len(), max)
        .into_iter()
        .map(|len| {
            let (chunk, after) = rest.split_at(len);
            rest = after;
            chunk
        })
        .collect()
}

/// Splits `n` rows into statement sizes that are powers of two, largest first, none over
/// `max` (rounded down to a power of two).
pub(crate) fn pow2_chunks(n: usize, max: usize) -> Vec<usize> {
    let max = if max == 0 { 1 } else { 1 << max.ilog2() };
    let mut left = n;
    let mut out = Vec::new();
    while left >= max {
        out.push(max);
        left -= max;
    }
    let mut size = max;
    while left > 0 {
        size /= 2;
        if left >= size {
            out.push(size);
            left -= size;
        }
    }
    out
}

/// Columns of one request record (the INSERT's bound parameters per row).
pub(crate) const RECORD_COLUMNS: usize = 15;

/// The head of every record insert: its columns, in the order [`record_columns`] gives
/// their values.
pub(crate) const INSERT_INTO: &str =
    "INSERT INTO requests (request_id, time_ms, key_id, team, endpoint, model, served_model, \
    input_tokens, cached_input_tokens, output_tokens, cost_nano, usage_source, status, latency_ms, stream) ";

/// One bound value of a record.
pub(crate) enum Column<'a> {
    Text(&'a str),
    Int(i64),
    Bool(bool),
}

/// A record's values in [`INSERT_INTO`]'s column order, as every write path binds them
/// (sqlx's for both backends, and the SQLite record connection's).
pub(crate) fn record_columns(r: &RequestRecord) -> [Column<'_>; RECORD_COLUMNS] {
    use Column::{Bool, Int, Text};
    [
        Text(&r.request_id),
        Int(r.time_ms),
        Text(&r.key_id),
        Text(&r.team),
        Text(r.endpoint),
        Text(&r.model),
        Text(&r.served_model),
        Int(to_i64(r.usage.input_tokens)),
        Int(to_i64(r.usage.cached_input_tokens)),
        Int(to_i64(r.usage.output_tokens)),
        Int(r.cost.0),
        Text(r.usage_source.as_str()),
        Int(i64::from(r.status)),
        Int(to_i64(r.latency_ms)),
        Bool(r.stream),
    ]
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::pow2_chunks;

    proptest::proptest! {
        /// Ids read as they always have: `req_`, 12 hex digits of the (clamped) start time,
        /// 16 of the random bits.
        #[test]
        fn request_ids_are_time_then_random_in_hex(time in proptest::prelude::any::<i64>(), random in proptest::prelude::any::<u64>()) {
            let expected = format!("req_{:012x}{random:016x}", time.clamp(0, super::max_id_time()));
            proptest::prop_assert_eq!(super::request_id_with(time, random), expected);
        }
    }

    #[test]
    fn batches_split_into_power_of_two_statements() {
        assert_eq!(pow2_chunks(0, 1024), Vec::<usize>::new());
        assert_eq!(pow2_chunks(1, 1024), [1]);
        assert_eq!(pow2_chunks(13, 1024), [8, 4, 1]);
        assert_eq!(pow2_chunks(2_500, 1_000), [512, 512, 512, 512, 256, 128, 64, 4]);
        for n in 0..3_000 {
            let chunks = pow2_chunks(n, 2_133);
            assert_eq!(chunks.iter().sum::<usize>(), n);
            assert!(chunks.iter().all(|c| c.is_power_of_two() && *c <= 2_048));
        }
    }

    #[test]
    fn split_batches_are_the_rows_in_order() {
        let rows: Vec<usize> = (0..2_500).collect();
        let chunks = super::pow2_split(&rows, 1_000);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), pow2_chunks(2_500, 1_000));
        assert_eq!(chunks.concat(), rows);
        assert!(super::pow2_split::<usize>(&[], 1_000).is_empty());
    }
}
