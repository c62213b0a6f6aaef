//! Budgets and rate limits: pure decisions over one atomic store.
//!
//! Every budget (a team's or a key's) is an `Account` of the current period: `spent` (settled
//! records) and `reserved` (worst-case costs of requests in flight). A request reserves its
//! worst case against all of its budgets under one lock, so however many requests race,
//! `spent + reserved` never passes a limit; after the upstream answers the reservation is
//! settled to the real cost. Accounts are rebuilt from the ledger on first use after a start.
//!
//! The lock is a std `Mutex`: it is never held across an `.await`.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use foldhash::{HashMap, HashMapExt};
use serde::{Deserialize, Serialize};

use crate::policy::pricing::NanoUsd;

/// How often a budget resets. Periods start at 00:00 UTC; weeks on Monday, months on the 1st.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    #[default]
    Monthly,
    /// Never resets.
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }

    /// Start of the period containing `now`, Unix ms.
    pub fn start(self, now: DateTime<Utc>) -> i64 {
        let day = now.date_naive();
        let start = match self {
            Period::Daily => day,
            Period::Weekly => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
            Period::Monthly => day.with_day(1).unwrap_or(day),
            Period::Total => return 0,
        };
        Utc.from_utc_datetime(&start.and_hms_opt(0, 0, 0).unwrap_or_default()).timestamp_millis()
    }

    /// When the period containing `now` ends, Unix ms; `None` for `total`.
    pub fn reset(self, now: DateTime<Utc>) -> Option<i64> {
        let day = now.date_naive();
        let next = match self {
            Period::Daily => day + Duration::days(1),
            Period::Weekly => day + Duration::days(7 - i64::from(day.weekday().num_days_from_monday())),
            Period::Monthly => {
                let (y, m) = if day.month() == 12 { (day.year() + 1, 1) } else { (day.year(), day.month() + 1) };
                chrono::NaiveDate::from_ymd_opt(y, m, 1)?
            }
            Period::Total => return None,
        };
        Some(Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0)?).timestamp_millis())
    }
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "daily" => Ok(Period::Daily),
            "weekly" => Ok(Period::Weekly),
            "monthly" => Ok(Period::Monthly),
            "total" => Ok(Period::Total),
            other => Err(format!("unknown period {other:?}: use daily, weekly, monthly or total")),
        }
    }
}

/// The budget and limit fields a team or a key carries (flat, as in SPEC §3).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetSpec {
    /// `None`: no spending limit.
    pub limit: Option<NanoUsd>,
    pub period: Period,
    /// Fraction of `limit` past which requests are downgraded to a cheaper model.
    pub downgrade_at: Option<f64>,
    /// Allow-list of model names; empty allows every model.
    pub models: Vec<String>,
    /// Requests admitted per trailing 60 s.
    pub rpm: Option<u64>,
    /// Input plus output tokens per trailing 60 s.
    pub tpm: Option<u64>,
}

impl BudgetSpec {
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// Whose budget an account is: a team's name or a key's id. Shared strings: every request
/// names its two scopes in its reservation, its rate ticket and the accounts it looks up, and
/// the directory makes each scope once per team or key, so those are reference counts rather
/// than string copies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Team(Arc<str>),
    Key(Arc<str>),
}

impl Scope {
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Team(_) => "team",
            Scope::Key(_) => "key",
        }
    }
}

/// The clock budgets read; tests move it to cross a period boundary.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Unix ms to report instead of the system time; 0 means the system time.
    fixed_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        match self.fixed_ms.load(Ordering::Relaxed) {
            0 => Utc::now(),
            ms => Utc.timestamp_millis_opt(ms).single().unwrap_or_else(Utc::now),
        }
    }
    /// Pins the clock to `at` (tests).
    pub fn set(&self, at: DateTime<Utc>) {
        self.fixed_ms.store(at.timestamp_millis(), Ordering::Relaxed);
    }
}

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

/// A budget a request must fit: whose, and its spec.
#[derive(Clone, Debug)]
pub struct Applicable {
    pub scope: Scope,
    pub spec: BudgetSpec,
}

