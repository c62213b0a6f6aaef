//! The admin API (SPEC §3): teams and keys, guarded by the master key.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{TimeZone, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{JsonObject, Master, Path, Query};
use crate::auth;
use crate::error::ApiError;
use crate::ledger::{now_ms, KeyRow, LedgerError, TeamRow};
use crate::policy::budget::BudgetStore;
use crate::policy::budget::{Applicable, BudgetSpec, Period, Scope};
use crate::policy::pricing::NanoUsd;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/teams", get(list_teams).post(create_team))
        .route("/admin/teams/{name}", get(get_team).patch(patch_team).delete(delete_team))
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{id}", get(get_key).patch(patch_key).delete(revoke_key))
}

pub(crate) fn ledger_error(e: LedgerError) -> ApiError {
    match e {
        LedgerError::Conflict(m) => ApiError::Conflict(m),
        LedgerError::NotFound(m) => ApiError::NotFound(m),
        other => {
            tracing::error!(error = %other, "admin ledger operation failed");
            ApiError::Internal
        }
    }
}

/// Checks a team or key name: 1–128 characters of letters, digits, `-`, `_`, `.`, `@`.
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ' '));
    if ok {
        Ok(())
    } else {
        Err(ApiError::param(
            field,
            format!("'{field}' must be 1-128 characters of letters, digits, '-', '_', '.', '@' or space."),
        ))
    }
}

/// Applies the flat budget fields present in `obj` to `spec` (`null` clears a field).
/// Any other key not in `extra` is an error, so a typo never passes silently.
pub fn apply_budget_fields(spec: &mut BudgetSpec, obj: &Map<String, Value>, extra: &[&str]) -> Result<(), ApiError> {
    for (key, value) in obj {
        match key.as_str() {
            "limit_usd" => {
                spec.limit = match value {
                    Value::Null => None,
                    v => Some(v.as_f64().and_then(NanoUsd::from_usd).ok_or_else(|| {
                        ApiError::param("limit_usd", "'limit_usd' must be a non-negative number of US dollars.")
                    })?),
                }
            }
            "period" => {
                spec.period = match value {
                    Value::Null => Period::default(),
                    Value::String(s) => s.parse().map_err(|e: String| ApiError::param("period", e))?,
                    _ => return Err(ApiError::param("period", "'period' must be daily, weekly, monthly or total.")),
                }
            }
            "downgrade_at" => {
                spec.downgrade_at = match value {
                    Value::Null => None,
                    v => Some(v.as_f64().filter(|f| *f > 0.0 && *f <= 1.0).ok_or_else(|| {
                        ApiError::param("downgrade_at", "'downgrade_at' must be a fraction of the limit in (0, 1].")
                    })?),
                }
            }
            "models" => {
                spec.models = match value {
                    Value::Null => Vec::new(),
                    Value::Array(items) => items
                        .iter()
                        .map(|m| m.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| ApiError::param("models", "'models' must be an array of model names."))?,
                    _ => return Err(ApiError::param("models", "'models' must be an array of model names.")),
                }
            }
            "rpm" | "tpm" => {
                let parsed = match value {
                    Value::Null => None,
                    v => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                        ApiError::param(key.as_str(), format!("'{key}' must be a positive integer."))
                    })?),
                };
                if key == "rpm" {
                    spec.rpm = parsed;
                } else {
                    spec.tpm = parsed;
                }
            }
            other if extra.contains(&other) => {}
            other => return Err(ApiError::param(other, format!("Unknown field '{other}'."))),
        }
    }
    Ok(())
}

fn budget_json(spec: &BudgetSpec) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("limit_usd".into(), spec.limit.map_or(Value::Null, |l| json!(l.as_usd())));
    m.insert("period".into(), json!(spec.period.as_str()));
    m.insert("downgrade_at".into(), json!(spec.downgrade_at));
    m.insert("models".into(), json!(spec.models));
    m.insert("rpm".into(), json!(spec.rpm));
    m.insert("tpm".into(), json!(spec.tpm));
    m
}

