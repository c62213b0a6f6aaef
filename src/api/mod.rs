//! HTTP handlers only: each module is one resource with its own `router()`.

pub mod admin;
pub mod health;
pub mod models;
pub mod spend;

use axum::body::Bytes;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Parses an admin request body as a JSON object, answering 400 in our envelope otherwise.
pub(crate) fn json_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson("The body must be a JSON object.".into())),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "We could not parse the JSON body of your request ({}).",
            e.to_string().split(" at line").next().unwrap_or("invalid JSON")
        ))),
    }
}
