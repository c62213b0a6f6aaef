//! The shape of a record write, the same on every backend and driver: which row of a batch
//! each request gets, the statement sizes a batch is cut into, the INSERT's columns and its
//! conflict clause. Each backend builds its statements from these (`postgres.rs` through
//! sqlx, `sqlite/record_conn.rs` through rusqlite).

use super::to_i64;
use crate::ledger::journal::LineOp;
use crate::ledger::{RequestRecord, UsageSource};

/// The conflict clause of every record insert (same SQL on both backends): a final record
/// replaces the row, a journal entry never does.
pub(crate) const UPSERT: &str = " ON CONFLICT (request_id) DO UPDATE SET time_ms = excluded.time_ms, \
    key_id = excluded.key_id, team = excluded.team, endpoint = excluded.endpoint, model = excluded.model, \
    served_model = excluded.served_model, input_tokens = excluded.input_tokens, \
    cached_input_tokens = excluded.cached_input_tokens, output_tokens = excluded.output_tokens, \
    cost_nano = excluded.cost_nano, usage_source = excluded.usage_source, status = excluded.status, \
    latency_ms = excluded.latency_ms, stream = excluded.stream \
    WHERE excluded.usage_source <> 'pending'";

/// One row per request of a batch, in order of first appearance: the last final record wins,
/// and a journal entry counts only while no final record of its request is in the batch
/// (one statement may not touch a row twice, and this is what applying them in order means).
pub(crate) fn latest_per_request<'a>(records: &[&'a RequestRecord]) -> Vec<&'a RequestRecord> {
    let mut out: Vec<&RequestRecord> = Vec::with_capacity(records.len());
    let mut at: foldhash::HashMap<&str, usize> = foldhash::HashMapExt::with_capacity(records.len());
    for &r in records {
        match at.get(r.request_id.as_str()) {
            None => {
                at.insert(&r.request_id, out.len());
                out.push(r);
            }
            Some(&i) if r.usage_source != UsageSource::Pending => out[i] = r,
            Some(_) => {}
        }
    }
    out
}

/// `rows` split into consecutive statements of the sizes [`pow2_chunks`] gives.
pub(crate) fn pow2_split<T>(rows: &[T], max: usize) -> Vec<&[T]> {
    let mut rest = rows;
    pow2_chunks(rows.len(), max)
        .into_iter()
        .map(|len| {
            let (chunk, after) = rest.split_at(len);
            rest = after;
            chunk
        })
        .collect()
}

/// Splits `n` rows into statement sizes that are powers of two, largest first, none over
/// `max` (rounded down to a power of two).
pub(crate) fn pow2_chunks(n: usize, max: usize) -> Vec<usize> {
    let max = if max == 0 { 1 } else { 1 << max.ilog2() };
    let mut left = n;
    let mut out = Vec::new();
    while left >= max {
        out.push(max);
        left -= max;
    }
    let mut size = max;
    while left > 0 {
        size /= 2;
        if left >= size {
            out.push(size);
            left -= size;
        }
    }
    out
}

/// Columns of one request record (the INSERT's bound parameters per row).
pub(crate) const RECORD_COLUMNS: usize = 15;

/// The head of every record insert: its columns, in the order [`record_columns`] gives
/// their values.
pub(crate) const INSERT_INTO: &str =
    "INSERT INTO requests (request_id, time_ms, key_id, team, endpoint, model, served_model, \
    input_tokens, cached_input_tokens, output_tokens, cost_nano, usage_source, status, latency_ms, stream) ";

/// One bound value of a record.
pub(crate) enum Column<'a> {
    Text(&'a str),
    Int(i64),
    Bool(bool),
}

