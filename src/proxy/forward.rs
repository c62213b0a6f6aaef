//! Forward: the request's journal entry, then the upstream call — the serving model, then
//! its fallbacks — until an answer's first bytes are in; the relay takes it from there.

use std::sync::Arc;
use std::time::Instant;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::answer::{model_headers, retryable};
use super::detach::unless_cut;
use super::relay::{first_sse_bytes, relay_stream, whole_response};
use super::settle::{cut_off, failed, LocalPrompt, Meter};
use crate::error::ApiError;
use crate::policy::budget::Reservation;
use crate::policy::models::Model;
use crate::policy::request::ParsedRequest;
use crate::policy::routing::{self, PromptCounter};
use crate::upstream::{SendError, UpstreamResponse};

/// A routed request on its way upstream.
pub(super) struct Forward {
    pub(super) parsed: ParsedRequest,
    pub(super) body: Bytes,
    pub(super) model: Arc<Model>,
    pub(super) downgraded_from: Option<String>,
    pub(super) meter: Meter,
    /// The prompt's tokens as reserved, for the journal entry.
    pub(super) prompt_tokens: u64,
    /// `on_ledger_error = reject`: forward nothing whose journal entry could not be written.
    pub(super) reject: bool,
}

impl Forward {
    pub(super) async fn run(self) -> Response {
        let Forward { parsed, body, model, downgraded_from, mut meter, prompt_tokens, reject } = self;
        if let Err(e) = meter.journal(&model, prompt_tokens) {
            if reject {
                tracing::warn!(request_id = %meter.request_id, error = %e, "journal entry not durable; request refused");
                let app = meter.app.clone();
                meter.abandon(&model);
                let error = ApiError::LedgerUnavailable;
                app.metrics.record_refusal(&error.code());
                return error.into_response();
            }
            tracing::warn!(request_id = %meter.request_id, error = %e, "journal entry not durable; serving anyway (on_ledger_error = serve)");
        }
        let app = meter.app.clone();
        // Shutdown's cut, as this worker waits on it (see `unless_cut`).
        let cut = app.cut_token();
        if cut.is_cancelled() {
            // Shutdown's grace period ended before this request left: it is never forwarded,
            // so it is refused like any other, with no record.
            meter.abandon(&model);
            let error = ApiError::ShuttingDown;
            app.metrics.record_refusal(&error.code());
            return error.into_response();
        }
        let path = parsed.endpoint.upstream_path();
        // The serving model, then its fallback deployments, each reserved at its own price
        // when its turn comes (`reserve_fallback`).
        let mut deployments = vec![model.clone()];
        deployments.extend(app.config.catalog.fallbacks_of(&model.name).cloned());
        let mut last_failure: Option<ApiError> = None;
        let mut last_response: Option<(Arc<Model>, UpstreamResponse)> = None;
        let count = deployments.len();
        // Gateway overhead before the upstream call: auth, parsing, routing, reservation.
        let before_upstream = meter.started.elapsed();
        for (i, deployment) in deployments.into_iter().enumerate() {
            if i > 0 {
                if let Err(why) = reserve_fallback(&mut meter, &parsed, &model, &deployment).await {
                    tracing::info!(model = %deployment.name, reason = %why, "fallback skipped");
                    continue;
                }
            }
            let upstream_body = parsed.rewrite(&body, &deployment.upstream_model);
            let sent = Instant::now();
            let Some(result) = unless_cut(&cut, app.upstreams.send(&deployment.provider, path, upstream_body)).await
            else {
                return cut_off(meter, &deployment, model_headers(&deployment, downgraded_from.as_deref()));
            };
            app.metrics.observe_upstream(&deployment.name, sent.elapsed());
            match result {
                Ok(resp) if retryable(resp.status) && i + 1 < count => {
                    tracing::warn!(model = %deployment.name, status = resp.status.as_u16(), "upstream failed; trying fallback");
                    last_failure =
                        Some(ApiError::Upstream { status: Some(resp.status.as_u16()), message: String::new() });
                }
                Ok(resp) => {
                    last_response = Some((deployment, resp));
                    break;
                }
                Err(e) => {
                    tracing::warn!(model = %deployment.name, error = %e, "upstream request failed");
                    last_failure = Some(unreachable(&e));
                    if let SendError::Timeout = e {
                        app.metrics.record_refusal("upstream_timeout");
                    }
                }
            }
        }
        let Some((served, upstream)) = last_response else {
            let error = last_failure.unwrap_or(ApiError::Internal);
            let error = match error {
                ApiError::Upstream { status: Some(s), .. } => ApiError::Upstream {
                    status: Some(s),
                    message: format!("The upstream failed with status {s} and no fallback succeeded."),
                },
                other => other,
            };
            return failed(meter, &model, error, model_headers(&model, downgraded_from.as_deref()));
        };
        let headers = model_headers(&served, downgraded_from.as_deref());
        let is_sse = upstream.content_type().starts_with("text/event-stream");
        if parsed.stream && upstream.status.is_success() {
            if !is_sse {
                let mut upstream = upstream;
                if unless_cut(&cut, upstream.read_all(app.config.max_response_bytes)).await.is_none() {
                    return cut_off(meter, &served, headers);
                }
                return failed(meter, &served, ApiError::InvalidUpstreamResponse, headers);
            }
            // The client's response waits for the upstream's first body bytes, so a 200
            // whose body is not SSE can still be answered with a 502 (SPEC §4); they go out
            // with the headers.
            let mut upstream = upstream;
            let Some(first) = unless_cut(&cut, first_sse_bytes(&mut upstream)).await else {
                return cut_off(meter, &served, headers);
            };
            let first = match first {
                Ok(first) => first,
                Err(error) => {
                    tracing::warn!(request_id = %meter.request_id, model = %served.name, code = %error.code(), "stream's body is not SSE");
                    return failed(meter, &served, error, headers);
                }
            };
            app.metrics.observe_overhead(before_upstream);
            return relay_stream(meter, served, upstream, first, parsed.client_wants_usage, headers);
        }
        whole_response(meter, served, upstream, headers, before_upstream, &cut).await
    }
}

