//! The OpenAI-compatible endpoints: authenticate, parse, route and reserve, forward (with
//! fallbacks before the first byte), meter, record, answer.
//!
//! Forwarding runs inside the client's connection but is not cancelled with it: a client
//! that hangs up leaves the upstream call and its metering to finish in a task the server
//! tracks (see [`Detachable`]), and SIGTERM waits for it — up to `shutdown_grace_ms`. Past
//! that the server cancels `AppState::cut`: every wait on an upstream here ends (see
//! [`unless_cut`]), and the request is settled on what it saw, as a cut-off.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};

use crate::auth;
use crate::config::{Model, OnLedgerError};
use crate::error::ApiError;
use crate::metering::sse::SseParser;
use crate::metering::usage::{self, ChunkKind, StreamAccumulator};
use crate::metering::{LocalPrompt, Meter, Outcome, Produced};
use crate::pricing::NanoUsd;
use crate::request::{self, Endpoint, ParsedRequest};
use crate::routing::{self, Admission, Decision, PromptCounter};
use crate::server::AppState;
use crate::upstream::{Joined, ReadError, SendError, UpstreamResponse};

// tollgate's own headers (SPEC §4), named once instead of parsed per use.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");
const DRY_RUN: HeaderName = HeaderName::from_static("x-tollgate-dry-run");
const MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
const DOWNGRADED_FROM: HeaderName = HeaderName::from_static("x-tollgate-downgraded-from");
const COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");

/// Largest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// Generated text kept per stream for estimating output tokens.
const MAX_STREAM_TEXT: usize = 4 * 1024 * 1024;
/// Events buffered between the upstream reader and a slow client.
const STREAM_BUFFER: usize = 16;

pub async fn chat_completions(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Chat, req).await
}

pub async fn completions(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Completions, req).await
}

pub async fn embeddings(State(app): State<AppState>, req: Request) -> Response {
    proxy(app, Endpoint::Embeddings, req).await
}

