//! Teams, keys and the directory version, generated into each backend's `impl`. Every change
//! bumps the version in the same transaction, so servers polling it see the change.

/// `$db` is the sqlx database; `$begin_write` the statement that opens a transaction which
/// reads and then writes.
macro_rules! directory_queries {
    (
        $db:ty,
        begin_write = $begin_write:literal
    ) => {
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
            let mut tx = self.pool.begin_with($begin_write).await?;
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
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn update_team(&self, team: &TeamRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
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
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn delete_team(&self, name: &str, now_ms: i64) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let done = sqlx::query("DELETE FROM teams WHERE name = $1").bind(name).execute(&mut *tx).await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("team {name:?} does not exist")));
            }
            sqlx::query("UPDATE keys SET revoked_ms = $2 WHERE team = $1 AND revoked_ms IS NULL")
                .bind(name)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn create_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let exists: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM teams WHERE name = $1").bind(&key.team).fetch_one(&mut *tx).await?;
            if exists == 0 {
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
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn update_key(&self, key: &KeyRow) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
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
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        pub async fn revoke_key(&self, id: &str, now_ms: i64) -> Result<(), LedgerError> {
            let mut tx = self.pool.begin_with($begin_write).await?;
            let done = sqlx::query("UPDATE keys SET revoked_ms = COALESCE(revoked_ms, $2) WHERE id = $1")
                .bind(id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(LedgerError::NotFound(format!("key {id:?} does not exist")));
            }
            Self::bump_version(&mut tx).await?;
            tx.commit().await?;
            Ok(())
        }

        async fn bump_version(tx: &mut sqlx::Transaction<'_, $db>) -> Result<(), LedgerError> {
            sqlx::query("UPDATE directory_version SET version = version + 1 WHERE id = 1").execute(&mut **tx).await?;
            Ok(())
        }
    };
}
pub(crate) use directory_queries;
