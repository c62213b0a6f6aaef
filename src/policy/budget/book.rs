//! The budget store of one process: every account in memory, behind one lock (a std
//! `Mutex`, never held across an `.await`). Accounts start from the ledger's sum for their
//! period (`AppState::load_account`) and count what settles here from then on.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt};

use super::{left_of, Applicable, BudgetStatus, BudgetStore, Hold, Loose, Refusal, Reservation, Scope, Unavailable};
use crate::policy::pricing::NanoUsd;

#[derive(Debug)]
struct Account {
    /// Start of the period `spent` belongs to, Unix ms.
    period_start: i64,
    spent: NanoUsd,
    reserved: NanoUsd,
    /// Loose reservations on this account not yet tightened, by id.
    loose: HashMap<u64, Arc<Loose>>,
    /// Whether `spent` started from the ledger's sum. An account a reservation made without
    /// a load (a scope with no limit needs none) counts only what settled since: the spend
    /// of earlier processes is missing until a load (a limit set later, an admin read).
    loaded: bool,
}

impl Account {
    fn new(period_start: i64, spent: NanoUsd, loaded: bool) -> Account {
        Account { period_start, spent, reserved: NanoUsd::ZERO, loose: HashMap::new(), loaded }
    }
}

/// All budget accounts, behind one lock.
#[derive(Default)]
pub struct BudgetBook {
    accounts: Mutex<HashMap<Scope, Account>>,
}

impl BudgetBook {
    /// Whether `scope`'s account is loaded for the period starting at `period_start`.
    pub fn is_loaded(&self, scope: &Scope, period_start: i64) -> bool {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        accounts.get(scope).is_some_and(|a| a.loaded && a.period_start == period_start)
    }

    /// Installs `spent` (summed from the ledger) as `scope`'s spend for the period, unless the
    /// account already tracks that period from a load (a concurrent loader got there first).
    /// An account that counted only its own settlements takes the ledger's sum, which holds
    /// them too (the loader synced the ledger first); its reservations stay held. (A
    /// settlement landing while the sum is read, its record not yet in it, is then missing
    /// from this process's figure; the ledger has it.)
    pub fn load(&self, scope: Scope, period_start: i64, spent: NanoUsd) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        match accounts.get_mut(&scope) {
            Some(a) if a.loaded && a.period_start == period_start => {}
            Some(a) => {
                a.period_start = period_start;
                a.spent = spent;
                a.loaded = true;
            }
            None => {
                accounts.insert(scope, Account::new(period_start, spent, true));
            }
        }
    }
}

impl BudgetStore for BudgetBook {
    /// Status of one budget at `now`.
    async fn status(&self, applicable: &Applicable, now: DateTime<Utc>) -> Result<BudgetStatus, Unavailable> {
        Ok(self.status_now(applicable, now))
    }

    /// Atomically reserves `amount` against every budget, or none of them. `loose` marks a
    /// reservation priced on a token bound, which others may tighten when they need room.
    async fn reserve(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        hold: Hold<'_>,
    ) -> Result<Result<Reservation, Refusal>, Unavailable> {
        Ok(self.reserve_now(budgets, amount, now, hold))
    }

    /// Loose reservations still untightened on any of these budgets.
    fn loose_on(&self, budgets: &[Applicable]) -> Vec<Arc<Loose>> {
        self.loose_on_now(budgets)
    }

    fn tighten(&self, loose: &[Arc<Loose>]) {
        self.tighten_now(loose);
    }

    fn settle(&self, reservation: Reservation, cost: NanoUsd) {
        self.settle_now(reservation, cost);
    }
}

impl BudgetBook {
    /// Status of one budget at `now`.
    pub fn status_now(&self, applicable: &Applicable, now: DateTime<Utc>) -> BudgetStatus {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let start = applicable.spec.period.start(now);
        let (spent, reserved) = match accounts.get_mut(&applicable.scope) {
            Some(a) => {
                roll(a, start);
                (a.spent, a.reserved)
            }
            None => (NanoUsd::ZERO, NanoUsd::ZERO),
        };
        BudgetStatus {
            spent,
            reserved,
            remaining: applicable.spec.limit.map(|l| left_of(l, spent + reserved)),
            resets_at_ms: applicable.spec.period.reset(now),
        }
    }

