//! What every metered answer carries: tollgate's headers (SPEC §4) and the error envelope
//! of a request that went upstream.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::policy::models::Model;
use crate::policy::pricing::NanoUsd;

// tollgate's own headers (SPEC §4), named once instead of parsed per use.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");
pub(super) const MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
pub(super) const DOWNGRADED_FROM: HeaderName = HeaderName::from_static("x-tollgate-downgraded-from");
pub(super) const COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");

/// The headers of every metered response but the cost: the model that served (or was
/// tried last), and the one asked for when the request was downgraded.
pub(super) fn model_headers(model: &Model, downgraded_from: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&model.name) {
        headers.insert(MODEL, v);
    }
    if let Some(v) = downgraded_from.and_then(|from| HeaderValue::from_str(from).ok()) {
        headers.insert(DOWNGRADED_FROM, v);
    }
    headers
}

/// `x-tollgate-cost-usd`: what the request was charged, in dollars.
pub(super) fn insert_cost(headers: &mut HeaderMap, cost: NanoUsd) {
    if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
        headers.insert(COST_USD, v);
    }
}

/// The error answer to a request that went upstream: OpenAI's envelope, with the headers
/// every metered response carries (`headers` from [`model_headers`]) and what it cost.
pub(super) fn forwarded_error(error: ApiError, mut headers: HeaderMap, cost: NanoUsd) -> Response {
    insert_cost(&mut headers, cost);
    let mut response = error.into_response();
    response.headers_mut().extend(headers);
    response
}

/// A response of `status` with exactly `headers`: the finished map is installed as it is (a
/// tuple's `into_response` would build a map and merge these into it one by one).
pub(super) fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Whether a failure is worth trying the next deployment for.
pub(super) fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}
