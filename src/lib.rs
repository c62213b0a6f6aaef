//! tollgate: a cost-aware gateway for OpenAI-compatible APIs.
//!
//! The house, from the top floor down (`docs/architecture.md` gives the rules of which part
//! may import which):
//! - `main.rs` — the CLI. [`server`] — the accept loop, the worker threads, shutdown; nothing
//!   else reaches into it.
//! - The HTTP layer: [`edge`] (what every route gets: body limit and timeout, the error
//!   envelope), [`proxy`] (the metered endpoints, one phase a file: admit → forward → relay →
//!   settle), [`api`] (admin, spend, health, models), on [`state`] (the shared handles),
//!   [`auth`] (Bearer key → `Caller`) and [`metrics`].
//! - [`upstream`] — the only outbound HTTP (and the built-in `mock` provider).
//!   [`metering`] — usage read from an answer's bytes, JSON or SSE.
//! - [`ledger`] — the only SQL: the write-ahead journal, group commit, SQLite / PostgreSQL.
//! - [`policy`] — pure decisions: prices and money, budgets and rate windows, routing along
//!   the downgrade chain, the client's request as read, token counting. [`skim`] — the
//!   validating JSON pass that reads a request's fields and an answer's usage.
//! - [`config`], [`error`] — the typed config; `ApiError` and OpenAI's error envelope.

pub mod api;
pub mod auth;
pub mod config;
pub mod edge;
pub mod error;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod replicas;
pub mod server;
pub mod skim;
pub mod state;
pub mod upstream;

pub use config::Config;
pub use server::{app, run, RunOptions};
pub use state::AppState;
