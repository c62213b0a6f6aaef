//! Liveness, readiness (the database answers) and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready)).route("/metrics", get(metrics))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<AppState>) -> Response {
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), app.ledger.backend().ping()).await;
    let database = matches!(ping, Ok(Ok(()))) && !app.ledger.health().failing();
    let journal = !app.ledger.journal_failing();
    // Where budgets and rate windows are held: this process, or the database every replica
    // shares (reachable exactly when the database is).
    let budgets = match (app.replica.as_ref(), database) {
        (None, _) => "in-process".to_string(),
        (Some(_), true) => "postgres".to_string(),
        (Some(_), false) => "unavailable".to_string(),
    };
    let body = json!({
        "status": if database && journal { "ok" } else { "unavailable" },
        "database": if database { "ok" } else { "unreachable" },
        "journal": if journal { "ok" } else { "failing" },
        "budgets": budgets,
        "replica": app.replica.as_ref().map(|r| r.id()),
    });
    let status = if database && journal { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.metrics.render(app.ledger.health());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
