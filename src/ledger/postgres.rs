//! The PostgreSQL backend, for several replicas sharing one ledger: the same tables and
//! queries as `sqlite.rs` in PostgreSQL's dialect, migrations from `migrations/postgres/`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, QueryBuilder, Row};

use super::sqlite::{hash_from_hex, hash_to_hex};
use super::{
    models_from_json, models_to_json, period_from_str, GroupBy, KeyRow, LedgerError, LogFilter, LogPage,
    RequestRecord, SpendFilter, SpendGroup, SpendTotals, TeamRow, UsageSource,
};
use crate::budget::BudgetSpec;
use crate::metering::usage::Usage;
use crate::pricing::NanoUsd;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// PostgreSQL allows 65,535 bound parameters per statement.
const RECORD_COLUMNS: usize = 15;

#[derive(Clone)]
pub struct PostgresBackend {
    pool: PgPool,
}

impl PostgresBackend {
    /// `lock_timeout` bounds how long a statement waits for a row lock held elsewhere.
    pub async fn connect(url: &str, lock_timeout: Duration) -> Result<PostgresBackend, LedgerError> {
        let options = PgConnectOptions::from_str(url)?
            .options([("lock_timeout", format!("{}ms", lock_timeout.as_millis()))]);
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

    pub async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Writes a batch in one transaction. Journal entries (`pending`) never overwrite a
    /// row; final records replace their journal entry (an upsert).
    pub async fn insert_records(&self, records: &[RequestRecord]) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        // Runs of the same kind keep their order: a journal entry precedes its final record.
        let mut start = 0;
        while start < records.len() {
            let pending = records[start].usage_source == UsageSource::Pending;
            let len = records[start..].iter().take_while(|r| (r.usage_source == UsageSource::Pending) == pending).count();
            for chunk in records[start..start + len].chunks(60_000 / RECORD_COLUMNS) {
                let mut qb = QueryBuilder::new(format!(
                    "INSERT INTO requests (request_id, time_ms, key_id, team, endpoint, model, served_model, \
                     input_tokens, cached_input_tokens, output_tokens, cost_nano, usage_source, status, latency_ms, stream) "
                ));
                qb.push_values(chunk, |mut row, r| {
                    row.push_bind(&r.request_id)
                        .push_bind(r.time_ms)
                        .push_bind(&r.key_id)
                        .push_bind(&r.team)
                        .push_bind(r.endpoint)
                        .push_bind(&r.model)
                        .push_bind(&r.served_model)
                        .push_bind(to_i64(r.usage.input_tokens))
                        .push_bind(to_i64(r.usage.cached_input_tokens))
                        .push_bind(to_i64(r.usage.output_tokens))
                        .push_bind(r.cost.0)
                        .push_bind(r.usage_source.as_str())
                        .push_bind(i64::from(r.status))
                        .push_bind(to_i64(r.latency_ms))
                        .push_bind(r.stream);
                });
                qb.push(if pending { " ON CONFLICT (request_id) DO NOTHING" } else { UPSERT });
                qb.build().execute(&mut *tx).await?;
            }
            start += len;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn mark_interrupted(&self) -> Result<u64, LedgerError> {
        let done = sqlx::query("UPDATE requests SET usage_source = 'interrupted' WHERE usage_source = 'pending'")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn directory_version(&self) -> Result<i64, LedgerError> {
        Ok(sqlx::query_scalar("SELECT version FROM directory_version WHERE id = 1").fetch_one(&self.pool).await?)
    }

    pub async fn load_teams(&self) -> Result<Vec<TeamRow>, LedgerError> {
        let rows = sqlx::query(
            "SELECT name, limit_nano, period, downgrade_at, models, rpm, tpm, created_ms FROM teams ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(TeamRow { name: r.try_get("name")?, budget: budget_from_row(r)?, created_ms: r.try_get("created_ms")? }))
            .collect()
    }

    pub async fn load_keys(&self) -> Result<Vec<KeyRow>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, team, name, key_hash, prefix, limit_nano, period, downgrade_at, models, rpm, tpm, \
             created_ms, revoked_ms FROM keys ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let hash_hex: String = r.try_get("key_hash")?;
                Ok(KeyRow {
                    id: r.try_get("id")?,
                    team: r.try_get("team")?,
                    name: r.try_get("name")?,
                    key_hash: hash_from_hex(&hash_hex),
                    prefix: r.try_get("prefix")?,
                    budget: budget_from_row(r)?,
                    created_ms: r.try_get("created_ms")?,
                    revoked_ms: r.try_get("revoked_ms")?,
                })
            })
            .collect()
    }

    pub async fn create_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let b = &team.budget;
        let result = sqlx::query(
            "INSERT INTO teams (name, limit_nano, period, downgrade_at, models, rpm, tpm, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&team.name)
        .bind(b.limit.map(|l| l.0))
        .bind(b.period.as_str())
        .bind(b.downgrade_at)
        .bind(models_to_json(&b.models))
        .bind(b.rpm.map(to_i64))
        .bind(b.tpm.map(to_i64))
        .bind(team.created_ms)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(e)) = &result {
            if e.is_unique_violation() {
                return Err(LedgerError::Conflict(format!("team {:?} already exists", team.name)));
            }
        }
        result?;
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn update_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let b = &team.budget;
        let done = sqlx::query(
            "UPDATE teams SET limit_nano = $2, period = $3, downgrade_at = $4, models = $5, rpm = $6, tpm = $7 \
             WHERE name = $1",
        )
        .bind(&team.name)
        .bind(b.limit.map(|l| l.0))
        .bind(b.period.as_str())
        .bind(b.downgrade_at)
        .bind(models_to_json(&b.models))
        .bind(b.rpm.map(to_i64))
        .bind(b.tpm.map(to_i64))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(LedgerError::NotFound(format!("team {:?} does not exist", team.name)));
        }
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_team(&self, name: &str, now_ms: i64) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM teams WHERE name = $1").bind(name).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(LedgerError::NotFound(format!("team {name:?} does not exist")));
        }
        sqlx::query("UPDATE keys SET revoked_ms = $2 WHERE team = $1 AND revoked_ms IS NULL")
            .bind(name)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn create_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1::BIGINT FROM teams WHERE name = $1").bind(&key.team).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            return Err(LedgerError::NotFound(format!("team {:?} does not exist", key.team)));
        }
        let b = &key.budget;
        sqlx::query(
            "INSERT INTO keys (id, team, name, key_hash, prefix, limit_nano, period, downgrade_at, models, rpm, tpm, \
             created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, NULL)",
        )
        .bind(&key.id)
        .bind(&key.team)
        .bind(&key.name)
        .bind(hash_to_hex(&key.key_hash))
        .bind(&key.prefix)
        .bind(b.limit.map(|l| l.0))
        .bind(b.period.as_str())
        .bind(b.downgrade_at)
        .bind(models_to_json(&b.models))
        .bind(b.rpm.map(to_i64))
        .bind(b.tpm.map(to_i64))
        .bind(key.created_ms)
        .execute(&mut *tx)
        .await?;
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn update_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let b = &key.budget;
        let done = sqlx::query(
            "UPDATE keys SET name = $2, limit_nano = $3, period = $4, downgrade_at = $5, models = $6, rpm = $7, \
             tpm = $8 WHERE id = $1",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(b.limit.map(|l| l.0))
        .bind(b.period.as_str())
        .bind(b.downgrade_at)
        .bind(models_to_json(&b.models))
        .bind(b.rpm.map(to_i64))
        .bind(b.tpm.map(to_i64))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(LedgerError::NotFound(format!("key {:?} does not exist", key.id)));
        }
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE keys SET revoked_ms = COALESCE(revoked_ms, $2) WHERE id = $1")
            .bind(id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(LedgerError::NotFound(format!("key {id:?} does not exist")));
        }
        bump_version(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn spent_since(&self, key: bool, id: &str, since_ms: i64) -> Result<NanoUsd, LedgerError> {
        let sql = if key {
            "SELECT COALESCE(SUM(cost_nano), 0)::BIGINT FROM requests WHERE key_id = $1 AND time_ms >= $2 \
             AND usage_source <> 'pending'"
        } else {
            "SELECT COALESCE(SUM(cost_nano), 0)::BIGINT FROM requests WHERE team = $1 AND time_ms >= $2 \
             AND usage_source <> 'pending'"
        };
        let sum: i64 = sqlx::query_scalar(sql).bind(id).bind(since_ms).fetch_one(&self.pool).await?;
        Ok(NanoUsd(sum))
    }

    pub async fn spend(
        &self,
        filter: &SpendFilter,
        group_by: &[GroupBy],
    ) -> Result<(SpendTotals, Vec<SpendGroup>), LedgerError> {
        let column = |g: GroupBy| match g {
            GroupBy::Team => "team",
            GroupBy::Key => "key_id",
            GroupBy::Model => "served_model",
            GroupBy::Day => "to_char(to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        };
        let mut qb = QueryBuilder::new("SELECT ");
        for (i, g) in group_by.iter().enumerate() {
            qb.push(column(*g)).push(format!(" AS g{i}, "));
        }
        qb.push(
            "COUNT(*) AS requests, COALESCE(SUM(input_tokens), 0)::BIGINT AS input_tokens, \
             COALESCE(SUM(cached_input_tokens), 0)::BIGINT AS cached_input_tokens, \
             COALESCE(SUM(output_tokens), 0)::BIGINT AS output_tokens, COALESCE(SUM(cost_nano), 0)::BIGINT AS cost_nano \
             FROM requests WHERE usage_source <> 'pending'",
        );
        push_spend_filter(&mut qb, filter);
        if !group_by.is_empty() {
            qb.push(" GROUP BY ");
            for i in 0..group_by.len() {
                if i > 0 {
                    qb.push(", ");
                }
                qb.push(format!("g{i}"));
            }
            qb.push(" ORDER BY ");
            for i in 0..group_by.len() {
                if i > 0 {
                    qb.push(", ");
                }
                qb.push(format!("g{i}"));
            }
        }
        let rows = qb.build().fetch_all(&self.pool).await?;
        let mut groups = Vec::with_capacity(rows.len());
        let mut total = SpendTotals::default();
        for row in &rows {
            let totals = totals_from_row(row)?;
            total.requests += totals.requests;
            total.input_tokens += totals.input_tokens;
            total.cached_input_tokens += totals.cached_input_tokens;
            total.output_tokens += totals.output_tokens;
            total.cost += totals.cost;
            let mut labels = Vec::with_capacity(group_by.len());
            for (i, g) in group_by.iter().enumerate() {
                labels.push((*g, row.try_get::<String, _>(format!("g{i}").as_str())?));
            }
            groups.push(SpendGroup { labels, totals });
        }
        if group_by.is_empty() {
            // No grouping: the single row is the total.
            groups.clear();
        }
        Ok((total, groups))
    }

    pub async fn logs(&self, filter: &LogFilter) -> Result<LogPage, LedgerError> {
        let mut qb = QueryBuilder::new(
            "SELECT request_id, time_ms, key_id, team, endpoint, model, served_model, input_tokens, \
             cached_input_tokens, output_tokens, cost_nano, usage_source, status, latency_ms, stream \
             FROM requests WHERE 1 = 1",
        );
        if let Some(before) = &filter.before {
            qb.push(" AND request_id < ").push_bind(before.clone());
        }
        if let Some(team) = &filter.team {
            qb.push(" AND team = ").push_bind(team.clone());
        }
        if let Some(key) = &filter.key_id {
            qb.push(" AND key_id = ").push_bind(key.clone());
        }
        let limit = i64::from(filter.limit.max(1));
        qb.push(" ORDER BY request_id DESC LIMIT ").push_bind(limit + 1);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let mut records = rows.iter().map(record_from_row).collect::<Result<Vec<_>, _>>()?;
        let next_before = if records.len() as i64 > limit {
            records.truncate(limit as usize);
            records.last().map(|r| r.request_id.clone())
        } else {
            None
        };
        Ok(LogPage { records, next_before })
    }
}

fn push_spend_filter(qb: &mut QueryBuilder<'_, sqlx::Postgres>, filter: &SpendFilter) {
    if let Some(from) = filter.from_ms {
        qb.push(" AND time_ms >= ").push_bind(from);
    }
    if let Some(to) = filter.to_ms {
        qb.push(" AND time_ms < ").push_bind(to);
    }
    if let Some(team) = &filter.team {
        qb.push(" AND team = ").push_bind(team.clone());
    }
    if let Some(key) = &filter.key_id {
        qb.push(" AND key_id = ").push_bind(key.clone());
    }
    if let Some(model) = &filter.model {
        qb.push(" AND (served_model = ").push_bind(model.clone()).push(" OR model = ").push_bind(model.clone()).push(")");
    }
}

async fn bump_version(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), LedgerError> {
    sqlx::query("UPDATE directory_version SET version = version + 1 WHERE id = 1").execute(&mut **tx).await?;
    Ok(())
}

super::row_mappers!(PgRow);

const UPSERT: &str = " ON CONFLICT (request_id) DO UPDATE SET time_ms = EXCLUDED.time_ms, key_id = EXCLUDED.key_id, \
    team = EXCLUDED.team, endpoint = EXCLUDED.endpoint, model = EXCLUDED.model, served_model = EXCLUDED.served_model, \
    input_tokens = EXCLUDED.input_tokens, cached_input_tokens = EXCLUDED.cached_input_tokens, \
    output_tokens = EXCLUDED.output_tokens, cost_nano = EXCLUDED.cost_nano, usage_source = EXCLUDED.usage_source, \
    status = EXCLUDED.status, latency_ms = EXCLUDED.latency_ms, stream = EXCLUDED.stream";

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
