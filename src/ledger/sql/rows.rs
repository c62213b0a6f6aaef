//! Row → type mapping for every backend: their row types differ, the code does not.

/// Row → type mapping shared by every backend (their row types differ; the code does not).
macro_rules! row_mappers {
    ($row:ty) => {
        fn budget_from_row(r: &$row) -> Result<BudgetSpec, sqlx::Error> {
            let period: String = r.try_get("period")?;
            let models: String = r.try_get("models")?;
            Ok(BudgetSpec {
                limit: r.try_get::<Option<i64>, _>("limit_nano")?.map(NanoUsd),
                period: period_from_str(&period),
                downgrade_at: r.try_get("downgrade_at")?,
                models: models_from_json(&models),
                rpm: r.try_get::<Option<i64>, _>("rpm")?.map(from_i64),
                tpm: r.try_get::<Option<i64>, _>("tpm")?.map(from_i64),
            })
        }

        fn totals_from_row(r: &$row) -> Result<SpendTotals, sqlx::Error> {
            Ok(SpendTotals {
                requests: from_i64(r.try_get("requests")?),
                input_tokens: from_i64(r.try_get("input_tokens")?),
                cached_input_tokens: from_i64(r.try_get("cached_input_tokens")?),
                output_tokens: from_i64(r.try_get("output_tokens")?),
                cost: NanoUsd(r.try_get("cost_nano")?),
            })
        }

        fn record_from_row(r: &$row) -> Result<RequestRecord, sqlx::Error> {
            let source: String = r.try_get("usage_source")?;
            let endpoint: String = r.try_get("endpoint")?;
            Ok(RequestRecord {
                request_id: r.try_get("request_id")?,
                time_ms: r.try_get("time_ms")?,
                key_id: r.try_get("key_id")?,
                team: r.try_get("team")?,
                endpoint: crate::policy::request::Endpoint::from_name(&endpoint),
                model: r.try_get("model")?,
                served_model: r.try_get("served_model")?,
                usage: Usage {
                    input_tokens: from_i64(r.try_get("input_tokens")?),
                    cached_input_tokens: from_i64(r.try_get("cached_input_tokens")?),
                    output_tokens: from_i64(r.try_get("output_tokens")?),
                },
                cost: NanoUsd(r.try_get("cost_nano")?),
                usage_source: match source.as_str() {
                    "estimated" => UsageSource::Estimated,
                    "pending" => UsageSource::Pending,
                    "interrupted" => UsageSource::Interrupted,
                    _ => UsageSource::Reported,
                },
                status: u16::try_from(r.try_get::<i64, _>("status")?).unwrap_or(0),
                latency_ms: from_i64(r.try_get("latency_ms")?),
                stream: r.try_get("stream")?,
            })
        }
    };
}
pub(crate) use row_mappers;
