//! Typed configuration: TOML with `${VAR}` interpolation, unknown keys rejected,
//! prices converted to integer nano-dollars once at load, and `validate()` reporting
//! every problem at once so a user fixes a config in one pass.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::Uri;
use foldhash::{HashMap, HashMapExt};
use serde::Deserialize;

use crate::policy::models::{Catalog, Model};
use crate::policy::pricing::{self, Capabilities, ModelKind, NanoUsd, Price};

/// The config file's path when none is given on the command line or in `$TOLLGATE_CONFIG`.
pub const DEFAULT_CONFIG_PATH: &str = "config/tollgate.toml";

/// A secret string (provider key, master key). Its `Debug` and `Display` print `***`
/// so it cannot leak through a log line or an error message.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call sites are the few places that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What to do with a request whose record cannot be journaled (a full disk under the
/// journal). A failing database needs no policy: records wait in the journal for it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnLedgerError {
    /// Refuse it (503) before forwarding; a response whose final record cannot be journaled
    /// is a 503 (non-streaming) or cut before `[DONE]` (streaming).
    #[default]
    Reject,
    /// Serve it; its records reach the database from memory (lost if the process dies first).
    Serve,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_database_url")]
    database_url: String,
    #[serde(default)]
    journal_dir: Option<String>,
    #[serde(default)]
    redis_url: Option<Secret>,
    #[serde(default = "default_redis_prefix")]
    redis_key_prefix: String,
    #[serde(default = "default_lease")]
    reservation_lease_ms: u64,
    #[serde(default = "default_segment_bytes")]
    journal_segment_bytes: u64,
    #[serde(default = "default_grace")]
    shutdown_grace_ms: u64,
    #[serde(default)]
    master_key: Option<Secret>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_response")]
    max_response_bytes: usize,
    #[serde(default = "default_disconnect_drain_ms")]
    disconnect_drain_ms: u64,
    #[serde(default)]
    on_ledger_error: OnLedgerError,
    #[serde(default = "default_ledger_queue")]
    ledger_queue_capacity: usize,
    #[serde(default = "default_ack_timeout")]
    ledger_ack_timeout_ms: u64,
    #[serde(default = "default_busy_timeout")]
    sqlite_busy_timeout_ms: u64,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout_ms: u64,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout_ms: u64,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    routing: RawRouting,
}

fn default_listen() -> String {
    "127.0.0.1:4000".into()
}
fn default_database_url() -> String {
    "sqlite://data/tollgate.db".into()
}
fn default_redis_prefix() -> String {
    "tollgate:".into()
}
fn default_lease() -> u64 {
    30_000
}
fn default_grace() -> u64 {
    30_000
}
fn default_max_body() -> usize {
    8 * 1024 * 1024
}
fn default_max_response() -> usize {
    64 * 1024 * 1024
}
fn default_disconnect_drain_ms() -> u64 {
    60_000
}
/// A journal segment's length: a megabyte holds a few thousand records.
fn default_segment_bytes() -> u64 {
    1024 * 1024
}
fn default_ledger_queue() -> usize {
    100_000
}
fn default_ack_timeout() -> u64 {
    10_000
}
fn default_busy_timeout() -> u64 {
    5_000
}
fn default_header_read_timeout() -> u64 {
    10_000
}
fn default_body_read_timeout() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: ProviderKind,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key: Option<Secret>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_ms: u64,
    #[serde(default = "default_first_byte_timeout")]
    first_byte_timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_ms: u64,
}

fn default_connect_timeout() -> u64 {
    5_000
}
fn default_first_byte_timeout() -> u64 {
    600_000
}
fn default_idle_timeout() -> u64 {
    120_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    provider: String,
    #[serde(default)]
    upstream_model: Option<String>,
    #[serde(default)]
    input_per_mtok: Option<f64>,
    #[serde(default)]
    cached_input_per_mtok: Option<f64>,
    #[serde(default)]
    output_per_mtok: Option<f64>,
    #[serde(default)]
    context_window: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    kind: Option<ModelKind>,
    #[serde(default)]
    supports_tools: Option<bool>,
    #[serde(default)]
    supports_vision: Option<bool>,
    #[serde(default)]
    supports_json_schema: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default)]
    downgrade: BTreeMap<String, String>,
    #[serde(default)]
    fallbacks: BTreeMap<String, Vec<String>>,
}

/// The kind of an upstream API.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible HTTP API.
    Openai,
    /// Answers in-process like OpenAI, deterministically; for quick starts and demos.
    Mock,
}

