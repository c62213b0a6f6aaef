//! tollgate's integration tests: one binary, one module per capability.

mod helpers;

mod admin;
mod errors;
mod proxy;
mod streaming;
