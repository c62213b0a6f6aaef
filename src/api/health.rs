//! Liveness, readiness (the database answers) and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::server::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<AppState>) -> Response {
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), app.ledger.backend().ping()).await;
    match ping {
        Ok(Ok(())) if !app.ledger.health().failing() => Json(json!({"status": "ok", "database": "ok"})).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "database": "unreachable"})))
            .into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.metrics.render(app.ledger.health());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}
