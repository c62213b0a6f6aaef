//! Measures: the exact count and the byte bound share one walk over the body, so that the bound
//! holds term by term: each string measured by the bound is at least its exact token count, and
//! every constant is added identically by both.

use bpe_openai::Tokenizer;
use serde_json::Value;

use super::image::image_size_from_data_url;
use super::py_json::{write_py_json, JsonLen};

pub(super) trait Measure {
    /// Tokens in `s`.
    fn text(&self, s: &str) -> u64;
    /// Tokens in the concatenation of `parts` (BPE pieces can straddle the joins).
    fn joined(&self, parts: &[&str]) -> u64;
    /// Tokens in `v` dumped as Python's `json.dumps(v, separators=(",", ":"))` does.
    fn json(&self, v: &Value) -> u64;
    /// An image's pixel size, if this measure reads image headers; `None` means "charge the worst
    /// case".
    fn image_size(&self, url: &str) -> Option<(u64, u64)>;
}

pub(super) struct Exact(pub(super) &'static Tokenizer);

impl Measure for Exact {
    fn text(&self, s: &str) -> u64 {
        to_u64(self.0.count(s))
    }

    fn joined(&self, parts: &[&str]) -> u64 {
        self.text(&parts.concat())
    }

    fn json(&self, v: &Value) -> u64 {
        let mut out = String::new();
        write_py_json(v, &mut out);
        self.text(&out)
    }

    fn image_size(&self, url: &str) -> Option<(u64, u64)> {
        image_size_from_data_url(url)
    }
}

/// One token per byte at most: the bound behind [`prompt_tokens_upper_bound`](super::prompt_tokens_upper_bound).
pub(super) struct ByteBound;

impl Measure for ByteBound {
    fn text(&self, s: &str) -> u64 {
        to_u64(s.len())
    }

    fn joined(&self, parts: &[&str]) -> u64 {
        parts.iter().map(|p| to_u64(p.len())).sum()
    }

    fn json(&self, v: &Value) -> u64 {
        let mut len = JsonLen(0);
        write_py_json(v, &mut len);
        len.0
    }

    fn image_size(&self, _url: &str) -> Option<(u64, u64)> {
        // Decoding base64 would cost as much as the BPE saves; the worst case bounds every size.
        None
    }
}

pub(super) fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A running total that may dip below zero mid-way (the tool rule has a negative constant) and
/// saturates instead of overflowing.
#[derive(Default)]
pub(super) struct Tally(i64);

impl Tally {
    pub(super) fn add(&mut self, n: u64) {
        self.0 = self.0.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(super) fn add_signed(&mut self, n: i64) {
        self.0 = self.0.saturating_add(n);
    }

    pub(super) fn total(&self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }
}