/// `GET /v1/models`: the models this key may use.
pub async fn list_models(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = auth::authenticate(&app.directory, app.ledger.backend(), &headers).await?;
    let data: Vec<_> = app
        .config
        .model_order
        .iter()
        .filter(|name| caller.allows(name))
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
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
    let mut response = match handle(&app, endpoint, req, started, now, &request_id).await {
        Ok(response) => response,
        Err(e) => {
            app.metrics.record_refusal(&e.code());
            tracing::info!(request_id = %request_id, status = e.status().as_u16(), code = %e.code(), "request refused");
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// After refusing a body as too large, the 413 goes out at once while up to this many more
/// bytes of the body are read and thrown away in the background (for at most [`DRAIN_TIME`]):
/// most clients write their whole body before reading the answer, and closing a connection
/// with unread bytes resets it, so they would see a broken pipe instead of the 413 (nginx's
/// lingering close does the same).
const DRAIN_BYTES: u64 = 32 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

async fn read_body(mut body: Body, limit: usize, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        if n - limit as u64 <= DRAIN_BYTES {
            tokio::spawn(drain(body, n));
        }
        return Err(ApiError::TooLarge { limit });
    }
    // Usually the body is one frame: handed on as it is, without a copy.
    let mut joined = Joined::new(declared.map(|n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ApiError::InvalidJson("The request body could not be read.".into()))?;
        let Ok(data) = frame.into_data() else { continue };
        if joined.len() + data.len() > limit {
            tokio::spawn(drain(body, DRAIN_BYTES));
            return Err(ApiError::TooLarge { limit });
        }
        joined.push(data);
    }
    Ok(joined.into_bytes())
}

/// Reads and discards up to `at_most` bytes of `body`, for at most [`DRAIN_TIME`].
async fn drain(mut body: Body, at_most: u64) {
    use http_body_util::BodyExt;
    let discard = async {
        let mut read = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read >= at_most {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

fn dry_run_asked(headers: &HeaderMap) -> bool {
    headers.get(DRY_RUN).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

async fn handle(
    app: &AppState,
    endpoint: Endpoint,
    req: Request,
    started: Instant,
    now: chrono::DateTime<chrono::Utc>,
    request_id: &str,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    // Authenticate before reading the body: an anonymous client gets no buffering from us.
    let caller = auth::authenticate(&app.directory, app.ledger.backend(), &parts.headers).await?;
    let body_timeout = std::time::Duration::from_millis(app.config.body_read_timeout_ms);
    let body = tokio::time::timeout(body_timeout, read_body(body, app.config.max_body_bytes, &parts.headers))
        .await
        .map_err(|_| ApiError::BodyTimeout)??;
    let parsed = request::parse(endpoint, &body)?;
    let asked =
        app.config.models.get(&parsed.model).cloned().ok_or_else(|| ApiError::ModelNotFound(parsed.model.clone()))?;
    if !caller.allows(&asked.name) {
        return Err(ApiError::ModelNotAllowed(asked.name.clone()));
    }
    let wants_embedding = endpoint == Endpoint::Embeddings;
    if wants_embedding != (asked.kind == crate::pricing::ModelKind::Embedding) {
        return Err(ApiError::param(
            "model",
            format!("The model `{}` does not serve {} requests.", asked.name, endpoint.name()),
        ));
    }
    if asked.kind == crate::pricing::ModelKind::Chat {
        // Each of `max_tokens` and `max_completion_tokens` is checked, as the upstream checks each.
        if let Some((param, max)) = parsed.output_limit_over(asked.max_output_tokens) {
            return Err(ApiError::param(
                param,
                format!(
                    "{param} is too large: {max}. This model supports at most {} completion tokens.",
                    asked.max_output_tokens
                ),
            ));
        }
    }
    let dry_run = dry_run_asked(&parts.headers);
    // The ledger policy (docs/reliability.md): with `reject`, nothing is forwarded whose
    // journal entry could not be written; with either policy, a request claims the queue
    // place its final record needs up front, so a full queue refuses new work rather than
    // hold records in unbounded memory or hang an admitted request.
    let reject = app.config.on_ledger_error == OnLedgerError::Reject;
    let slot = if dry_run {
        None
    } else {
        match app.ledger.claim() {
            Some(slot) => Some(slot),
            None => return Err(ApiError::LedgerUnavailable),
        }
    };

    let budgets = caller.budgets();
    routing::load_accounts(&app.budgets, &app.ledger, &budgets, now).await?;
    let mut counter = PromptCounter::new(&parsed);
    let ask = routing::Ask { caller: &caller, budgets: &budgets, request: &parsed, asked: &asked };
    let admitted = routing::admit(&app.config, &app.budgets, ask, &mut counter, now);
    if dry_run {
        return Ok(dry_run_answer(app, &budgets, &parsed, &asked, admitted, &mut counter, now));
    }
    let admission = match admitted {
        Ok(a) => a,
        Err((reason, refusal)) => {
            tracing::info!(request_id, key_id = %caller.key.id, team = %caller.team.name, %reason, "budget refused");
            return Err(ApiError::BudgetExceeded {
                message: format!("Budget exceeded: {reason}."),
                retry_after_s: refusal.and_then(|r| r.retry_after_s),
            });
        }
    };
    // Rate limits count admitted requests; tpm needs the prompt's tokens.
    let limited_tpm = budgets.iter().any(|b| b.spec.tpm.is_some());
    let rate_tokens = if limited_tpm { counter.exact(&admission.model) } else { admission.prompt_tokens };
    let rate = match app.rates.admit(&budgets, rate_tokens, now.timestamp_millis()) {
        Ok(t) => t,
        Err(refusal) => {
            app.budgets.settle(admission.reservation, NanoUsd::ZERO);
            return Err(ApiError::RateLimited {
                message: rate_limit_message(&refusal),
                retry_after_s: refusal.retry_after_s,
            });
        }
    };
    let local_prompt = if admission.prompt_exact || limited_tpm {
        LocalPrompt::Exact(counter.exact(&admission.model))
    } else {
        LocalPrompt::Deferred(parsed.prompt.clone(), endpoint)
    };
    let Admission { model, decision, reason, reservation, prompt_tokens, .. } = admission;
    tracing::debug!(request_id, model = %model.name, decision = decision.as_str(), %reason, "routed");
    let downgraded_from = (decision == Decision::Downgrade).then(|| asked.name.clone());
    let Some(slot) = slot else {
        // Only dry runs have no slots, and they returned above.
        return Err(ApiError::Internal);
    };
    let meter = Meter {
        app: app.clone(),
        caller,
        request_id: request_id.to_string(),
        time_ms: now.timestamp_millis(),
        started,
        endpoint: endpoint.name(),
        asked: asked.name.clone(),
        stream: parsed.stream,
        local_prompt_tokens: local_prompt,
        reservation,
        rate,
        slot,
        entry: None,
    };
    let job = Forward { parsed, body, model, downgraded_from, meter, prompt_tokens, reject };
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

/// A request's forwarding (or a stream's pump), polled by the handler (or the response
/// body) itself while the client stays, and finished by a task the server tracks if it is
/// dropped first (the client hung up; shutdown's grace period ran out). Until then a tracker
/// token stands in for that task, so shutdown waits for the work either way.
///
/// It replaces a task spawned for every request and awaited by the handler: the spawn, a
/// second task polled, and the wake-up of the handler when it finished. Boxed, so handing
/// it to a task moves a pointer, not the few kilobytes of the forwarding state machine (and
/// a boxed future stays where it is, pinned, when it changes hands).
struct Detachable<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    run: Option<std::pin::Pin<Box<F>>>,
    tracker: TaskTracker,
    _token: TaskTrackerToken,
}

/// The forwarding panicked (its state is dropped, not run on).
struct Panicked;

impl<F: Future + Send + 'static> Detachable<F>
where
    F::Output: Send + 'static,
{
    fn new(tracker: &TaskTracker, run: F) -> Self {
        Detachable { run: Some(Box::pin(run)), tracker: tracker.clone(), _token: tracker.token() }
    }
}

impl<F: Future + Send + 'static> Future for Detachable<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        // Polled again after it finished: never (hyper drops a finished handler; the relay
        // forgets a finished pump).
        let Some(run) = self.run.as_mut() else { return Poll::Ready(Err(Panicked)) };
        // A panic is the handler's 500, as a panicking task's was, not a dropped connection.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.run = None;
                Poll::Ready(Ok(output))
            }
            Err(_) => {
                self.run = None;
                Poll::Ready(Err(Panicked))
            }
        }
    }
}

impl<F: Future + Send + 'static> Drop for Detachable<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(run) = self.run.take() else { return };
        // Outside a runtime (a worker's runtime being torn down drops its tasks with none
        // current) there is nowhere to run it; the journal entry then marks the request
        // interrupted at the next start, as for a process that died.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(run);
        }
    }
}

