//! The one error type at the HTTP edge. Every variant renders as OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}` with the status of SPEC §4; internal
//! detail goes to the log, never to the client.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::policy::request::RequestError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401: missing, unknown or revoked key.
    #[error("{0}")]
    InvalidApiKey(&'static str),
    /// 401 for the admin API: the master key is missing or wrong.
    #[error("{0}")]
    AdminUnauthorized(&'static str),
    /// 404: the model is not configured.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// 403: the model is not on the key's or team's allow-list.
    #[error("The model `{0}` is not allowed for this key or team.")]
    ModelNotAllowed(String),
    /// 400: the body is not JSON (or not an object).
    #[error("{0}")]
    InvalidJson(String),
    /// 400: a field has the wrong type or value; `param` names it.
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    /// 413: the body is over the limit.
    #[error("Request body is larger than the limit of {limit} bytes.")]
    TooLarge { limit: usize },
    /// 408: the client did not send its body within `body_read_timeout_ms`.
    #[error("The request body was not received in time.")]
    BodyTimeout,
    /// 404: no such route, or no such admin object.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists with another method.
    #[error("Method not allowed.")]
    MethodNotAllowed,
    /// 409: the object already exists.
    #[error("{0}")]
    Conflict(String),
    /// 429: budget exhausted and nothing cheaper fits. `retry_after_s` is the time to the reset.
    #[error("{message}")]
    BudgetExceeded { message: String, retry_after_s: Option<u64> },
    /// 429: rpm / tpm limit.
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    /// 502: the upstream failed and no fallback succeeded; `status` is the upstream's.
    #[error("{message}")]
    Upstream { status: Option<u16>, message: String },
    /// 502: the upstream answered 200 with a body that is not JSON (or not SSE).
    #[error("The upstream returned a response that could not be parsed.")]
    InvalidUpstreamResponse,
    /// 504: no response headers in time, or no connection in time.
    #[error("The upstream did not answer in time.")]
    UpstreamTimeout,
    /// 503: the ledger cannot take records and the policy is to reject.
    #[error("The spend ledger is unavailable; the request was not forwarded.")]
    LedgerUnavailable,
    /// 503: the upstream answered but its record could not be made durable in time
    /// (`on_ledger_error = "reject"`); the record is written once the database recovers.
    #[error("The spend ledger could not record this request in time; the answer is withheld. The request was charged and will be recorded when the ledger recovers.")]
    LedgerNotDurable,
    /// 503: budgets are shared through the database (several replicas) and it cannot be
    /// reached: no request is admitted without its budget checked.
    #[error("The budget store is unavailable; the request was not forwarded.")]
    BudgetsUnavailable,
    /// 503: the server is shutting down and its grace period ended before the answer did.
    #[error("The server is shutting down; the request was cut off.")]
    ShuttingDown,
    /// 500: a bug or an unexpected failure; the detail is logged, not shown.
    #[error("Internal error.")]
    Internal,
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        match e {
            RequestError::InvalidJson(message) => ApiError::InvalidJson(message),
            RequestError::InvalidParam { param, message } => ApiError::InvalidParam { param, message },
        }
    }
}

impl ApiError {
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParam { param: param.into(), message: message.into() }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidApiKey(_) | ApiError::AdminUnauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidJson(_) | ApiError::InvalidParam { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BudgetExceeded { .. } | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Upstream { .. } | ApiError::InvalidUpstreamResponse => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::LedgerUnavailable
            | ApiError::LedgerNotDurable
            | ApiError::BudgetsUnavailable
            | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn type_and_code(&self) -> (&'static str, Option<String>) {
        let s = |c: &str| Some(c.to_string());
        match self {
            ApiError::InvalidApiKey(_) | ApiError::AdminUnauthorized(_) => {
                ("invalid_request_error", s("invalid_api_key"))
            }
            ApiError::ModelNotFound(_) => ("invalid_request_error", s("model_not_found")),
            ApiError::ModelNotAllowed(_) => ("permission_error", s("model_not_allowed")),
            ApiError::InvalidJson(_) => ("invalid_request_error", s("invalid_json")),
            ApiError::InvalidParam { .. } => ("invalid_request_error", s("invalid_value")),
            ApiError::TooLarge { .. } => ("invalid_request_error", s("request_too_large")),
            ApiError::NotFound(_) => ("invalid_request_error", s("not_found")),
            ApiError::BodyTimeout => ("invalid_request_error", s("request_timeout")),
            ApiError::MethodNotAllowed => ("invalid_request_error", s("method_not_allowed")),
            ApiError::Conflict(_) => ("invalid_request_error", s("conflict")),
            ApiError::BudgetExceeded { .. } => ("insufficient_quota", s("budget_exceeded")),
            ApiError::RateLimited { .. } => ("rate_limit_error", s("rate_limit_exceeded")),
            ApiError::Upstream { status, .. } => {
                ("upstream_error", Some(status.map_or_else(|| "upstream_unreachable".to_string(), |s| s.to_string())))
            }
            ApiError::InvalidUpstreamResponse => ("upstream_error", s("invalid_upstream_response")),
            ApiError::UpstreamTimeout => ("upstream_error", s("upstream_timeout")),
            ApiError::LedgerUnavailable | ApiError::LedgerNotDurable => ("server_error", s("ledger_unavailable")),
            ApiError::BudgetsUnavailable => ("server_error", s("budget_store_unavailable")),
            ApiError::ShuttingDown => ("server_error", s("shutting_down")),
            ApiError::Internal => ("server_error", s("internal_error")),
        }
    }

    /// The machine-readable code, for metrics and logs.
    pub fn code(&self) -> String {
        self.type_and_code().1.unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, code) = self.type_and_code();
        let param = match &self {
            ApiError::InvalidParam { param, .. } => Some(param.clone()),
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) => Some("model".to_string()),
            _ => None,
        };
        let body = json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}});
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::BudgetExceeded { retry_after_s, .. } => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
                if let Some(secs) = retry_after_s {
                    headers.insert("retry-after", HeaderValue::from(*secs));
                }
            }
            ApiError::RateLimited { retry_after_s, .. } => {
                headers.insert("retry-after", HeaderValue::from(*retry_after_s));
            }
            _ => {}
        }
        response
    }
}