/// Moves the request's reservation to `fallback` at its own price (`routing::reserve_fallback`),
/// or says why `fallback` cannot serve it.
async fn reserve_fallback(
    meter: &mut Meter,
    parsed: &ParsedRequest,
    routed: &Arc<Model>,
    fallback: &Arc<Model>,
) -> Result<(), String> {
    let app = meter.app.clone();
    // The period the request is charged to is the one it was admitted in.
    let now = chrono::DateTime::from_timestamp_millis(meter.time_ms).unwrap_or_else(|| app.clock.now());
    let budgets = meter.caller.budgets();
    let mut counter = PromptCounter::new(parsed);
    let ask = routing::Ask {
        caller: &meter.caller,
        budgets: &budgets,
        request: parsed,
        asked: routed,
        request_id: &meter.request_id,
    };
    let held = std::mem::replace(&mut meter.reservation, Reservation::none());
    match routing::reserve_fallback(&app.budgets, ask, held, fallback, &mut counter, now).await {
        Ok(reservation) => {
            meter.reservation = reservation;
            if let LocalPrompt::Exact(_) = meter.local_prompt_tokens {
                // Counted for the routed model; the fallback's tokenizer may count otherwise.
                meter.local_prompt_tokens = LocalPrompt::Exact(counter.exact(fallback));
            }
            Ok(())
        }
        Err((held, why)) => {
            meter.reservation = held;
            Err(why)
        }
    }
}

/// The client-facing error for an upstream that gave no answer, when no fallback succeeds.
fn unreachable(e: &SendError) -> ApiError {
    match e {
        SendError::Timeout => ApiError::UpstreamTimeout,
        SendError::Connect(_) | SendError::Other(_) => {
            ApiError::Upstream { status: None, message: "The upstream could not be reached.".into() }
        }
    }
}
