//! Settle: the phase every forwarded request ends in, exactly once, whether it succeeded,
//! failed, or lost its client — usage (reported, else estimated), cost, budgets, rate
//! windows, metrics, and a ledger record that is durable before the response's last byte
//! is released.
//!
//! A `Meter` is made when a request is admitted and consumed by `settle`. It lives in the
//! forwarding, which a client that disconnects does not cancel (it finishes in a task the
//! server tracks), and shutdown waits for it.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use axum::response::Response;

use super::answer::forwarded_error;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::ledger::{LedgerError, NotJournaled, Pin, RequestRecord, Slot, UsageSource};
use crate::policy::budget::BudgetStore;
use crate::policy::budget::Reservation;
use crate::policy::models::Model;
use crate::policy::pricing::{NanoUsd, Usage};
use crate::policy::tokens;
use crate::replicas::Ticket;
use crate::state::AppState;

/// Everything needed to settle one forwarded request.
pub struct Meter {
    pub app: AppState,
    pub caller: Caller,
    pub request_id: String,
    pub time_ms: i64,
    pub started: Instant,
    pub endpoint: &'static str,
    pub asked: String,
    pub stream: bool,
    /// Prompt tokens counted locally for the serving model (used when no usage is reported).
    pub local_prompt_tokens: LocalPrompt,
    pub reservation: Reservation,
    pub rate: Ticket,
    /// The queue place the final record is written through.
    pub slot: Slot,
    /// The hold on the request's journal entry, released with its final record.
    pub entry: Option<Pin>,
}

/// The prompt's local token count, or what is needed to count it.
pub enum LocalPrompt {
    Exact(u64),
    /// Count on demand (only when the upstream reports no usage).
    Deferred(Arc<crate::policy::request::Prompt>, crate::policy::request::Endpoint),
}

impl LocalPrompt {
    fn count(&self, model: &str) -> u64 {
        match self {
            LocalPrompt::Exact(n) => *n,
            LocalPrompt::Deferred(prompt, endpoint) => {
                tokens::prompt_tokens(endpoint.prompt_kind(), model, prompt.value())
            }
        }
    }
}

/// How a forwarded request ended, for its record.
pub struct Outcome<'a> {
    /// The HTTP status the client received.
    pub status: u16,
    /// The model that served it.
    pub model: &'a Arc<Model>,
    /// The upstream's usage, if it reported one.
    pub reported: Option<Usage>,
    /// Generated text seen, for estimating output when nothing was reported; `None` when
    /// the request produced nothing billable (it failed before the upstream answered).
    pub produced: Option<Produced<'a>>,
}

/// Output seen without a usage report.
pub struct Produced<'a> {
    pub text: &'a str,
    /// Bytes of text past what was kept (estimated at 4 bytes a token).
    pub overflow_bytes: u64,
}

/// The settled request: its cost, and whether its record is durable.
pub struct Settled {
    pub cost: NanoUsd,
    /// On failure, with a copy of the record as queued (to amend if the client ends up
    /// receiving something else).
    pub durable: Result<(), NotJournaled>,
}

impl Meter {
    /// Journals the request as in flight on `served`, charged its floor (its prompt, which
    /// the upstream bills once it has the request) should it never settle: a request is
    /// forwarded only once a crash can no longer lose it silently.
    pub fn journal(&mut self, served: &Model, prompt_tokens: u64) -> Result<(), Arc<LedgerError>> {
        let record = self.pending_record(served, prompt_tokens);
        let (entry, result) = self.app.ledger.journal(&record);
        self.entry = entry;
        result
    }

    /// Gives up a journaled request that will not be forwarded: releases its reservation and
    /// rate-limit slot and retracts its journal entry (no record: it never reached an upstream).
    pub fn abandon(self, served: &Model) {
        let record = self.pending_record(served, 0);
        self.app.ledger.amend(record, true, self.entry);
        self.app.budgets.settle(self.reservation, NanoUsd::ZERO);
        self.app.rates.correct(self.rate, 0);
    }