fn rate_limit_message(refusal: &crate::budget::RateRefusal) -> String {
    format!(
        "Rate limit reached for this {}: {} {}. Retry after {} s.",
        refusal.scope.label(),
        refusal.limit,
        refusal.what,
        refusal.retry_after_s
    )
}

fn dry_run_answer(
    app: &AppState,
    budgets: &[crate::budget::Applicable],
    parsed: &ParsedRequest,
    asked: &Arc<Model>,
    admitted: Result<Admission, (String, Option<crate::budget::Refusal>)>,
    counter: &mut PromptCounter,
    now: chrono::DateTime<chrono::Utc>,
) -> Response {
    // The rate limits as the request would meet them (checked, no slot taken).
    let admitted = admitted.and_then(|a| {
        let rate_tokens =
            if budgets.iter().any(|b| b.spec.tpm.is_some()) { counter.exact(&a.model) } else { a.prompt_tokens };
        match app.rates.check(budgets, rate_tokens, now.timestamp_millis()) {
            Ok(()) => Ok(a),
            Err(refusal) => {
                app.budgets.settle(a.reservation, NanoUsd::ZERO);
                Err((rate_limit_message(&refusal), None))
            }
        }
    });
    let (decision, served, reason, max_cost, estimated) = match admitted {
        Ok(a) => {
            let exact = counter.exact(&a.model);
            let estimated = a.model.price.worst_case(exact, 0);
            let max_cost = a.model.price.worst_case(exact, routing::max_output(parsed, &a.model));
            // A dry run charges nothing: give the reservation straight back.
            app.budgets.settle(a.reservation, NanoUsd::ZERO);
            (a.decision, Some(a.model.name.clone()), a.reason, max_cost, estimated)
        }
        Err((reason, _)) => {
            let exact = counter.exact(asked);
            let max_cost = asked.price.worst_case(exact, routing::max_output(parsed, asked));
            (Decision::Refuse, None, reason, max_cost, asked.price.worst_case(exact, 0))
        }
    };
    let remaining = app.budgets.headroom(budgets, now);
    axum::Json(json!({
        "dry_run": true,
        "decision": decision.as_str(),
        "model": asked.name,
        "served_model": served,
        "reason": reason,
        "estimated_cost_usd": estimated.as_usd(),
        "max_cost_usd": max_cost.as_usd(),
        "remaining_usd": remaining.map(|r| r.as_usd()),
    }))
    .into_response()
}

