//! Reading and rewriting a client's request body.
//!
//! tollgate reads only what routing, budgets and metering need (`model`, `stream`,
//! `stream_options`, `max_tokens`, `n`, and what counting and capability checks look at),
//! checks the types of the other common OpenAI fields as it passes them, and forwards every
//! other byte untouched: the rewrite splices new text into the exact byte ranges of `model`
//! and `stream_options`, it never re-serialises the body.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::Value;

use crate::policy::pricing::Capabilities;
use crate::policy::tokens::PlainChat;

mod full;
mod plain;
mod rewrite;
#[cfg(test)]
mod tests;

pub use full::parse_full;
use plain::skim_plain_chat;

/// Which OpenAI endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

    /// The path below the provider's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// The name stored in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    pub fn from_name(name: &str) -> &'static str {
        match name {
            "completions" => Endpoint::Completions.name(),
            "embeddings" => Endpoint::Embeddings.name(),
            _ => Endpoint::Chat.name(),
        }
    }

    pub fn prompt_kind(self) -> crate::policy::tokens::PromptKind {
        use crate::policy::tokens::PromptKind;
        match self {
            Endpoint::Chat => PromptKind::Chat,
            Endpoint::Completions => PromptKind::Completion,
            Endpoint::Embeddings => PromptKind::Embedding,
        }
    }
}

/// Largest `n` accepted (OpenAI's own limit).
const MAX_N: u64 = 128;

/// A request's body as the client sent it, parsed into a `Value` the first time its tokens
/// are counted exactly (a budget near its limit, a `tpm` limit, a dry run, an answer without
/// usage): most requests are never counted, so most bodies are never built into a tree.
#[derive(Debug)]
pub struct Prompt {
    body: Bytes,
    value: OnceLock<Value>,
}

impl Prompt {
    /// A body to parse when needed. A body usually arrives as a slice of its connection's
    /// read buffer: a stream's, kept for as long as the stream lasts, is copied when small,
    /// so that it does not keep the whole buffer alive (at 5,000 open streams, ~6 MB).
    fn unparsed(body: &Bytes, stream: bool) -> Prompt {
        const COPY_AT_MOST: usize = 64 * 1024;
        let body = if stream && body.len() <= COPY_AT_MOST { Bytes::copy_from_slice(body) } else { body.clone() };
        Prompt { body, value: OnceLock::new() }
    }

    /// A body parsed already.
    fn parsed(value: Value) -> Prompt {
        Prompt { body: Bytes::new(), value: OnceLock::from(value) }
    }

    /// The whole body, parsed.
    pub fn value(&self) -> &Value {
        // The body was checked as JSON before this `Prompt` was made, so this parse succeeds.
        self.value.get_or_init(|| serde_json::from_slice(&self.body).unwrap_or(Value::Null))
    }
}

/// What tollgate needs to know about a request.
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    /// The body, for token counting; shared with deferred counting.
    pub prompt: Arc<Prompt>,
    /// A chat body of string-only messages, tallied for the token bound as it was parsed.
    pub plain_chat: Option<PlainChat>,
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk itself (`stream_options.include_usage`).
    pub client_wants_usage: bool,
    /// `max_completion_tokens`, if the request sets it.
    pub max_completion_tokens: Option<u64>,
    /// `max_tokens`, if the request sets it.
    pub max_tokens: Option<u64>,
    /// Choices per request (`n`); output is reserved for each.
    pub n: u64,
    /// Features a serving model must support.
    pub needs: Capabilities,
    model_span: (usize, usize),
    stream_options_span: Option<(usize, usize)>,
    /// Offset of the closing `}` of the top-level object.
    close: usize,
}

/// Why a request body was refused: a 400, in OpenAI's words (`ApiError` takes it over at
/// the edge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The body is not JSON, or not a JSON object.
    InvalidJson(String),
    /// One field is missing or wrong; `param` names it as OpenAI does.
    InvalidParam { param: String, message: String },
}

impl RequestError {
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        RequestError::InvalidParam { param: param.into(), message: message.into() }
    }
}

/// Parses and checks a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &Bytes) -> Result<ParsedRequest, RequestError> {
    match skim_plain_chat(endpoint, body) {
        Some(parsed) => Ok(parsed),
        None => parse_full(endpoint, body),
    }
}

impl ParsedRequest {
    /// The output limit to reserve for: `max_completion_tokens`, else `max_tokens`.
    pub fn max_output(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The first output limit the request sets above `limit` (each is checked, as the
    /// upstream checks each): its field and value.
    pub fn output_limit_over(&self, limit: u64) -> Option<(&'static str, u64)> {
        [("max_tokens", self.max_tokens), ("max_completion_tokens", self.max_completion_tokens)]
            .into_iter()
            .find_map(|(field, max)| max.filter(|&max| max > limit).map(|max| (field, max)))
    }
}
