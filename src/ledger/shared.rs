//! The SQL of budgets and rate windows shared by replicas on PostgreSQL: calls of the functions
//! `migrations/postgres/0003_shared_budgets.sql` defines, each one round trip and atomic over
//! every budget it is given; and the rows those calls take, which `redis.rs` takes too.
//! `shared_store.rs` picks one of the two; `replicas` decides when to call them.

use super::{LedgerError, PostgresBackend};

/// A refusal by `tg_reserve`: which budget (index into the call's arrays) and its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub spent: i64,
    pub reserved: i64,
}

/// A refusal by `tg_rate_admit`: which window, what it counts, ms until there is room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRefused {
    pub index: usize,
    pub what: String,
    pub retry_ms: i64,
}

/// A request at its rate windows: one ticket, each window's scope and limits, its tokens.
#[derive(Debug)]
pub struct RateAsk<'a> {
    pub ticket: &'a str,
    pub scopes: &'a [String],
    /// Each window's rpm and tpm (None: not limited).
    pub rpm: &'a [Option<i64>],
    pub tpm: &'a [Option<i64>],
    pub tokens: i64,
    /// On the server's clock (a test may pin it).
    pub now_ms: i64,
    /// False: only check, take no slot.
    pub record: bool,
}

/// One budget of one settled reservation.
#[derive(Debug, Clone)]
pub struct SettleRow {
    pub hold: String,
    pub scope: String,
    pub period_start: i64,
    pub cost: i64,
    pub floor: i64,
}

/// A rate ticket's real token count, replacing its estimate.
#[derive(Debug, Clone)]
pub struct Correction {
    pub ticket: String,
    /// The windows the ticket is in.
    pub scopes: Vec<String>,
    pub tokens: i64,
}

/// A reservation to take: under which name, for which request, by which replica.
#[derive(Debug)]
pub struct HoldRow<'a> {
    pub hold: &'a str,
    pub request_id: &'a str,
    pub replica: &'a str,
    pub scopes: &'a [String],
    pub starts: &'a [i64],
    pub limits: &'a [i64],
    pub amount: i64,
    pub floor: i64,
}

/// The channel a schema's directory changes are announced on (a trigger on
/// `directory_version` sends them). Schemas on one database do not hear each other's.
const CHANNEL_SQL: &str = "SELECT 'tollgate_dir_' || left(md5(current_schema()), 16)";