/// An upstream API.
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub idle_timeout_ms: u64,
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub listen: String,
    pub database_url: String,
    /// The write-ahead journal's folder (one server each; see `ledger::journal`).
    pub journal_dir: std::path::PathBuf,
    /// A journal segment takes appends until it is this long; then a new one starts.
    pub journal_segment_bytes: u64,
    /// With PostgreSQL: Redis for the budgets' reservations and the rate windows replicas
    /// share (see `replicas`); without it, they are shared through PostgreSQL.
    pub redis_url: Option<Secret>,
    /// What every Redis key of this deployment starts with (several on one Redis).
    pub redis_key_prefix: String,
    /// On PostgreSQL, how long a replica's reservations outlive its last sign of life.
    pub reservation_lease_ms: u64,
    /// At SIGTERM, how long in-flight requests get to finish before they are cut (and
    /// still recorded); 0 cuts at once.
    pub shutdown_grace_ms: u64,
    pub master_key: Option<Secret>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest non-streamed upstream response read, in bytes.
    pub max_response_bytes: usize,
    /// After a client disconnects mid-stream, how long the upstream is still read for its usage.
    pub disconnect_drain_ms: u64,
    pub on_ledger_error: OnLedgerError,
    /// Records waiting to be written, at most.
    pub ledger_queue_capacity: usize,
    /// How long a spend or log query waits for records already journaled to reach the
    /// database, so it shows the requests answered before it.
    pub ledger_ack_timeout_ms: u64,
    /// How long an SQLite write waits for a lock held by another connection or process.
    pub sqlite_busy_timeout_ms: u64,
    /// Longest a client may take to send its request headers (slowloris guard).
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send its request body.
    pub body_read_timeout_ms: u64,
    /// Threads serving connections (each a single-threaded runtime; default one per CPU).
    pub workers: usize,
    pub providers: Vec<Arc<Provider>>,
    /// The models, their downgrade chains and fallbacks.
    pub catalog: Catalog,
}

/// Every problem found in a config, reported together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config is not valid TOML: {0}")]
    Toml(String),
    #[error("environment variable {0} is not set (referenced as ${{{0}}} in the config)")]
    MissingVar(String),
    #[error("invalid config:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Loads the config from `path`; a missing file at the default path means the built-in
    /// defaults (the mock provider serving every catalog model).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (Path::new(DEFAULT_CONFIG_PATH).to_path_buf(), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read { path: path.display().to_string(), source });
            }
        };
        Self::from_toml(&text, |name| std::env::var(name).ok())
    }

    /// Parses and validates config text; `env` resolves `${VAR}` references.
    pub fn from_toml(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        interpolate(&mut value, &env)?;
        let raw: RawConfig = value.try_into().map_err(|e: toml::de::Error| ConfigError::Toml(e.to_string()))?;
        raw.validate()
    }
}

