//! Local token counting: OpenAI's tokenizers plus OpenAI's published prompt accounting.
//!
//! Two uses: the reservation taken before an upstream call (prompt tokens × input price), and the
//! estimate recorded when the upstream reports no `usage`. Upstream `usage` is always the billing
//! truth; everything here is an estimate of it.
//!
//! The chat rule is the one in `shared/oracle/count_tokens.py` (the OpenAI cookbook's: 3 tokens per
//! message, every string field encoded, +1 per `name`, +3 priming the reply; tool definitions and
//! image tiles by the published constants), reproduced exactly, with these deliberate differences,
//! all of which only ever count *more* than the oracle, never less:
//! - An image whose size cannot be read (an `http(s)` URL, a truncated or corrupt `data:` URL, a
//!   zero dimension) is charged its model's worst case (8 tiles, or the full patch budget) where the
//!   oracle leaves it uncounted: a reservation must not be under-estimated by a caller who sends
//!   URLs instead of bytes. With `detail: "low"` the tile rule's size-independent base applies.
//! - A model without a published image rule (`gpt-4`, `gpt-5`, an unknown model behind a
//!   compatible provider) is charged gpt-4o's tile rule (85 + 170 per tile) instead of nothing.
//! - `ft:` fine-tunes get their base model's tool and image constants (the oracle strips `ft:`
//!   only when choosing the encoding).
//!
//! Where the oracle would crash on a malformed body (a wrong JSON type), this module skips the
//! offending value instead; such bodies are rejected by the upstream anyway.
//!
//! Two known limits, both inside nested tool schemas (themselves the oracle's approximation) and
//! both worth a token or two at most: the oracle serializes nested schemas in their source key
//! order, which `serde_json::Value` keeps only with serde_json's `preserve_order` feature (sorted
//! otherwise); and serde_json parses a float with 17 significant digits to within one ulp unless
//! its `float_roundtrip` feature is on, which can change the float's printed digits.
//!
//! Cost: [`prompt_tokens`] runs the BPE over every counted string, linear in the body's size
//! (`bpe-openai`'s encoder is linear even on one-letter megabytes, where tiktoken is quadratic).
//! [`prompt_tokens_upper_bound`] walks the same fields without the BPE, for the common case where a
//! budget is far from its limit.

use bpe_openai::Tokenizer;
use serde_json::Value;

mod accounting;
mod image;
mod measure;
mod py_json;
mod rules;
#[cfg(test)]
mod tests;

use accounting::count_body;
use measure::{to_u64, ByteBound, Exact, Tally};
use rules::{base_model, message_constants, ModelRules};

/// A BPE vocabulary of OpenAI's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-5, the o-series, and any model not known to be older.
    O200kBase,
    /// gpt-4, gpt-4-turbo, gpt-3.5-turbo, the `text-embedding-*` models, davinci-002/babbage-002.
    Cl100kBase,
}

impl Encoding {
    /// The encoding `model` tokenizes with, by tiktoken 0.14's model table: `o200k_base` for
    /// gpt-4o / gpt-4.1 / the o-series and unknown (newer) models, `cl100k_base` for gpt-4,
    /// gpt-4-turbo, gpt-3.5*, `text-embedding-*`. A `provider/` prefix is ignored and
    /// `ft:BASE:org::id` counts as `BASE`, as the oracle does.
    pub fn for_model(model: &str) -> Encoding {
        let m = base_model(model);
        let cl100k = m == "gpt-4"
            || m.starts_with("gpt-4-")
            || m.starts_with("gpt-3.5")
            || m == "gpt-35-turbo"
            || m.starts_with("gpt-35-turbo-")
            || m.starts_with("text-embedding-")
            || m == "davinci-002"
            || m == "babbage-002";
        if cl100k {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    fn tokenizer(self) -> &'static Tokenizer {
        // Both vocabularies are compiled into the binary by bpe-openai's build script (nothing is
        // downloaded); the first call deserializes one, later calls are free.
        match self {
            Encoding::O200kBase => bpe_openai::o200k_base(),
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
        }
    }
}

/// Which request body [`prompt_tokens`] is reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    /// `/v1/chat/completions`: `messages`, `tools` / `functions`.
    Chat,
    /// `/v1/completions`: `prompt`.
    Completion,
    /// `/v1/embeddings`: `input`.
    Embedding,
}

/// The number of tokens (not bytes, not characters) `text` encodes to with `enc`.
///
/// Text that looks like a special token (`<|endoftext|>`) is counted as ordinary text, as
/// tiktoken's `encode_ordinary` and the oracle do. The first call for each encoding loads its
/// vocabulary (about 100 ms in a release build); call `count_text(enc, "")` at start-up to keep
/// that off the first request's path.
pub fn count_text(enc: Encoding, text: &str) -> u64 {
    to_u64(enc.tokenizer().count(text))
}

/// The prompt tokens OpenAI bills for a request `body` of this `kind` sent for `model`.
///
/// `model` (the upstream model name) decides the encoding and the chat constants; `body["model"]`
/// is not read. Chat: the oracle's rule (see the module docs for where unknown images and unknown
/// models deliberately count more). Completion: `prompt`; embedding: `input`; each may be a
/// string, an array of strings, a token array or an array of token arrays, a token array counting
/// its length. Never panics; a value of the wrong JSON type is skipped. Linear in the body's size.
pub fn prompt_tokens(kind: PromptKind, model: &str, body: &Value) -> u64 {
    let rules = ModelRules::for_model(model);
    let exact = Exact(rules.encoding.tokenizer());
    count_body(&exact, &rules, kind, body)
}

/// An upper bound on [`prompt_tokens`] for the same arguments, in tokens, computed without the BPE:
/// linear in the body's bytes and far cheaper than the exact count.
///
/// Why it bounds: every BPE token covers at least one byte, so a string never encodes to more
/// tokens than its UTF-8 length; the fixed per-message and per-tool overheads are added as in the
/// exact count; every image is charged its model's worst case (which is what the exact count
/// charges when the size is unknown). Use it to skip exact counting when a budget is far from its
/// limit; it can be several times the exact count (a byte of English is about 0.25 tokens).
pub fn prompt_tokens_upper_bound(kind: PromptKind, model: &str, body: &Value) -> u64 {
    let rules = ModelRules::for_model(model);
    count_body(&ByteBound, &rules, kind, body)
}

/// A chat body whose messages hold only string fields (no content parts, tool calls or tool
/// definitions), tallied as the request parser passed it: what [`prompt_tokens_upper_bound`]
/// needs of such a body, without a `Value` to walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlainChat {
    /// Messages in `messages`.
    pub messages: u64,
    /// Their `name` fields.
    pub names: u64,
    /// Bytes of all their string fields as written in the JSON, escapes included: at least
    /// the UTF-8 length of the text, so at least its tokens.
    pub text_bytes: u64,
}

impl PlainChat {
    /// An upper bound on the prompt tokens of the body for `model`: the byte bound's terms
    /// (every string at most a token a byte, the per-message and per-name constants, the
    /// reply's priming), equal to [`prompt_tokens_upper_bound`] when no string holds escapes.
    pub fn upper_bound(&self, model: &str) -> u64 {
        let (per_message, per_name) = message_constants(base_model(model));
        let mut n = Tally::default();
        n.add(self.text_bytes);
        n.add_signed(per_message.saturating_mul(i64::try_from(self.messages).unwrap_or(i64::MAX)));
        n.add_signed(per_name.saturating_mul(i64::try_from(self.names).unwrap_or(i64::MAX)));
        n.add(3);
        n.total()
    }
}
