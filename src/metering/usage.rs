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

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use serde_json::Value;

/// The largest token count (per field, per request) taken as reported; anything above is a broken
/// upstream, not a real request. Real figures stay far below it: a 10M-token context, or an
/// embeddings batch of 2,048 inputs of 8,191 tokens, is under 2% of it.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000;

pub use crate::policy::pricing::Usage;

/// Usage from a response body or stream chunk: chat/completions shape (`usage.prompt_tokens`,
/// `usage.completion_tokens`, `usage.prompt_tokens_details.cached_tokens`), embeddings
/// (`prompt_tokens`, no completion), and Responses API shape (`usage.input_tokens`,
/// `usage.output_tokens`, `usage.input_tokens_details.cached_tokens`, also nested under `response`
/// for `response.completed` events).
///
/// `None` when there is no usage (absent or `null`), when it has no input count, or when any count
/// in it is not a non-negative integer up to [`MAX_REPORTED_TOKENS`] (treated as not reported).
/// `cached_input_tokens` is clamped to `input_tokens`. Never panics.
pub fn usage_from_json(v: &Value) -> Option<Usage> {
    match Field::<Body>::deserialize(v) {
        Ok(Field::Value(body)) => body.reported_usage(),
        _ => None,
    }
}

/// Generated text in a non-streamed chat/completions response (`choices[].message.content`,
/// `refusal`, `reasoning_content`, `tool_calls[].function.name` / `.arguments`, `function_call`,
/// or legacy completions' `choices[].text`), for estimating output tokens when the response has
/// no usage. Empty for anything else. Never panics.
pub fn response_text(v: &Value) -> String {
    match Field::<Body>::deserialize(v) {
        Ok(Field::Value(body)) => body_text(&body),
        _ => String::new(),
    }
}

fn body_text(body: &Body<'_>) -> String {
    let mut text = String::new();
    for choice in &body.choices.items {
        if let Field::Value(message) = &choice.message {
            message.for_each_text(|s| text.push_str(s));
        }
        if let Some(s) = &choice.text.0 {
            text.push_str(s);
        }
    }
    text
}

/// A non-streamed answer read straight from its bytes, without building a `Value` tree: its
/// reported usage and, only when it reports none, its generated text (for estimating). The
/// same as `usage_from_json` and `response_text` on the parsed body. `None` when the body is
/// not a JSON object.
pub fn read_answer(bytes: &[u8]) -> Option<(Option<Usage>, String)> {
    fn of(body: &Body<'_>) -> (Option<Usage>, String) {
        let usage = body.reported_usage();
        let text = if usage.is_some() { String::new() } else { body_text(body) };
        (usage, text)
    }
    // JSON is UTF-8 throughout; the typed reader skips the fields it ignores without checking
    // them, so check the whole body first (as parsing a `Value` does).
    let text = simdutf8::basic::from_utf8(bytes).ok()?;
    // A body with a usable top-level usage report needs nothing else: a skim that checks the
    // whole body and reads only that object answers for it, at a fraction of the typed
    // reader's cost (which matches every key against the typed view and decodes every string).
    if let Some((usage, _)) = skim_top(text) {
        return Some((Some(usage), String::new()));
    }
    match serde_json::from_str::<Field<Body>>(text) {
        Ok(Field::Value(body)) => Some(of(&body)),
        Ok(_) => None,
        // Well-formed JSON the typed reader refused (a duplicated key): read it as a `Value`
        // (last duplicate wins), which the typed reader always accepts.
        Err(e) if e.classify() == Category::Data => {
            let value: Value = serde_json::from_str(text).ok()?;
            match Field::<Body>::deserialize(&value) {
                Ok(Field::Value(body)) => Some(of(&body)),
                _ => None,
            }
        }
        Err(_) => None,
    }
}

/// What a well-formed body or chunk with a usable top-level `usage` report holds, as the
/// typed reader reads it: the report, and the chunk's kind for the forwarding loop. `None`
/// whenever the skim cannot tell, or the body has no such report (the typed reader decides).
fn skim_top(text: &str) -> Option<(Usage, ChunkKind)> {
    use super::skim::Skim;
    let mut s = Skim::new(text);
    if s.peek()? != b'{' {
        return None;
    }
    let (mut usage, mut error, mut kind, mut choices) = (None, None, None, None);
    s.object(|s, key| {
        // A known field twice: the full reader takes the last.
        match key? {
            b"usage" if usage.is_none() => usage = Some(skim_usage(s)?),
            b"error" if error.is_none() => error = Some(s.scalar()? != super::skim::Scalar::Null),
            b"type" if kind.is_none() => kind = Some(s.plain_str()? == Some("error")),
            b"choices" if choices.is_none() => choices = Some(s.non_empty_array()?),
            b"usage" | b"error" | b"type" | b"choices" => return None,
            _ => s.value()?,
        }
        Some(())
    })?;
    if !s.at_end() {
        return None;
    }
    let usage = usage?.to_usage()?;
    let kind = if error == Some(true) || kind == Some(true) {
        ChunkKind::Error
    } else if choices == Some(true) {
        ChunkKind::Content
    } else {
        ChunkKind::UsageOnly
    };
    Some((usage, kind))
}

