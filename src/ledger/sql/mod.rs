//! SQL both backends share, by concern: `writes.rs` (the shape of a record write), `rows.rs`
//! (rows read back into types), `directory.rs` (teams, keys and the directory version) and
//! `reports.rs` (spend and logs). The queries are macros, generated into each backend's
//! `impl` with its dialect's few differences as arguments; each backend's own SQL (its
//! record writes, its connections) is in its own file.

mod directory;
mod reports;
mod rows;
mod writes;

pub(crate) use directory::directory_queries;
pub(crate) use reports::report_queries;
pub(crate) use rows::row_mappers;
pub(crate) use writes::{
    latest_per_request, pow2_split, record_columns, runs, upsert_sql, Column, MARK_INTERRUPTED, RECORD_COLUMNS, RETRACT,
};

use crate::policy::budget::Period;

/// Column values shared by teams and keys, for the backends.
pub(crate) fn models_to_json(models: &[String]) -> String {
    serde_json::to_string(models).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn models_from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(crate) fn period_from_str(text: &str) -> Period {
    text.parse().unwrap_or(Period::Monthly)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn hash_to_hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn hash_from_hex(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = hex.get(i * 2..i * 2 + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    out
}