/// A record's values in [`INSERT_INTO`]'s column order, as every write path binds them
/// (sqlx's for both backends, and the SQLite record connection's).
pub(crate) fn record_columns(r: &RequestRecord) -> [Column<'_>; RECORD_COLUMNS] {
    use Column::{Bool, Int, Text};
    [
        Text(&r.request_id),
        Int(r.time_ms),
        Text(&r.key_id),
        Text(&r.team),
        Text(r.endpoint),
        Text(&r.model),
        Text(&r.served_model),
        Int(to_i64(r.usage.input_tokens)),
        Int(to_i64(r.usage.cached_input_tokens)),
        Int(to_i64(r.usage.output_tokens)),
        Int(r.cost.0),
        Text(r.usage_source.as_str()),
        Int(i64::from(r.status)),
        Int(to_i64(r.latency_ms)),
        Bool(r.stream),
    ]
}

/// The text of an upsert of `rows` records: [`INSERT_INTO`], `rows` tuples of parameters
/// numbered from 1 after `sigil` (`$` in PostgreSQL, `?` in SQLite), then [`UPSERT`].
/// Backends build each size once and keep it: formatting a placeholder per bound value is
/// work a batch need not repeat.
pub(crate) fn upsert_sql(rows: usize, sigil: char) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(INSERT_INTO.len() + UPSERT.len() + rows * RECORD_COLUMNS * 7);
    sql.push_str(INSERT_INTO);
    sql.push_str("VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..RECORD_COLUMNS {
            let sep = if column == 0 { "" } else { ", " };
            let _ = write!(sql, "{sep}{sigil}{}", row * RECORD_COLUMNS + column + 1);
        }
        sql.push(')');
    }
    sql.push_str(UPSERT);
    sql
}

/// Deletes a request's journal entry, never its final record (the one parameter is the id).
pub(crate) const RETRACT: &str = "DELETE FROM requests WHERE request_id = $1 AND usage_source = 'pending'";

/// Marks every journal entry as a request that was in flight when its server died.
pub(crate) const MARK_INTERRUPTED: &str =
    "UPDATE requests SET usage_source = 'interrupted' WHERE usage_source = 'pending'";

/// A batch cut into runs of the same operation, in order: each run is one step of its
/// transaction (writes as multi-row upserts, retractions one statement each).
pub(crate) fn runs(batch: &[(LineOp, RequestRecord)]) -> Vec<(LineOp, Vec<&RequestRecord>)> {
    let mut out: Vec<(LineOp, Vec<&RequestRecord>)> = Vec::new();
    for (op, record) in batch {
        match out.last_mut() {
            Some((last, run)) if last == op => run.push(record),
            _ => out.push((*op, vec![record])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pow2_chunks;

    #[test]
    fn batches_split_into_power_of_two_statements() {
        assert_eq!(pow2_chunks(0, 1024), Vec::<usize>::new());
        assert_eq!(pow2_chunks(1, 1024), [1]);
        assert_eq!(pow2_chunks(13, 1024), [8, 4, 1]);
        assert_eq!(pow2_chunks(2_500, 1_000), [512, 512, 512, 512, 256, 128, 64, 4]);
        for n in 0..3_000 {
            let chunks = pow2_chunks(n, 2_133);
            assert_eq!(chunks.iter().sum::<usize>(), n);
            assert!(chunks.iter().all(|c| c.is_power_of_two() && *c <= 2_048));
        }
    }

    #[test]
    fn an_upsert_numbers_its_parameters_row_by_row() {
        let sql = super::upsert_sql(2, '?');
        assert!(sql.starts_with(super::INSERT_INTO), "{sql}");
        assert!(sql.contains("VALUES (?1, ?2, "), "{sql}");
        assert!(sql.contains("?15), (?16, "), "{sql}");
        assert!(sql.contains("?30) ON CONFLICT"), "{sql}");
    }

    #[test]
    fn split_batches_are_the_rows_in_order() {
        let rows: Vec<usize> = (0..2_500).collect();
        let chunks = super::pow2_split(&rows, 1_000);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), pow2_chunks(2_500, 1_000));
        assert_eq!(chunks.concat(), rows);
        assert!(super::pow2_split::<usize>(&[], 1_000).is_empty());
    }
}