impl PostgresBackend {
    /// Renews `replica`'s lease until `lease_ms` from now (the database's clock).
    pub async fn renew_lease(&self, replica: &str, lease_ms: u64) -> Result<(), LedgerError> {
        sqlx::query(
            "INSERT INTO replicas (id, lease_until_ms) VALUES ($1, tg_now_ms() + $2) \
             ON CONFLICT (id) DO UPDATE SET lease_until_ms = excluded.lease_until_ms",
        )
        .bind(replica)
        .bind(lease_ms as i64)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Ends `replica`'s lease now: whatever it still holds is released by the next sweep.
    pub async fn end_lease(&self, replica: &str) -> Result<(), LedgerError> {
        sqlx::query("DELETE FROM replicas WHERE id = $1").bind(replica).execute(self.pool()).await?;
        Ok(())
    }

    /// Releases the reservations of replicas whose lease ran out (each charged its floor, its
    /// journal entry marked interrupted); returns how many.
    pub async fn sweep(&self) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar("SELECT tg_sweep()").fetch_one(self.pool()).await?)
    }

    /// Deletes rate-window events long out of every window, skipping rows a correction holds
    /// (never waiting on one: no lock order to get wrong).
    pub async fn prune_rate_events(&self) -> Result<(), LedgerError> {
        sqlx::query(
            "DELETE FROM rate_events WHERE ctid IN (SELECT ctid FROM rate_events \
             WHERE at_ms < tg_now_ms() - 120000 LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A budget's account for the period starting at `start`: (spent, reserved).
    pub async fn budget_account(&self, scope: &str, start: i64) -> Result<(i64, i64), LedgerError> {
        Ok(sqlx::query_as("SELECT spent, reserved FROM tg_budget_status($1, $2)")
            .bind(scope)
            .bind(start)
            .fetch_one(self.pool())
            .await?)
    }

    /// Reserves against every budget of `row` or none; `Ok(None)` when held. A replica whose
    /// lease has run out reserves nothing (its earlier holds may have been swept).
    pub async fn reserve(&self, row: &HoldRow<'_>) -> Result<Result<(), Refused>, LedgerError> {
        let (refused, spent, reserved): (i32, i64, i64) =
            sqlx::query_as("SELECT refused, spent, reserved FROM tg_reserve($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(row.hold)
                .bind(row.request_id)
                .bind(row.replica)
                .bind(row.scopes)
                .bind(row.starts)
                .bind(row.limits)
                .bind(row.amount)
                .bind(row.floor)
                .fetch_one(self.pool())
                .await?;
        match refused {
            0 => Ok(Ok(())),
            -1 => Err(LedgerError::LeaseExpired),
            i => Ok(Err(Refused { index: (i - 1) as usize, spent, reserved })),
        }
    }

    /// Settles reservations in one call: holds released, costs booked.
    pub async fn settle(&self, rows: &[SettleRow]) -> Result<(), LedgerError> {
        let holds: Vec<&str> = rows.iter().map(|r| r.hold.as_str()).collect();
        let scopes: Vec<&str> = rows.iter().map(|r| r.scope.as_str()).collect();
        let starts: Vec<i64> = rows.iter().map(|r| r.period_start).collect();
        let costs: Vec<i64> = rows.iter().map(|r| r.cost).collect();
        let floors: Vec<i64> = rows.iter().map(|r| r.floor).collect();
        sqlx::query("SELECT tg_settle($1, $2, $3, $4, $5)")
            .bind(holds)
            .bind(scopes)
            .bind(starts)
            .bind(costs)
            .bind(floors)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Admits a request to every rate window of its scopes or none.
    pub async fn rate_admit(&self, ask: &RateAsk<'_>) -> Result<Result<(), RateRefused>, LedgerError> {
        let (refused, what, retry_ms): (i32, Option<String>, i64) =
            sqlx::query_as("SELECT refused, what, retry_ms FROM tg_rate_admit($1, $2, $3, $4, $5, $6, $7)")
                .bind(ask.ticket)
                .bind(ask.scopes)
                .bind(ask.rpm)
                .bind(ask.tpm)
                .bind(ask.tokens)
                .bind(ask.now_ms)
                .bind(ask.record)
                .fetch_one(self.pool())
                .await?;
        match refused {
            0 => Ok(Ok(())),
            i => Ok(Err(RateRefused { index: (i - 1) as usize, what: what.unwrap_or_default(), retry_ms })),
        }
    }

    /// Replaces rate tickets' estimated tokens with their real counts.
    pub async fn rate_correct(&self, tickets: &[Correction]) -> Result<(), LedgerError> {
        let ids: Vec<&str> = tickets.iter().map(|t| t.ticket.as_str()).collect();
        let tokens: Vec<i64> = tickets.iter().map(|t| t.tokens).collect();
        sqlx::query(
            "UPDATE rate_events e SET tokens = u.tokens FROM unnest($1::TEXT[], $2::BIGINT[]) AS u(ticket, tokens) \
             WHERE e.ticket = u.ticket",
        )
        .bind(ids)
        .bind(tokens)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Marks the journal entries of swept reservations' requests interrupted, each at its
    /// floor (a sweep through Redis; PostgreSQL's `tg_sweep` does it itself).
    pub async fn mark_swept(&self, swept: &[(String, i64)]) -> Result<(), LedgerError> {
        let ids: Vec<&str> = swept.iter().map(|s| s.0.as_str()).collect();
        let floors: Vec<i64> = swept.iter().map(|s| s.1).collect();
        sqlx::query(
            "UPDATE requests r SET usage_source = 'interrupted', cost_nano = u.floor \
             FROM unnest($1::TEXT[], $2::BIGINT[]) AS u(id, floor) \
             WHERE r.request_id = u.id AND r.usage_source = 'pending'",
        )
        .bind(ids)
        .bind(floors)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Listens for directory changes (keys, teams, budgets) made through any replica or the
    /// CLI; returns the listener, which yields a notification per change.
    pub async fn listen_directory(&self) -> Result<sqlx::postgres::PgListener, LedgerError> {
        let channel: String = sqlx::query_scalar(CHANNEL_SQL).fetch_one(self.pool()).await?;
        let mut listener = sqlx::postgres::PgListener::connect_with(self.pool()).await?;
        listener.listen(&channel).await?;
        Ok(listener)
    }
}

/// A scope's kind and name: `key:<id>` or `team:<name>`.
pub(crate) fn split_scope(scope: &str) -> (bool, &str) {
    match scope.split_once(':') {
        Some(("key", id)) => (true, id),
        Some((_, name)) => (false, name),
        None => (false, scope),
    }
}
