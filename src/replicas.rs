//! Budgets and rate windows shared by several replicas (SPEC §8).
//!
//! On SQLite one process owns the ledger, and its budgets and rate windows live in memory
//! ([`BudgetBook`], [`RateLimiter`]). On PostgreSQL any number of replicas may share the
//! ledger, so a limited budget's reservations and every rpm / tpm window live in the database,
//! each change one atomic function call (`ledger::shared`): however requests are spread over
//! the replicas, a budget is never passed and a window counts each request once. A request
//! whose budgets have no limit (and no rpm / tpm) makes no call at all.
//!
//! Each replica holds a lease (`reservation_lease_ms`) it renews well within its length; a
//! reservation is held under the replica's name. When a replica dies, any other sweeps its
//! reservations once its lease has run out: each is released and charged its floor, the
//! prompt the upstream certainly billed, and its request's journal entry is marked
//! `interrupted` at that charge. Settling is off the request's path: settlements queue and go
//! to the database in batches; until one lands its reservation stays held, so a delay costs
//! room, never exactness.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::distr::{Alphanumeric, SampleString};
use tokio::sync::{mpsc, oneshot};

use crate::ledger::shared::{Correction, HoldRow, RateAsk, SettleRow};
use crate::ledger::LedgerError;
use crate::ledger::SharedStore;
use crate::policy::budget::{
    retry_after_s, Applicable, BudgetBook, BudgetStatus, BudgetStore, Hold, Loose, RateLimiter, RateRefusal,
    RateTicket, Refusal, Reservation, Scope, Unavailable,
};
use crate::policy::pricing::NanoUsd;

/// Settlements sent to the database in one call, at most.
const SETTLE_BATCH: usize = 512;