    /// Atomically reserves `amount` against every budget, or none of them. `loose` marks a
    /// reservation priced on a token bound, which others may tighten when they need room.
    pub fn reserve_now(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        hold: Hold<'_>,
    ) -> Result<Reservation, Refusal> {
        let loose = hold.loose;
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        for b in budgets {
            let start = b.spec.period.start(now);
            let account = accounts.entry(b.scope.clone()).or_insert_with(|| Account::new(start, NanoUsd::ZERO, false));
            roll(account, start);
            if let Some(limit) = b.spec.limit {
                let used = account.spent + account.reserved;
                if used + amount > limit {
                    let retry_after_s = retry_after_s(b, now);
                    return Err(Refusal { scope: b.scope.clone(), remaining: left_of(limit, used), retry_after_s });
                }
            }
        }
        let mut held = Vec::with_capacity(budgets.len());
        for b in budgets {
            if let Some(account) = accounts.get_mut(&b.scope) {
                account.reserved += amount;
                if let Some(l) = &loose {
                    account.loose.insert(l.id, l.clone());
                }
                held.push((b.scope.clone(), account.period_start));
            }
        }
        Ok(Reservation { amount, held, loose, hold: None, floor: hold.floor })
    }

    /// Loose reservations still untightened on any of these budgets.
    pub fn loose_on_now(&self, budgets: &[Applicable]) -> Vec<Arc<Loose>> {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Loose>> = Vec::new();
        for b in budgets.iter().filter(|b| b.spec.limit.is_some()) {
            if let Some(a) = accounts.get(&b.scope) {
                for l in a.loose.values() {
                    if !out.iter().any(|o| o.id == l.id) {
                        out.push(l.clone());
                    }
                }
            }
        }
        out
    }

    /// Replaces loose reservations' bound-priced amounts with their exact worst cases.
    /// The counting runs outside the lock; each is counted at most once.
    pub fn tighten_now(&self, loose: &[Arc<Loose>]) {
        let exact: Vec<NanoUsd> = loose.iter().map(|l| l.exact()).collect();
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        for account in accounts.values_mut() {
            for (l, exact) in loose.iter().zip(&exact) {
                // Present only while the reservation is held and not yet tightened.
                if account.loose.remove(&l.id).is_some() {
                    account.reserved =
                        account.reserved.saturating_sub(l.bound.saturating_sub(*exact)).max(NanoUsd::ZERO);
                }
            }
        }
    }

    /// Releases the reservation and books `cost` as spent in the period it was taken in.
    pub fn settle_now(&self, reservation: Reservation, cost: NanoUsd) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        for (scope, period_start) in reservation.held {
            if let Some(account) = accounts.get_mut(&scope) {
                let held = match &reservation.loose {
                    // Still loose here: the bound-priced amount is held; else the exact one.
                    Some(l) if account.loose.remove(&l.id).is_none() => {
                        l.exact.get().copied().unwrap_or(reservation.amount)
                    }
                    _ => reservation.amount,
                };
                account.reserved = account.reserved.saturating_sub(held).max(NanoUsd::ZERO);
                // A request that straddled a reset is billed to the period it started in.
                if account.period_start == period_start {
                    account.spent += cost;
                }
            }
        }
    }
}

/// Seconds until `budget`'s period resets (None: it never does).
pub(crate) fn retry_after_s(budget: &Applicable, now: DateTime<Utc>) -> Option<u64> {
    budget.spec.period.reset(now).map(|at| ((at - now.timestamp_millis()).max(0) as u64).div_ceil(1000))
}

/// Starts a new period: spend resets, reservations in flight stay held.
fn roll(account: &mut Account, period_start: i64) {
    if account.period_start < period_start {
        account.period_start = period_start;
        account.spent = NanoUsd::ZERO;
    }
}