/// A routed request on its way upstream.
struct Forward {
    parsed: ParsedRequest,
    body: Bytes,
    model: Arc<Model>,
    downgraded_from: Option<String>,
    meter: Meter,
    /// The prompt's tokens as reserved, for the journal entry.
    prompt_tokens: u64,
    /// `on_ledger_error = reject`: forward nothing whose journal entry could not be written.
    reject: bool,
}

/// Whether a failure is worth trying the next deployment for.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

impl Forward {
    async fn run(self) -> Response {
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
        let cut = crate::server::cut_token(&app);
        if cut.is_cancelled() {
            // Shutdown's grace period ended before this request left: it is never forwarded,
            // so it is refused like any other, with no record.
            meter.abandon(&model);
            let error = ApiError::ShuttingDown;
            app.metrics.record_refusal(&error.code());
            return error.into_response();
        }
        let path = parsed.endpoint.upstream_path();
        // The serving model, then its fallback deployments (allowed ones only).
        let mut deployments = vec![model.clone()];
        if let Some(list) = app.config.fallbacks.get(&model.name) {
            for name in list {
                if let Some(m) = app.config.models.get(name) {
                    if meter.caller.allows(&m.name) && m.capabilities.covers(&parsed.needs) {
                        deployments.push(m.clone());
                    }
                }
            }
        }
        let mut last_failure: Option<ApiError> = None;
        let mut last_response: Option<(Arc<Model>, UpstreamResponse)> = None;
        let count = deployments.len();
        // Gateway overhead before the upstream call: auth, parsing, routing, reservation.
        let before_upstream = meter.started.elapsed();
        for (i, deployment) in deployments.into_iter().enumerate() {
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
                    last_failure = Some(e.to_api_error());
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

/// A non-streamed answer: read it whole, meter, record durably, then answer.
async fn whole_response(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    mut headers: HeaderMap,
    before_upstream: std::time::Duration,
    cut: &CancellationToken,
) -> Response {
    let app = meter.app.clone();
    let status = upstream.status;
    let Some(read) = unless_cut(cut, upstream.read_all(app.config.max_response_bytes)).await else {
        return cut_off(meter, &served, headers);
    };
    let after_upstream = Instant::now();
    let body = match read {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(model = %served.name, error = %e, "upstream body failed");
            let error = match e {
                ReadError::Body(crate::upstream::BodyError::Idle) => ApiError::UpstreamTimeout,
                // A 200 whose body was cut off is a body that is not JSON (SPEC §4).
                ReadError::Body(_) if status.is_success() => ApiError::InvalidUpstreamResponse,
                ReadError::Body(_) => {
                    ApiError::Upstream { status: None, message: "The upstream connection failed mid-response.".into() }
                }
                ReadError::TooLarge => {
                    ApiError::Upstream { status: None, message: "The upstream response was too large.".into() }
                }
            };
            return failed(meter, &served, error, headers);
        }
    };
    let answer = usage::read_answer(&body);
    if status.is_success() {
        let Some((reported, text)) = answer else {
            return failed(meter, &served, ApiError::InvalidUpstreamResponse, headers);
        };
        let settled = meter.settle(Outcome {
            status: status.as_u16(),
            model: &served,
            reported,
            produced: Some(Produced { text: &text, overflow_bytes: 0 }),
        });
        if let Err(failed) = settled.durable {
            if app.config.on_ledger_error == OnLedgerError::Reject {
                // The client receives a 503: the record (which reaches the database from
                // memory) must say so.
                let error = ApiError::LedgerNotDurable;
                let status = error.status().as_u16();
                app.ledger.amend(crate::ledger::RequestRecord { status, ..*failed.record }, false, None);
                return forwarded_error(error, headers, settled.cost);
            }
        }
        insert_cost(&mut headers, settled.cost);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        app.metrics.observe_overhead(before_upstream + after_upstream.elapsed());
        return respond(status, headers, Body::from(body));
    }
    // The upstream refused the request itself (4xx): its error body reaches the client
    // unchanged; 401/403 mean tollgate's provider credentials are wrong, which is not the
    // client's to see as its own key's fault.
    let reported = answer.and_then(|(usage, _)| usage);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN || retryable(status) {
        let error = ApiError::Upstream {
            status: Some(status.as_u16()),
            message: format!("The upstream failed with status {}.", status.as_u16()),
        };
        let settled =
            meter.settle(Outcome { status: error.status().as_u16(), model: &served, reported, produced: None });
        let mut response = forwarded_error(error, headers, settled.cost);
        if let Some(retry) = upstream.headers.get(header::RETRY_AFTER) {
            response.headers_mut().insert(header::RETRY_AFTER, retry.clone());
        }
        return response;
    }
    let settled = meter.settle(Outcome { status: status.as_u16(), model: &served, reported, produced: None });
    insert_cost(&mut headers, settled.cost);
    let content_type =
        upstream.headers.get(header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    respond(status, headers, Body::from(body))
}

/// The headers of every metered response but the cost: the model that served (or was
/// tried last), and the one asked for when the request was downgraded.
fn model_headers(model: &Model, downgraded_from: Option<&str>) -> HeaderMap {
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
fn insert_cost(headers: &mut HeaderMap, cost: NanoUsd) {
    if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
        headers.insert(COST_USD, v);
    }
}

/// `fut`, unless shutdown's grace period ends first (`None`: `fut` is dropped, and with it
/// the upstream request it was waiting on). `cut` is the worker's token, taken once per
/// request or stream (`server::cut_token`).
async fn unless_cut<F: Future>(cut: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = cut.cancelled() => None,
    }
}

/// Settles a non-streamed request cut by shutdown while it waited on `served`, and the 503
/// its client gets if its connection is still open. As with a client that hangs up, the
/// request is charged for what the upstream was seen to do: its prompt (counted locally,
/// `estimated`), no output (none reached tollgate).
fn cut_off(meter: Meter, served: &Arc<Model>, headers: HeaderMap) -> Response {
    tracing::warn!(request_id = %meter.request_id, model = %served.name, "grace period over; request cut");
    let error = ApiError::ShuttingDown;
    let produced = Some(Produced { text: "", overflow_bytes: 0 });
    let settled = meter.settle(Outcome { status: error.status().as_u16(), model: served, reported: None, produced });
    forwarded_error(error, headers, settled.cost)
}

/// Settles a request that went upstream to `served` and failed with `error`, before any
/// usage was reported or output seen (it costs nothing), and answers with the error.
fn failed(meter: Meter, served: &Arc<Model>, error: ApiError, headers: HeaderMap) -> Response {
    let settled =
        meter.settle(Outcome { status: error.status().as_u16(), model: served, reported: None, produced: None });
    forwarded_error(error, headers, settled.cost)
}

/// The error answer to a request that went upstream: OpenAI's envelope, with the headers
/// every metered response carries (`headers` from [`model_headers`]) and what it cost.
fn forwarded_error(error: ApiError, mut headers: HeaderMap, cost: NanoUsd) -> Response {
    insert_cost(&mut headers, cost);
    let mut response = error.into_response();
    response.headers_mut().extend(headers);
    response
}

/// A response of `status` with exactly `headers` (a tuple's `into_response` would build a
/// map and merge these into it one by one, ~1% of a request's instructions).
fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Reads a stream's body until it can tell whether it starts like SSE (usually its first
/// chunk): what it read, for the pump to go on from. A body that starts with anything but an
/// SSE field (`data`, `event`, `id`, `retry`), a `:` comment or a blank line, or that ends or
/// fails first, is refused with a 502 before the client sees a 200 (one that falls silent
/// for `idle_timeout_ms` first, with a 504).
async fn first_sse_bytes(upstream: &mut UpstreamResponse) -> Result<Bytes, ApiError> {
    let mut read = Bytes::new();
    loop {
        let chunk = match upstream.next_chunk().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(crate::upstream::BodyError::Idle)) => return Err(ApiError::UpstreamTimeout),
            Some(Err(_)) | None => return Err(ApiError::InvalidUpstreamResponse),
        };
        // Usually the first chunk decides, and is handed on as it is; joining is for the
        // rare start split inside its first few bytes.
        read = if read.is_empty() { chunk } else { [read, chunk].concat().into() };
        match starts_like_sse(&read) {
            Some(true) => return Ok(read),
            Some(false) => return Err(ApiError::InvalidUpstreamResponse),
            None => {}
        }
    }
}

