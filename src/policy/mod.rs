//! Policy: pure decisions, no I/O — what a request costs (`pricing`), what a budget allows
//! (`budget`), which model serves it (`routing`), and what the client asked for and how many
//! tokens it holds (`request`, `tokens`). Nothing here imports the HTTP layer, the ledger,
//! the upstream client or the metering of bytes; money and usage types live here, low, so
//! every other part may use them.

pub mod budget;
pub mod pricing;
pub mod routing;

pub use crate::metering::tokens;
pub use crate::request;
