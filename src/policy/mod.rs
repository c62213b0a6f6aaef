//! Pure decisions, no I/O: what the client asks (`request`: parse, check, rewrite its body) and
//! how many tokens it costs (`tokens`: OpenAI's tokenizers and prompt accounting). Nothing here
//! imports metering, upstream, the ledger or the HTTP layer.

pub mod request;
pub mod tokens;