/// Whether `bytes`, the start of a body, start like an SSE stream (`None`: too few to tell).
fn starts_like_sse(bytes: &[u8]) -> Option<bool> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    const FIELDS: [&[u8]; 4] = [b"data", b"event", b"id", b"retry"];
    if bytes.len() < BOM.len() && BOM.starts_with(bytes) {
        return None;
    }
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match bytes.iter().position(|&b| matches!(b, b':' | b'\r' | b'\n')) {
        // A comment or a blank line, or a field's name.
        Some(0) => Some(true),
        Some(end) => Some(FIELDS.contains(&&bytes[..end])),
        None if bytes.is_empty() || FIELDS.iter().any(|f| f.starts_with(bytes)) => None,
        None => Some(false),
    }
}

/// Starts relaying a stream: the response goes out at once with the upstream's status; its
/// body runs the pump, which forwards `first` (the body's first bytes, read already), then
/// reads the upstream, forwards each event as it completes, and settles.
fn relay_stream(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    first: Bytes,
    client_wants_usage: bool,
    mut headers: HeaderMap,
) -> Response {
    // The pump needs no upstream header: free them rather than hold them for the stream's life.
    upstream.headers = HeaderMap::new();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(STREAM_BUFFER);
    let app = meter.app.clone();
    let drain = std::time::Duration::from_millis(app.config.disconnect_drain_ms);
    let status = upstream.status;
    let pump = Detachable::new(&app.tracker, pump(meter, served, upstream, first, client_wants_usage, tx, drain));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    respond(status, headers, Body::from_stream(Relay { pump: Some(pump), rx, held: None, panicked: false }))
}

