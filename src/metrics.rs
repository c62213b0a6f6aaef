//! Prometheus metrics: requests, tokens and cost by model and team, refusals by code,
//! upstream latency and gateway overhead, and the ledger writer's state.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ledger::LedgerHealth;
use crate::policy::pricing::NanoUsd;
use crate::policy::pricing::Usage;

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
    /// Each worker thread's handles on the series it records into (see [`Handles`]).
    shards: Vec<Shard>,
}

/// How many sets of cached handles there are; a thread uses set `slot % SHARDS`.
const SHARDS: usize = 16;

/// One worker's cached handles, by model, then team; on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<HashMap<String, HashMap<String, Handles>>>);

/// The series one (model, team) pair records into. A handle shares its counter with the
/// family it came from, so recording through it is one atomic add: no label set to build
/// (two `String`s each), hash and look up under the family's lock, which both workers
/// share, on every request. Series are still created on first use only.
#[derive(Default)]
struct Handles {
    requests: Vec<(u16, Counter)>,
    /// Input, cached input and output tokens.
    tokens: [Option<Counter>; 3],
    cost: Option<Counter<f64, AtomicU64>>,
    upstream_latency: Option<Histogram>,
}

const TOKEN_KINDS: [&str; 3] = ["input", "cached_input", "output"];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests forwarded upstream, by model, team and status", requests.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens metered, by model, team and kind (input, cached_input, output)",
            tokens.clone(),
        );
        let cost = Family::<CostLabels, Counter<f64, AtomicU64>>::default();
        registry.register("cost_usd", "Cost in USD, by model and team", cost.clone());
        let refused = Family::<CodeLabels, Counter>::default();
        registry.register(
            "refused_requests",
            "Requests answered with an error before or instead of forwarding, by code",
            refused.clone(),
        );
        let upstream_latency = Family::<ModelLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "upstream_latency_seconds",
            "Time until the upstream's response headers",
            upstream_latency.clone(),
        );
        let overhead = Histogram::new(exponential_buckets(0.000_01, 2.0, 20));
        registry.register(
            "gateway_overhead_seconds",
            "Time tollgate adds to a request outside the upstream call",
            overhead.clone(),
        );
        let ledger_written = Gauge::default();
        registry.register("ledger_records_written", "Request records committed since start", ledger_written.clone());
        let ledger_queued = Gauge::default();
        registry.register("ledger_queue_depth", "Request records waiting to be written", ledger_queued.clone());
        let ledger_failing = Gauge::default();
        registry.register("ledger_failing", "1 while ledger writes fail", ledger_failing.clone());
        let shards = (0..SHARDS).map(|_| Shard::default()).collect();
        Metrics {
            registry,
            requests,
            tokens,
            cost,
            refused,
            upstream_latency,
            overhead,
            ledger_written,
            ledger_queued,
            ledger_failing,
            shards,
        }
    }
}

/// This thread's shard, taken on its first use: the worker threads spread over the shards
/// in the order they first record a request.
fn thread_slot() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    SLOT.with(|slot| *slot)
}

impl Metrics {
    /// Runs `f` on this worker's handles for (`model`, `team`).
    fn with_handles<R>(&self, model: &str, team: &str, f: impl FnOnce(&mut Handles) -> R) -> R {
        let shard = &self.shards[thread_slot() % SHARDS];
        let mut by_model = shard.0.lock().unwrap_or_else(|p| p.into_inner());
        if !by_model.contains_key(model) {
            by_model.insert(model.to_string(), HashMap::new());
        }
        let by_team = by_model.get_mut(model).expect("inserted above");
        if !by_team.contains_key(team) {
            by_team.insert(team.to_string(), Handles::default());
        }
        f(by_team.get_mut(team).expect("inserted above"))
    }

