//! Metering: reading what an upstream billed from the bytes it sent — usage from a JSON
//! answer or from SSE events, and the generated text to estimate from when it reports none.
//! Nothing here writes, and nothing here knows budgets or the ledger: settling a request is
//! the proxy's last phase (`proxy::settle`).

pub mod sse;
pub mod usage;
