//! The PostgreSQL backend, for several replicas sharing one ledger: the same tables and
//! queries as the SQLite backend in PostgreSQL's dialect, migrations from
//! `migrations/postgres/`. Everything, the ledger writer's batches included, goes through
//! one sqlx pool (PostgreSQL's caches are the server's, not the connection's).

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, QueryBuilder, Row};

use super::backend::Batch;
use super::journal::LineOp;
use super::sql::{
    from_i64, hash_from_hex, hash_to_hex, latest_per_request, models_from_json, models_to_json, period_from_str,
    pow2_split, record_columns, runs, to_i64, upsert_sql, Column, RECORD_COLUMNS, RETRACT,
};
use super::{
    GroupBy, KeyRow, LedgerError, LogFilter, LogPage, RequestRecord, SpendFilter, SpendGroup, SpendTotals, TeamRow,
    UsageSource,
};
use crate::policy::budget::BudgetSpec;
use crate::policy::pricing::{NanoUsd, Usage};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// PostgreSQL binds at most 65,535 parameters a statement.
const MAX_ROWS: usize = 60_000 / RECORD_COLUMNS;

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

    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies a batch (see `Backend::apply`). Writes go as multi-row upserts of a power of
    /// two of rows (at most [`MAX_ROWS`]), so a handful of statement texts serve every batch
    /// size from the prepared-statement cache instead of a new one being parsed for each
    /// size. A batch of one statement needs no transaction.
    pub async fn apply(&self, batch: &Batch) -> Result<(), LedgerError> {
        let runs = runs(batch);
        if let [(LineOp::Write, records)] = &runs[..] {
            let rows = latest_per_request(records);
            if let [only] = pow2_split(&rows, MAX_ROWS)[..] {
                return Self::insert_chunk(&self.pool, only).await;
            }
        }
        let mut tx = self.pool.begin().await?;
        for (op, records) in &runs {
            match op {
                LineOp::Write => {
                    let rows = latest_per_request(records);
                    for chunk in pow2_split(&rows, MAX_ROWS) {
                        Self::insert_chunk(&mut *tx, chunk).await?;
                    }
                }
                LineOp::Retract => {
                    for r in records {
                        sqlx::query(RETRACT).bind(&r.request_id).execute(&mut *tx).await?;
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_chunk<'e, E>(executor: E, chunk: &[&RequestRecord]) -> Result<(), LedgerError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        use sqlx::Arguments as _;
        let mut args = sqlx::postgres::PgArguments::default();
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

    /// The upsert of `rows` records (a power of two), built once per size.
    fn insert_sql(rows: usize) -> &'static str {
        static SQL: [OnceLock<String>; 16] = [const { OnceLock::new() }; 16];
        debug_assert!(rows.is_power_of_two() && rows.ilog2() < 16);
        SQL[rows.ilog2() as usize].get_or_init(|| upsert_sql(rows, '$'))
    }

    /// Marks the entries of `journaled` that are still pending as interrupted.
    pub async fn mark_interrupted(&self, journaled: &[String]) -> Result<u64, LedgerError> {
        if journaled.is_empty() {
            return Ok(0);
        }
        const MARK_JOURNALED: &str =
            "UPDATE requests SET usage_source = 'interrupted' WHERE usage_source = 'pending' AND request_id = ANY($1)";
        Ok(sqlx::query(MARK_JOURNALED).bind(journaled).execute(&self.pool).await?.rows_affected())
    }

    super::sql::directory_queries!(sqlx::Postgres, begin_write = "BEGIN");

    super::sql::report_queries!(
        sqlx::Postgres,
        day = "to_char(to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        int = "::BIGINT"
    );
}

super::sql::row_mappers!(PgRow);