fn rfc3339(ms: i64) -> Value {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map_or(Value::Null, |t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
}

/// `spent_usd`, `reserved_usd`, `remaining_usd` and `resets_at` of one budget, now. When the
/// store replicas share budgets through cannot be reached, the three figures are null: the
/// write a view answers has happened, and a figure from elsewhere could be wrong.
async fn spend_fields(app: &AppState, scope: Scope, spec: &BudgetSpec) -> Result<Map<String, Value>, ApiError> {
    let now = app.clock.now();
    let applicable = Applicable { scope, spec: spec.clone() };
    app.load_account(&applicable, now).await?;
    let mut m = Map::new();
    match app.budgets.status(&applicable, now).await {
        Ok(status) => {
            m.insert("spent_usd".into(), json!(status.spent.as_usd()));
            m.insert("reserved_usd".into(), json!(status.reserved.as_usd()));
            m.insert("remaining_usd".into(), status.remaining.map_or(Value::Null, |r| json!(r.as_usd())));
        }
        Err(_) => {
            for field in ["spent_usd", "reserved_usd", "remaining_usd"] {
                m.insert(field.into(), Value::Null);
            }
        }
    }
    m.insert("resets_at".into(), spec.period.reset(now).map_or(Value::Null, rfc3339));
    Ok(m)
}

fn team_json(team: &TeamRow) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("name".into(), json!(team.name));
    m.extend(budget_json(&team.budget));
    m.insert("created_at".into(), rfc3339(team.created_ms));
    m
}

fn key_json(key: &KeyRow) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(key.id));
    m.insert("team".into(), json!(key.team));
    m.insert("name".into(), json!(key.name));
    m.insert("prefix".into(), json!(key.prefix));
    m.extend(budget_json(&key.budget));
    m.insert("created_at".into(), rfc3339(key.created_ms));
    m.insert("revoked".into(), json!(key.revoked_ms.is_some()));
    m.insert("revoked_at".into(), key.revoked_ms.map_or(Value::Null, rfc3339));
    m
}

async fn find_team(app: &AppState, name: &str) -> Result<TeamRow, ApiError> {
    let teams = app.ledger.backend().load_teams().await.map_err(ledger_error)?;
    teams
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("Team {name:?} does not exist.")))
}

async fn find_key(app: &AppState, id: &str) -> Result<KeyRow, ApiError> {
    let keys = app.ledger.backend().load_keys().await.map_err(ledger_error)?;
    keys.into_iter().find(|k| k.id == id).ok_or_else(|| ApiError::NotFound(format!("Key {id:?} does not exist.")))
}

/// Makes an admin change visible to request handling at once.
async fn refresh(app: &AppState) -> Result<(), ApiError> {
    app.directory.refresh(app.ledger.backend(), true).await.map_err(ledger_error)
}

