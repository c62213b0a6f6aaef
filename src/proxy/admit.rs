//! Admit: everything a request passes before it may cost anything — its key, its body and
//! their checks, its budgets' accounts, the route along the downgrade chain with its
//! worst case reserved, and the rate limits. A dry run is answered here.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::forward::Forward;
use super::settle::{LocalPrompt, Meter};
use crate::auth;
use crate::config::OnLedgerError;
use crate::edge;
use crate::error::ApiError;
use crate::policy::budget::{BudgetStore, Reservation};
use crate::policy::models::Model;
use crate::policy::pricing::NanoUsd;
use crate::policy::request::{self, Endpoint, ParsedRequest};
use crate::policy::routing::{self, Admission, Decision, NotAdmitted, PromptCounter};
use crate::state::AppState;

const DRY_RUN: HeaderName = HeaderName::from_static("x-tollgate-dry-run");

/// Where admission leads.
// Moved once, straight into the forwarding's future: boxing the big variant would cost an
// allocation a request for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admitted {
    /// A dry run's answer: what would happen, nothing reserved.
    DryRun(Response),
    /// The routed, reserved request, to forward.
    Forward(Forward),
}

/// Admits a request: authenticates its key, reads and checks its body, loads its budgets'
/// accounts, routes it and reserves its worst case, and takes its rate-limit slots. A dry run
/// ends here with its answer; any other request leaves as the job to forward.
pub(super) async fn admit(
    app: &AppState,
    endpoint: Endpoint,
    req: Request,
    started: Instant,
    now: chrono::DateTime<chrono::Utc>,
    request_id: &str,
) -> Result<Admitted, ApiError> {
    let (parts, body) = req.into_parts();
    // Authenticate before reading the body: an anonymous client gets no buffering from us.
    let caller = auth::authenticate(&app.directory, app.ledger.backend(), &parts.headers).await?;
    let body_timeout = std::time::Duration::from_millis(app.config.body_read_timeout_ms);
    let body = edge::read_body(body, app.config.max_body_bytes, body_timeout, &parts.headers).await?;
    let parsed = request::parse(endpoint, &body)?;
    let asked = app
        .config
        .catalog
        .models
        .get(&parsed.model)
        .cloned()
        .ok_or_else(|| ApiError::ModelNotFound(parsed.model.clone()))?;
    if !caller.allows(&asked.name) {
        return Err(ApiError::ModelNotAllowed(asked.name.clone()));
    }
    let wants_embedding = endpoint == Endpoint::Embeddings;
    if wants_embedding != (asked.kind == crate::policy::pricing::ModelKind::Embedding) {
        return Err(ApiError::param(
            "model",
            format!("The model `{}` does not serve {} requests.", asked.name, endpoint.name()),
        ));
    }
    if asked.kind == crate::policy::pricing::ModelKind::Chat {
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
    app.load_accounts(&budgets, now).await?;
    let mut counter = PromptCounter::new(&parsed);
    let ask = routing::Ask { caller: &caller, budgets: &budgets, request: &parsed, asked: &asked, request_id };
    let admitted = routing::admit(&app.config.catalog, &app.budgets, ask, &mut counter, now).await;
    if let Err(NotAdmitted::Unavailable(_)) = admitted {
        return Err(ApiError::BudgetsUnavailable);
    }
    if dry_run {
        let answer = dry_run_answer(app, &budgets, &parsed, &asked, admitted, &mut counter, now).await?;
        return Ok(Admitted::DryRun(answer));
    }
    let admission = match admitted {
        Ok(a) => a,
        Err(NotAdmitted::Unavailable(_)) => return Err(ApiError::BudgetsUnavailable),
        Err(NotAdmitted::Refused(reason, refusal)) => {
            tracing::info!(request_id, key_id = %caller.key.id, team = %caller.team.name, %reason, "budget refused");
            return Err(ApiError::BudgetExceeded {
                message: format!("Budget exceeded: {reason}."),
                retry_after_s: refusal.and_then(|r| r.retry_after_s),
            });
        }
    };
    let Admission { model, decision, reason, reservation, prompt_tokens, prompt_exact, .. } = admission;
    // From here until the request is forwarded, a refusal or a client gone gives it back.
    let taken = Taken::new(app, reservation);
    // Rate limits count admitted requests; tpm needs the prompt's tokens.
    let limited_tpm = budgets.iter().any(|b| b.spec.tpm.is_some());
    let rate_tokens = if limited_tpm { counter.exact(&model) } else { prompt_tokens };
    let rate = match app.rates.admit(&budgets, rate_tokens, now.timestamp_millis()).await {
        Ok(Ok(t)) => t,
        Err(_) => return Err(ApiError::BudgetsUnavailable),
        Ok(Err(refusal)) => {
            return Err(ApiError::RateLimited {
                message: rate_limit_message(&refusal),
                retry_after_s: refusal.retry_after_s,
            });
        }
    };
    let local_prompt = if prompt_exact || limited_tpm {
        LocalPrompt::Exact(counter.exact(&model))
    } else {
        LocalPrompt::Deferred(parsed.prompt.clone(), endpoint)
    };
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
        reservation: taken.keep(),
        rate,
        slot,
        entry: None,
    };
    Ok(Admitted::Forward(Forward { parsed, body, model, downgraded_from, meter, prompt_tokens, reject }))
}

