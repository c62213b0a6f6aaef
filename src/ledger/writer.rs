//! The group-commit writer. A request claims a [`Slot`] in the bounded queue when it is
//! admitted, journals its in-flight entry ([`Ledger::journal`]), and hands its final record
//! to [`Ledger::write`]; corrections go through [`Ledger::amend`]. One task takes whatever
//! has queued up, writes it to the database in one transaction (`Backend::apply`), and
//! releases the records' journal [`Pin`]s once it is committed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend::Batch;
use super::journal::{self, Journal, LineOp as Op, Pin};
use super::{Backend, LedgerError, RequestRecord};

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
pub(crate) const MAX_BATCH: usize = 1024;

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
        // only releases pins. (Replaying a journal applies both, in order.) The records
        // move into the batch; the pins stay here until it lands.
        let mut pins = Vec::with_capacity(jobs.len() * 2);
        let mut writes = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            pins.extend([job.pin, job.entry].into_iter().flatten());
            if job.op == Op::Write {
                writes.push((job.op, job.record));
            }
        }
        let batch: Batch = Arc::new(writes);
        let mut backoff = Duration::from_millis(10);
        let mut gave_up_at = None;
        let landed = loop {
            let written = if batch.is_empty() { Ok(()) } else { backend.apply(&batch).await };
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
        health.queued.fetch_sub(received as u64, Ordering::Relaxed);
        if landed {
            health.written.fetch_add(records, Ordering::Relaxed);
            health.batches.fetch_add(1, Ordering::Relaxed);
            for pin in pins {
                pin.commit();
            }
            total += received as u64;
            committed.send_replace(total);
        } else {
            // Dropped uncommitted: their segments stay on disk.
            drop(pins);
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

/// How long the writer keeps retrying a failing database once shutdown has begun.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(10);

/// How long the writer, once stopped, waits for a record from a request that has not
/// settled yet (see the writer).
const STRAGGLER_WAIT: Duration = Duration::from_secs(1);
