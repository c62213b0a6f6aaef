//! Where replicas share budgets and rate windows: PostgreSQL alone (`shared.rs`), or Redis
//! beside it (`redis.rs`). Both take the same calls; this enum picks one.

use super::redis::RedisShared;
use super::shared::split_scope;
use super::shared::{Correction, HoldRow, RateAsk, RateRefused, Refused, SettleRow};
use super::{LedgerError, PostgresBackend};

/// Where replicas share budgets and rate windows: PostgreSQL alone, or Redis beside it.
#[derive(Clone)]
pub enum SharedStore {
    Postgres(PostgresBackend),
    Redis(RedisShared),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            SharedStore::Postgres($s) => $body,
            SharedStore::Redis($s) => $body,
        }
    };
}

impl SharedStore {
    /// What holds the budgets, for readiness.
    pub fn name(&self) -> &'static str {
        match self {
            SharedStore::Postgres(_) => "postgres",
            SharedStore::Redis(_) => "redis",
        }
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        dispatch!(self, s => s.ping().await)
    }

    pub async fn renew_lease(&self, replica: &str, lease_ms: u64) -> Result<(), LedgerError> {
        dispatch!(self, s => s.renew_lease(replica, lease_ms).await)
    }

    pub async fn end_lease(&self, replica: &str) -> Result<(), LedgerError> {
        dispatch!(self, s => s.end_lease(replica).await)
    }

    /// Releases dead replicas' holds (see `tg_sweep`), and on PostgreSQL prunes old rate-window
    /// events (Redis expires them itself).
    pub async fn sweep(&self) -> Result<i64, LedgerError> {
        if let SharedStore::Postgres(pg) = self {
            pg.prune_rate_events().await?;
        }
        dispatch!(self, s => s.sweep().await)
    }

    pub async fn budget_account(&self, scope: &str, start: i64) -> Result<(i64, i64), LedgerError> {
        dispatch!(self, s => s.budget_account(scope, start).await)
    }

    /// What the ledger holds as spent by `scope` since `start`: the spend of a budget without
    /// a limit, which the shared store does not track.
    pub async fn ledger_spent(&self, scope: &str, start: i64) -> Result<i64, LedgerError> {
        let pg = match self {
            SharedStore::Postgres(pg) => pg,
            SharedStore::Redis(r) => r.ledger(),
        };
        let (is_key, id) = split_scope(scope);
        Ok(pg.spent_since(is_key, id, start).await?.0)
    }

    pub async fn reserve(&self, row: &HoldRow<'_>) -> Result<Result<(), Refused>, LedgerError> {
        dispatch!(self, s => s.reserve(row).await)
    }

    pub async fn settle(&self, rows: &[SettleRow]) -> Result<(), LedgerError> {
        dispatch!(self, s => s.settle(rows).await)
    }

    pub async fn rate_admit(&self, ask: &RateAsk<'_>) -> Result<Result<(), RateRefused>, LedgerError> {
        dispatch!(self, s => s.rate_admit(ask).await)
    }

    pub async fn rate_correct(&self, tickets: &[Correction]) -> Result<(), LedgerError> {
        dispatch!(self, s => s.rate_correct(tickets).await)
    }
}