/// The state of one budget now.
#[derive(Clone, Copy, Debug)]
pub struct BudgetStatus {
    pub spent: NanoUsd,
    pub reserved: NanoUsd,
    /// `None` when there is no limit.
    pub remaining: Option<NanoUsd>,
    /// End of the current period, Unix ms; `None` for `total`.
    pub resets_at_ms: Option<i64>,
}

/// A reservation priced on the cheap upper bound of the prompt's tokens. It can be
/// tightened later — by whichever request first needs the room — to its exact worst case.
pub struct Loose {
    id: u64,
    bound: NanoUsd,
    exact: OnceLock<NanoUsd>,
    compute: Box<dyn Fn() -> NanoUsd + Send + Sync>,
}

impl Loose {
    /// `bound`: the worst case on the token bound; `compute`: the exact worst case (runs at
    /// most once, only if the room is needed).
    pub fn new(bound: NanoUsd, compute: impl Fn() -> NanoUsd + Send + Sync + 'static) -> Arc<Loose> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Loose {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            bound,
            exact: OnceLock::new(),
            compute: Box::new(compute),
        })
    }

    fn exact(&self) -> NanoUsd {
        *self.exact.get_or_init(|| (self.compute)().min(self.bound))
    }
}

impl std::fmt::Debug for Loose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loose").field("id", &self.id).field("bound", &self.bound).finish()
    }
}

/// Money held for a request in flight; settle it exactly once.
#[derive(Debug)]
pub struct Reservation {
    amount: NanoUsd,
    held: Vec<(Scope, i64)>,
    loose: Option<Arc<Loose>>,
}

