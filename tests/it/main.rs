//! tollgate's integration tests: one binary, one module per capability.

mod helpers;

mod admin;
mod budgets;
mod errors;
mod faults;
mod hostile;
mod postgres;
mod proxy;
mod routing;
mod shutdown;
mod streaming;