async fn list_teams(State(app): State<AppState>, _master: Master) -> Result<Response, ApiError> {
    let teams = app.ledger.backend().load_teams().await.map_err(ledger_error)?;
    let mut data = Vec::with_capacity(teams.len());
    for t in &teams {
        let mut m = team_json(t);
        m.extend(spend_fields(&app, Scope::Team(t.name.as_str().into()), &t.budget).await?);
        data.push(Value::Object(m));
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn create_team(
    State(app): State<AppState>,
    _master: Master,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let name = obj.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::param("name", "'name' is required."))?;
    validate_name("name", name)?;
    let mut budget = BudgetSpec::default();
    apply_budget_fields(&mut budget, &obj, &["name"])?;
    let team = TeamRow { name: name.to_string(), budget, created_ms: now_ms() };
    app.ledger.backend().create_team(&team).await.map_err(ledger_error)?;
    refresh(&app).await?;
    let mut m = team_json(&team);
    m.extend(spend_fields(&app, Scope::Team(team.name.as_str().into()), &team.budget).await?);
    Ok((StatusCode::CREATED, Json(Value::Object(m))).into_response())
}

async fn get_team(
    State(app): State<AppState>,
    _master: Master,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let team = find_team(&app, &name).await?;
    let mut m = team_json(&team);
    m.extend(spend_fields(&app, Scope::Team(team.name.as_str().into()), &team.budget).await?);
    Ok(Json(Value::Object(m)).into_response())
}

async fn patch_team(
    State(app): State<AppState>,
    _master: Master,
    Path(name): Path<String>,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    if obj.get("name").is_some_and(|n| n.as_str() != Some(name.as_str())) {
        return Err(ApiError::param("name", "A team cannot be renamed."));
    }
    let mut team = find_team(&app, &name).await?;
    apply_budget_fields(&mut team.budget, &obj, &["name"])?;
    app.ledger.backend().update_team(&team).await.map_err(ledger_error)?;
    refresh(&app).await?;
    let mut m = team_json(&team);
    m.extend(spend_fields(&app, Scope::Team(team.name.as_str().into()), &team.budget).await?);
    Ok(Json(Value::Object(m)).into_response())
}

async fn delete_team(
    State(app): State<AppState>,
    _master: Master,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    app.ledger.backend().delete_team(&name, now_ms()).await.map_err(ledger_error)?;
    refresh(&app).await?;
    Ok(Json(json!({"name": name, "deleted": true})).into_response())
}

#[derive(Deserialize)]
struct KeyListQuery {
    team: Option<String>,
}

async fn list_keys(
    State(app): State<AppState>,
    _master: Master,
    Query(q): Query<KeyListQuery>,
) -> Result<Response, ApiError> {
    let keys = app.ledger.backend().load_keys().await.map_err(ledger_error)?;
    let data: Vec<Value> = keys
        .iter()
        .filter(|k| q.team.as_ref().is_none_or(|t| &k.team == t))
        .map(|k| Value::Object(key_json(k)))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn create_key(
    State(app): State<AppState>,
    _master: Master,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let team = obj.get("team").and_then(Value::as_str).ok_or_else(|| ApiError::param("team", "'team' is required."))?;
    let name = match obj.get("name") {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(ApiError::param("name", "'name' must be a string.")),
    };
    validate_name("name", name)?;
    let mut budget = BudgetSpec::default();
    apply_budget_fields(&mut budget, &obj, &["team", "name"])?;
    let (row, secret) = new_key(team, name, budget);
    app.ledger.backend().create_key(&row).await.map_err(ledger_error)?;
    refresh(&app).await?;
    let mut m = key_json(&row);
    m.insert("key".into(), json!(secret));
    Ok((StatusCode::CREATED, Json(Value::Object(m))).into_response())
}

/// A new key row and its secret (the only time the secret exists outside the client).
pub fn new_key(team: &str, name: &str, budget: BudgetSpec) -> (KeyRow, String) {
    let secret = auth::generate_secret();
    let row = KeyRow {
        id: auth::generate_key_id(),
        team: team.to_string(),
        name: name.to_string(),
        key_hash: auth::hash_secret(&secret),
        prefix: auth::display_prefix(&secret),
        budget,
        created_ms: now_ms(),
        revoked_ms: None,
    };
    (row, secret)
}

async fn get_key(State(app): State<AppState>, _master: Master, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = find_key(&app, &id).await?;
    let mut m = key_json(&key);
    m.extend(spend_fields(&app, Scope::Key(key.id.as_str().into()), &key.budget).await?);
    Ok(Json(Value::Object(m)).into_response())
}

async fn patch_key(
    State(app): State<AppState>,
    _master: Master,
    Path(id): Path<String>,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let mut key = find_key(&app, &id).await?;
    if obj.get("team").is_some_and(|t| t.as_str() != Some(key.team.as_str())) {
        return Err(ApiError::param("team", "A key cannot move to another team."));
    }
    if let Some(name) = obj.get("name") {
        let name = name.as_str().ok_or_else(|| ApiError::param("name", "'name' must be a string."))?;
        validate_name("name", name)?;
        key.name = name.to_string();
    }
    apply_budget_fields(&mut key.budget, &obj, &["name", "team", "revoked"])?;
    // Every field is checked before anything is written: a refused patch changes nothing.
    let revoke = match obj.get("revoked") {
        Some(Value::Bool(true)) => true,
        None | Some(Value::Null) => false,
        Some(_) => {
            return Err(ApiError::param("revoked", "Only 'revoked': true is accepted; a revoked key stays revoked."))
        }
    };
    app.ledger.backend().update_key(&key).await.map_err(ledger_error)?;
    if revoke {
        app.ledger.backend().revoke_key(&key.id, now_ms()).await.map_err(ledger_error)?;
    }
    refresh(&app).await?;
    let key = find_key(&app, &id).await?;
    let mut m = key_json(&key);
    m.extend(spend_fields(&app, Scope::Key(key.id.as_str().into()), &key.budget).await?);
    Ok(Json(Value::Object(m)).into_response())
}

async fn revoke_key(
    State(app): State<AppState>,
    _master: Master,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.ledger.backend().revoke_key(&id, now_ms()).await.map_err(ledger_error)?;
    refresh(&app).await?;
    let key = find_key(&app, &id).await?;
    Ok(Json(Value::Object(key_json(&key))).into_response())
}
