//! Prometheus metrics: requests, tokens and cost by model and team, refusals by code,
//! upstream latency and gateway overhead, and the ledger writer's state.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ledger::LedgerHealth;
use crate::metering::usage::Usage;
use crate::pricing::NanoUsd;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    team: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    team: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    model: String,
    team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    refused: Family<CodeLabels, Counter>,
    upstream_latency: Family<ModelLabels, Histogram>,
    overhead: Histogram,
    ledger_written: Gauge,
    ledger_queued: Gauge,
    ledger_failing: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests forwarded upstream, by model, team and status", requests.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens metered, by model, team and kind (input, cached_input, output)", tokens.clone());
        let cost = Family::<CostLabels, Counter<f64, AtomicU64>>::default();
        registry.register("cost_usd", "Cost in USD, by model and team", cost.clone());
        let refused = Family::<CodeLabels, Counter>::default();
        registry.register("refused_requests", "Requests answered with an error before or instead of forwarding, by code", refused.clone());
        let upstream_latency =
            Family::<ModelLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 18)));
        registry.register("upstream_latency_seconds", "Time until the upstream's response headers", upstream_latency.clone());
        let overhead = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register("gateway_overhead_seconds", "Time tollgate adds to a request outside the upstream call", overhead.clone());
        let ledger_written = Gauge::default();
        registry.register("ledger_records_written", "Request records committed since start", ledger_written.clone());
        let ledger_queued = Gauge::default();
        registry.register("ledger_queue_depth", "Request records waiting to be written", ledger_queued.clone());
        let ledger_failing = Gauge::default();
        registry.register("ledger_failing", "1 while ledger writes fail", ledger_failing.clone());
        Metrics { registry, requests, tokens, cost, refused, upstream_latency, overhead, ledger_written, ledger_queued, ledger_failing }
    }
}

impl Metrics {
    pub fn record_request(&self, model: &str, team: &str, status: u16, usage: &Usage, cost: NanoUsd) {
        self.requests.get_or_create(&RequestLabels { model: model.into(), team: team.into(), status }).inc();
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("cached_input", usage.cached_input_tokens),
            ("output", usage.output_tokens),
        ] {
            if n > 0 {
                self.tokens.get_or_create(&TokenLabels { model: model.into(), team: team.into(), kind }).inc_by(n);
            }
        }
        self.cost.get_or_create(&CostLabels { model: model.into(), team: team.into() }).inc_by(cost.as_usd());
    }

    pub fn record_refusal(&self, code: &str) {
        self.refused.get_or_create(&CodeLabels { code: code.into() }).inc();
    }

    pub fn observe_upstream(&self, model: &str, elapsed: Duration) {
        self.upstream_latency.get_or_create(&ModelLabels { model: model.into() }).observe(elapsed.as_secs_f64());
    }

    pub fn observe_overhead(&self, elapsed: Duration) {
        self.overhead.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self, ledger: &LedgerHealth) -> String {
        self.ledger_written.set(ledger.written() as i64);
        self.ledger_queued.set(ledger.queued() as i64);
        self.ledger_failing.set(i64::from(ledger.failing()));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