/// This replica on a shared PostgreSQL ledger: its name, its lease and its settlement queue.
pub struct Replica {
    id: Arc<str>,
    db: SharedStore,
    lease_ms: u64,
    next: AtomicU64,
    queue: mpsc::UnboundedSender<Queued>,
    /// The renewal task, stopped before the lease is ended (a renewal landing after the end
    /// would take the lease again, and hold what is left for a whole lease).
    renewer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

enum Queued {
    Settle(Vec<SettleRow>),
    Correct(Correction),
    /// Answered once everything queued before it has landed.
    Flush(oneshot::Sender<()>),
}

impl Replica {
    /// Takes a lease under a new name and starts renewing it, sweeping dead replicas'
    /// reservations, and sending settlements. Stops when `stop` is cancelled (after
    /// [`Replica::close`]).
    pub async fn start(db: SharedStore, lease_ms: u64, stop: tokio_util::sync::CancellationToken) -> Arc<Replica> {
        let id: Arc<str> = format!("rep_{}", Alphanumeric.sample_string(&mut rand::rng(), 12)).into();
        // A replica starts while its shared store is down (Redis): it holds nothing, refusing
        // budgeted requests with a 503 and saying so at /health/ready, until a renewal lands.
        if let Err(e) = db.renew_lease(&id, lease_term(lease_ms)).await {
            tracing::warn!(error = %e, "could not take a reservation lease; retrying");
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let replica =
            Arc::new(Replica { id, db, lease_ms, next: AtomicU64::new(1), queue, renewer: Default::default() });
        let renewer = tokio::spawn(renew(replica.clone(), stop));
        *replica.renewer.lock().unwrap_or_else(|e| e.into_inner()) = Some(renewer);
        tokio::spawn(send_settlements(replica.db.clone(), rx));
        tracing::info!(replica = %replica.id, lease_ms, store = replica.db.name(), "budgets and rate windows shared");
        replica
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where budgets are shared: "postgres" or "redis".
    pub fn store(&self) -> &'static str {
        self.db.name()
    }

    /// Whether the shared store answers.
    pub async fn ping(&self) -> bool {
        matches!(tokio::time::timeout(Duration::from_secs(2), self.db.ping()).await, Ok(Ok(())))
    }

    /// Waits until every settlement queued so far has landed, then ends the lease (what is
    /// still held, nothing should be, is released by the next sweep of another replica).
    pub async fn close(&self) {
        let renewer = self.renewer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(renewer) = renewer {
            renewer.abort();
            let _ = renewer.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Queued::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
        if let Err(e) = self.db.end_lease(&self.id).await {
            tracing::warn!(error = %e, "could not end this replica's lease; it runs out by itself");
        }
    }

    /// A name for a hold or a rate ticket, unique across replicas.
    fn name(&self) -> String {
        format!("{}:{}", self.id, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// How often a replica renews its lease and sweeps: every third of the lease, at least once a
/// second (a dead replica's holds are released within a tick of its lease's end, whatever the
/// sweeping replica's own lease).
fn tick_ms(lease_ms: u64) -> u64 {
    (lease_ms / 3).clamp(50, 1000)
}

/// How far ahead a renewal sets the lease's end: one tick short of `lease_ms`, so that a
/// replica dead just after a renewal has its holds swept within `lease_ms` of its death, while
/// a live one, renewing every tick, keeps a third of its lease or more in hand.
fn lease_term(lease_ms: u64) -> u64 {
    lease_ms.saturating_sub(tick_ms(lease_ms)).max(tick_ms(lease_ms) * 2)
}

/// Renews the lease every tick and sweeps the reservations of replicas whose lease has run out.
async fn renew(replica: Arc<Replica>, stop: tokio_util::sync::CancellationToken) {
    let every = Duration::from_millis(tick_ms(replica.lease_ms));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = replica.db.renew_lease(&replica.id, lease_term(replica.lease_ms)).await {
            tracing::warn!(error = %e, "could not renew this replica's reservation lease");
            continue;
        }
        match replica.db.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(reservations = n, "released the reservations of a replica whose lease ran out"),
            Err(e) => tracing::warn!(error = %e, "could not sweep expired reservations"),
        }
    }
}

/// Sends queued settlements and token corrections in batches; a failed batch is retried until
/// it lands (its reservations stay held meanwhile, so budgets stay exact, if tighter).
async fn send_settlements(db: SharedStore, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut settles = Vec::new();
    let mut corrections = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Queued::Settle(rows) => settles.extend(rows),
                Queued::Correct(c) => corrections.push(c),
                Queued::Flush(tx) => flushes.push(tx),
            }
            next = if settles.len() + corrections.len() < SETTLE_BATCH { rx.try_recv().ok() } else { None };
        }
        // Each part is cleared once it has landed: a retry never books a settlement twice.
        let mut backoff = Duration::from_millis(50);
        while !settles.is_empty() || !corrections.is_empty() {
            let sent = if !settles.is_empty() {
                db.settle(&settles).await.map(|()| settles.clear())
            } else {
                db.rate_correct(&corrections).await.map(|()| corrections.clear())
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "could not settle reservations; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

fn scope_key(scope: &Scope) -> String {
    match scope {
        Scope::Team(name) => format!("team:{name}"),
        Scope::Key(id) => format!("key:{id}"),
    }
}

fn unavailable(e: LedgerError) -> Unavailable {
    tracing::error!(error = %e, "the shared budget store is unavailable");
    Unavailable(e.to_string())
}

/// The budget store of a replica on PostgreSQL.
pub struct SharedBudgets {
    replica: Arc<Replica>,
}

impl BudgetStore for SharedBudgets {
    async fn status(&self, applicable: &Applicable, now: DateTime<Utc>) -> Result<BudgetStatus, Unavailable> {
        let start = applicable.spec.period.start(now);
        let scope = scope_key(&applicable.scope);
        // Only limited budgets are accounted in the shared store; the spend of one without a
        // limit is the ledger's.
        let (spent, reserved) = match applicable.spec.limit {
            Some(_) => self.replica.db.budget_account(&scope, start).await,
            None => self.replica.db.ledger_spent(&scope, start).await.map(|spent| (spent, 0)),
        }
        .map_err(unavailable)?;
        let (spent, reserved) = (NanoUsd(spent), NanoUsd(reserved));
        Ok(BudgetStatus {
            spent,
            reserved,
            remaining: applicable.spec.limit.map(|l| l.saturating_sub(spent + reserved).max(NanoUsd::ZERO)),
            resets_at_ms: applicable.spec.period.reset(now),
        })
    }

    async fn reserve(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        hold: Hold<'_>,
    ) -> Result<Result<Reservation, Refusal>, Unavailable> {
        let limited: Vec<&Applicable> = budgets.iter().filter(|b| b.spec.limit.is_some()).collect();
        if limited.is_empty() {
            return Ok(Ok(Reservation::held_as(None, amount, Vec::new(), hold.floor)));
        }
        let scopes: Vec<String> = limited.iter().map(|b| scope_key(&b.scope)).collect();
        let starts: Vec<i64> = limited.iter().map(|b| b.spec.period.start(now)).collect();
        let limits: Vec<i64> = limited.iter().map(|b| b.spec.limit.map_or(i64::MAX, |l| l.0)).collect();
        let name = self.replica.name();
        let row = HoldRow {
            hold: &name,
            request_id: hold.request_id,
            replica: &self.replica.id,
            scopes: &scopes,
            starts: &starts,
            limits: &limits,
            amount: amount.0,
            floor: hold.floor.0,
        };
        let reserved = match self.replica.db.reserve(&row).await {
            Ok(reserved) => reserved,
            Err(e) => {
                // The hold may have been taken and only its answer lost: release it by name
                // (a release of a hold never taken books nothing).
                let rows = settle_rows(&name, scopes.iter().cloned().zip(starts.iter().copied()), 0, 0);
                let _ = self.replica.queue.send(Queued::Settle(rows));
                return Err(unavailable(e));
            }
        };
        match reserved {
            Ok(()) => {
                let held = limited.iter().zip(&starts).map(|(b, s)| (b.scope.clone(), *s)).collect();
                Ok(Ok(Reservation::held_as(Some(name.into()), amount, held, hold.floor)))
            }
            Err(refused) => {
                let b = limited[refused.index];
                let used = NanoUsd(refused.spent) + NanoUsd(refused.reserved);
                let limit = b.spec.limit.unwrap_or(NanoUsd::ZERO);
                Ok(Err(Refusal {
                    scope: b.scope.clone(),
                    remaining: limit.saturating_sub(used).max(NanoUsd::ZERO),
                    retry_after_s: retry_after_s(b, now),
                }))
            }
        }
    }

    /// Other replicas cannot count this one's prompts: reservations are exact from the start.
    fn tightens(&self) -> bool {
        false
    }

    fn loose_on(&self, _budgets: &[Applicable]) -> Vec<Arc<Loose>> {
        Vec::new()
    }

    fn tighten(&self, _loose: &[Arc<Loose>]) {}

    fn settle(&self, reservation: Reservation, cost: NanoUsd) {
        if let Some(rows) = rows_of(&reservation, cost) {
            // The receiver lives as long as the process's runtime; if it is gone, the lease
            // runs out and the sweep releases the hold.
            let _ = self.replica.queue.send(Queued::Settle(rows));
        }
    }

    /// Gives the hold back at once (a fallback's reservation must find its room free),
    /// queueing the release only if the store does not answer.
    async fn release(&self, reservation: Reservation) {
        let Some(rows) = rows_of(&reservation, NanoUsd::ZERO) else { return };
        if let Err(e) = self.replica.db.settle(&rows).await {
            tracing::warn!(error = %e, "could not release a reservation; queued");
            let _ = self.replica.queue.send(Queued::Settle(rows));
        }
    }
}

/// The settlement rows of `reservation` at `cost`, one per budget held (None: nothing held).
fn rows_of(reservation: &Reservation, cost: NanoUsd) -> Option<Vec<SettleRow>> {
    let hold = reservation.hold()?;
    let held = reservation.held().iter().map(|(scope, start)| (scope_key(scope), *start));
    Some(settle_rows(hold, held, cost.0, reservation.floor().0))
}

fn settle_rows(hold: &str, held: impl Iterator<Item = (String, i64)>, cost: i64, floor: i64) -> Vec<SettleRow> {
    held.map(|(scope, period_start)| SettleRow { hold: hold.to_string(), scope, period_start, cost, floor }).collect()
}

/// The budget store a server uses: its own, or the one shared with its replicas.
pub enum Budgets {
    Local(BudgetBook),
    Shared(SharedBudgets),
}

impl Budgets {
    pub fn shared(replica: Arc<Replica>) -> Budgets {
        Budgets::Shared(SharedBudgets { replica })
    }

    /// The in-process book, when this server keeps its budgets itself.
    pub fn local(&self) -> Option<&BudgetBook> {
        match self {
            Budgets::Local(book) => Some(book),
            Budgets::Shared(_) => None,
        }
    }
}

impl BudgetStore for Budgets {
    async fn status(&self, applicable: &Applicable, now: DateTime<Utc>) -> Result<BudgetStatus, Unavailable> {
        match self {
            Budgets::Local(b) => b.status(applicable, now).await,
            Budgets::Shared(s) => s.status(applicable, now).await,
        }
    }

    async fn reserve(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        hold: Hold<'_>,
    ) -> Result<Result<Reservation, Refusal>, Unavailable> {
        match self {
            Budgets::Local(b) => b.reserve(budgets, amount, now, hold).await,
            Budgets::Shared(s) => s.reserve(budgets, amount, now, hold).await,
        }
    }

    fn tightens(&self) -> bool {
        matches!(self, Budgets::Local(_))
    }

    fn loose_on(&self, budgets: &[Applicable]) -> Vec<Arc<Loose>> {
        match self {
            Budgets::Local(b) => b.loose_on(budgets),
            Budgets::Shared(s) => s.loose_on(budgets),
        }
    }

    fn tighten(&self, loose: &[Arc<Loose>]) {
        match self {
            Budgets::Local(b) => b.tighten(loose),
            Budgets::Shared(s) => s.tighten(loose),
        }
    }

    fn settle(&self, reservation: Reservation, cost: NanoUsd) {
        match self {
            Budgets::Local(b) => b.settle(reservation, cost),
            Budgets::Shared(s) => s.settle(reservation, cost),
        }
    }

    async fn release(&self, reservation: Reservation) {
        match self {
            Budgets::Local(b) => b.release(reservation).await,
            Budgets::Shared(s) => s.release(reservation).await,
        }
    }
}

/// A request's place in its rate windows, corrected to its real tokens when it settles.
#[derive(Debug)]
pub enum Ticket {
    Local(RateTicket),
    Shared {
        name: String,
        /// The windows it is in.
        scopes: Vec<String>,
        tokens: u64,
    },
    /// No window limits the request.
    None,
}

/// The rpm / tpm windows a server uses: its own, or the ones shared with its replicas.
pub enum Rates {
    Local(RateLimiter),
    Shared(Arc<Replica>),
}

impl Rates {
    /// Admits a request charging `tokens` to every limited window, or refuses it without
    /// charging any.
    pub async fn admit(
        &self,
        budgets: &[Applicable],
        tokens: u64,
        now_ms: i64,
    ) -> Result<Result<Ticket, RateRefusal>, Unavailable> {
        match self {
            Rates::Local(rl) => Ok(rl.admit(budgets, tokens, now_ms).map(Ticket::Local)),
            Rates::Shared(replica) => {
                let name = replica.name();
                Ok(shared_rates(replica, budgets, tokens, now_ms, Some(&name)).await?.map(|scopes| {
                    if scopes.is_empty() {
                        Ticket::None
                    } else {
                        Ticket::Shared { name, scopes, tokens }
                    }
                }))
            }
        }
    }

    /// Whether [`admit`](Self::admit) would admit the request now, taking no slot.
    pub async fn check(
        &self,
        budgets: &[Applicable],
        tokens: u64,
        now_ms: i64,
    ) -> Result<Result<(), RateRefusal>, Unavailable> {
        match self {
            Rates::Local(rl) => Ok(rl.check(budgets, tokens, now_ms)),
            Rates::Shared(replica) => Ok(shared_rates(replica, budgets, tokens, now_ms, None).await?.map(|_| ())),
        }
    }

    /// Replaces the ticket's estimated tokens with the real count.
    pub fn correct(&self, ticket: Ticket, actual_tokens: u64) {
        match (self, ticket) {
            (Rates::Local(rl), Ticket::Local(t)) => rl.correct(t, actual_tokens),
            (Rates::Shared(replica), Ticket::Shared { name, scopes, tokens }) if tokens != actual_tokens => {
                let correction = Correction { ticket: name, scopes, tokens: actual_tokens as i64 };
                let _ = replica.queue.send(Queued::Correct(correction));
            }
            _ => {}
        }
    }
}

/// Admits (`ticket` given) or checks a request against the shared windows; gives the windows
/// it was admitted to (none when none of its budgets has one).
async fn shared_rates(
    replica: &Replica,
    budgets: &[Applicable],
    tokens: u64,
    now_ms: i64,
    ticket: Option<&str>,
) -> Result<Result<Vec<String>, RateRefusal>, Unavailable> {
    let limited: Vec<&Applicable> = budgets.iter().filter(|b| b.spec.rpm.is_some() || b.spec.tpm.is_some()).collect();
    if limited.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let scopes: Vec<String> = limited.iter().map(|b| scope_key(&b.scope)).collect();
    let rpm: Vec<Option<i64>> = limited.iter().map(|b| b.spec.rpm.map(|v| v as i64)).collect();
    let tpm: Vec<Option<i64>> = limited.iter().map(|b| b.spec.tpm.map(|v| v as i64)).collect();
    let ask = RateAsk {
        ticket: ticket.unwrap_or(""),
        scopes: &scopes,
        rpm: &rpm,
        tpm: &tpm,
        tokens: tokens as i64,
        now_ms,
        record: ticket.is_some(),
    };
    let admitted = replica.db.rate_admit(&ask).await.map_err(unavailable)?;
    Ok(admitted.map(|()| scopes).map_err(|r| {
        let b = limited[r.index];
        let per_minute = r.what.starts_with("requests");
        RateRefusal {
            scope: b.scope.clone(),
            what: if per_minute { "requests per minute" } else { "tokens per minute" },
            limit: if per_minute { b.spec.rpm.unwrap_or(0) } else { b.spec.tpm.unwrap_or(0) },
            retry_after_s: (r.retry_ms.max(1000) as u64).div_ceil(1000),
        }
    }))
}
