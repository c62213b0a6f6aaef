//! Spend queries (SPEC §6). The master key sees everything; a virtual key sees only its own.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::admin::ledger_error;
use crate::api::Query;
use crate::auth;
use crate::error::ApiError;
use crate::ledger::{GroupBy, LogFilter, RequestRecord, SpendFilter, SpendGroup, SpendTotals};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/spend", get(spend)).route("/spend/logs", get(logs))
}

/// Who is asking: the master key (everything) or one virtual key (its own records only).
enum Viewer {
    Master,
    Key(String),
}

async fn viewer(app: &AppState, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    if auth::is_master(app.config.master_key.as_ref(), headers) {
        return Ok(Viewer::Master);
    }
    let caller = auth::authenticate(&app.directory, app.ledger.backend(), headers).await?;
    Ok(Viewer::Key(caller.key.id.clone()))
}

/// Which end of a time range a bound is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// `from`: inclusive.
    From,
    /// `to`: exclusive; a date names its whole day, so it ends at the next midnight.
    To,
}

impl Edge {
    fn field(self) -> &'static str {
        match self {
            Edge::From => "from",
            Edge::To => "to",
        }
    }
}

/// Parses a time bound, Unix ms: RFC 3339 (`2026-11-01T04:00:00Z`), a date and time without
/// a zone (read as UTC), a date (`2026-11-01`: from its midnight UTC, or — for `to` — up to
/// the next, so the day is included), or Unix seconds.
pub fn parse_time(edge: Edge, text: &str) -> Result<i64, ApiError> {
    let field = edge.field();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(Utc.from_utc_datetime(&t).timestamp_millis());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let day = match edge {
            Edge::From => Some(d),
            Edge::To => d.succ_opt(),
        };
        if let Some(t) = day.and_then(|d| d.and_hms_opt(0, 0, 0)) {
            return Ok(Utc.from_utc_datetime(&t).timestamp_millis());
        }
    }
    if let Ok(secs) = text.parse::<i64>() {
        if let Some(t) = Utc.timestamp_opt(secs, 0).single() {
            return Ok(t.timestamp_millis());
        }
    }
    Err(ApiError::param(
        field,
        format!("'{field}' must be an RFC 3339 time, a date and time in UTC, a date (YYYY-MM-DD) or Unix seconds."),
    ))
}

/// Grouping when the query names none: by team and model (the CLI's default too).
pub const DEFAULT_GROUP_BY: &str = "team,model";

pub fn parse_group_by(text: &str) -> Result<Vec<GroupBy>, ApiError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let g = match part {
            "team" => GroupBy::Team,
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            other => {
                return Err(ApiError::param(
                    "group_by",
                    format!("Unknown group_by {other:?}: use team, key, model or day."),
                ))
            }
        };
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
}

pub fn group_name(g: GroupBy) -> &'static str {
    match g {
        GroupBy::Team => "team",
        GroupBy::Key => "key",
        GroupBy::Model => "model",
        GroupBy::Day => "day",
    }
}

fn rfc3339(ms: i64) -> Value {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map_or(Value::Null, |t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
}

pub fn totals_json(t: &SpendTotals) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("requests".into(), json!(t.requests));
    m.insert("input_tokens".into(), json!(t.input_tokens));
    m.insert("cached_input_tokens".into(), json!(t.cached_input_tokens));
    m.insert("output_tokens".into(), json!(t.output_tokens));
    m.insert("cost_usd".into(), json!(t.cost.as_usd()));
    m
}

pub fn record_json(r: &RequestRecord) -> Value {
    json!({
        "request_id": r.request_id,
        "time": rfc3339(r.time_ms),
        "key_id": r.key_id,
        "team": r.team,
        "endpoint": r.endpoint,
        "model": r.model,
        "served_model": r.served_model,
        "input_tokens": r.usage.input_tokens,
        "cached_input_tokens": r.usage.cached_input_tokens,
        "output_tokens": r.usage.output_tokens,
        "cost_usd": r.cost.as_usd(),
        "usage_source": r.usage_source.as_str(),
        "status": r.status,
        "latency_ms": r.latency_ms,
        "stream": r.stream,
    })
}

