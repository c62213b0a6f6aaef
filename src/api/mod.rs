//! The HTTP API beside the proxy, one module per resource with its own `router()`; and the
//! extractors they share, which give every rejection OpenAI's error envelope and read a body
//! only after the key is checked, under the edge's limit and timeout (`edge`).

pub mod admin;
pub mod health;
pub mod models;
pub mod spend;

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::auth;
use crate::edge;
use crate::error::ApiError;
use crate::state::AppState;

/// The master key, checked: the admin API's guard. It comes before any extractor that reads
/// the body, so an anonymous client is answered 401 without a byte of its body read.
pub struct Master;

impl FromRequestParts<AppState> for Master {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Master, ApiError> {
        if app.config.master_key.is_none() {
            return Err(ApiError::AdminUnauthorized("The admin API is disabled: set master_key in the config."));
        }
        if !auth::is_master(app.config.master_key.as_ref(), &parts.headers) {
            return Err(ApiError::AdminUnauthorized("The admin API requires the master key as a Bearer token."));
        }
        Ok(Master)
    }
}

/// A request body that is a JSON object, read under the same size limit and read timeout as
/// a proxied request's.
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &AppState) -> Result<JsonObject, ApiError> {
        let (parts, body) = req.into_parts();
        let timeout = Duration::from_millis(app.config.body_read_timeout_ms);
        let body = edge::read_body(body, app.config.max_body_bytes, timeout, &parts.headers).await?;
        json_object(&body).map(JsonObject)
    }
}

/// Parses a body as a JSON object, answering 400 in our envelope otherwise.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson("The body must be a JSON object.".into())),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "We could not parse the JSON body of your request ({}).",
            e.to_string().split(" at line").next().unwrap_or("invalid JSON")
        ))),
    }
}

/// A path parameter; one that cannot be read (not UTF-8 once decoded, say) is a 400.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Path<T>, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, app).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(e) => Err(ApiError::param("path", e.body_text())),
        }
    }
}

/// A query string; one that cannot be read (a parameter given twice, say) is a 400.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Query<T>, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, app).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(e) => Err(ApiError::param("query", e.body_text())),
        }
    }
}