/// A stream's response body: the events the pump hands over, as they come.
///
/// The body polls the pump itself, on the connection's task, before it looks for events:
/// an upstream read wakes the task that writes to the client, and no task is spawned a
/// stream. When hyper drops the body before the pump has finished (the client hung up, or
/// the connection closed), the pump goes on in a tracked task: it notices the client is gone
/// at its next hand-over and keeps metering. The pump runs ahead of the client by at most
/// the channel's [`STREAM_BUFFER`] hand-overs, and while the client reads nothing hyper
/// stops polling the body, which leaves the rest of the stream in the upstream connection.
///
/// An error (the cut-off) is held back for one poll: hyper drops its unflushed buffer —
/// response head included — when a body errors in the same write pass, and the client must
/// see a 200 that stops before `[DONE]`, not a connection that closed without a response
/// (which SDKs retry, charging twice).
struct Relay<F: Future<Output = ()> + Send + 'static> {
    pump: Option<Detachable<F>>,
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    held: Option<std::io::Error>,
    panicked: bool,
}

impl<F: Future<Output = ()> + Send + 'static> futures::Stream for Relay<F> {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(e) = this.held.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(pump) = this.pump.as_mut() {
            match std::pin::Pin::new(pump).poll(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => this.pump = None,
                Poll::Ready(Err(Panicked)) => {
                    tracing::error!("stream relay panicked");
                    this.pump = None;
                    this.panicked = true;
                }
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.held = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            // The events it handed over went out; then the stream is cut off, not ended as
            // if complete.
            Poll::Ready(None) if this.panicked => {
                this.panicked = false;
                Poll::Ready(Some(Err(std::io::Error::other("stream relay panicked"))))
            }
            other => other,
        }
    }
}

