//! tollgate: a cost-aware gateway for OpenAI-compatible APIs.
//!
//! A request's path through the code, in order:
//! 1. `server` — accept loop (header timeouts), router, graceful shutdown.
//! 2. `auth` — Bearer key → SHA-256 → in-memory directory → `Caller { key, team }`.
//! 3. `request` — parse the body, read only what is needed, validate; later splice the
//!    upstream model name and the usage option into the client's bytes.
//! 4. `routing` + `budget` — pick the serving model (downgrade chain), reserve its worst-case
//!    cost against the key's and team's budgets atomically, check rpm / tpm.
//! 5. `upstream` (or `mock`) — forward, falling back to other deployments before the first
//!    byte reaches the client; 502 / 504 on failure.
//! 6. `metering` — usage from the JSON body or the SSE stream (`sse`, `usage`), local token
//!    counts (`tokens`) when none is reported; `Meter::settle` books the real cost.
//! 7. `ledger` — the only SQL; group-committed records, durable before the last byte.
//!
//! `api/` holds the HTTP handlers (proxy, admin, spend, health); `pricing` the catalog and
//! integer nano-dollar money; `config` the TOML config; `metrics` Prometheus.

pub mod api;
pub mod auth;
pub mod budget;
pub mod config;
pub mod error;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod mock;
pub mod policy;
pub mod pricing;
pub mod routing;
pub mod server;
pub mod skim;
pub mod upstream;

pub use config::Config;
pub use policy::request;
pub use server::{app, run, AppState, RunOptions};