/// Replaces `${VAR}` in every string value. `$${` is a literal `${`.
fn interpolate(value: &mut toml::Value, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => *s = interpolate_str(s, env)?,
        toml::Value::Array(items) => {
            for item in items {
                interpolate(item, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (_, item) in table.iter_mut() {
                interpolate(item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn interpolate_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            // `$${X}` escapes the reference.
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(ConfigError::Toml(format!("unterminated ${{ in config string {s:?}")));
        };
        let name = &after[..end];
        let value = env(name).ok_or_else(|| ConfigError::MissingVar(name.to_string()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Converts a config price (USD per 1M tokens) to nano-dollars per 1M tokens.
fn usd_per_mtok(value: f64, field: &str, model: &str, problems: &mut Vec<String>) -> NanoUsd {
    if !value.is_finite() || !(0.0..=1_000_000.0).contains(&value) {
        problems.push(format!("model {model:?}: {field} must be a non-negative number of USD per 1M tokens"));
        return NanoUsd(0);
    }
    NanoUsd((value * 1e9).round() as i64)
}

/// `context_window` of a model outside the catalog that does not configure one.
pub const DEFAULT_CONTEXT_WINDOW: u64 = 128_000;
/// `max_output_tokens` of a model outside the catalog that does not configure one.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 16_384;

/// An address to listen on: an IP and port (`127.0.0.1:4000`, `[::1]:4000`), or a host name
/// and port (`localhost:4000`) that binding resolves. Checked without a name lookup, so
/// `check-config` works offline.
fn listen_ok(listen: &str) -> bool {
    if listen.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = listen.rsplit_once(':') else { return false };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    host_ok && port.parse::<u16>().is_ok()
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        if !listen_ok(&self.listen) {
            problems.push(format!("listen: {:?} is not an address like 127.0.0.1:4000 or localhost:4000", self.listen));
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            problems.push("database_url must start with sqlite: or postgres://".to_string());
        }
        if self.max_body_bytes == 0 {
            problems.push("max_body_bytes must be positive".into());
        }
        if self.workers == Some(0) {
            problems.push("workers must be positive (leave it out for one per CPU)".into());
        }
        if self.journal_segment_bytes == 0 {
            problems.push("journal_segment_bytes must be positive".into());
        }
        if self.journal_dir.as_deref().is_some_and(str::is_empty) {
            problems.push("journal_dir must not be empty".into());
        }
        for (field, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("ledger_ack_timeout_ms", self.ledger_ack_timeout_ms),
            ("reservation_lease_ms", self.reservation_lease_ms),
        ] {
            if v == 0 {
                problems.push(format!("{field} must be positive"));
            }
        }
        if let Some(url) = &self.redis_url {
            let url = url.expose();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                problems.push("redis_url must start with redis:// or rediss://".into());
            }
            if !self.database_url.starts_with("postgres") {
                problems.push("redis_url needs a postgres:// database_url (replicas share their ledger)".into());
            }
        }
        if self.ledger_queue_capacity == 0 {
            problems.push("ledger_queue_capacity must be positive".into());
        }
        if let Some(key) = &self.master_key {
            if key.expose().trim().is_empty() {
                problems.push("master_key must not be empty (leave it out to disable the admin API)".into());
            }
        }

        let mut providers: HashMap<String, Arc<Provider>> = HashMap::new();
        let mut provider_list = Vec::new();
        for p in self.providers {
            if providers.contains_key(&p.name) {
                problems.push(format!("provider {:?} is defined twice", p.name));
                continue;
            }
            let base_url = match (p.kind, p.base_url) {
                (_, Some(url)) => {
                    if !(url.starts_with("http://") || url.starts_with("https://"))
                        || parse_upstream_uri(&url).is_none()
                    {
                        problems.push(format!("provider {:?}: base_url must be an http(s) URL", p.name));
                    }
                    url.trim_end_matches('/').to_string()
                }
                (ProviderKind::Openai, None) => "https://api.openai.com/v1".to_string(),
                (ProviderKind::Mock, None) => "mock://".to_string(),
            };
            for (field, v) in [
                ("connect_timeout_ms", p.connect_timeout_ms),
                ("first_byte_timeout_ms", p.first_byte_timeout_ms),
                ("idle_timeout_ms", p.idle_timeout_ms),
            ] {
                if v == 0 {
                    problems.push(format!("provider {:?}: {field} must be positive", p.name));
                }
            }
            let provider = Arc::new(Provider {
                name: p.name.clone(),
                kind: p.kind,
                base_url,
                api_key: p.api_key,
                connect_timeout_ms: p.connect_timeout_ms,
                first_byte_timeout_ms: p.first_byte_timeout_ms,
                idle_timeout_ms: p.idle_timeout_ms,
            });
            provider_list.push(provider.clone());
            providers.insert(p.name, provider);
        }
        // The built-in mock provider is always there unless a provider takes its name.
        if !providers.contains_key("mock") {
            let mock = Arc::new(Provider {
                name: "mock".into(),
                kind: ProviderKind::Mock,
                base_url: "mock://".into(),
                api_key: None,
                connect_timeout_ms: default_connect_timeout(),
                first_byte_timeout_ms: default_first_byte_timeout(),
                idle_timeout_ms: default_idle_timeout(),
            });
            provider_list.push(mock.clone());
            providers.insert("mock".into(), mock);
        }

        let raw_models = if self.models.is_empty() {
            // No models configured: serve the whole catalog from the mock provider.
            pricing::CATALOG
                .iter()
                .map(|entry| RawModel {
                    name: entry.name.to_string(),
                    provider: "mock".into(),
                    upstream_model: None,
                    input_per_mtok: None,
                    cached_input_per_mtok: None,
                    output_per_mtok: None,
                    context_window: None,
                    max_output_tokens: None,
                    kind: None,
                    supports_tools: None,
                    supports_vision: None,
                    supports_json_schema: None,
                })
                .collect()
        } else {
            self.models
        };

        let mut models = HashMap::new();
        let mut model_order = Vec::new();
        for m in raw_models {
            if models.contains_key(&m.name) {
                problems.push(format!("model {:?} is defined twice", m.name));
                continue;
            }
            if !providers.contains_key(&m.provider) {
                problems.push(format!("model {:?}: unknown provider {:?}", m.name, m.provider));
                continue;
            }
            let upstream_model = m.upstream_model.clone().unwrap_or_else(|| m.name.clone());
            let entry = pricing::catalog_entry(&upstream_model).or_else(|| pricing::catalog_entry(&m.name));
            let input = match (m.input_per_mtok, entry) {
                (Some(v), _) => Some(usd_per_mtok(v, "input_per_mtok", &m.name, &mut problems)),
                (None, Some(e)) => Some(e.price.input_per_mtok),
                (None, None) => None,
            };
            let output = match (m.output_per_mtok, entry) {
                (Some(v), _) => Some(usd_per_mtok(v, "output_per_mtok", &m.name, &mut problems)),
                (None, Some(e)) => Some(e.price.output_per_mtok),
                (None, None) => None,
            };
            let kind = m.kind.or(entry.map(|e| e.kind)).unwrap_or(ModelKind::Chat);
            let (Some(input), Some(output)) = (input, output.or((kind == ModelKind::Embedding).then_some(NanoUsd(0))))
            else {
                problems.push(format!(
                    "model {:?}: no price (upstream model {upstream_model:?} is not in the built-in catalog; \
                     set input_per_mtok and output_per_mtok)",
                    m.name
                ));
                continue;
            };
            let cached_input = match (m.cached_input_per_mtok, m.input_per_mtok, entry) {
                (Some(v), _, _) => usd_per_mtok(v, "cached_input_per_mtok", &m.name, &mut problems),
                // An explicit input price without a cached price bills cached tokens at input price.
                (None, Some(_), _) => input,
                (None, None, Some(e)) => e.price.cached_input_per_mtok,
                (None, None, None) => input,
            };
            // Outside the catalog, and not configured: a common size of today's chat models.
            // Only the worst case a request reserves and the `max_tokens` check use them.
            let context_window = m.context_window.or(entry.map(|e| e.context_window)).unwrap_or(DEFAULT_CONTEXT_WINDOW);
            let max_output_tokens =
                m.max_output_tokens.or(entry.map(|e| e.max_output_tokens)).unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
            if context_window == 0 {
                problems.push(format!("model {:?}: context_window must be positive", m.name));
            }
            let base_caps = entry.map(|e| e.capabilities).unwrap_or(Capabilities::ALL);
            let capabilities = Capabilities {
                tools: m.supports_tools.unwrap_or(base_caps.tools),
                vision: m.supports_vision.unwrap_or(base_caps.vision),
                json_schema: m.supports_json_schema.unwrap_or(base_caps.json_schema),
            };
            model_order.push(m.name.clone());
            models.insert(
                m.name.clone(),
                Arc::new(Model {
                    name: m.name,
                    provider: m.provider,
                    upstream_model,
                    price: Price {
                        input_per_mtok: input,
                        cached_input_per_mtok: cached_input,
                        output_per_mtok: output,
                    },
                    context_window,
                    max_output_tokens,
                    kind,
                    capabilities,
                }),
            );
        }

        let mut downgrade = HashMap::new();
        for (from, to) in self.routing.downgrade {
            if !models.contains_key(&from) {
                problems.push(format!("routing.downgrade: {from:?} is not a configured model"));
            }
            if !models.contains_key(&to) {
                problems.push(format!("routing.downgrade: {to:?} (target of {from:?}) is not a configured model"));
            }
            if from == to {
                problems.push(format!("routing.downgrade: {from:?} downgrades to itself"));
            }
            downgrade.insert(from, to);
        }
        // A chain that comes back to where it started would loop forever.
        for start in downgrade.keys() {
            let mut seen = HashSet::from([start.as_str()]);
            let mut at = start.as_str();
            while let Some(next) = downgrade.get(at) {
                if !seen.insert(next.as_str()) {
                    if next == start {
                        problems.push(format!("routing.downgrade: cycle through {start:?}"));
                    }
                    break;
                }
                at = next;
            }
        }
        let mut fallbacks = HashMap::new();
        for (from, list) in self.routing.fallbacks {
            if !models.contains_key(&from) {
                problems.push(format!("routing.fallbacks: {from:?} is not a configured model"));
            }
            for to in &list {
                if !models.contains_key(to) {
                    problems
                        .push(format!("routing.fallbacks: {to:?} (fallback of {from:?}) is not a configured model"));
                }
            }
            fallbacks.insert(from, list);
        }

        problems.sort();
        problems.dedup();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            listen: self.listen,
            journal_dir: self.journal_dir.map_or_else(|| default_journal_dir(&self.database_url), PathBuf::from),
            journal_segment_bytes: self.journal_segment_bytes,
            redis_url: self.redis_url,
            redis_key_prefix: self.redis_key_prefix,
            reservation_lease_ms: self.reservation_lease_ms,
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            database_url: self.database_url,
            shutdown_grace_ms: self.shutdown_grace_ms,
            master_key: self.master_key,
            max_body_bytes: self.max_body_bytes,
            max_response_bytes: self.max_response_bytes,
            disconnect_drain_ms: self.disconnect_drain_ms,
            on_ledger_error: self.on_ledger_error,
            ledger_queue_capacity: self.ledger_queue_capacity,
            ledger_ack_timeout_ms: self.ledger_ack_timeout_ms,
            sqlite_busy_timeout_ms: self.sqlite_busy_timeout_ms,
            header_read_timeout_ms: self.header_read_timeout_ms,
            body_read_timeout_ms: self.body_read_timeout_ms,
            providers: provider_list,
            catalog: Catalog { models, model_order, downgrade, fallbacks },
        })
    }
}

/// The journal folder used when the config names none: beside an SQLite database file, else
/// `tollgate-journal` in the working directory.
fn default_journal_dir(database_url: &str) -> PathBuf {
    if let Some(rest) = database_url.strip_prefix("sqlite://").or_else(|| database_url.strip_prefix("sqlite:")) {
        let file = rest.split('?').next().unwrap_or(rest);
        if !file.is_empty() && !file.starts_with(':') {
            return PathBuf::from(format!("{file}.journal"));
        }
    }
    PathBuf::from("tollgate-journal")
}

/// The URI of an upstream endpoint: an absolute `http(s)://` URL with a host.
pub fn parse_upstream_uri(url: &str) -> Option<Uri> {
    let uri: Uri = url.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    // `Uri` takes `host:port` with a port that is not a number (and then reports none).
    let host_port = uri.authority().map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""));
    let after_host = host_port.rfind(']').map_or(host_port, |i| &host_port[i + 1..]);
    let port_ok = after_host.rfind(':').is_none_or(|i| after_host[i + 1..].parse::<u16>().is_ok());
    (scheme_ok && host_ok && port_ok).then_some(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "sk-secret-value".to_string())
    }

    #[test]
    fn empty_config_serves_the_catalog_from_mock() {
        let c = Config::from_toml("", env).unwrap();
        assert!(c.catalog.models.contains_key("gpt-4o-mini"));
        assert_eq!(c.catalog.models["gpt-4o-mini"].provider, "mock");
        assert_eq!(c.providers.iter().find(|p| p.name == "mock").map(|p| p.kind), Some(ProviderKind::Mock));
        assert_eq!(c.catalog.models["gpt-4o-mini"].price.input_per_mtok, NanoUsd(150_000_000));
    }

    #[test]
    fn variables_are_interpolated_and_missing_ones_named() {
        let text = "master_key = \"${KEY}\"";
        let c = Config::from_toml(text, env).unwrap();
        assert_eq!(c.master_key.unwrap().expose(), "sk-secret-value");
        let err = Config::from_toml("master_key = \"${NOPE_VAR}\"", env).unwrap_err();
        assert!(err.to_string().contains("NOPE_VAR"), "{err}");
    }

    #[test]
    fn listen_takes_an_ip_or_a_host_name_with_a_port() {
        for good in ["127.0.0.1:4000", "0.0.0.0:0", "[::1]:4000", "localhost:4000", "gateway.internal:8080"] {
            assert!(Config::from_toml(&format!("listen = '{good}'"), env).is_ok(), "{good}");
        }
        for bad in ["", "4000", "localhost", "localhost:", "localhost:99999", "-bad:1", "a b:1", "http://localhost:1"] {
            let err = Config::from_toml(&format!("listen = '{bad}'"), env).unwrap_err();
            assert!(err.to_string().contains("listen"), "{bad}: {err}");
        }
    }

    #[test]
    fn any_non_empty_master_key_is_accepted() {
        for key in ["admin", "sk-test", "a-long-master-key-0123456789"] {
            let c = Config::from_toml(&format!("master_key = '{key}'"), env).unwrap();
            assert_eq!(c.master_key.unwrap().expose(), key);
        }
        for empty in ["", "  "] {
            let err = Config::from_toml(&format!("master_key = '{empty}'"), env).unwrap_err();
            assert!(err.to_string().contains("master_key must not be empty"), "{err}");
        }
    }

    #[test]
    fn a_priced_model_outside_the_catalog_needs_no_sizes() {
        let text = "[[models]]\nname = 'my-llama'\nprovider = 'mock'\ninput_per_mtok = 0.2\noutput_per_mtok = 0.4";
        let c = Config::from_toml(text, env).unwrap();
        let m = &c.catalog.models["my-llama"];
        assert_eq!((m.context_window, m.max_output_tokens), (DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_OUTPUT_TOKENS));
        let sized = format!("{text}\ncontext_window = 8192\nmax_output_tokens = 2048");
        let m = Config::from_toml(&sized, env).unwrap().catalog.models["my-llama"].clone();
        assert_eq!((m.context_window, m.max_output_tokens), (8192, 2048));
        let unpriced = "[[models]]\nname = 'my-llama'\nprovider = 'mock'";
        assert!(Config::from_toml(unpriced, env).is_err(), "no price is still a start-up error");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("listne = \"127.0.0.1:1\"", env).unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let err = Config::from_toml("[[models]]\nname='a'\nprovider='mock'\ninput_per_mtoken=1", env).unwrap_err();
        assert!(err.to_string().contains("input_per_mtoken"), "{err}");
    }

    #[test]
    fn workers_default_to_the_cpus_and_cannot_be_zero() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Config::from_toml("", env).unwrap().workers, cpus);
        assert_eq!(Config::from_toml("workers = 3", env).unwrap().workers, 3);
        let err = Config::from_toml("workers = 0", env).unwrap_err();
        assert!(err.to_string().contains("workers must be positive"), "{err}");
    }

    #[test]
    fn a_provider_base_url_must_parse_with_a_host() {
        let provider = |url: &str| format!("[[providers]]\nname='p'\nkind='openai'\nbase_url='{url}'");
        for good in ["https://api.openai.com/v1", "http://127.0.0.1:8080/v1/", "http://[::1]:9000"] {
            assert!(Config::from_toml(&provider(good), env).is_ok(), "{good}");
        }
        for bad in ["http://", "https://exa mple.com/v1", "http://host:port/v1", "ftp://host/v1", "api.openai.com"] {
            let err = Config::from_toml(&provider(bad), env).unwrap_err();
            assert!(err.to_string().contains("base_url must be an http(s) URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn model_without_price_is_an_error_not_free() {
        let err = Config::from_toml("[[models]]\nname='my-llama'\nprovider='mock'", env).unwrap_err();
        assert!(err.to_string().contains("no price"), "{err}");
    }

    #[test]
    fn downgrade_cycles_are_rejected() {
        let text = "[[models]]\nname='gpt-4o'\nprovider='mock'\n[[models]]\nname='gpt-4o-mini'\nprovider='mock'\n\
                    [routing]\ndowngrade = { 'gpt-4o' = 'gpt-4o-mini', 'gpt-4o-mini' = 'gpt-4o' }";
        let err = Config::from_toml(text, env).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml("master_key = \"${KEY}\"", env).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("sk-secret-value"));
    }

    #[test]
    fn explicit_prices_override_catalog() {
        let text = "[[models]]\nname='gpt-4o'\nprovider='mock'\ninput_per_mtok=1.5\noutput_per_mtok=2";
        let c = Config::from_toml(text, env).unwrap();
        let p = c.catalog.models["gpt-4o"].price;
        assert_eq!(p.input_per_mtok, NanoUsd(1_500_000_000));
        assert_eq!(p.cached_input_per_mtok, NanoUsd(1_500_000_000));
        assert_eq!(p.output_per_mtok, NanoUsd(2_000_000_000));
    }

    #[test]
    fn default_folder_sits_beside_an_sqlite_file() {
        assert_eq!(default_journal_dir("sqlite://data/t.db"), PathBuf::from("data/t.db.journal"));
        assert_eq!(default_journal_dir("sqlite:///var/lib/t.db?mode=rwc"), PathBuf::from("/var/lib/t.db.journal"));
        assert_eq!(default_journal_dir("postgres://u@h/db"), PathBuf::from("tollgate-journal"));
        assert_eq!(default_journal_dir("sqlite::memory:"), PathBuf::from("tollgate-journal"));
    }
}
