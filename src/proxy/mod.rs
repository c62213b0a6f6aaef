//! The OpenAI-compatible endpoints, as a request passes them, one phase a file:
//! - [`admit`]: the key, the body, its checks, the budgets' accounts, the route and the
//!   reservation, the rate limits (a dry run ends here);
//! - [`forward`]: the journal entry, the upstream call and its fallbacks, until the first
//!   byte of an answer;
//! - [`relay`]: the answer to the client, whole (JSON) or event by event (SSE);
//! - [`settle`]: the phase that always runs — usage, cost, budgets, rates, metrics and the
//!   ledger record — whether the request succeeded, failed, or lost its client.
//!
//! Forwarding runs inside the client's connection but is not cancelled with it: a client
//! that hangs up leaves the upstream call and its metering to finish in a task the server
//! tracks (see [`detach`]), and SIGTERM waits for it — up to `shutdown_grace_ms`. Past that
//! the server cancels `AppState::cut`: every wait on an upstream ends
//! ([`detach::unless_cut`]), and the request is settled on what it saw, as a cut-off.

mod admit;
mod answer;
mod detach;
mod forward;
mod relay;
mod settle;

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::error::ApiError;
use crate::policy::request::Endpoint;
use crate::state::AppState;
use admit::Admitted;
use detach::{Detachable, Panicked};

pub async fn chat_completions(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Chat, req).await
}

pub async fn completions(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Completions, req).await
}

pub async fn embeddings(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Embeddings, req).await
}

/// The metered endpoint a request is for: a `POST` to one of their paths, with or without
/// the `/v1` prefix (the server sends these here without going through the router).
pub fn metered_endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    if method != Method::POST {
        return None;
    }
    let path = path.strip_prefix("/v1").unwrap_or(path);
    Endpoint::ALL.into_iter().find(|e| e.upstream_path() == path)
}

/// Serves one request to a metered endpoint, answering every refusal in OpenAI's envelope.
pub async fn proxy(app: AppState, endpoint: Endpoint, req: Request) -> Response {
    let started = Instant::now();
    // The budget clock, so records and budget periods agree even when a test moves it.
    // Read once: the record's time and the budget period the request is charged to agree.
    let now = app.clock.now();
    let request_id = crate::ledger::new_request_id(now.timestamp_millis());
    // With `RUST_LOG=debug` (or a `[request]` directive), every log line of the request's
    // phases — the stream's pump and a forwarding that outlives its client included —
    // carries its id and endpoint. At debug level, so that a server logging at info pays
    // nothing for it (an info-level span cost measurable CPU a request: docs/benchmarks.md);
    // the lines that matter at info carry `request_id` themselves.
    let span = tracing::debug_span!("request", id = %request_id, endpoint = endpoint.name());
    let handled = handle(&app, endpoint, req, started, now, &request_id).instrument(span).await;
    let mut response = match handled {
        Ok(response) => response,
        Err(e) => {
            app.metrics.record_refusal(&e.code());
            tracing::info!(request_id = %request_id, status = e.status().as_u16(), code = %e.code(), "request refused");
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(answer::REQUEST_ID, v);
    }
    response
}

async fn handle(
    app: &AppState,
    endpoint: Endpoint,
    req: Request,
    started: Instant,
    now: chrono::DateTime<chrono::Utc>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let job = match admit::admit(app, endpoint, req, started, now, request_id).await? {
        Admitted::DryRun(answer) => return Ok(answer),
        Admitted::Forward(job) => job,
    };
    // The journal entry and the forward run inline, and on in a tracked task if this handler
    // is dropped (client gone): the request is still journaled, metered and recorded.
    match Detachable::new(&app.tracker, job.run()).await {
        Ok(response) => Ok(response),
        Err(Panicked) => {
            tracing::error!(request_id, "forwarding panicked");
            Err(ApiError::Internal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metered_endpoints_are_posts_to_their_paths() {
        let post = |path| metered_endpoint(&Method::POST, path);
        assert_eq!(post("/v1/chat/completions"), Some(Endpoint::Chat));
        assert_eq!(post("/chat/completions"), Some(Endpoint::Chat));
        assert_eq!(post("/v1/completions"), Some(Endpoint::Completions));
        assert_eq!(post("/embeddings"), Some(Endpoint::Embeddings));
        for other in [
            "/v1/models",
            "/v1/v1/chat/completions",
            "/v1chat/completions",
            "/v1/chat/completions/",
            "/admin/keys",
            "/",
        ] {
            assert_eq!(post(other), None, "{other}");
        }
        assert_eq!(metered_endpoint(&Method::GET, "/v1/chat/completions"), None);
        assert_eq!(metered_endpoint(&Method::PUT, "/v1/embeddings"), None);
    }
}