impl Reservation {
    /// The amount reserved when taken (a loose one may since have been tightened).
    pub fn amount(&self) -> NanoUsd {
        self.amount
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub scope: Scope,
    pub remaining: NanoUsd,
    /// Seconds until the refusing budget's period resets.
    pub retry_after_s: Option<u64>,
}

/// All budget accounts, behind one lock.
#[derive(Default)]
pub struct BudgetBook {
    accounts: Mutex<HashMap<Scope, Account>>,
}

/// What is left of `limit` once `used` is taken: never negative (spend can pass the limit,
/// when a request costs more than it reserved).
fn left_of(limit: NanoUsd, used: NanoUsd) -> NanoUsd {
    limit.saturating_sub(used).max(NanoUsd::ZERO)
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

    /// Status of one budget at `now`.
    pub fn status(&self, applicable: &Applicable, now: DateTime<Utc>) -> BudgetStatus {
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

    /// Whether any budget is at or past its downgrade threshold (spent + reserved ≥
    /// downgrade_at × limit), before the request in question.
    pub fn past_threshold(&self, budgets: &[Applicable], now: DateTime<Utc>) -> bool {
        budgets.iter().any(|b| {
            let (Some(limit), Some(at)) = (b.spec.limit, b.spec.downgrade_at) else { return false };
            let status = self.status(b, now);
            let threshold = (limit.0 as f64 * at).ceil() as i64;
            (status.spent + status.reserved).0 >= threshold
        })
    }

    /// Room left in the tightest budget (None: no limits apply).
    pub fn headroom(&self, budgets: &[Applicable], now: DateTime<Utc>) -> Option<NanoUsd> {
        budgets.iter().filter_map(|b| self.status(b, now).remaining).min()
    }

    /// Atomically reserves `amount` against every budget, or none of them. `loose` marks a
    /// reservation priced on a token bound, which others may tighten when they need room.
    pub fn reserve(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        loose: Option<Arc<Loose>>,
    ) -> Result<Reservation, Refusal> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        for b in budgets {
            let start = b.spec.period.start(now);
            let account = accounts.entry(b.scope.clone()).or_insert_with(|| Account::new(start, NanoUsd::ZERO, false));
            roll(account, start);
            if let Some(limit) = b.spec.limit {
                let used = account.spent + account.reserved;
                if used + amount > limit {
                    let retry_after_s =
                        b.spec.period.reset(now).map(|at| ((at - now.timestamp_millis()).max(0) as u64).div_ceil(1000));
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
        Ok(Reservation { amount, held, loose })
    }

    /// Loose reservations still untightened on any of these budgets.
    pub fn loose_on(&self, budgets: &[Applicable]) -> Vec<Arc<Loose>> {
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
    pub fn tighten(&self, loose: &[Arc<Loose>]) {
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
    pub fn settle(&self, reservation: Reservation, cost: NanoUsd) {
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

/// Starts a new period: spend resets, reservations in flight stay held.
fn roll(account: &mut Account, period_start: i64) {
    if account.period_start < period_start {
        account.period_start = period_start;
        account.spent = NanoUsd::ZERO;
    }
}

/// Sliding 60-second windows for rpm / tpm.
#[derive(Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<Scope, Window>>,
}

#[derive(Default)]
struct Window {
    /// (admitted at, Unix ms; tokens charged) — oldest first.
    events: VecDeque<(i64, u64)>,
    tokens: u64,
}

const WINDOW_MS: i64 = 60_000;

/// A rate limit was hit: which, and seconds until there is room.
#[derive(Debug, Clone)]
pub struct RateRefusal {
    pub scope: Scope,
    pub what: &'static str,
    pub limit: u64,
    pub retry_after_s: u64,
}

/// A slot taken in the windows; its tokens are corrected once the real count is known.
#[derive(Debug)]
pub struct RateTicket {
    entries: Vec<(Scope, i64)>,
    tokens: u64,
}

impl RateLimiter {
    /// Admits a request charging `tokens` (its prompt estimate) to every limited scope, or
    /// refuses it without charging any.
    pub fn admit(&self, budgets: &[Applicable], tokens: u64, now_ms: i64) -> Result<RateTicket, RateRefusal> {
        let limited = Self::limited(budgets);
        if limited.is_empty() {
            return Ok(RateTicket { entries: Vec::new(), tokens });
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        Self::room(&mut windows, &limited, tokens, now_ms)?;
        let mut entries = Vec::with_capacity(limited.len());
        for b in limited {
            let w = windows.entry(b.scope.clone()).or_default();
            w.events.push_back((now_ms, tokens));
            w.tokens += tokens;
            entries.push((b.scope.clone(), now_ms));
        }
        Ok(RateTicket { entries, tokens })
    }

    /// Whether [`admit`](Self::admit) would admit a request charging `tokens` now, without
    /// taking a slot (a dry run).
    pub fn check(&self, budgets: &[Applicable], tokens: u64, now_ms: i64) -> Result<(), RateRefusal> {
        let limited = Self::limited(budgets);
        if limited.is_empty() {
            return Ok(());
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        Self::room(&mut windows, &limited, tokens, now_ms)
    }

    /// The budgets with an rpm or tpm limit.
    fn limited(budgets: &[Applicable]) -> Vec<&Applicable> {
        budgets.iter().filter(|b| b.spec.rpm.is_some() || b.spec.tpm.is_some()).collect()
    }

    /// Whether every limited scope's window has room for one more request of `tokens`.
    fn room(
        windows: &mut HashMap<Scope, Window>,
        limited: &[&Applicable],
        tokens: u64,
        now_ms: i64,
    ) -> Result<(), RateRefusal> {
        for b in limited {
            let w = windows.entry(b.scope.clone()).or_default();
            w.expire(now_ms);
            if let Some(rpm) = b.spec.rpm {
                if w.events.len() as u64 >= rpm {
                    let oldest = w.events.front().map_or(now_ms, |e| e.0);
                    return Err(RateRefusal {
                        scope: b.scope.clone(),
                        what: "requests per minute",
                        limit: rpm,
                        retry_after_s: retry_after(oldest, now_ms),
                    });
                }
            }
            if let Some(tpm) = b.spec.tpm {
                // A request is admitted while the window has room; one request may overshoot.
                if w.tokens >= tpm || (w.tokens > 0 && w.tokens + tokens > tpm) {
                    let retry = w.time_until_room(tpm.saturating_sub(tokens), now_ms);
                    return Err(RateRefusal {
                        scope: b.scope.clone(),
                        what: "tokens per minute",
                        limit: tpm,
                        retry_after_s: retry,
                    });
                }
            }
        }
        Ok(())
    }

    /// Replaces the ticket's estimated tokens with the real count.
    pub fn correct(&self, ticket: RateTicket, actual_tokens: u64) {
        if ticket.entries.is_empty() || ticket.tokens == actual_tokens {
            return;
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for (scope, at) in ticket.entries {
            if let Some(w) = windows.get_mut(&scope) {
                if let Some(e) = w.events.iter_mut().find(|e| e.0 == at && e.1 == ticket.tokens) {
                    w.tokens = w.tokens - e.1 + actual_tokens;
                    e.1 = actual_tokens;
                }
            }
        }
    }
}

impl Window {
    fn expire(&mut self, now_ms: i64) {
        while let Some(&(at, tokens)) = self.events.front() {
            if at + WINDOW_MS > now_ms {
                break;
            }
            self.events.pop_front();
            self.tokens -= tokens;
        }
    }

    /// Seconds until the window's tokens drop to `target` or below.
    fn time_until_room(&self, target: u64, now_ms: i64) -> u64 {
        let mut tokens = self.tokens;
        for &(at, t) in &self.events {
            if tokens <= target {
                break;
            }
            tokens -= t;
            if tokens <= target {
                return retry_after(at, now_ms);
            }
        }
        retry_after(self.events.back().map_or(now_ms, |e| e.0), now_ms)
    }
}

fn retry_after(oldest_ms: i64, now_ms: i64) -> u64 {
    (((oldest_ms + WINDOW_MS - now_ms).max(1000)) as u64).div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn team(limit: i64, downgrade_at: Option<f64>) -> Applicable {
        Applicable {
            scope: Scope::Team("t".into()),
            spec: BudgetSpec { limit: Some(NanoUsd(limit)), downgrade_at, ..Default::default() },
        }
    }

    #[test]
    fn periods_start_and_reset_at_utc_boundaries() {
        let now = at("2026-11-28T19:00:00Z"); // a Saturday
        assert_eq!(Period::Daily.start(now), at("2026-11-28T00:00:00Z").timestamp_millis());
        assert_eq!(Period::Weekly.start(now), at("2026-11-23T00:00:00Z").timestamp_millis());
        assert_eq!(Period::Monthly.start(now), at("2026-11-01T00:00:00Z").timestamp_millis());
        assert_eq!(Period::Monthly.reset(now), Some(at("2026-12-01T00:00:00Z").timestamp_millis()));
        assert_eq!(Period::Weekly.reset(now), Some(at("2026-11-30T00:00:00Z").timestamp_millis()));
        assert_eq!(
            Period::Monthly.reset(at("2026-12-15T00:00:00Z")),
            Some(at("2027-01-01T00:00:00Z").timestamp_millis())
        );
        assert_eq!(Period::Total.reset(now), None);
    }

    #[test]
    fn reservations_never_pass_the_limit() {
        let book = BudgetBook::default();
        let now = at("2026-11-28T19:00:00Z");
        let budgets = [team(100, None)];
        let r1 = book.reserve(&budgets, NanoUsd(60), now, None).unwrap();
        assert!(book.reserve(&budgets, NanoUsd(50), now, None).is_err());
        book.settle(r1, NanoUsd(10));
        let _r2 = book.reserve(&budgets, NanoUsd(90), now, None).unwrap();
        assert!(book.reserve(&budgets, NanoUsd(1), now, None).is_err());
    }

    #[test]
    fn spend_resets_with_the_period_and_late_settles_stay_in_their_period() {
        let book = BudgetBook::default();
        let budgets = [Applicable {
            scope: Scope::Team("t".into()),
            spec: BudgetSpec { limit: Some(NanoUsd(100)), period: Period::Daily, ..Default::default() },
        }];
        let r = book.reserve(&budgets, NanoUsd(100), at("2026-11-28T23:59:59Z"), None).unwrap();
        let next_day = at("2026-11-29T00:00:01Z");
        assert!(book.reserve(&budgets, NanoUsd(1), next_day, None).is_err(), "in-flight reservation still held");
        book.settle(r, NanoUsd(100));
        let s = book.status(&budgets[0], next_day);
        assert_eq!(s.spent, NanoUsd(0));
        assert_eq!(s.remaining, Some(NanoUsd(100)));
    }

    #[test]
    fn a_refusal_past_the_limit_reports_nothing_remaining() {
        let book = BudgetBook::default();
        let now = at("2026-11-28T19:00:00Z");
        let budgets = [team(100, None)];
        let r = book.reserve(&budgets, NanoUsd(90), now, None).unwrap();
        // The request cost more than its reservation: the period's spend passes the limit.
        book.settle(r, NanoUsd(109));
        let refusal = book.reserve(&budgets, NanoUsd(1), now, None).unwrap_err();
        assert_eq!(refusal.remaining, NanoUsd::ZERO);
        assert_eq!(book.status(&budgets[0], now).remaining, Some(NanoUsd::ZERO));
    }

    #[test]
    fn threshold_counts_reserved_money() {
        let book = BudgetBook::default();
        let now = at("2026-11-28T19:00:00Z");
        let budgets = [team(100, Some(0.8))];
        let _r = book.reserve(&budgets, NanoUsd(79), now, None).unwrap();
        assert!(!book.past_threshold(&budgets, now));
        let _r2 = book.reserve(&budgets, NanoUsd(1), now, None).unwrap();
        assert!(book.past_threshold(&budgets, now));
    }

    #[test]
    fn loose_reservations_are_tightened_when_room_is_needed() {
        let book = BudgetBook::default();
        let now = at("2026-11-28T19:00:00Z");
        let budgets = [team(100, None)];
        let loose = Loose::new(NanoUsd(60), || NanoUsd(40));
        let r1 = book.reserve(&budgets, NanoUsd(60), now, Some(loose)).unwrap();
        assert!(book.reserve(&budgets, NanoUsd(60), now, None).is_err());
        let pending = book.loose_on(&budgets);
        assert_eq!(pending.len(), 1);
        book.tighten(&pending);
        assert!(book.loose_on(&budgets).is_empty());
        let r2 = book.reserve(&budgets, NanoUsd(60), now, None).unwrap();
        book.settle(r1, NanoUsd(30));
        book.settle(r2, NanoUsd(60));
        let s = book.status(&budgets[0], now);
        assert_eq!((s.spent, s.reserved), (NanoUsd(90), NanoUsd(0)));
    }

    #[test]
    fn rpm_counts_a_trailing_minute() {
        let rl = RateLimiter::default();
        let budgets =
            [Applicable { scope: Scope::Key("k".into()), spec: BudgetSpec { rpm: Some(2), ..Default::default() } }];
        rl.admit(&budgets, 1, 1_000).unwrap();
        // A check takes no slot.
        rl.check(&budgets, 1, 1_500).unwrap();
        rl.check(&budgets, 1, 1_500).unwrap();
        rl.admit(&budgets, 1, 2_000).unwrap();
        assert_eq!(rl.check(&budgets, 1, 3_000).unwrap_err().retry_after_s, 58);
        let refused = rl.admit(&budgets, 1, 3_000).unwrap_err();
        assert_eq!(refused.retry_after_s, 58);
        rl.admit(&budgets, 1, 61_001).unwrap();
    }

    #[test]
    fn tpm_uses_corrected_counts() {
        let rl = RateLimiter::default();
        let budgets =
            [Applicable { scope: Scope::Key("k".into()), spec: BudgetSpec { tpm: Some(100), ..Default::default() } }];
        let t = rl.admit(&budgets, 10, 1_000).unwrap();
        rl.correct(t, 100);
        assert!(rl.admit(&budgets, 10, 2_000).is_err());
        rl.admit(&budgets, 10, 61_001).unwrap();
    }
}