#[derive(Deserialize)]
struct SpendQuery {
    from: Option<String>,
    to: Option<String>,
    team: Option<String>,
    key: Option<String>,
    model: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

async fn spend(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<SpendQuery>, ApiError>,
) -> Result<Response, ApiError> {
    let viewer = viewer(&app, &headers).await?;
    let Query(q) = query?;
    let mut filter = SpendFilter {
        from_ms: q.from.as_deref().filter(|s| !s.is_empty()).map(|s| parse_time(Edge::From, s)).transpose()?,
        to_ms: q.to.as_deref().filter(|s| !s.is_empty()).map(|s| parse_time(Edge::To, s)).transpose()?,
        team: q.team.filter(|s| !s.is_empty()),
        key_id: q.key.filter(|s| !s.is_empty()),
        model: q.model.filter(|s| !s.is_empty()),
    };
    if let Viewer::Key(id) = &viewer {
        if filter.key_id.as_ref().is_some_and(|k| k != id) {
            return Err(ApiError::param("key", "A virtual key can only see its own spend."));
        }
        filter.key_id = Some(id.clone());
    }
    let group_by = parse_group_by(q.group_by.as_deref().unwrap_or(DEFAULT_GROUP_BY))?;
    let csv = match q.format.as_deref() {
        None | Some("") | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::param("format", "'format' must be json or csv.")),
    };
    app.ledger.sync().await;
    let (total, groups) = app.ledger.backend().spend(&filter, &group_by).await.map_err(ledger_error)?;
    if csv {
        let mut out = String::new();
        for g in &group_by {
            out.push_str(group_name(*g));
            out.push(',');
        }
        out.push_str("requests,input_tokens,cached_input_tokens,output_tokens,cost_usd\n");
        let rows: Vec<(Vec<String>, &SpendTotals)> = if group_by.is_empty() {
            vec![(Vec::new(), &total)]
        } else {
            groups.iter().map(|g| (g.labels.iter().map(|(_, l)| l.clone()).collect(), &g.totals)).collect()
        };
        for (labels, t) in rows {
            for l in labels {
                out.push_str(&csv_field(&l));
                out.push(',');
            }
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                t.requests, t.input_tokens, t.cached_input_tokens, t.output_tokens, t.cost
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response());
    }
    let queried_ms = app.clock.now().timestamp_millis();
    Ok(Json(spend_json(&filter, queried_ms, &total, &groups)).into_response())
}

/// A spend answer in JSON (the API's and the CLI's `spend --json`): the range as RFC 3339
/// (all time when open: from the Unix epoch to `queried_ms`, when the query ran), the total
/// and the groups.
pub fn spend_json(filter: &SpendFilter, queried_ms: i64, total: &SpendTotals, groups: &[SpendGroup]) -> Value {
    let groups: Vec<Value> = groups
        .iter()
        .map(|g| {
            let mut m = Map::new();
            for (by, label) in &g.labels {
                m.insert(group_name(*by).into(), json!(label));
            }
            m.extend(totals_json(&g.totals));
            Value::Object(m)
        })
        .collect();
    json!({
        "from": rfc3339(filter.from_ms.unwrap_or(0)),
        "to": rfc3339(filter.to_ms.unwrap_or(queried_ms)),
        "total": totals_json(total),
        "groups": groups,
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    limit: Option<String>,
    before: Option<String>,
    team: Option<String>,
    key: Option<String>,
}

/// A `before` cursor: a request id, what `next_before` hands out. Anything else is a 400, not
/// an empty page.
fn cursor(before: String) -> Result<String, ApiError> {
    if crate::ledger::is_request_id(&before) {
        Ok(before)
    } else {
        Err(ApiError::param("before", "'before' must be a request id, as 'next_before' gives it."))
    }
}

/// Default and largest page size.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

async fn logs(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<LogsQuery>, ApiError>,
) -> Result<Response, ApiError> {
    let viewer = viewer(&app, &headers).await?;
    let Query(q) = query?;
    let limit = match q.limit.as_deref().filter(|s| !s.is_empty()) {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| n.min(u64::from(MAX_LIMIT)) as u32)
            .ok_or_else(|| ApiError::param("limit", "'limit' must be a positive integer."))?,
    };
    let mut filter = LogFilter {
        before: q.before.filter(|s| !s.is_empty()).map(cursor).transpose()?,
        team: q.team.filter(|s| !s.is_empty()),
        key_id: q.key.filter(|s| !s.is_empty()),
        limit,
    };
    if let Viewer::Key(id) = &viewer {
        if filter.key_id.as_ref().is_some_and(|k| k != id) {
            return Err(ApiError::param("key", "A virtual key can only see its own records."));
        }
        filter.key_id = Some(id.clone());
    }
    app.ledger.sync().await;
    let page = app.ledger.backend().logs(&filter).await.map_err(ledger_error)?;
    let data: Vec<Value> = page.records.iter().map(record_json).collect();
    Ok(Json(json!({"data": data, "next_before": page.next_before})).into_response())
}
