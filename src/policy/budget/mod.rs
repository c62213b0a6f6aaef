//! Budgets and rate limits: pure decisions over one atomic store.
//!
//! Every budget (a team's or a key's) is an `Account` of the current period: `spent` (settled
//! records) and `reserved` (worst-case costs of requests in flight). A request reserves its
//! worst case against all of its budgets under one lock, so however many requests race,
//! `spent + reserved` never passes a limit; after the upstream answers the reservation is
//! settled to the real cost. Accounts are rebuilt from the ledger on first use after a start.
//!
//! Routing decides through the [`BudgetStore`] seam; [`BudgetBook`] is the store of one
//! process (`book`), and the rate windows are in `rates`.

mod book;
mod rates;
#[cfg(test)]
mod tests;

pub(crate) use book::retry_after_s;
pub use book::BudgetBook;
pub use rates::{RateLimiter, RateRefusal, RateTicket};

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
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

    /// The exact worst case, counted on first use.
    pub fn exact(&self) -> NanoUsd {
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
    /// The store's name for the hold (a shared store's row), if it has one.
    hold: Option<Arc<str>>,
    /// What the request certainly costs once forwarded: its prompt, estimated.
    floor: NanoUsd,
}

impl Reservation {
    /// A reservation that holds nothing (settling it changes no account).
    pub fn none() -> Reservation {
        Reservation { amount: NanoUsd::ZERO, held: Vec::new(), loose: None, hold: None, floor: NanoUsd::ZERO }
    }

    /// A reservation a store other than [`BudgetBook`] holds under the name `hold` (None:
    /// nothing is held, no budget of the request has a limit).
    pub fn held_as(hold: Option<Arc<str>>, amount: NanoUsd, held: Vec<(Scope, i64)>, floor: NanoUsd) -> Reservation {
        Reservation { amount, held, loose: None, hold, floor }
    }

    /// The amount reserved when taken (a loose one may since have been tightened).
    pub fn amount(&self) -> NanoUsd {
        self.amount
    }

    /// The budgets held, each with the start of the period it was held in.
    pub fn held(&self) -> &[(Scope, i64)] {
        &self.held
    }

    /// The store's name for the hold.
    pub fn hold(&self) -> Option<&Arc<str>> {
        self.hold.as_ref()
    }

    /// What the request certainly costs once forwarded (its prompt, estimated).
    pub fn floor(&self) -> NanoUsd {
        self.floor
    }
}

/// What a reservation is for, beyond its amount.
#[derive(Clone, Debug)]
pub struct Hold<'a> {
    /// The request it is held for.
    pub request_id: &'a str,
    /// Marks a reservation priced on a token bound, which others may tighten when they need
    /// room.
    pub loose: Option<Arc<Loose>>,
    /// What the request certainly costs once forwarded: charged if the process holding the
    /// reservation dies before it settles.
    pub floor: NanoUsd,
}

/// Why a reservation was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub scope: Scope,
    pub remaining: NanoUsd,
    /// Seconds until the refusing budget's period resets.
    pub retry_after_s: Option<u64>,
}

/// A shared store could not be reached: nothing was reserved, and no decision taken.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

/// Where budgets' reservations live: the seam routing decides through. This process's
/// [`BudgetBook`] is one store; a store shared by several replicas is another. Each call is
/// atomic over all the budgets it is given: however many requests race, `spent + reserved`
/// never passes a limit. A store that cannot answer says [`Unavailable`], never "no limit".
pub trait BudgetStore: Send + Sync {
    /// The state of one budget now.
    fn status(
        &self,
        applicable: &Applicable,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<BudgetStatus, Unavailable>> + Send;

    /// Reserves `amount` against every budget, or none of them.
    fn reserve(
        &self,
        budgets: &[Applicable],
        amount: NanoUsd,
        now: DateTime<Utc>,
        hold: Hold<'_>,
    ) -> impl Future<Output = Result<Result<Reservation, Refusal>, Unavailable>> + Send;

    /// Whether the store takes loose reservations (priced on a token bound) and tightens
    /// them when room is needed. One that cannot — its reservations are seen by other
    /// processes, which cannot count this one's prompts — is given exact amounts only.
    fn tightens(&self) -> bool {
        true
    }

    /// Loose reservations still untightened on any of these budgets.
    fn loose_on(&self, budgets: &[Applicable]) -> Vec<Arc<Loose>>;

    /// Replaces loose reservations' bound-priced amounts with their exact worst cases.
    fn tighten(&self, loose: &[Arc<Loose>]);

    /// Releases the reservation and books `cost` as spent in the period it was taken in. A
    /// shared store may book it a moment later; the money stays held until it has.
    fn settle(&self, reservation: Reservation, cost: NanoUsd);

    /// Releases the reservation, nothing spent, and returns once its room is free again.
    fn release(&self, reservation: Reservation) -> impl Future<Output = ()> + Send {
        self.settle(reservation, NanoUsd::ZERO);
        std::future::ready(())
    }

    /// Whether any budget is at or past its downgrade threshold (spent + reserved ≥
    /// downgrade_at × limit), before the request in question.
    fn past_threshold(
        &self,
        budgets: &[Applicable],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, Unavailable>> + Send {
        async move {
            for b in budgets {
                let (Some(limit), Some(at)) = (b.spec.limit, b.spec.downgrade_at) else { continue };
                let status = self.status(b, now).await?;
                let threshold = (limit.0 as f64 * at).ceil() as i64;
                if (status.spent + status.reserved).0 >= threshold {
                    return Ok(true);
                }
            }
            Ok(false)
        }
    }

    /// Room left in the tightest budget (None: no limits apply).
    fn headroom(
        &self,
        budgets: &[Applicable],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<NanoUsd>, Unavailable>> + Send {
        async move {
            let mut least: Option<NanoUsd> = None;
            for b in budgets {
                if let Some(left) = self.status(b, now).await?.remaining {
                    least = Some(least.map_or(left, |l| l.min(left)));
                }
            }
            Ok(least)
        }
    }
}

/// What is left of `limit` once `used` is taken: never negative (spend can pass the limit,
/// when a request costs more than it reserved).
fn left_of(limit: NanoUsd, used: NanoUsd) -> NanoUsd {
    limit.saturating_sub(used).max(NanoUsd::ZERO)
}
