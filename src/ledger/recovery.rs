//! Start-up recovery: what an earlier run left in the journal is applied to the database,
//! in order, before the server takes requests.

use std::path::Path;
use std::sync::Arc;

use super::journal::{Journal, LineOp};
use super::writer::MAX_BATCH;
use super::{Backend, LedgerError, RequestRecord, UsageSource};

/// Applies what an earlier run left in the journal, in order, then marks requests still in
/// flight then as `interrupted`. Returns (lines replayed, torn lines, requests interrupted).
pub async fn recover(
    backend: &Backend,
    journal_dir: &Path,
    segment_bytes: u64,
) -> Result<(Journal, (usize, usize, u64)), LedgerError> {
    let (journal, mut leftovers) = Journal::open(journal_dir, segment_bytes)?;
    let lines = std::mem::take(&mut leftovers.lines);
    let replayed = lines.len();
    let in_flight = in_flight(&lines);
    let mut lines = lines.into_iter().peekable();
    while lines.peek().is_some() {
        let batch = Arc::new(lines.by_ref().take(MAX_BATCH).collect());
        backend.apply(&batch).await?;
    }
    let torn = leftovers.torn;
    let interrupted = backend.mark_interrupted(&in_flight).await?;
    leftovers.discard();
    Ok((journal, (replayed, torn, interrupted)))
}

/// The requests the journal leaves in flight: an entry with no final record or retraction
/// after it.
fn in_flight(lines: &[(LineOp, RequestRecord)]) -> Vec<String> {
    let mut open: Vec<&str> = Vec::new();
    for (op, record) in lines {
        let id = record.request_id.as_str();
        match op {
            LineOp::Write if record.usage_source == UsageSource::Pending => open.push(id),
            _ => open.retain(|o| *o != id),
        }
    }
    open.into_iter().map(str::to_owned).collect()
}