/// A `usage` object as `RawUsage` reads it. `None` for anything else (the full reader
/// decides) and for a field given twice (the full reader takes the last).
fn skim_usage(s: &mut super::skim::Skim<'_>) -> Option<RawUsage> {
    if s.peek()? != b'{' {
        return None;
    }
    enum Slot<'r> {
        Count(&'r mut Count),
        Details(&'r mut Field<Details>),
    }
    let mut raw = RawUsage::default();
    let mut seen = 0u8;
    s.object(|s, key| {
        let (bit, slot) = match key? {
            b"prompt_tokens" => (1, Slot::Count(&mut raw.prompt_tokens)),
            b"completion_tokens" => (2, Slot::Count(&mut raw.completion_tokens)),
            b"input_tokens" => (4, Slot::Count(&mut raw.input_tokens)),
            b"output_tokens" => (8, Slot::Count(&mut raw.output_tokens)),
            b"prompt_tokens_details" => (16, Slot::Details(&mut raw.prompt_tokens_details)),
            b"input_tokens_details" => (32, Slot::Details(&mut raw.input_tokens_details)),
            _ => return s.value(),
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match slot {
            Slot::Count(count) => *count = skim_count(s)?,
            Slot::Details(details) => *details = skim_details(s)?,
        }
        Some(())
    })?;
    Some(raw)
}

/// `prompt_tokens_details` / `input_tokens_details` as `Field<Details>` reads it (a
/// `cached_tokens` given twice is left to the full reader).
fn skim_details(s: &mut super::skim::Skim<'_>) -> Option<Field<Details>> {
    if s.peek()? != b'{' {
        return Some(match s.scalar()? {
            super::skim::Scalar::Null => Field::Null,
            _ => Field::Other,
        });
    }
    let mut cached = None;
    s.object(|s, key| match key? {
        b"cached_tokens" if cached.is_none() => {
            cached = Some(skim_count(s)?);
            Some(())
        }
        b"cached_tokens" => None,
        _ => s.value(),
    })?;
    Some(Field::Value(Details { cached_tokens: cached.unwrap_or_default() }))
}

/// A count as `Count` reads it (a negative number is left to the full reader).
fn skim_count(s: &mut super::skim::Skim<'_>) -> Option<Count> {
    use super::skim::Scalar;
    Some(match s.scalar()? {
        Scalar::Null => Count::Absent,
        Scalar::Uint(n) if n <= MAX_REPORTED_TOKENS => Count::Valid(n),
        Scalar::Uint(_) | Scalar::Other => Count::Invalid,
    })
}

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

/// Follows a streamed chat/completions response: remembers the usage if one is reported and the
/// generated text so output tokens can be estimated when usage never arrives.
#[derive(Debug)]
pub struct StreamAccumulator {
    usage: Option<Usage>,
    text: String,
    max_text_bytes: usize,
    overflow_bytes: u64,
    saw_done: bool,
    /// Chunks held unread by [`observe_later`](Self::observe_later), in arrival order, and
    /// the bytes they hold.
    held: Vec<String>,
    held_bytes: usize,
    /// Bytes this stream has taken from the all-streams total for holding (at least
    /// `held_bytes`): taken a quantum at a time, so two workers' streams do not bounce the
    /// total's cache line between cores on every chunk.
    held_quota: usize,
}

/// Chunk bytes one stream may hold unread.
const MAX_HELD_PER_STREAM: usize = 64 * 1024;
/// Chunk bytes all streams together may hold unread, so that thousands of open streams cost
/// little memory for it: past this, chunks are read as they arrive.
const MAX_HELD_TOTAL: usize = 2 * 1024 * 1024;
static HELD_TOTAL: AtomicUsize = AtomicUsize::new(0);
/// What a stream takes from the total when it needs room to hold more: a dozen chat chunks.
const HOLD_QUANTUM: usize = 4 * 1024;

fn hold_bytes(n: usize) -> bool {
    if HELD_TOTAL.fetch_add(n, Ordering::Relaxed) + n <= MAX_HELD_TOTAL {
        return true;
    }
    HELD_TOTAL.fetch_sub(n, Ordering::Relaxed);
    false
}

fn release_bytes(n: usize) {
    if n > 0 {
        HELD_TOTAL.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Whether a chunk's JSON might report usage: it names a `"usage"` key — other than the
/// `"usage":null` OpenAI ends every chunk with under `include_usage` — or has a `\u` escape
/// that could spell one. A chunk without either has no usage in any reading of it.
fn may_report_usage(data: &str) -> bool {
    static USAGE: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    const TRAILING_NULL: &[u8] = b",\"usage\":null}";
    let bytes = data.trim_ascii_end().as_bytes();
    // A `\u` escape: found by its backslash (a byte search is cheaper than a substring one).
    if memchr::memchr_iter(b'\\', bytes).any(|i| bytes.get(i + 1) == Some(&b'u')) {
        return true;
    }
    // The first `"usage"` is the one that ends the chunk, so it is the only one.
    USAGE.find(bytes).is_some_and(|at| at == 0 || &bytes[at - 1..] != TRAILING_NULL)
}

impl StreamAccumulator {
    /// `max_text_bytes`: text kept for estimation is bounded; past it only a byte count is kept.
    pub fn new(max_text_bytes: usize) -> Self {
        StreamAccumulator {
            usage: None,
            text: String::new(),
            max_text_bytes,
            overflow_bytes: 0,
            saw_done: false,
            held: Vec::new(),
            held_bytes: 0,
            held_quota: 0,
        }
    }

    /// Looks at a chunk as [`observe`](Self::observe) does, or holds it unread: a chunk that
    /// cannot report usage is only needed for its text, and the text only if the stream ends
    /// without a usage report. Such a chunk is held (returns `None`: forward it as it is) —
    /// or skipped, once usage has been reported — and read by [`finish`](Self::finish) if
    /// it turns out to be needed. Most streams report usage in their last chunk, so most
    /// chunks are never read. What is held is bounded per stream and across all streams;
    /// past a bound, chunks are read as they arrive, as `observe` does.
    pub fn observe_later(&mut self, data: String) -> Option<ChunkKind> {
        if data.trim_ascii() == "[DONE]" {
            return Some(self.observe(&data));
        }
        if !may_report_usage(&data) {
            if self.usage.is_some() {
                return None;
            }
            let held = self.held_bytes + data.capacity() + std::mem::size_of::<String>();
            if held <= MAX_HELD_PER_STREAM && self.room_to_hold(held) {
                self.held_bytes = held;
                if self.held.capacity() == 0 {
                    // A chat stream's chunks, without regrowing the list from four.
                    self.held.reserve(16);
                }
                self.held.push(data);
                return None;
            }
            self.read_held();
            return Some(self.observe(&data));
        }
        if self.held.is_empty() {
            return Some(self.observe(&data));
        }
        // Held chunks come first. Their text is needed only if this chunk reports no usage:
        // read it on its own first (keeping no text), by a skim when it can tell.
        if let Some((usage, kind)) = skim_top(&data) {
            self.usage = Some(usage);
            self.drop_held();
            return Some(kind);
        }
        let mut probe = StreamAccumulator::new(0);
        let kind = probe.observe(&data);
        if probe.usage.is_some() {
            self.usage = probe.usage;
            self.drop_held();
            return Some(kind);
        }
        self.read_held();
        Some(self.observe(&data))
    }

    /// The end of the stream: reads the chunks held unread if no usage was reported (their
    /// text is needed for the estimate), else lets them go. Call before `produced_text`.
    pub fn finish(&mut self) {
        if self.usage.is_some() {
            self.drop_held();
        } else {
            self.read_held();
        }
    }

    /// Whether this stream may hold `held` bytes in all, taking room from the all-streams
    /// total if its quota is short: a quantum if the total has it, else just what is needed.
    fn room_to_hold(&mut self, held: usize) -> bool {
        if held <= self.held_quota {
            return true;
        }
        let needed = held - self.held_quota;
        let quantum = needed.max(HOLD_QUANTUM).min(MAX_HELD_PER_STREAM - self.held_quota);
        for take in [quantum, needed] {
            if hold_bytes(take) {
                self.held_quota += take;
                return true;
            }
        }
        false
    }

    /// Gives the stream's room for holding back to the all-streams total.
    fn release_quota(&mut self) {
        self.held_bytes = 0;
        release_bytes(std::mem::take(&mut self.held_quota));
    }

    fn read_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.release_quota();
        for data in &held {
            self.observe(data);
        }
    }

    fn drop_held(&mut self) {
        self.held = Vec::new();
        self.release_quota();
    }

    /// Look at the `data` of one event.
    pub fn observe(&mut self, data: &str) -> ChunkKind {
        if data.trim_ascii() == "[DONE]" {
            self.saw_done = true;
            return ChunkKind::Done;
        }
        let reparsed: Value;
        let body = match serde_json::from_str::<Field<Body>>(data) {
            Ok(body) => body,
            // Well-formed JSON the typed reader still refused, e.g. a duplicated key: read it as a
            // `Value` (last duplicate wins), which the typed reader always accepts.
            Err(e) if e.classify() == Category::Data => match serde_json::from_str(data) {
                Ok(v) => {
                    reparsed = v;
                    Field::<Body>::deserialize(&reparsed).unwrap_or(Field::Other)
                }
                Err(_) => return ChunkKind::NotJson,
            },
            Err(_) => return ChunkKind::NotJson,
        };
        // JSON but not an object: nothing in it to meter.
        let Field::Value(body) = body else {
            return ChunkKind::Content;
        };
        if let Some(usage) = body.reported_usage() {
            self.usage = Some(usage);
        }
        if body.error.is_non_null() || body.kind.0.as_deref() == Some("error") {
            return ChunkKind::Error;
        }
        for choice in &body.choices.items {
            if let Field::Value(delta) = &choice.delta {
                delta.for_each_text(|s| self.keep_text(s));
            }
            if let Some(s) = &choice.text.0 {
                self.keep_text(s);
            }
        }
        if body.usage.is_non_null() && !body.choices.any {
            ChunkKind::UsageOnly
        } else {
            ChunkKind::Content
        }
    }

    /// The last usage reported so far, if any (a later report replaces an earlier one, as
    /// providers that report on every chunk send running totals).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Generated text seen so far: `choices[].delta.content`, `delta.refusal`,
    /// `delta.reasoning_content` (or `delta.reasoning` when that is absent),
    /// `delta.tool_calls[].function.name` and `.arguments`, `delta.function_call`, and legacy
    /// completions `choices[].text` — in arrival order, at most `max_text_bytes` of it. With
    /// [`observe_later`](Self::observe_later): complete after [`finish`](Self::finish) when no
    /// usage was reported; with a report, the text of chunks never read is left out.
    pub fn produced_text(&self) -> &str {
        &self.text
    }

    /// Bytes of generated text dropped past the bound (estimate those as bytes/4 tokens, rounded
    /// up, caller's job).
    pub fn overflow_bytes(&self) -> u64 {
        self.overflow_bytes
    }

    /// Whether `data: [DONE]` has been seen.
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Chunks held unread, and their bytes (for tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.held.len(), self.held_bytes)
    }

    fn keep_text(&mut self, s: &str) {
        let room = self.max_text_bytes.saturating_sub(self.text.len());
        // Once text has been dropped nothing more is kept, so the kept text stays a prefix of
        // what was generated rather than a patchwork.
        if self.overflow_bytes == 0 && s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = if self.overflow_bytes == 0 { room } else { 0 };
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        let (kept, dropped) = s.split_at(cut);
        self.text.push_str(kept);
        self.overflow_bytes = self.overflow_bytes.saturating_add(dropped.len() as u64);
    }
}

impl Drop for StreamAccumulator {
    fn drop(&mut self) {
        self.release_quota();
    }
}

// ---- The typed view of a body or chunk -------------------------------------------------------
//
// Only the fields metering needs. Every field type below accepts any JSON value, so a body that
// is valid JSON always deserializes.

/// A response body or stream chunk, of any of the shapes this module knows.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Body<'a> {
    #[serde(borrow)]
    choices: List<Choice<'a>>,
    usage: Field<RawUsage>,
    /// The Response object in Responses API stream events such as `response.completed`.
    response: Field<ResponseObject>,
    error: Field<IgnoredAny>,
    /// The Responses API event type.
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
}

impl Body<'_> {
    fn reported_usage(&self) -> Option<Usage> {
        match (&self.usage, &self.response) {
            (Field::Value(usage), _) => usage.to_usage(),
            (Field::Null, Field::Value(response)) => match &response.usage {
                Field::Value(usage) => usage.to_usage(),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ResponseObject {
    usage: Field<RawUsage>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Choice<'a> {
    /// Streamed chat/completions.
    #[serde(borrow)]
    delta: Field<Message<'a>>,
    /// Non-streamed chat/completions.
    #[serde(borrow)]
    message: Field<Message<'a>>,
    /// Legacy completions, streamed or not.
    #[serde(borrow)]
    text: Text<'a>,
}

/// A chat message or a streamed delta of one.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    #[serde(borrow)]
    content: Text<'a>,
    #[serde(borrow)]
    refusal: Text<'a>,
    /// DeepSeek-style reasoning text (OpenAI itself does not stream its reasoning).
    #[serde(borrow)]
    reasoning_content: Text<'a>,
    /// The newer spelling of the same (vLLM, OpenRouter); some providers send both.
    #[serde(borrow)]
    reasoning: Text<'a>,
    #[serde(borrow)]
    tool_calls: List<ToolCall<'a>>,
    /// The deprecated single function call.
    #[serde(borrow)]
    function_call: Field<FunctionCall<'a>>,
}

impl Message<'_> {
    fn for_each_text(&self, mut f: impl FnMut(&str)) {
        // Providers that send both spellings of reasoning send the same text twice.
        let reasoning = self.reasoning_content.0.as_ref().or(self.reasoning.0.as_ref());
        let texts = [reasoning, self.content.0.as_ref(), self.refusal.0.as_ref()];
        for s in texts.into_iter().flatten() {
            f(s);
        }
        if let Field::Value(call) = &self.function_call {
            call.for_each_text(&mut f);
        }
        for call in &self.tool_calls.items {
            if let Field::Value(function) = &call.function {
                function.for_each_text(&mut f);
            }
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ToolCall<'a> {
    #[serde(borrow)]
    function: Field<FunctionCall<'a>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow)]
    arguments: Text<'a>,
}

impl FunctionCall<'_> {
    fn for_each_text(&self, mut f: impl FnMut(&str)) {
        for s in [&self.name.0, &self.arguments.0].into_iter().flatten() {
            f(s);
        }
    }
}

/// `usage` in any of the known shapes.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct RawUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    prompt_tokens_details: Field<Details>,
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Field<Details>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Details {
    cached_tokens: Count,
}

impl RawUsage {
    fn to_usage(&self) -> Option<Usage> {
        // The chat spelling wins when an upstream sends both.
        let input = match either(self.prompt_tokens, self.input_tokens) {
            Count::Valid(n) => n,
            // Without an input count this is not a usage report worth billing from.
            Count::Absent | Count::Invalid => return None,
        };
        let output = either(self.completion_tokens, self.output_tokens).or_zero()?;
        let cached = either(Details::cached(&self.prompt_tokens_details), Details::cached(&self.input_tokens_details))
            .or_zero()?;
        Some(Usage { input_tokens: input, cached_input_tokens: cached.min(input), output_tokens: output })
    }
}

impl Details {
    fn cached(details: &Field<Details>) -> Count {
        match details {
            Field::Null => Count::Absent,
            Field::Other => Count::Invalid,
            Field::Value(d) => d.cached_tokens,
        }
    }
}

/// The first of two alternative spellings of a count that is present.
fn either(a: Count, b: Count) -> Count {
    match a {
        Count::Absent => b,
        _ => a,
    }
}

// ---- Lenient field types ---------------------------------------------------------------------

/// `visit_*` methods for a lenient visitor that maps each named kind of JSON scalar to `$value`.
macro_rules! scalars_yield {
    ($value:expr; $($kind:ident),+) => { $(scalars_yield!(@one $value; $kind);)+ };
    (@one $value:expr; bool) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; i64) => {
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; u64) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; f64) => {
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; str) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($value) }
    };
    (@one $value:expr; bytes) => {
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> { Ok($value) }
    };
}

