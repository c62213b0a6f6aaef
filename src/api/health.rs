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
    // Where budgets and rate windows are held: this process, or the store every replica
    // shares. A replica that cannot reach it admits no budgeted request: not ready.
    let (budgets, shared_ok) = match &app.replica {
        None => ("in-process", true),
        Some(r) if r.ping().await => (r.store(), true),
        Some(_) => ("unavailable", false),
    };
    let ready = database && journal && shared_ok;
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "database": if database { "ok" } else { "unreachable" },
        "journal": if journal { "ok" } else { "failing" },
        "budgets": budgets,
        "replica": app.replica.as_ref().map(|r| r.id()),
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.metrics.render(app.ledger.health());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
