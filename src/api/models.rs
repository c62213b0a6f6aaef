//! `GET /v1/models`: the models a key may use.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth;
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /v1/models`: the models this key may use.
pub async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = auth::authenticate(&app.directory, app.ledger.backend(), &headers).await?;
    let data: Vec<_> = app
        .config
        .catalog
        .model_order
        .iter()
        .filter(|name| caller.allows(name))
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}
