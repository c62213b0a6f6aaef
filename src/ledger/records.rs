//! What the ledger stores and reads back: a request's record and its id, teams, keys, and
//! the filters and sums of spend and log queries. Plain data; no I/O.

use serde::{Deserialize, Serialize};

use crate::policy::budget::BudgetSpec;
use crate::policy::pricing::{NanoUsd, Usage};

/// Where a record's token counts came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The upstream's `usage`, as reported.
    Reported,
    /// Counted locally with the model's tokenizer because the upstream reported none.
    Estimated,
    /// In flight: journaled when forwarded, replaced by the final record when it settles.
    Pending,
    /// Was in flight when the server died: charged its prompt (what the upstream certainly billed).
    Interrupted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::Pending => "pending",
            UsageSource::Interrupted => "interrupted",
        }
    }
}

/// Hex digits of the start time in a request id.
const ID_TIME_DIGITS: usize = 12;

/// A new request id: `req_`, the start time (Unix ms) as 12 lower-case hex digits, then 64
/// random bits in hex. Ids therefore sort by start time: the requests table's primary key
/// serves as its time index (spend queries over a time range) and as the logs' cursor.
pub fn new_request_id(time_ms: i64) -> String {
    request_id_with(time_ms, rand::random::<u64>())
}

/// The id of a request started at `time_ms` with `random` as its random bits, written digit
/// by digit: every request makes one, and `format!`'s padded hex fields cost a measurable
/// share of a request's instructions.
fn request_id_with(time_ms: i64, random: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Clamped into 0..=max_id_time(): non-negative, and 12 hex digits hold it.
    let time = time_ms.clamp(0, max_id_time()).unsigned_abs();
    let mut id = String::with_capacity(4 + ID_TIME_DIGITS + 16);
    id.push_str("req_");
    let digits = (0..ID_TIME_DIGITS)
        .rev()
        .map(|i| (time >> (4 * i)) & 0xf)
        .chain((0..16).rev().map(|i| (random >> (4 * i)) & 0xf));
    id.extend(digits.map(|d| char::from(HEX[d as usize])));
    id
}

/// Whether `s` is a request id as [`new_request_id`] writes them (`req_`, then the time's and
/// the random bits' lower-case hex digits).
pub fn is_request_id(s: &str) -> bool {
    let digits = s.strip_prefix("req_").unwrap_or("");
    digits.len() == ID_TIME_DIGITS + 16 && digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn max_id_time() -> i64 {
    (1i64 << (4 * ID_TIME_DIGITS)) - 1
}

/// The smallest id a request started at `time_ms` can have; `None` past the ids' range.
pub(crate) fn request_id_floor(time_ms: i64) -> Option<String> {
    (time_ms <= max_id_time()).then(|| format!("req_{:0width$x}", time_ms.max(0), width = ID_TIME_DIGITS))
}

/// One forwarded request, as recorded.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// See [`new_request_id`]: the time it starts with is `time_ms`.
    pub request_id: String,
    /// Start of the request, Unix ms.
    pub time_ms: i64,
    pub key_id: String,
    pub team: String,
    pub endpoint: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// The model that served it (after downgrade or fallback).
    pub served_model: String,
    pub usage: Usage,
    pub cost: NanoUsd,
    pub usage_source: UsageSource,
    /// The HTTP status the client received.
    pub status: u16,
    pub latency_ms: u64,
    pub stream: bool,
}

/// A team as stored.
#[derive(Clone, Debug)]
pub struct TeamRow {
    pub name: String,
    pub budget: BudgetSpec,
    pub created_ms: i64,
}

/// A virtual key as stored (never the secret).
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub team: String,
    pub name: String,
    /// SHA-256 of the secret.
    pub key_hash: [u8; 32],
    /// The first characters of the secret, for display (`tg-AbC1…`).
    pub prefix: String,
    pub budget: BudgetSpec,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Filters for spend queries. Times are Unix ms; `to` is exclusive.
#[derive(Clone, Debug, Default)]
pub struct SpendFilter {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
}

/// Columns spend can be grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Team,
    Key,
    Model,
    Day,
}

/// Sums over a set of records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpendTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost: NanoUsd,
}

/// One group of a grouped spend query: its labels in `GroupBy` order, and its sums.
#[derive(Clone, Debug)]
pub struct SpendGroup {
    pub labels: Vec<(GroupBy, String)>,
    pub totals: SpendTotals,
}

/// A page of request records, newest first.
#[derive(Clone, Debug)]
pub struct LogPage {
    pub records: Vec<RequestRecord>,
    pub next_before: Option<String>,
}

/// Filters for the request log.
#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    pub before: Option<String>,
    pub team: Option<String>,
    pub key_id: Option<String>,
    pub limit: u32,
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        /// Ids read as they always have: `req_`, 12 hex digits of the (clamped) start time,
        /// 16 of the random bits.
        #[test]
        fn request_ids_are_time_then_random_in_hex(time in proptest::prelude::any::<i64>(), random in proptest::prelude::any::<u64>()) {
            let expected = format!("req_{:012x}{random:016x}", time.clamp(0, super::max_id_time()));
            proptest::prop_assert_eq!(super::request_id_with(time, random), expected);
        }
    }
}