    pub fn record_request(&self, model: &str, team: &str, status: u16, usage: &Usage, cost: NanoUsd) {
        self.with_handles(model, team, |h| {
            match h.requests.iter().find(|(s, _)| *s == status) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let counter = self
                        .requests
                        .get_or_create(&RequestLabels { model: model.into(), team: team.into(), status })
                        .clone();
                    counter.inc();
                    h.requests.push((status, counter));
                }
            }
            let counts = [usage.input_tokens, usage.cached_input_tokens, usage.output_tokens];
            for ((kind, n), handle) in TOKEN_KINDS.into_iter().zip(counts).zip(&mut h.tokens) {
                if n > 0 {
                    handle
                        .get_or_insert_with(|| {
                            self.tokens
                                .get_or_create(&TokenLabels { model: model.into(), team: team.into(), kind })
                                .clone()
                        })
                        .inc_by(n);
                }
            }
            h.cost
                .get_or_insert_with(|| {
                    self.cost.get_or_create(&CostLabels { model: model.into(), team: team.into() }).clone()
                })
                .inc_by(cost.as_usd());
        });
    }

    pub fn record_refusal(&self, code: &str) {
        self.refused.get_or_create(&CodeLabels { code: code.into() }).inc();
    }

    pub fn observe_upstream(&self, model: &str, elapsed: Duration) {
        // Keyed by model alone: the team slot is left empty.
        self.with_handles(model, "", |h| {
            h.upstream_latency
                .get_or_insert_with(|| {
                    self.upstream_latency.get_or_create(&ModelLabels { model: model.into() }).clone()
                })
                .observe(elapsed.as_secs_f64());
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage { input_tokens: input, cached_input_tokens: cached, output_tokens: output }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix)).map(|l| l[prefix.len()..].trim())
    }

    #[test]
    fn requests_tokens_and_cost_add_up_by_model_and_team() {
        let m = Metrics::default();
        m.record_request("gpt-4o-mini", "search", 200, &usage(10, 0, 5), NanoUsd(1_500));
        m.record_request("gpt-4o-mini", "search", 200, &usage(20, 4, 7), NanoUsd(2_500));
        m.record_request("gpt-4o-mini", "search", 502, &usage(0, 0, 0), NanoUsd(0));
        m.record_request("gpt-4o", "search", 200, &usage(1, 0, 1), NanoUsd(10));
        // The same pair recorded from another thread (which takes a shard of its own) lands in the same series.
        std::thread::scope(|s| {
            s.spawn(|| {
                m.record_request("gpt-4o-mini", "search", 200, &usage(1, 0, 1), NanoUsd(1_000));
            });
        });
        m.observe_upstream("gpt-4o-mini", Duration::from_millis(3));
        m.observe_upstream("gpt-4o-mini", Duration::from_millis(5));
        let text = m.render(&LedgerHealth::default());
        let series = |p: &str| line(&text, p).unwrap_or_else(|| panic!("no {p} in\n{text}")).to_string();
        assert_eq!(series(r#"tollgate_requests_total{model="gpt-4o-mini",team="search",status="200"}"#), "3");
        assert_eq!(series(r#"tollgate_requests_total{model="gpt-4o-mini",team="search",status="502"}"#), "1");
        assert_eq!(series(r#"tollgate_requests_total{model="gpt-4o",team="search",status="200"}"#), "1");
        assert_eq!(series(r#"tollgate_tokens_total{model="gpt-4o-mini",team="search",kind="input"}"#), "31");
        assert_eq!(series(r#"tollgate_tokens_total{model="gpt-4o-mini",team="search",kind="cached_input"}"#), "4");
        assert_eq!(series(r#"tollgate_tokens_total{model="gpt-4o-mini",team="search",kind="output"}"#), "13");
        assert!(line(&text, r#"tollgate_tokens_total{model="gpt-4o",team="search",kind="cached_input"}"#).is_none());
        let cost: f64 = series(r#"tollgate_cost_usd_total{model="gpt-4o-mini",team="search"}"#).parse().unwrap();
        assert!((cost - 5e-6).abs() < 1e-12, "{cost}");
        assert_eq!(series(r#"tollgate_upstream_latency_seconds_count{model="gpt-4o-mini"}"#), "2");
    }
}