fn dry_run_asked(headers: &HeaderMap) -> bool {
    headers.get(DRY_RUN).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn rate_limit_message(refusal: &crate::policy::budget::RateRefusal) -> String {
    format!(
        "Rate limit reached for this {}: {} {}. Retry after {} s.",
        refusal.scope.label(),
        refusal.limit,
        refusal.what,
        refusal.retry_after_s
    )
}

async fn dry_run_answer(
    app: &AppState,
    budgets: &[crate::policy::budget::Applicable],
    parsed: &ParsedRequest,
    asked: &Arc<Model>,
    admitted: Result<Admission, NotAdmitted>,
    counter: &mut PromptCounter<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Response, ApiError> {
    // The rate limits as the request would meet them (checked, no slot taken). A dry run
    // charges nothing: every reservation goes back before the room left is read.
    let admitted = match admitted {
        Ok(mut a) => {
            let taken = Taken::new(app, std::mem::replace(&mut a.reservation, Reservation::none()));
            let rate_tokens =
                if budgets.iter().any(|b| b.spec.tpm.is_some()) { counter.exact(&a.model) } else { a.prompt_tokens };
            let checked = app.rates.check(budgets, rate_tokens, now.timestamp_millis()).await;
            taken.give_back().await;
            match checked {
                Ok(Ok(())) => Ok(a),
                Ok(Err(refusal)) => Err(rate_limit_message(&refusal)),
                Err(_) => return Err(ApiError::BudgetsUnavailable),
            }
        }
        Err(NotAdmitted::Refused(reason, _)) => Err(reason),
        Err(NotAdmitted::Unavailable(_)) => return Err(ApiError::BudgetsUnavailable),
    };
    let (decision, served, reason, max_cost, estimated) = match admitted {
        Ok(a) => {
            let exact = counter.exact(&a.model);
            let estimated = a.model.price.worst_case(exact, 0);
            let max_cost = a.model.price.worst_case(exact, routing::max_output(parsed, &a.model));
            (a.decision, Some(a.model.name.clone()), a.reason, max_cost, estimated)
        }
        Err(reason) => {
            let exact = counter.exact(asked);
            let max_cost = asked.price.worst_case(exact, routing::max_output(parsed, asked));
            (Decision::Refuse, None, reason, max_cost, asked.price.worst_case(exact, 0))
        }
    };
    let remaining = app.budgets.headroom(budgets, now).await.map_err(|_| ApiError::BudgetsUnavailable)?;
    Ok(axum::Json(json!({
        "dry_run": true,
        "decision": decision.as_str(),
        "model": asked.name,
        "served_model": served,
        "reason": reason,
        "estimated_cost_usd": estimated.as_usd(),
        "max_cost_usd": max_cost.as_usd(),
        "remaining_usd": remaining.map(|r| r.as_usd()),
    }))
    .into_response())
}

/// A reservation admission has taken: given back (nothing spent) if it is dropped before the
/// request is forwarded, as when the client goes away while a rate window is asked.
struct Taken<'a> {
    app: &'a AppState,
    reservation: Option<Reservation>,
}

impl<'a> Taken<'a> {
    fn new(app: &'a AppState, reservation: Reservation) -> Self {
        Taken { app, reservation: Some(reservation) }
    }

    /// The reservation, now the request's to settle.
    fn keep(mut self) -> Reservation {
        self.reservation.take().unwrap_or_else(Reservation::none)
    }

    /// Gives the reservation back, returning once its room is free.
    async fn give_back(mut self) {
        if let Some(r) = self.reservation.take() {
            self.app.budgets.release(r).await;
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.app.budgets.settle(r, NanoUsd::ZERO);
        }
    }
}
