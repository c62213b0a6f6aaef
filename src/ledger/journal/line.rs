//! A journal line: one operation and its record, as one line of JSON. Lines written by
//! older versions (through `serde_json`) and by this one read the same.

use serde::{Deserialize, Serialize};

use crate::ledger::{RequestRecord, UsageSource};
use crate::policy::pricing::{NanoUsd, Usage};

/// What a journal line asks of the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineOp {
    /// Write the record (a journal entry never overwrites; a final record does).
    #[serde(rename = "w")]
    Write,
    /// Delete the request's journal entry.
    #[serde(rename = "r")]
    Retract,
}

/// One journal line: an operation and its record, as JSON.
#[derive(Serialize, Deserialize)]
pub(super) struct Line<'a> {
    pub(super) op: LineOp,
    #[serde(borrow)]
    pub(super) id: std::borrow::Cow<'a, str>,
    pub(super) t: i64,
    #[serde(borrow)]
    pub(super) key: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(super) team: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(super) ep: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(super) model: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(super) served: std::borrow::Cow<'a, str>,
    pub(super) inp: u64,
    pub(super) cached: u64,
    pub(super) out: u64,
    pub(super) cost: i64,
    pub(super) src: UsageSource,
    pub(super) status: u16,
    pub(super) ms: u64,
    pub(super) stream: bool,
}

/// Encodes `record` as one journal line (ending in `\n`): the JSON `serde_json` writes for
/// [`Line`], written directly: every request encodes two lines, and serde's per-byte string
/// escaping and per-field calls would be a noticeable share of a request's work; here the
/// strings (ids, names, model names: nothing to escape, as a rule) are copied whole.
pub(crate) fn encode(op: LineOp, r: &RequestRecord) -> Vec<u8> {
    // A line is ~250 bytes with typical ids and names.
    let mut buf = Vec::with_capacity(384);
    buf.extend_from_slice(match op {
        LineOp::Write => b"{\"op\":\"w\",\"id\":",
        LineOp::Retract => b"{\"op\":\"r\",\"id\":",
    });
    json_str(&mut buf, &r.request_id);
    json_int(&mut buf, b",\"t\":", r.time_ms);
    buf.extend_from_slice(b",\"key\":");
    json_str(&mut buf, &r.key_id);
    buf.extend_from_slice(b",\"team\":");
    json_str(&mut buf, &r.team);
    buf.extend_from_slice(b",\"ep\":");
    json_str(&mut buf, r.endpoint);
    buf.extend_from_slice(b",\"model\":");
    json_str(&mut buf, &r.model);
    buf.extend_from_slice(b",\"served\":");
    json_str(&mut buf, &r.served_model);
    json_int(&mut buf, b",\"inp\":", r.usage.input_tokens);
    json_int(&mut buf, b",\"cached\":", r.usage.cached_input_tokens);
    json_int(&mut buf, b",\"out\":", r.usage.output_tokens);
    json_int(&mut buf, b",\"cost\":", r.cost.0);
    buf.extend_from_slice(b",\"src\":\"");
    buf.extend_from_slice(r.usage_source.as_str().as_bytes());
    json_int(&mut buf, b"\",\"status\":", r.status);
    json_int(&mut buf, b",\"ms\":", r.latency_ms);
    buf.extend_from_slice(if r.stream { b",\"stream\":true}\n" } else { b",\"stream\":false}\n" });
    buf
}

fn json_int(buf: &mut Vec<u8>, key: &[u8], n: impl itoa::Integer) {
    buf.extend_from_slice(key);
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it: `"` and `\\`, and the
/// control characters below U+0020 (short forms where JSON has them); nothing else.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let bytes = s.as_bytes();
    // Usually nothing to escape: checked eight bytes at a time.
    if !needs_escape(bytes) {
        buf.extend_from_slice(bytes);
        buf.push(b'"');
        return;
    }
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            buf.extend_from_slice(escape);
        }
    }
    buf.extend_from_slice(&bytes[plain..]);
    buf.push(b'"');
}

/// Whether `bytes` holds a byte a JSON string must escape: `"`, `\\` or one below 0x20.
/// Eight bytes a step, with the classic word tricks: `w - 0x01…01 * n & !w & 0x80…80` is
/// non-zero exactly when some byte of `w` is below `n` (for `n` ≤ 0x80), and a byte equal
/// to `c` is a zero byte of `w ^ c…c`.
pub(super) fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let Ok(word) = <[u8; 8]>::try_from(word) else { return true };
        let w = u64::from_le_bytes(word);
        if below(w, 0x20) || below(w ^ (ONES * u64::from(b'"')), 1) || below(w ^ (ONES * u64::from(b'\\')), 1) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Decodes one journal line; `None` for a torn or foreign line.
pub(crate) fn decode(text: &str) -> Option<(LineOp, RequestRecord)> {
    let l: Line<'_> = serde_json::from_str(text).ok()?;
    let record = RequestRecord {
        request_id: l.id.into_owned(),
        time_ms: l.t,
        key_id: l.key.into_owned(),
        team: l.team.into_owned(),
        endpoint: crate::policy::request::Endpoint::from_name(&l.ep),
        model: l.model.into_owned(),
        served_model: l.served.into_owned(),
        usage: Usage { input_tokens: l.inp, cached_input_tokens: l.cached, output_tokens: l.out },
        cost: NanoUsd(l.cost),
        usage_source: l.src,
        status: l.status,
        latency_ms: l.ms,
        stream: l.stream,
    };
    Some((l.op, record))
}
