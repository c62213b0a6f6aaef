//! Spend and log queries over the records, generated into each backend's `impl`. They read
//! through the backend's sqlx pool; only final records count (`usage_source <> 'pending'`).

/// `$db` is the sqlx database, `$day` the expression for a record's UTC day, `$int` the cast
/// that makes a SUM an i64 (PostgreSQL sums BIGINT as NUMERIC).
macro_rules! report_queries {
    (
        $db:ty,
        day = $day:literal,
        int = $int:literal
    ) => {
        pub async fn spent_since(&self, key: bool, id: &str, since_ms: i64) -> Result<NanoUsd, LedgerError> {
            let sql = if key {
                concat!(
                    "SELECT COALESCE(SUM(cost_nano), 0)",
                    $int,
                    " FROM requests WHERE key_id = $1 AND time_ms >= $2 AND usage_source <> 'pending'"
                )
            } else {
                concat!(
                    "SELECT COALESCE(SUM(cost_nano), 0)",
                    $int,
                    " FROM requests WHERE team = $1 AND time_ms >= $2 AND usage_source <> 'pending'"
                )
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
                GroupBy::Day => $day,
            };
            let mut qb = QueryBuilder::<$db>::new("SELECT ");
            for (i, g) in group_by.iter().enumerate() {
                qb.push(column(*g)).push(format!(" AS g{i}, "));
            }
            qb.push(concat!(
                "COUNT(*) AS requests, COALESCE(SUM(input_tokens), 0)",
                $int,
                " AS input_tokens, ",
                "COALESCE(SUM(cached_input_tokens), 0)",
                $int,
                " AS cached_input_tokens, ",
                "COALESCE(SUM(output_tokens), 0)",
                $int,
                " AS output_tokens, ",
                "COALESCE(SUM(cost_nano), 0)",
                $int,
                " AS cost_nano FROM requests WHERE usage_source <> 'pending'"
            ));
            Self::push_spend_filter(&mut qb, filter);
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
            let mut qb = QueryBuilder::<$db>::new(
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

        fn push_spend_filter(qb: &mut QueryBuilder<'_, $db>, filter: &SpendFilter) {
            // A time range is also put as a range of request ids (which begin with their
            // time): the primary key's index then finds it, with no index on time_ms to keep
            // up on every insert.
            if let Some(from) = filter.from_ms {
                if let Some(floor) = crate::ledger::request_id_floor(from) {
                    qb.push(" AND request_id >= ").push_bind(floor);
                }
                qb.push(" AND time_ms >= ").push_bind(from);
            }
            if let Some(to) = filter.to_ms {
                if let Some(floor) = crate::ledger::request_id_floor(to) {
                    qb.push(" AND request_id < ").push_bind(floor);
                }
                qb.push(" AND time_ms < ").push_bind(to);
            }
            if let Some(team) = &filter.team {
                qb.push(" AND team = ").push_bind(team.clone());
            }
            if let Some(key) = &filter.key_id {
                qb.push(" AND key_id = ").push_bind(key.clone());
            }
            if let Some(model) = &filter.model {
                qb.push(" AND (served_model = ")
                    .push_bind(model.clone())
                    .push(" OR model = ")
                    .push_bind(model.clone())
                    .push(")");
            }
        }
    };
}
pub(crate) use report_queries;