/// A token count: absent/`null`, a usable integer, or something else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Count {
    #[default]
    Absent,
    Valid(u64),
    /// Negative, fractional, too large, or not a number.
    Invalid,
}

impl Count {
    /// An absent count is 0; an invalid one spoils the usage it is in.
    fn or_zero(self) -> Option<u64> {
        match self {
            Count::Absent => Some(0),
            Count::Valid(n) => Some(n),
            Count::Invalid => None,
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                Ok(if n <= MAX_REPORTED_TOKENS { Count::Valid(n) } else { Count::Invalid })
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Ok(Count::Invalid),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count::Absent)
            }
            fn visit_none<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count::Absent)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Count, D::Error> {
                Count::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                drain_seq(seq).map(|()| Count::Invalid)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                drain_map(map).map(|()| Count::Invalid)
            }
            scalars_yield!(Count::Invalid; bool, f64, str, bytes);
        }
        d.deserialize_any(CountVisitor)
    }
}

/// A string field; any other value reads as absent.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            // Borrowed when the JSON string has no escapes, so most deltas cost no allocation.
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Borrowed(s))))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(s.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Text<'a>, E> {
                Ok(Text(Some(Cow::Owned(s))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Text<'a>, E> {
                Ok(Text(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Text<'a>, D::Error> {
                Text::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text<'a>, A::Error> {
                drain_seq(seq).map(|()| Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text<'a>, A::Error> {
                drain_map(map).map(|()| Text(None))
            }
            scalars_yield!(Text(None); bool, i64, u64, f64, bytes);
        }
        d.deserialize_any(TextVisitor(PhantomData))
    }
}

/// An object field read as `T`: absent/`null`, some other JSON value, or the object.
#[derive(Default)]
enum Field<T> {
    #[default]
    Null,
    Other,
    Value(T),
}

impl<T> Field<T> {
    fn is_non_null(&self) -> bool {
        !matches!(self, Field::Null)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for FieldVisitor<T> {
            type Value = Field<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Field::Value)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Field<T>, E> {
                Ok(Field::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Field<T>, E> {
                Ok(Field::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Field<T>, D::Error> {
                Field::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<T>, A::Error> {
                drain_seq(seq).map(|()| Field::Other)
            }
            scalars_yield!(Field::Other; bool, i64, u64, f64, str, bytes);
        }
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

/// An array field of objects read as `T`; elements that are not objects are skipped, and any
/// other value reads as an empty list.
struct List<T> {
    items: Vec<T>,
    /// Whether the value was an array with at least one element, usable or not.
    any: bool,
}

// Written out rather than derived: the derive would demand `T: Default`.
impl<T> Default for List<T> {
    fn default() -> Self {
        List { items: Vec::new(), any: false }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut list = List::default();
                while let Some(element) = seq.next_element::<Field<T>>()? {
                    list.any = true;
                    if let Field::Value(item) = element {
                        list.items.push(item);
                    }
                }
                Ok(list)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<List<T>, A::Error> {
                drain_map(map).map(|()| List::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<List<T>, E> {
                Ok(List::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<List<T>, E> {
                Ok(List::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<List<T>, D::Error> {
                List::deserialize(d)
            }
            scalars_yield!(List::default(); bool, i64, u64, f64, str, bytes);
        }
        d.deserialize_any(ListVisitor(PhantomData))
    }
}

/// A lenient visitor must still consume what it ignores, or the deserializer reports leftovers.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_openai_usage_chunk_is_skimmed() {
        let chunk = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        assert_eq!(skim_top(chunk), Some((usage(9, 0, 3).unwrap(), ChunkKind::UsageOnly)));
        let last_content = chunk.replace(r#""choices":[]"#, r#""choices":[{"index":0,"delta":{"content":"!"}}]"#);
        assert_eq!(skim_top(&last_content), Some((usage(9, 0, 3).unwrap(), ChunkKind::Content)));
    }

    #[test]
    fn read_answer_agrees_with_reading_the_parsed_value() {
        let bodies: [&[u8]; 15] = [
            b"{\"choices\":[],\"ignored\":{\"k\xe3y\":1}}",
            // Bodies with a top-level usage object, which the skim reads: a usable report, an
            // unusable one (the text is then needed), a duplicated count, a key with escapes.
            br#"{"choices":[{"message":{"content":"a"}}],"usage":{"prompt_tokens":3,"completion_tokens":1.5}}"#,
            br#"{"choices":[{"message":{"content":"b"}}],"usage":{"prompt_tokens":3,"prompt_tokens":4}}"#,
            br#"{"choices":[{"message":{"content":"c"}}],"us\u0061ge":{"prompt_tokens":5}}"#,
            br#"{"choices":[{"message":{"content":"d"}}],"usage":{"input_tokens":5,"output_tokens":2,"input_tokens_details":{"cached_tokens":9}}}"#,
            br#"{"choices":[{"message":{"content":"e\ud83d\ude00"}}],"usage":{"prompt_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}} x"#,
            br#"{"choices":[{"message":{"content":"hi there"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            br#"{"choices":[{"message":{"content":"no usage","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}"#,
            br#"{"choices":[{"text":"legacy"}],"usage":null}"#,
            br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":9,"completion_tokens":1}}"#,
            br#"{"choices":"nonsense","usage":{"prompt_tokens":-1}}"#,
            br#"[1,2,3]"#,
            br#"null"#,
            br#"{"truncated": "#,
        ];
        for bytes in bodies {
            let expected = serde_json::from_slice::<Value>(bytes).ok().filter(Value::is_object).map(|v| {
                let usage = usage_from_json(&v);
                (usage, if usage.is_some() { String::new() } else { response_text(&v) })
            });
            assert_eq!(read_answer(bytes), expected, "{}", String::from_utf8_lossy(bytes));
        }
    }

    use super::super::sse::SseParser;
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn usage(input: u64, cached: u64, output: u64) -> Option<Usage> {
        Some(Usage { input_tokens: input, cached_input_tokens: cached, output_tokens: output })
    }

    // ---- usage_from_json ----

    #[test]
    fn chat_completion_usage_with_cached_tokens() {
        let body = json!({
            "id": "chatcmpl-abc", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": 15, "total_tokens": 1215,
                      "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
        });
        assert_eq!(usage_from_json(&body), usage(1200, 1024, 15));
    }

    #[test]
    fn chat_usage_without_details_has_no_cached_tokens() {
        let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}});
        assert_eq!(usage_from_json(&body), usage(9, 0, 12));
        let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12,
                                    "prompt_tokens_details": null, "completion_tokens_details": null}});
        assert_eq!(usage_from_json(&body), usage(9, 0, 12));
        let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12,
                                    "prompt_tokens_details": {"cached_tokens": null}}});
        assert_eq!(usage_from_json(&body), usage(9, 0, 12));
    }

    #[test]
    fn embeddings_usage_has_no_output() {
        let body = json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8}
        });
        assert_eq!(usage_from_json(&body), usage(8, 0, 0));
    }

    #[test]
    fn responses_api_usage() {
        let body = json!({
            "id": "resp_1", "object": "response", "status": "completed",
            "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
                      "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 380}
        });
        assert_eq!(usage_from_json(&body), usage(328, 128, 52));
    }

    #[test]
    fn responses_api_completed_event_usage_is_nested_under_response() {
        let event = json!({
            "type": "response.completed", "sequence_number": 42,
            "response": {"id": "resp_1", "object": "response", "status": "completed",
                         "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
                                   "output_tokens": 87, "total_tokens": 123}}
        });
        assert_eq!(usage_from_json(&event), usage(36, 0, 87));
        let created = json!({"type": "response.created", "response": {"status": "in_progress", "usage": null}});
        assert_eq!(usage_from_json(&created), None);
    }

    #[test]
    fn null_or_missing_usage_is_none() {
        assert_eq!(usage_from_json(&json!({"usage": null})), None);
        assert_eq!(usage_from_json(&json!({"choices": []})), None);
        assert_eq!(usage_from_json(&json!({})), None);
        assert_eq!(usage_from_json(&json!({"usage": {}})), None);
        assert_eq!(usage_from_json(&json!({"usage": {"completion_tokens": 5}})), None);
    }

    #[test]
    fn non_objects_are_none() {
        for v in [json!(null), json!(1), json!("usage"), json!([{"usage": {"prompt_tokens": 1}}])] {
            assert_eq!(usage_from_json(&v), None, "{v}");
        }
        assert_eq!(usage_from_json(&json!({"usage": "lots"})), None);
        assert_eq!(usage_from_json(&json!({"usage": [1, 2]})), None);
    }

    #[test]
    fn hostile_counts_make_usage_unreported() {
        let bad = [
            json!(-1),
            json!(1.5),
            json!(10.0),
            json!("12"),
            json!(true),
            json!([3]),
            json!({"n": 3}),
            json!(u64::MAX),
            json!(MAX_REPORTED_TOKENS + 1),
            json!(1e300),
            json!(i64::MIN),
        ];
        for v in bad {
            let prompt = json!({"usage": {"prompt_tokens": v, "completion_tokens": 1}});
            assert_eq!(usage_from_json(&prompt), None, "prompt_tokens {v}");
            let completion = json!({"usage": {"prompt_tokens": 1, "completion_tokens": v}});
            assert_eq!(usage_from_json(&completion), None, "completion_tokens {v}");
            let cached = json!({"usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                          "prompt_tokens_details": {"cached_tokens": v}}});
            assert_eq!(usage_from_json(&cached), None, "cached_tokens {v}");
            let responses = json!({"usage": {"input_tokens": 5, "output_tokens": v}});
            assert_eq!(usage_from_json(&responses), None, "output_tokens {v}");
        }
        let details = json!({"usage": {"prompt_tokens": 5, "prompt_tokens_details": 7}});
        assert_eq!(usage_from_json(&details), None);
    }

    #[test]
    fn huge_number_beyond_u64_in_text_is_unreported() {
        let v: Value =
            serde_json::from_str(r#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":1}}"#)
                .unwrap();
        assert_eq!(usage_from_json(&v), None);
    }

    #[test]
    fn largest_accepted_count() {
        let body = json!({"usage": {"prompt_tokens": MAX_REPORTED_TOKENS, "completion_tokens": 0}});
        assert_eq!(usage_from_json(&body), usage(MAX_REPORTED_TOKENS, 0, 0));
    }

    #[test]
    fn cached_is_clamped_to_input() {
        let body = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                    "prompt_tokens_details": {"cached_tokens": 500}}});
        assert_eq!(usage_from_json(&body), usage(10, 10, 2));
    }

    #[test]
    fn chat_spelling_wins_when_both_are_present() {
        let body = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                    "input_tokens": 99, "output_tokens": 99}});
        assert_eq!(usage_from_json(&body), usage(10, 0, 2));
    }

    #[test]
    fn zero_usage_is_reported_not_missing() {
        let body = json!({"usage": {"prompt_tokens": 0, "completion_tokens": 0}});
        assert_eq!(usage_from_json(&body), usage(0, 0, 0));
    }

    // ---- response_text ----

    #[test]
    fn response_text_of_a_chat_message() {
        let body = json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": null}},
            {"index": 1, "message": {"role": "assistant", "content": null, "refusal": "I can't."}}
        ]});
        assert_eq!(response_text(&body), "Hello thereI can't.");
    }

    #[test]
    fn response_text_of_tool_calls() {
        let body = json!({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": null,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}}
        ]}}]});
        assert_eq!(response_text(&body), "get_weather{\"city\":\"Paris\"}get_time{}");
    }

    #[test]
    fn response_text_of_a_legacy_function_call() {
        let body = json!({"choices": [{"message": {"role": "assistant", "content": null,
            "function_call": {"name": "f", "arguments": "{\"x\":1}"}}}]});
        assert_eq!(response_text(&body), "f{\"x\":1}");
    }

    #[test]
    fn response_text_of_legacy_completions() {
        let body = json!({"object": "text_completion", "choices": [
            {"text": "\n\nThis is a test.", "index": 0, "logprobs": null, "finish_reason": "length"}]});
        assert_eq!(response_text(&body), "\n\nThis is a test.");
    }

    #[test]
    fn response_text_includes_reasoning_once() {
        let body = json!({"choices": [{"message": {"reasoning_content": "think", "reasoning": "think",
                                                   "content": "answer"}}]});
        assert_eq!(response_text(&body), "thinkanswer");
    }

    #[test]
    fn response_text_of_odd_bodies_is_empty_or_partial() {
        assert_eq!(response_text(&json!(null)), "");
        assert_eq!(response_text(&json!({"data": []})), "");
        assert_eq!(response_text(&json!({"choices": "nope"})), "");
        let body = json!({"choices": [5, null, {"message": {"content": 3}}, {"message": {"content": "ok"}}]});
        assert_eq!(response_text(&body), "ok");
    }

    // ---- StreamAccumulator on OpenAI-shaped streams ----

    const CHAT_WITH_USAGE: &str = concat!(
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":"! \"Quoted\" \u00e9t\u00e9\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const CHAT_WITHOUT_USAGE: &str = concat!(
        r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const TOOL_CALLS: &str = concat!(
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"location"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":80,"completion_tokens":16,"total_tokens":96,"prompt_tokens_details":{"cached_tokens":64}}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const LEGACY_COMPLETIONS: &str = concat!(
        r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":"\n\n","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}"#,
        "\n\n",
        r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":"This is","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}"#,
        "\n\n",
        r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":" a test.","index":0,"logprobs":null,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct"}"#,
        "\n\n",
        r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    /// Runs a stream through the SSE parser (split at `cut`) and an accumulator.
    fn run(stream: &str, cut: usize) -> (StreamAccumulator, Vec<ChunkKind>, Vec<u8>) {
        let mut parser = SseParser::new(1 << 20);
        let mut acc = StreamAccumulator::new(1 << 16);
        let mut kinds = Vec::new();
        let bytes = stream.as_bytes();
        let cut = cut.min(bytes.len());
        for chunk in [&bytes[..cut], &bytes[cut..]] {
            for event in parser.push(chunk).expect("fixture is valid SSE") {
                if let Some(data) = &event.data {
                    kinds.push(acc.observe(data));
                }
            }
        }
        (acc, kinds, parser.pending().to_vec())
    }

    /// Runs a stream's events through `observe_later`, then `finish`.
    fn run_later(stream: &str) -> (StreamAccumulator, Vec<Option<ChunkKind>>) {
        let mut parser = SseParser::new(1 << 20);
        let mut acc = StreamAccumulator::new(1 << 16);
        let kinds = parser
            .push(stream.as_bytes())
            .expect("fixture is valid SSE")
            .into_iter()
            .filter_map(|e| e.data)
            .map(|d| acc.observe_later(d))
            .collect();
        acc.finish();
        (acc, kinds)
    }

    #[test]
    fn only_chunks_that_name_usage_or_escape_a_character_may_report_usage() {
        for plain in [
            r#"{"choices":[{"delta":{"content":"hi"}}]}"#,
            r#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
            "{\"choices\":[],\"usage\":null}\n ",
            r#"{"choices":[{"delta":{"content":"the \"usage\" field"}}]}"#,
            r#"{"x":"usage"#,
            "not json",
            "",
        ] {
            assert!(!may_report_usage(plain), "{plain}");
        }
        for may in [
            r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"{"usage":null,"choices":[]}"#,
            r#"{"usage":null,"usage":null}"#,
            r#""usage":null}"#,
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":1}}}"#,
            r#"{"\u0075sage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"delta":{"content":"caf\u00e9"}}],"usage":null}"#,
            r#"{"a":"x","usage":null} {"usage":1}"#,
        ] {
            assert!(may_report_usage(may), "{may}");
        }
    }

    #[test]
    fn a_stream_that_reports_usage_at_its_end_is_read_only_there() {
        use ChunkKind::*;
        let (acc, kinds) = run_later(CHAT_WITH_USAGE);
        // The third chunk spells é with an escape: it is read, and the two before it with it.
        assert_eq!(kinds, [None, None, Some(Content), None, Some(UsageOnly), Some(Done)]);
        assert_eq!(acc.usage(), usage(19, 0, 10));
        assert_eq!(acc.held(), (0, 0));
        assert!(acc.saw_done());
        // Once usage is known, the text that was never read is not needed.
        assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
    }

    #[test]
    fn held_chunks_are_read_in_order_when_the_stream_ends_without_usage() {
        for stream in [CHAT_WITHOUT_USAGE, LEGACY_COMPLETIONS, TOOL_CALLS] {
            let (direct, kinds, _) = run(stream, 0);
            let (later, later_kinds) = run_later(stream);
            assert_eq!(later.usage(), direct.usage(), "{stream}");
            if direct.usage().is_none() {
                assert_eq!(later.produced_text(), direct.produced_text(), "{stream}");
            }
            assert_eq!(later.saw_done(), direct.saw_done());
            // What the pump acts on is the same: `[DONE]` and usage-only chunks.
            let acted = |k: Option<ChunkKind>| matches!(k, Some(ChunkKind::Done | ChunkKind::UsageOnly));
            assert_eq!(
                later_kinds.iter().copied().filter(|k| acted(*k)).collect::<Vec<_>>(),
                kinds.iter().copied().filter(|k| acted(Some(*k))).map(Some).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_chunk_naming_usage_without_reporting_it_reads_the_held_chunks_first() {
        let mut acc = StreamAccumulator::new(1 << 10);
        assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"a"}}]}"#.into()), None);
        assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"b"}}]}"#.into()), None);
        let odd = r#"{"usage":"soon","choices":[{"delta":{"content":"c"}}]}"#;
        assert_eq!(acc.observe_later(odd.into()), Some(ChunkKind::Content));
        assert_eq!(acc.held(), (0, 0));
        assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"d"}}]}"#.into()), None);
        acc.finish();
        assert_eq!((acc.usage(), acc.produced_text()), (None, "abcd"));
    }

    #[test]
    fn held_chunks_take_room_from_the_total_a_quantum_at_a_time() {
        let mut acc = StreamAccumulator::new(1 << 10);
        let chunk = format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#, "x".repeat(200));
        let mut takes = 0;
        for _ in 0..12 {
            let before = acc.held_quota;
            assert_eq!(acc.observe_later(chunk.clone()), None);
            takes += usize::from(acc.held_quota != before);
            assert!(acc.held_bytes <= acc.held_quota, "what is held is within the room taken");
        }
        assert_eq!(acc.held().0, 12);
        // 12 chunks of ~260 bytes: 3 KiB, within one quantum (unless other tests filled the
        // total meanwhile, when it takes what each chunk needs).
        assert!(takes == 1 || acc.held_quota == acc.held_bytes, "{takes} takes for a quota of {}", acc.held_quota);
        acc.finish();
        assert_eq!((acc.held_bytes, acc.held_quota), (0, 0), "the room goes back when the stream ends");
    }

    #[test]
    fn chunks_after_a_usage_report_are_neither_held_nor_read() {
        let mut acc = StreamAccumulator::new(1 << 10);
        acc.observe_later(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#.into());
        assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"x"}}]}"#.into()), None);
        assert_eq!(acc.held(), (0, 0));
        acc.finish();
        assert_eq!(acc.usage(), usage(3, 0, 1));
    }

    #[test]
    fn a_stream_holds_at_most_its_bound_and_its_text_stays_whole() {
        let mut acc = StreamAccumulator::new(1 << 20);
        let mut want = String::new();
        for i in 0..2_000 {
            let piece = format!("w{i} ");
            want.push_str(&piece);
            acc.observe_later(format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}"#));
            assert!(acc.held().1 <= MAX_HELD_PER_STREAM);
        }
        assert!(acc.held().0 > 0);
        acc.finish();
        assert_eq!(acc.held(), (0, 0));
        assert_eq!(acc.produced_text(), want);
    }

    #[test]
    fn stream_with_include_usage_reports_usage_in_the_last_chunk() {
        use ChunkKind::*;
        for cut in 0..=CHAT_WITH_USAGE.len() {
            let (acc, kinds, pending) = run(CHAT_WITH_USAGE, cut);
            assert_eq!(kinds, [Content, Content, Content, Content, UsageOnly, Done]);
            assert_eq!(acc.usage(), usage(19, 0, 10));
            assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
            assert!(acc.saw_done());
            assert!(pending.is_empty());
        }
    }

    #[test]
    fn stream_without_usage_keeps_the_text_for_estimation() {
        use ChunkKind::*;
        let (acc, kinds, _) = run(CHAT_WITHOUT_USAGE, 0);
        assert_eq!(kinds, [Content, Content, Content, Done]);
        assert_eq!(acc.usage(), None);
        assert_eq!(acc.produced_text(), "Hi");
        assert!(acc.saw_done());
    }

    #[test]
    fn cut_off_stream_has_no_usage_and_no_done() {
        let cut_at = CHAT_WITH_USAGE.find(r#""choices":[],"#).unwrap();
        let (acc, kinds, pending) = run(&CHAT_WITH_USAGE[..cut_at], usize::MAX);
        assert_eq!(kinds.len(), 4);
        assert_eq!(acc.usage(), None);
        assert!(!acc.saw_done());
        assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
        assert!(pending.starts_with(b"data: {"));
    }

    #[test]
    fn tool_call_deltas_are_kept_as_text() {
        use ChunkKind::*;
        for cut in 0..=TOOL_CALLS.len() {
            let (acc, kinds, _) = run(TOOL_CALLS, cut);
            assert_eq!(kinds, [Content, Content, Content, Content, Content, UsageOnly, Done]);
            assert_eq!(acc.produced_text(), "get_weather{\"location\":\"Paris\"}");
            assert_eq!(acc.usage(), usage(80, 64, 16));
        }
    }

    #[test]
    fn legacy_completions_stream() {
        use ChunkKind::*;
        let (acc, kinds, _) = run(LEGACY_COMPLETIONS, 17);
        assert_eq!(kinds, [Content, Content, Content, UsageOnly, Done]);
        assert_eq!(acc.produced_text(), "\n\nThis is a test.");
        assert_eq!(acc.usage(), usage(5, 0, 6));
    }

    #[test]
    fn responses_api_stream_usage_comes_from_response_completed() {
        let stream = concat!(
            "event: response.created\n",
            r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","usage":null}}"#,
            "\n\n",
            "event: response.output_text.delta\n",
            r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
            "\n\n",
            "event: response.completed\n",
            r#"data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}"#,
            "\n\n",
        );
        let (acc, kinds, _) = run(stream, 100);
        assert_eq!(kinds, [ChunkKind::Content; 3]);
        assert_eq!(acc.usage(), usage(36, 0, 87));
    }

    #[test]
    fn error_object_in_the_stream() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc.observe(
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        );
        assert_eq!(kind, ChunkKind::Error);
        assert_eq!(acc.observe(r#"{"type":"error","code":"server_error","message":"x"}"#), ChunkKind::Error);
        assert_eq!(acc.observe(r#"{"error":"overloaded"}"#), ChunkKind::Error);
        // `"error": null` is not an error.
        assert_eq!(acc.observe(r#"{"choices":[],"error":null}"#), ChunkKind::Content);
    }

    #[test]
    fn done_and_not_json() {
        let mut acc = StreamAccumulator::new(100);
        assert_eq!(acc.observe("hello"), ChunkKind::NotJson);
        assert_eq!(acc.observe(""), ChunkKind::NotJson);
        assert_eq!(acc.observe("{\"choices\": ["), ChunkKind::NotJson);
        assert_eq!(acc.observe("{} trailing"), ChunkKind::NotJson);
        assert!(!acc.saw_done());
        assert_eq!(acc.observe(" [DONE]\n"), ChunkKind::Done);
        assert!(acc.saw_done());
    }

    #[test]
    fn json_that_is_not_an_object_is_content() {
        let mut acc = StreamAccumulator::new(100);
        for data in ["42", "\"text\"", "[1,2]", "null", "true"] {
            assert_eq!(acc.observe(data), ChunkKind::Content, "{data}");
        }
        assert_eq!(acc.produced_text(), "");
    }

    #[test]
    fn azure_prompt_filter_chunk_without_usage_is_content() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc.observe(
            r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
        );
        assert_eq!(kind, ChunkKind::Content);
        assert_eq!(acc.observe(r#"{"choices":[],"usage":null}"#), ChunkKind::Content);
    }

    #[test]
    fn usage_chunk_without_a_choices_key_is_usage_only() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc.observe(r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(kind, ChunkKind::UsageOnly);
        assert_eq!(acc.usage(), usage(3, 0, 4));
    }

    #[test]
    fn usage_chunk_with_garbage_counts_is_still_the_usage_chunk() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc.observe(r#"{"choices":[],"usage":{"prompt_tokens":-3,"completion_tokens":4}}"#);
        assert_eq!(kind, ChunkKind::UsageOnly);
        assert_eq!(acc.usage(), None);
    }

    #[test]
    fn usage_on_every_chunk_keeps_the_latest_and_stays_content() {
        // vLLM's continuous usage stats: running totals on chunks that also carry content.
        let mut acc = StreamAccumulator::new(100);
        let a =
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        let b =
            r#"{"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        assert_eq!(acc.observe(a), ChunkKind::Content);
        assert_eq!(acc.observe(b), ChunkKind::Content);
        assert_eq!(acc.usage(), usage(5, 0, 2));
        // A later broken report does not erase a good one.
        acc.observe(r#"{"choices":[],"usage":{"prompt_tokens":"5"}}"#);
        assert_eq!(acc.usage(), usage(5, 0, 2));
    }

    #[test]
    fn reasoning_refusal_and_legacy_function_call_deltas_are_text() {
        let mut acc = StreamAccumulator::new(100);
        acc.observe(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm "}}]}"#);
        acc.observe(r#"{"choices":[{"index":0,"delta":{"reasoning":"plan "}}]}"#);
        acc.observe(r#"{"choices":[{"index":0,"delta":{"refusal":"no "}}]}"#);
        acc.observe(r#"{"choices":[{"index":0,"delta":{"function_call":{"name":"f","arguments":"{}"}}}]}"#);
        assert_eq!(acc.produced_text(), "hmm plan no f{}");
    }

    #[test]
    fn several_choices_are_all_kept() {
        let mut acc = StreamAccumulator::new(100);
        acc.observe(r#"{"choices":[{"index":0,"delta":{"content":"A"}},{"index":1,"delta":{"content":"B"}}]}"#);
        assert_eq!(acc.produced_text(), "AB");
    }

    #[test]
    fn odd_field_types_do_not_lose_the_rest_of_the_chunk() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc.observe(
            r#"{"choices":[7,{"index":0,"delta":{"content":["x"],"refusal":{"a":1},"tool_calls":"no"},"text":12},{"delta":{"content":"ok"}}],"usage":{"prompt_tokens":2,"completion_tokens":1,"extra":[{"deep":[1,2,{"x":null}]}]}}"#,
        );
        assert_eq!(kind, ChunkKind::Content);
        assert_eq!(acc.produced_text(), "ok");
        assert_eq!(acc.usage(), usage(2, 0, 1));
    }

    #[test]
    fn duplicate_keys_fall_back_to_last_one_wins() {
        let mut acc = StreamAccumulator::new(100);
        let kind = acc
            .observe(r#"{"choices":[{"delta":{"content":"a","content":"b"}}],"choices":[{"delta":{"content":"c"}}]}"#);
        assert_eq!(kind, ChunkKind::Content);
        assert_eq!(acc.produced_text(), "c");
    }

    #[test]
    fn deeply_nested_json_does_not_overflow_the_stack() {
        // Past the few levels metering reads, values are skipped by serde_json without recursion.
        let mut acc = StreamAccumulator::new(100);
        let deep = format!("{{\"choices\":[{}{}]}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(acc.observe(&deep), ChunkKind::Content);
        let deep = format!("{{\"usage\":{{\"x\":{}1{}}}}}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        assert_eq!(acc.observe(&deep), ChunkKind::UsageOnly);
        // With a duplicate key the fallback parses a `Value`, whose depth limit refuses it.
        let deep = format!("{{\"a\":1,\"error\":null,\"error\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(acc.observe(&deep), ChunkKind::NotJson);
        assert_eq!(acc.usage(), None);
    }

    #[test]
    fn text_past_the_bound_is_only_counted() {
        let mut acc = StreamAccumulator::new(10);
        acc.observe(r#"{"choices":[{"delta":{"content":"12345678"}}]}"#);
        acc.observe(r#"{"choices":[{"delta":{"content":"abcd"}}]}"#);
        acc.observe(r#"{"choices":[{"delta":{"content":"x"}}]}"#);
        assert_eq!(acc.produced_text(), "12345678ab");
        assert_eq!(acc.overflow_bytes(), 3);
    }

    #[test]
    fn the_bound_never_splits_a_character() {
        let mut acc = StreamAccumulator::new(5);
        // "é" is 2 bytes: 4 fit, the fifth byte would split the third "é".
        acc.observe(r#"{"choices":[{"delta":{"content":"ééé"}}]}"#);
        assert_eq!(acc.produced_text(), "éé");
        assert_eq!(acc.overflow_bytes(), 2);
        // Nothing more is kept once text has been dropped, even if it would fit.
        acc.observe(r#"{"choices":[{"delta":{"content":"a"}}]}"#);
        assert_eq!(acc.produced_text(), "éé");
        assert_eq!(acc.overflow_bytes(), 3);
    }

    #[test]
    fn zero_bound_keeps_nothing_but_counts_everything() {
        let mut acc = StreamAccumulator::new(0);
        acc.observe(r#"{"choices":[{"delta":{"content":"héllo"}}]}"#);
        assert_eq!(acc.produced_text(), "");
        assert_eq!(acc.overflow_bytes(), 6);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..100).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z\"\\\\é]{0,6}".prop_map(Value::from),
        ];
        let keys = prop_oneof![
            Just("usage"),
            Just("choices"),
            Just("delta"),
            Just("message"),
            Just("content"),
            Just("text"),
            Just("prompt_tokens"),
            Just("completion_tokens"),
            Just("input_tokens"),
            Just("output_tokens"),
            Just("prompt_tokens_details"),
            Just("cached_tokens"),
            Just("tool_calls"),
            Just("function"),
            Just("arguments"),
            Just("name"),
            Just("error"),
            Just("response"),
            Just("type"),
            Just("input_tokens_details"),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((keys.clone(), inner), 0..6).prop_map(|entries| {
                    Value::Object(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_json_never_panics_and_usage_is_sane(v in arb_json()) {
            if let Some(u) = usage_from_json(&v) {
                prop_assert!(u.cached_input_tokens <= u.input_tokens);
                prop_assert!(u.input_tokens <= MAX_REPORTED_TOKENS);
                prop_assert!(u.output_tokens <= MAX_REPORTED_TOKENS);
            }
            let _ = response_text(&v);
            let mut acc = StreamAccumulator::new(8);
            let kind = acc.observe(&v.to_string());
            prop_assert_ne!(kind, ChunkKind::NotJson);
            prop_assert_eq!(acc.usage(), usage_from_json(&v));
            prop_assert!(acc.produced_text().len() <= 8);
        }

        /// Holding chunks unread never changes the usage, nor the text when no usage is
        /// reported, nor what the pump acts on (`[DONE]`, usage-only chunks).
        #[test]
        fn holding_chunks_meters_as_reading_them_all(
            chunks in prop::collection::vec(
                prop_oneof![
                    4 => arb_json().prop_map(|v| v.to_string()),
                    2 => "[a-z]{1,6}".prop_map(|t| format!(r#"{{"choices":[{{"delta":{{"content":"{t}"}}}}],"usage":null}}"#)),
                    1 => Just("[DONE]".to_string()),
                    1 => "\\PC{0,24}",
                ],
                0..12,
            ),
            max in prop_oneof![Just(0usize), Just(7), Just(1 << 16)],
        ) {
            let mut direct = StreamAccumulator::new(max);
            let mut later = StreamAccumulator::new(max);
            for chunk in &chunks {
                let kind = direct.observe(chunk);
                let held = later.observe_later(chunk.clone());
                let acted = matches!(kind, ChunkKind::Done | ChunkKind::UsageOnly);
                prop_assert_eq!(held.is_some_and(|k| k == kind), acted || held.is_some(), "{}", chunk);
                if acted {
                    prop_assert_eq!(held, Some(kind));
                }
            }
            later.finish();
            prop_assert_eq!(later.usage(), direct.usage());
            prop_assert_eq!(later.saw_done(), direct.saw_done());
            if direct.usage().is_none() {
                prop_assert_eq!(later.produced_text(), direct.produced_text());
                prop_assert_eq!(later.overflow_bytes(), direct.overflow_bytes());
            }
            prop_assert_eq!(later.held(), (0, 0));
        }

        /// The skim of a chunk with a usage report answers what reading it in full does.
        #[test]
        fn skimmed_chunks_meter_as_read_ones(
            usage in prop_oneof![
                3 => (0u64..5000, 0u64..5000, prop::option::of(0u64..9000)).prop_map(|(i, o, c)| match c {
                    Some(c) => json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o,
                                      "prompt_tokens_details": {"cached_tokens": c, "audio_tokens": 0}}),
                    None => json!({"input_tokens": i, "output_tokens": o, "input_tokens_details": null}),
                }),
                1 => arb_json(),
            ],
            choices in prop_oneof![Just(None), Just(Some(json!([]))), Just(Some(json!(null))), Just(Some(json!("x"))),
                                   Just(Some(json!([{"delta": {"content": "hi"}}]))), Just(Some(json!([1])))],
            error in prop_oneof![Just(None), Just(Some(json!(null))), Just(Some(json!({"message": "boom"}))), Just(Some(json!(0)))],
            kind in prop_oneof![Just(None), Just(Some(json!("error"))), Just(Some(json!("response.completed"))), Just(Some(json!(7)))],
            extra in prop::option::of(arb_json()),
            pretty in any::<bool>(),
        ) {
            let mut body = serde_json::Map::new();
            body.insert("id".into(), json!("chatcmpl-1"));
            for (key, value) in [("choices", choices), ("error", error), ("type", kind), ("extra", extra)] {
                if let Some(value) = value {
                    body.insert(key.into(), value);
                }
            }
            body.insert("usage".into(), usage);
            let body = Value::Object(body);
            let text = if pretty { serde_json::to_string_pretty(&body).unwrap() } else { body.to_string() };
            let mut read = StreamAccumulator::new(0);
            let read_kind = read.observe(&text);
            // (When the skim cannot tell, the full reader decides: nothing to compare.)
            if let Some((usage, kind)) = skim_top(&text) {
                prop_assert_eq!(Some(usage), read.usage(), "{}", text);
                prop_assert_eq!(kind, read_kind, "{}", text);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,64}") {
            let mut acc = StreamAccumulator::new(8);
            let _ = acc.observe(&s);
        }
    }
}
