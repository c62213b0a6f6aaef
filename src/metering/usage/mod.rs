//! Token usage as upstreams report it, and the generated text to estimate it from when they don't.
//!
//! Three response shapes carry usage: chat/completions and legacy completions
//! (`usage.prompt_tokens`, `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`),
//! embeddings (`usage.prompt_tokens` only) and the Responses API (`usage.input_tokens`,
//! `usage.output_tokens`, `usage.input_tokens_details.cached_tokens`, nested under `response` in
//! its `response.completed` / `.incomplete` / `.failed` stream events).
//!
//! Bodies are read into small typed structs rather than by walking a `serde_json::Value`, and
//! every field is lenient: a field of an unexpected type reads as absent instead of failing the
//! whole chunk, because one odd field from an upstream must not cost the rest of the metering.
//! A token count that is present but unusable (negative, fractional, a string, absurdly large)
//! makes the whole usage "not reported", so the caller estimates instead of billing garbage.

mod answer;
mod lenient;
mod stream;
#[cfg(test)]
mod tests;
mod view;

pub use answer::{read_answer, response_text, usage_from_json};
pub use stream::StreamAccumulator;

/// The largest token count (per field, per request) taken as reported; anything above is a broken
/// upstream, not a real request. Real figures stay far below it: a 10M-token context, or an
/// embeddings batch of 2,048 inputs of 8,191 tokens, is under 2% of it.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000;

pub use crate::policy::pricing::Usage;

/// What one stream event was, for the forwarding loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkKind {
    /// `data: [DONE]`, the end of a complete chat/completions stream.
    Done,
    /// A chunk with a non-null `usage` and no choices (`choices: []`, `null` or absent): the chunk
    /// to drop when the client did not ask for usage. Its usage has been recorded.
    UsageOnly,
    /// Any other JSON: forward it. Usage in it (e.g. Responses API `response.completed`, or
    /// providers that report usage on every chunk) has been recorded.
    Content,
    /// Data that isn't JSON: caller decides.
    NotJson,
    /// An `{"error": ...}` object (non-null `error`), or a Responses API `{"type": "error"}`
    /// event, in the stream.
    Error,
}