    fn pending_record(&self, served: &Model, prompt_tokens: u64) -> RequestRecord {
        RequestRecord {
            request_id: self.request_id.clone(),
            time_ms: self.time_ms,
            key_id: self.caller.key.id.clone(),
            team: self.caller.team.name.clone(),
            endpoint: self.endpoint,
            model: self.asked.clone(),
            served_model: served.name.clone(),
            usage: Usage { input_tokens: prompt_tokens, cached_input_tokens: 0, output_tokens: 0 },
            cost: self.reservation.floor(),
            usage_source: UsageSource::Pending,
            status: 0,
            latency_ms: 0,
            stream: self.stream,
        }
    }

    /// Settles the request: usage (reported, else estimated), cost, budgets, rate windows,
    /// metrics, and the ledger record, durable (journaled) when this returns.
    pub fn settle(self, outcome: Outcome<'_>) -> Settled {
        let model = outcome.model;
        let (usage, source) = match (outcome.reported, &outcome.produced) {
            (Some(u), _) => (u, UsageSource::Reported),
            (None, Some(p)) => {
                let enc = tokens::Encoding::for_model(&model.upstream_model);
                let output = tokens::count_text(enc, p.text) + p.overflow_bytes.div_ceil(4);
                let input = self.local_prompt_tokens.count(&model.upstream_model);
                (Usage { input_tokens: input, cached_input_tokens: 0, output_tokens: output }, UsageSource::Estimated)
            }
            // Failed before the upstream produced anything: nothing to bill.
            (None, None) => (Usage::default(), UsageSource::Reported),
        };
        let cost = model.price.cost(&usage);
        if cost > self.reservation.amount() {
            // The upstream produced more than the worst case (e.g. it ignored max_tokens).
            tracing::warn!(
                request_id = %self.request_id, reserved = self.reservation.amount().0, cost = cost.0,
                "request cost more than its reservation"
            );
        }
        self.app.budgets.settle(self.reservation, cost);
        self.app.rates.correct(self.rate, usage.input_tokens + usage.output_tokens);
        let latency_ms = self.started.elapsed().as_millis() as u64;
        self.app.metrics.record_request(&model.name, &self.caller.team.name, outcome.status, &usage, cost);
        let record = RequestRecord {
            request_id: self.request_id,
            time_ms: self.time_ms,
            key_id: self.caller.key.id.clone(),
            team: self.caller.team.name.clone(),
            endpoint: self.endpoint,
            model: self.asked,
            served_model: model.name.clone(),
            usage,
            cost,
            usage_source: source,
            status: outcome.status,
            latency_ms,
            stream: self.stream,
        };
        let durable = self.app.ledger.write(self.slot, record, self.entry);
        if let Err(e) = &durable {
            tracing::error!(error = %e.error, "request record could not be written");
        }
        Settled { cost, durable }
    }
}

/// Settles a non-streamed request cut by shutdown while it waited on `served`, and the 503
/// its client gets if its connection is still open. As with a client that hangs up, the
/// request is charged for what the upstream was seen to do: its prompt (counted locally,
/// `estimated`), no output (none reached tollgate).
pub(super) fn cut_off(meter: Meter, served: &Arc<Model>, headers: HeaderMap) -> Response {
    tracing::warn!(request_id = %meter.request_id, model = %served.name, "grace period over; request cut");
    let error = ApiError::ShuttingDown;
    let produced = Some(Produced { text: "", overflow_bytes: 0 });
    let settled = meter.settle(Outcome { status: error.status().as_u16(), model: served, reported: None, produced });
    forwarded_error(error, headers, settled.cost)
}

/// Settles a request that went upstream to `served` and failed with `error`, before any
/// usage was reported or output seen (it costs nothing), and answers with the error.
pub(super) fn failed(meter: Meter, served: &Arc<Model>, error: ApiError, headers: HeaderMap) -> Response {
    let settled =
        meter.settle(Outcome { status: error.status().as_u16(), model: served, reported: None, produced: None });
    forwarded_error(error, headers, settled.cost)
}
