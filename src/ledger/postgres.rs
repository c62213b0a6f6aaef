//! The PostgreSQL backend, for several replicas sharing one ledger: the same tables and
//! queries as `sqlite.rs` in PostgreSQL's dialect, migrations from `migrations/postgres/`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, QueryBuilder, Row};

use super::sqlite::{hash_from_hex, hash_to_hex};
use super::{
    from_i64, latest_per_request, models_from_json, models_to_json, period_from_str, pow2_split, record_columns,
    to_i64, Column, GroupBy, KeyRow, LedgerError, LogFilter, LogPage, RequestRecord, SpendFilter, SpendGroup,
    SpendTotals, TeamRow, UsageSource, INSERT_INTO, RECORD_COLUMNS, UPSERT,
};
use crate::budget::BudgetSpec;
use crate::pricing::NanoUsd;
use crate::pricing::Usage;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone)]
pub struct PostgresBackend {
    pool: PgPool,
}

impl PostgresBackend {
    /// `lock_timeout` bounds how long a statement waits for a row lock held elsewhere.
    pub async fn connect(url: &str, lock_timeout: Duration) -> Result<PostgresBackend, LedgerError> {
        let options =
            PgConnectOptions::from_str(url)?.options([("lock_timeout", format!("{}ms", lock_timeout.as_millis()))]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        // Several replicas may start at once: the migrator takes an advisory lock.
        MIGRATOR.run(&pool).await?;
        Ok(PostgresBackend { pool })
    }

    /// Where record batches go: the one pool (PostgreSQL's caches are the server's).
    fn writer(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    super::shared_queries!(
        sqlx::Postgres,
        day = "to_char(to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        int = "::BIGINT",
        // PostgreSQL binds at most 65,535 parameters a statement.
        max_rows = 60_000 / RECORD_COLUMNS,
        begin_write = "BEGIN"
    );
}

super::row_mappers!(PgRow);
