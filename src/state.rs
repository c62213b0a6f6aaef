//! The state every request shares: a handful of cheap-to-clone handles.
//!
//! It lives outside the server so that the handlers and the request's phases depend on the
//! state they use, not on the machinery that serves connections.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Directory;
use crate::config::Config;
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::budget::{Applicable, BudgetBook, Clock, RateLimiter, Scope};
use crate::replicas::{Budgets, Rates, Replica};
use crate::upstream::Upstreams;

/// Cheap-to-clone handles shared by every request.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Arc<Config>,
    pub ledger: Ledger,
    pub directory: Directory,
    /// In-process on SQLite; shared with the other replicas on PostgreSQL.
    pub budgets: Budgets,
    pub rates: Rates,
    /// This replica on a shared PostgreSQL ledger.
    pub replica: Option<Arc<Replica>>,
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    pub clock: Clock,
    /// Forwarding and stream tasks; shutdown waits for them.
    pub tracker: TaskTracker,
    /// Cancelled when shutdown's grace period runs out: forwarding and stream pumps stop
    /// reading their upstreams, settle and record what they have, and answer a 503 or cut
    /// their stream off (see `proxy`). Requests wait on a child token of their thread's own
    /// ([`AppState::cut_token`]).
    pub cut: CancellationToken,
    /// Tells this state apart from others in the same process (tests run many servers).
    id: u64,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Everything [`AppState::new`] is made of but its identity.
pub struct Parts {
    pub config: Arc<Config>,
    pub ledger: Ledger,
    pub directory: Directory,
    pub upstreams: Upstreams,
    pub clock: Clock,
    /// This replica's lease, when budgets and rate windows are shared (PostgreSQL).
    pub replica: Option<Arc<Replica>>,
}

thread_local! {
    /// This thread's child of one state's `cut`, with that state's id.
    static THREAD_CUT: RefCell<Option<(u64, Arc<CancellationToken>)>> = const { RefCell::new(None) };
}

impl AppState {
    pub fn new(parts: Parts) -> AppState {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let Parts { config, ledger, directory, upstreams, clock, replica } = parts;
        let (budgets, rates) = match &replica {
            Some(r) => (Budgets::shared(r.clone()), Rates::Shared(r.clone())),
            None => (Budgets::Local(BudgetBook::default()), Rates::Local(RateLimiter::default())),
        };
        AppState(Arc::new(Inner {
            config,
            ledger,
            directory,
            budgets,
            rates,
            replica,
            upstreams,
            metrics: Metrics::default(),
            clock,
            tracker: TaskTracker::new(),
            cut: CancellationToken::new(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }))
    }

    /// Shutdown's cut as the current thread should wait on it: a child token of this
    /// thread's own. A token's waiters sit behind a lock of its own, and every request waits
    /// on the cut: on one token shared by all worker threads, that lock would bounce between
    /// cores on every request.
    pub fn cut_token(&self) -> Arc<CancellationToken> {
        THREAD_CUT.with(|cut| {
            let mut cut = cut.borrow_mut();
            match &*cut {
                Some((id, token)) if *id == self.id => token.clone(),
                _ => {
                    let token = Arc::new(self.cut.child_token());
                    *cut = Some((self.id, token.clone()));
                    token
                }
            }
        })
    }

    /// Makes sure every limited budget's account holds this period's spend from the ledger
    /// (a shared store starts its accounts from the ledger itself).
    pub async fn load_accounts(
        &self,
        budgets: &[Applicable],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ApiError> {
        for b in budgets.iter().filter(|b| b.spec.limit.is_some()) {
            self.load_account(b, now).await?;
        }
        Ok(())
    }

    /// Makes sure one budget's account holds this period's spend from the ledger, including
    /// records still on their way to the database (waiting for them as `Ledger::sync` does).
    pub async fn load_account(&self, budget: &Applicable, now: chrono::DateTime<chrono::Utc>) -> Result<(), ApiError> {
        let Some(book) = self.budgets.local() else { return Ok(()) };
        let start = budget.spec.period.start(now);
        if book.is_loaded(&budget.scope, start) {
            return Ok(());
        }
        self.ledger.sync().await;
        let (is_key, id) = match &budget.scope {
            Scope::Key(id) => (true, &**id),
            Scope::Team(name) => (false, &**name),
        };
        let spent = self.ledger.backend().spent_since(is_key, id, start).await.map_err(|e| {
            tracing::error!(error = %e, "could not load budget spend from the ledger");
            ApiError::LedgerUnavailable
        })?;
        book.load(budget.scope.clone(), start, spent);
        Ok(())
    }
}