/// With `include_usage` (which tollgate adds), OpenAI puts `"usage":null` at the end of
/// every chunk; a client that did not ask for usage would not see that field, so it is
/// removed when it is exactly there. Anything else passes untouched. Appends to `out`.
fn push_without_null_usage(out: &mut BytesMut, raw: &[u8]) {
    const FIELD: &[u8] = b",\"usage\":null}";
    let end = memchr::memrchr(b'}', raw).map_or(0, |i| i + 1);
    if end >= FIELD.len() && &raw[end - FIELD.len()..end] == FIELD {
        out.extend_from_slice(&raw[..end - FIELD.len()]);
        out.extend_from_slice(b"}");
        out.extend_from_slice(&raw[end..]);
    } else {
        out.extend_from_slice(raw);
    }
}

/// Reads the upstream stream to its end, forwarding events to the client while it listens:
/// the events that arrived in one upstream read leave in one write, at once. `[DONE]` is held
/// back until the record is durable. If the client goes away, reading continues (for at most
/// `drain`) to learn the usage; if the upstream stops early, or shutdown's grace period ends
/// (`AppState::cut`), the client's stream is cut off too, without `[DONE]`, and charged by
/// estimate from what was read.
async fn pump(
    meter: Meter,
    served: Arc<Model>,
    mut upstream: UpstreamResponse,
    first: Bytes,
    client_wants_usage: bool,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    drain: std::time::Duration,
) {
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    let mut acc = StreamAccumulator::new(MAX_STREAM_TEXT);
    let mut client_gone = false;
    let mut gone_at: Option<Instant> = None;
    let mut done_event: Option<Bytes> = None;
    let mut failure: Option<String> = None;
    let mut first = Some(first);
    let cut = crate::server::cut_token(&meter.app);
    loop {
        if let Some(at) = gone_at {
            if at.elapsed() > drain {
                failure = Some("client gone; stopped draining the upstream".into());
                break;
            }
        }
        let next = match first.take() {
            Some(first) => Some(Ok(first)),
            None => match unless_cut(&cut, upstream.next_chunk()).await {
                Some(next) => next,
                None => {
                    failure = Some("grace period over at shutdown; stream cut".into());
                    break;
                }
            },
        };
        let (events, at_end) = match next {
            // End of body: a final event may still be waiting on its line ending.
            None => match parser.finish() {
                Ok(events) => (events, true),
                Err(e) => {
                    failure = Some(format!("malformed SSE from the upstream: {e}"));
                    break;
                }
            },
            Some(Ok(chunk)) => match parser.push(&chunk) {
                Ok(events) => (events, false),
                Err(e) => {
                    failure = Some(format!("malformed SSE from the upstream: {e:?}"));
                    break;
                }
            },
            Some(Err(e)) => {
                failure = Some(e.to_string());
                break;
            }
        };
        // Sized for every event: grown event by event, it was reallocated and copied a
        // handful of times per read.
        let mut out = BytesMut::with_capacity(events.iter().map(|e| e.raw.len()).sum());
        for event in events {
            // A chunk held unread (`None`) is forwarded like any other content.
            let kind = event.data.and_then(|data| acc.observe_later(data));
            match kind {
                Some(ChunkKind::Done) => {
                    done_event = Some(event.raw);
                    break;
                }
                Some(ChunkKind::UsageOnly) if !client_wants_usage => continue,
                _ => {}
            }
            if client_wants_usage {
                out.extend_from_slice(&event.raw);
            } else {
                push_without_null_usage(&mut out, &event.raw);
            }
        }
        if !out.is_empty() && !client_gone && tx.send(Ok(out.freeze())).await.is_err() {
            client_gone = true;
            gone_at = Some(Instant::now());
            tracing::info!(request_id = %meter.request_id, "client disconnected mid-stream; still metering");
        }
        if done_event.is_some() || at_end {
            break;
        }
    }
    let complete = done_event.is_some();
    if let Some(why) = &failure {
        tracing::warn!(request_id = %meter.request_id, model = %served.name, reason = %why, "stream ended early");
    }
    acc.finish();
    let app = meter.app.clone();
    let settled = meter.settle(Outcome {
        status: upstream.status.as_u16(),
        model: &served,
        reported: acc.usage(),
        produced: Some(Produced { text: acc.produced_text(), overflow_bytes: acc.overflow_bytes() }),
    });
    if client_gone {
        return;
    }
    let keep = settled.durable.is_ok() || app.config.on_ledger_error == OnLedgerError::Serve;
    match done_event {
        Some(done) if complete && keep => {
            let _ = tx.send(Ok(done)).await;
        }
        _ => {
            // Cut the client's stream off: an error ends the chunked body without its terminator.
            let _ = tx.send(Err(std::io::Error::other("upstream stream ended early"))).await;
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

    #[test]
    fn an_sse_start_is_a_field_a_comment_or_a_blank_line() {
        for sse in [
            &b"data: {}"[..],
            b"data:x",
            b"data\n",
            b"event: x\r\n",
            b"id: 1",
            b"retry: 5",
            b": hi",
            b"\n",
            b"\r\n",
            b"\xEF\xBB\xBFdata: x",
        ] {
            assert_eq!(starts_like_sse(sse), Some(true), "{sse:?}");
        }
        for not in [
            &b"{\"id\":1}"[..],
            b"<html>",
            b"HTTP/1.1",
            b"dat x",
            b"datum: x",
            b"data_x: 1",
            b"ids:",
            b" data: x",
            b"\xEF\xBB\xBF{",
        ] {
            assert_eq!(starts_like_sse(not), Some(false), "{not:?}");
        }
        for undecided in [
            &b""[..],
            b"d",
            b"dat",
            b"data",
            b"ev",
            b"i",
            b"retr",
            b"\xEF",
            b"\xEF\xBB",
            b"\xEF\xBB\xBF",
            b"\xEF\xBB\xBFda",
        ] {
            assert_eq!(starts_like_sse(undecided), None, "{undecided:?}");
        }
    }

    #[test]
    fn null_usage_is_removed_only_where_openai_puts_it() {
        let without_null_usage = |raw: &[u8]| {
            let mut out = BytesMut::from(&b"before|"[..]);
            push_without_null_usage(&mut out, raw);
            out.strip_prefix(b"before|").expect("appends").to_vec()
        };
        assert_eq!(
            without_null_usage(b"data: {\"id\":\"c\",\"choices\":[],\"usage\":null}\n\n"),
            b"data: {\"id\":\"c\",\"choices\":[]}\n\n"
        );
        assert_eq!(without_null_usage(b"data: {\"a\":1,\"usage\":null}\r\n\r\n"), b"data: {\"a\":1}\r\n\r\n");
        for untouched in [
            &b"data: {\"usage\":{\"prompt_tokens\":1}}\n\n"[..],
            b"data: {\"text\":\"\\\"usage\\\":null\",\"x\":1}\n\n",
            b": comment\n\n",
            b"data: [DONE]\n\n",
        ] {
            assert_eq!(without_null_usage(untouched), untouched);
        }
    }
}
