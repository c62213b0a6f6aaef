//! Following a streamed response: the usage it reports and the text it generates, with chunks
//! that cannot report usage held unread (within bounds) until the stream's end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::error::Category;
use serde_json::Value;

use super::answer::skim_top;
use super::lenient::Field;
use super::view::Body;
use super::{ChunkKind, Usage};

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
    pub(super) held_bytes: usize,
    /// Bytes this stream has taken from the all-streams total for holding (at least
    /// `held_bytes`): taken a quantum at a time, so two workers' streams do not bounce the
    /// total's cache line between cores on every chunk.
    pub(super) held_quota: usize,
}

/// Chunk bytes one stream may hold unread.
pub(super) const MAX_HELD_PER_STREAM: usize = 64 * 1024;
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
pub(super) fn may_report_usage(data: &str) -> bool {
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
    pub(super) fn held(&self) -> (usize, usize) {
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
