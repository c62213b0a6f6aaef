//! The write-ahead journal: every record is appended to a local file before anyone relies on
//! it, and the database is written from memory behind it, in batches, off the request path.
//!
//! An append is one `write(2)` to a file opened `O_APPEND`: once it returns, the line is in
//! the kernel and survives the process being killed (`kill -9`, OOM, panic) — the same
//! promise an SQLite WAL commit with `synchronous = NORMAL` makes, at the cost of a system call
//! instead of a round trip through the database. No lock of ours is held across the write;
//! concurrent appends are atomic per line (`O_APPEND`).
//!
//! On a server worker thread, appends are grouped: the lines appended while the worker's
//! event loop runs one turn are written together, in one `write(2)`, when the loop is about
//! to wait for I/O, and each appender resumes only after that write (so "appended before
//! forwarding / before the last byte" holds as before). At 64 concurrent requests this
//! cut the journal's writes per request from two to about 0.12 and the gateway's CPU per
//! request by about 8% (docs/benchmarks.md). After a turn with at most one append, the
//! next turn's appends are written at once: one request at a time has nothing to share a
//! write with, and waiting for the turn's end would only add a wake-up.
//!
//! The journal is a folder of numbered segments. The current one takes appends until it is
//! `SEGMENT_BYTES` long, then a new one is started. A segment is deleted when it is no longer
//! current and every record appended to it has been committed to the database (each queued
//! record holds a [`Pin`] on its segment). A record dropped uncommitted (the process stopping
//! with the database down) marks its segment to be kept. On start, leftover segments are
//! replayed into the database in order — every write is an idempotent upsert — and removed.
//!
//! One process owns a journal folder at a time (an exclusive file lock); a second server
//! pointed at the same folder refuses to start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{RequestRecord, UsageSource};
use crate::metering::usage::Usage;
use crate::pricing::NanoUsd;

/// A segment takes appends until it is this long, unless configured otherwise.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

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
struct Line<'a> {
    op: LineOp,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    t: i64,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    team: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    ep: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    served: std::borrow::Cow<'a, str>,
    inp: u64,
    cached: u64,
    out: u64,
    cost: i64,
    src: UsageSource,
    status: u16,
    ms: u64,
    stream: bool,
}

/// Encodes `record` as one journal line (ending in `\n`).
pub(crate) fn encode(op: LineOp, r: &RequestRecord) -> Vec<u8> {
    use std::borrow::Cow::Borrowed;
    let line = Line {
        op,
        id: Borrowed(&r.request_id),
        t: r.time_ms,
        key: Borrowed(&r.key_id),
        team: Borrowed(&r.team),
        ep: Borrowed(r.endpoint),
        model: Borrowed(&r.model),
        served: Borrowed(&r.served_model),
        inp: r.usage.input_tokens,
        cached: r.usage.cached_input_tokens,
        out: r.usage.output_tokens,
        cost: r.cost.0,
        src: r.usage_source,
        status: r.status,
        ms: r.latency_ms,
        stream: r.stream,
    };
    let mut buf = Vec::with_capacity(256);
    // Serializing plain strings and integers cannot fail.
    let _ = serde_json::to_writer(&mut buf, &line);
    buf.push(b'\n');
    buf
}

/// Decodes one journal line; `None` for a torn or foreign line.
pub(crate) fn decode(text: &str) -> Option<(LineOp, RequestRecord)> {
    let l: Line<'_> = serde_json::from_str(text).ok()?;
    let record = RequestRecord {
        request_id: l.id.into_owned(),
        time_ms: l.t,
        key_id: l.key.into_owned(),
        team: l.team.into_owned(),
        endpoint: crate::request::Endpoint::from_name(&l.ep),
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

/// One segment file.
pub(crate) struct Segment {
    path: PathBuf,
    file: File,
    len: AtomicU64,
    /// Set when a record appended here was dropped before it was committed: keep the file
    /// for the next start to replay.
    keep: AtomicBool,
}

impl Drop for Segment {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Acquire) {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "could not remove a journal segment");
                }
            }
        }
    }
}

/// A queued record's hold on the segment it was appended to. `commit` releases it; dropping it
/// uncommitted keeps the segment on disk.
pub struct Pin {
    segment: Arc<Segment>,
    committed: bool,
}

impl Clone for Pin {
    /// Another hold on the same segment, released on its own.
    fn clone(&self) -> Pin {
        Pin { segment: self.segment.clone(), committed: false }
    }
}

impl Pin {
    /// Releases the hold: the record is committed to the database.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if !self.committed {
            self.segment.keep.store(true, Ordering::Release);
        }
    }
}

/// The journal folder of one server.
pub struct Journal {
    dir: PathBuf,
    current: Mutex<Arc<Segment>>,
    next_number: AtomicU64,
    segment_bytes: u64,
    failing: AtomicBool,
    /// `write(2)` calls that appended lines (a grouped write counts once).
    writes: AtomicU64,
    /// Held for the journal's life: the folder's exclusive lock.
    _lock: File,
}

/// What replaying a journal found.
pub struct Leftovers {
    /// Lines to apply, in the order they were appended.
    pub lines: Vec<(LineOp, RequestRecord)>,
    /// Lines that could not be read (a line torn by a crash mid-write).
    pub torn: usize,
    files: Vec<PathBuf>,
}

impl Leftovers {
    /// Removes the replayed segments once their lines are committed.
    pub fn discard(self) {
        for path in self.files {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a replayed journal segment");
            }
        }
    }
}

impl Journal {
    /// Opens (creating) the journal folder, takes its lock, and reads what an earlier run left
    /// behind. The caller applies the leftovers to the database, then discards them.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Journal, Leftovers)> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("journal folder {} is in use by another tollgate process", dir.display()),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut numbered = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(number) = name.to_str().and_then(segment_number) else { continue };
            numbered.push((number, entry.path()));
        }
        numbered.sort();
        let next = numbered.last().map_or(1, |(n, _)| n + 1);
        let mut leftovers = Leftovers { lines: Vec::new(), torn: 0, files: Vec::new() };
        for (_, path) in numbered {
            // Only regular files hold lines (a name may be taken by something else).
            if !fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
                continue;
            }
            let bytes = fs::read(&path)?;
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match std::str::from_utf8(line).ok().and_then(decode) {
                    Some(entry) => leftovers.lines.push(entry),
                    None => leftovers.torn += 1,
                }
            }
            leftovers.files.push(path);
        }
        let first = Arc::new(Segment::create(dir, next)?);
        let journal = Journal {
            dir: dir.to_path_buf(),
            current: Mutex::new(first),
            next_number: AtomicU64::new(next + 1),
            segment_bytes: segment_bytes.max(1),
            failing: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            _lock: lock,
        };
        Ok((journal, leftovers))
    }

    /// Whether the last append failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// How many writes appended lines so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Appends `record` with `op` (as the ledger does; public for benchmarks and tools).
    pub fn append_record(&self, op: LineOp, record: &RequestRecord) -> io::Result<Pin> {
        self.append(&encode(op, record))
    }

    /// Appends one line; once this returns `Ok`, the line survives the process dying. A
    /// failed write is tried once more on a fresh segment (space may have been freed since
    /// the current one failed).
    pub(crate) fn append(&self, line: &[u8]) -> io::Result<Pin> {
        match self.try_append(line) {
            Ok(pin) => Ok(pin),
            Err(_) => self.try_append(line),
        }
    }

    /// Appends one line like [`Journal::append`], but on a thread that groups appends (a
    /// server worker, see [`group_appends_on_this_thread`]) the line waits for the end of
    /// the worker's event-loop turn and goes out in one `write(2)` with every other line
    /// appended in that turn. It returns once that write has; elsewhere it writes at once.
    pub(crate) async fn append_grouped(self: &Arc<Self>, line: Vec<u8>) -> io::Result<Pin> {
        let done = GROUP.with(|g| {
            let mut group = g.borrow_mut();
            let group = group.as_mut()?;
            group.appends_this_turn = group.appends_this_turn.saturating_add(1);
            group.grouping.then(|| group.add(self, line.as_slice()))
        });
        let Some(done) = done else {
            return self.append(&line);
        };
        match done.await {
            Ok(result) => result,
            // The thread's group went away unflushed (its runtime is stopping): write it alone.
            Err(_) => self.append(&line),
        }
    }

    fn try_append(&self, line: &[u8]) -> io::Result<Pin> {
        let mut segment = self.current();
        if segment.len.load(Ordering::Relaxed) >= self.segment_bytes {
            self.rotate(&segment);
            segment = self.current();
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        match (&segment.file).write_all(line) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %segment.path.display(), "journal appends work again");
                }
                segment.len.fetch_add(line.len() as u64, Ordering::Relaxed);
                Ok(Pin { segment, committed: false })
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(path = %segment.path.display(), error = %e, "journal append failed");
                }
                // A partial line may be in this segment: keep it for the next start (a torn
                // line is skipped there) and move later appends to a fresh file.
                segment.keep.store(true, Ordering::Release);
                self.rotate(&segment);
                Err(e)
            }
        }
    }

    fn current(&self) -> Arc<Segment> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts a new segment unless another append already replaced `full`. The file is
    /// created before the lock is taken: the lock only swaps a pointer.
    fn rotate(&self, full: &Arc<Segment>) {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let fresh = match Segment::create(&self.dir, number) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "could not start a journal segment");
                return;
            }
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, full) {
            *current = fresh;
        }
        // else: `fresh` is dropped unused, and its empty file removed.
    }
}

impl Segment {
    fn create(dir: &Path, number: u64) -> io::Result<Segment> {
        let path = dir.join(format!("{number:012}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Segment { path, file, len: AtomicU64::new(len), keep: AtomicBool::new(false) })
    }
}

/// The lines appended on one worker thread during its current event-loop turn, and who
/// waits for them.
struct Group {
    journal: Option<Arc<Journal>>,
    lines: Vec<u8>,
    waiting: Vec<tokio::sync::oneshot::Sender<io::Result<Pin>>>,
    /// Whether appends wait for the end of the turn. Off after a turn with at most one
    /// append: with nothing to share a write with, an append is written at once (waiting
    /// would only cost the wake-up and, in tokio, one more poll of the I/O driver).
    grouping: bool,
    appends_this_turn: u32,
}

type Done = tokio::sync::oneshot::Receiver<io::Result<Pin>>;

impl Group {
    fn add(&mut self, journal: &Arc<Journal>, line: &[u8]) -> Done {
        if self.journal.as_ref().is_some_and(|j| !Arc::ptr_eq(j, journal)) {
            // Another server's journal on this thread (tests run several): write what is
            // grouped for the first before taking lines for the second.
            self.flush();
        }
        self.journal.get_or_insert_with(|| journal.clone());
        self.lines.extend_from_slice(line);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.push(tx);
        if self.lines.len() >= GROUP_BYTES {
            self.flush();
        }
        rx
    }

    /// Writes the grouped lines in one append and tells every waiter how it went.
    fn flush(&mut self) {
        let Some(journal) = self.journal.take() else { return };
        let result = journal.append(&self.lines);
        self.lines.clear();
        for tx in self.waiting.drain(..) {
            let _ = tx.send(match &result {
                Ok(pin) => Ok(pin.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        // `result`'s own pin is dropped here as committed: each waiter holds a copy.
        if let Ok(pin) = result {
            pin.commit();
        }
        if self.lines.capacity() > 4 * GROUP_BYTES {
            self.lines = Vec::new();
        }
    }

    /// The event loop is about to wait: write the group, and group the next turn's appends
    /// only if this turn had more than one.
    fn end_turn(&mut self) {
        self.flush();
        self.grouping = self.appends_this_turn > 1;
        self.appends_this_turn = 0;
    }
}

/// A group is written at once when it reaches this many bytes, turn over or not.
const GROUP_BYTES: usize = 64 * 1024;

thread_local! {
    /// This thread's group of appends; `None` on threads that write each append at once.
    static GROUP: std::cell::RefCell<Option<Group>> = const { std::cell::RefCell::new(None) };
}

/// Makes [`Journal::append_grouped`] group appends on this thread until the thread ends. The
/// thread must call [`flush_grouped_appends`] whenever its event loop is about to wait
/// (tokio's `on_thread_park`), or nobody waiting on an append is ever woken.
pub fn group_appends_on_this_thread() {
    GROUP.with(|g| {
        g.borrow_mut().get_or_insert_with(|| Group {
            journal: None,
            lines: Vec::new(),
            waiting: Vec::new(),
            grouping: true,
            appends_this_turn: 0,
        });
    });
}

/// Writes the lines this thread grouped since its last flush, in one `write(2)`, wakes the
/// tasks waiting on them, and decides whether the next turn groups (only after a turn with
/// more than one append). Called at the end of each event-loop turn of a worker.
pub fn flush_grouped_appends() {
    GROUP.with(|g| {
        if let Ok(mut group) = g.try_borrow_mut() {
            if let Some(group) = group.as_mut() {
                group.end_turn();
            }
        }
    });
}

fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The journal folder used when the config names none: beside an SQLite database file, else
/// `tollgate-journal` in the working directory.
pub fn default_dir(database_url: &str) -> PathBuf {
    if let Some(rest) = database_url.strip_prefix("sqlite://").or_else(|| database_url.strip_prefix("sqlite:")) {
        let file = rest.split('?').next().unwrap_or(rest);
        if !file.is_empty() && !file.starts_with(':') {
            return PathBuf::from(format!("{file}.journal"));
        }
    }
    PathBuf::from("tollgate-journal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, source: UsageSource) -> RequestRecord {
        RequestRecord {
            request_id: id.into(),
            time_ms: 1_700_000_000_000,
            key_id: "key_1".into(),
            team: "t \"quoted\"\n".into(),
            endpoint: "embeddings",
            model: "gpt-4o".into(),
            served_model: "gpt-4o-mini".into(),
            usage: Usage { input_tokens: 12, cached_input_tokens: 3, output_tokens: 7 },
            cost: NanoUsd(4_200),
            usage_source: source,
            status: 200,
            latency_ms: 15,
            stream: true,
        }
    }

    #[test]
    fn a_line_round_trips_every_field() {
        let r = record("req_1", UsageSource::Estimated);
        let line = encode(LineOp::Retract, &r);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line, whatever the strings hold");
        let (op, back) = decode(std::str::from_utf8(&line[..line.len() - 1]).unwrap()).unwrap();
        assert_eq!(op, LineOp::Retract);
        assert_eq!(format!("{back:?}"), format!("{r:?}"));
        assert!(decode("{\"op\":\"w\",\"id\":\"x\"").is_none(), "a torn line is refused");
    }

    #[test]
    fn leftovers_are_replayed_in_order_and_segments_go_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, left) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
            assert!(left.lines.is_empty());
            let a = journal.append(&encode(LineOp::Write, &record("a", UsageSource::Pending))).unwrap();
            let b = journal.append(&encode(LineOp::Write, &record("a", UsageSource::Reported))).unwrap();
            a.commit();
            // `b` is dropped uncommitted (as if the database never took it): its segment stays.
            drop(b);
            assert!(Journal::open(dir.path(), SEGMENT_BYTES).is_err(), "a second owner is refused");
        }
        // A line torn by a crash mid-append.
        fs::write(dir.path().join("000000000099.log"), b"{\"op\":\"w\",\"id\":").unwrap();
        let (journal, left) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let sources: Vec<_> = left.lines.iter().map(|(_, r)| r.usage_source).collect();
        assert_eq!(sources, [UsageSource::Pending, UsageSource::Reported]);
        assert_eq!(left.torn, 1);
        left.discard();
        // Everything committed: the current segment goes when the journal closes.
        journal.append(&encode(LineOp::Write, &record("c", UsageSource::Reported))).unwrap().commit();
        drop(journal);
        let logs: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .collect();
        assert!(logs.is_empty(), "{logs:?}");
    }

    /// Appends `n` lines from `n` tasks on a worker-like thread: a single-threaded runtime,
    /// grouping on, and flushing when it is about to wait, as the server's workers do.
    fn append_from_tasks(journal: Arc<Journal>, n: usize, grouped: bool) -> Vec<io::Result<Pin>> {
        std::thread::spawn(move || {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_all();
            if grouped {
                group_appends_on_this_thread();
                builder.on_thread_park(flush_grouped_appends);
            }
            let runtime = builder.build().unwrap();
            runtime.block_on(async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let journal = journal.clone();
                        tokio::spawn(async move {
                            let line = encode(LineOp::Write, &record(&format!("r{i}"), UsageSource::Reported));
                            journal.append_grouped(line).await
                        })
                    })
                    .collect();
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await.unwrap());
                }
                results
            })
        })
        .join()
        .unwrap()
    }

    #[test]
    fn after_a_turn_with_a_single_append_the_next_is_written_at_once() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let journal = Arc::new(journal);
        let line = || encode(LineOp::Write, &record("r", UsageSource::Reported));
        let j = journal.clone();
        std::thread::spawn(move || {
            group_appends_on_this_thread();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(flush_grouped_appends)
                .build()
                .unwrap();
            runtime.block_on(async move {
                // A fresh worker groups: the append waits for the end of the turn.
                let mut first = Box::pin(j.append_grouped(line()));
                assert!((&mut first).now_or_never().is_none(), "grouped: waits for the turn's end");
                first.await.unwrap().commit();
                // That turn had one append: the next one is written before it returns.
                let second = j.append_grouped(line()).now_or_never().expect("written at once").unwrap();
                second.commit();
                assert_eq!(j.writes(), 2);
                // A turn with several appends turns grouping back on for the next turn.
                for _ in 0..3 {
                    j.append_grouped(line()).now_or_never().expect("still at once in this turn").unwrap().commit();
                }
                // End the turn by waiting for another thread (a park with no other wake-up:
                // an idle turn, with no append, would turn grouping off again).
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    let _ = tx.send(());
                });
                rx.await.unwrap();
                let mut grouped = Box::pin(j.append_grouped(line()));
                assert!((&mut grouped).now_or_never().is_none(), "grouped again after a busy turn");
                grouped.await.unwrap().commit();
            });
        })
        .join()
        .unwrap();
        assert_eq!(journal.writes(), 6);
    }

    #[test]
    fn appends_of_one_event_loop_turn_go_out_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let journal = Arc::new(journal);
        let pins: Vec<Pin> = append_from_tasks(journal.clone(), 50, true).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(pins.len(), 50);
        assert_eq!(journal.writes(), 1, "fifty tasks ready in one turn share one write");
        // Elsewhere (no grouping on the thread) each append is its own write.
        let more: Vec<Pin> = append_from_tasks(journal.clone(), 5, false).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(journal.writes(), 6);
        // Every line is there, whole, and each pin holds the segment until committed.
        let segment = fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).find(|e| e.file_name().to_string_lossy().ends_with(".log")).unwrap().path();
        let text = fs::read_to_string(&segment).unwrap();
        let ids: std::collections::BTreeSet<String> = text.lines().map(|l| decode(l).unwrap().1.request_id).collect();
        assert_eq!(ids.len(), 50, "the grouped lines are distinct and whole");
        assert_eq!(text.lines().count(), 55);
        drop(pins);
        drop(more);
        drop(journal);
        assert!(segment.exists(), "uncommitted pins keep their segment for the next start");
    }

    #[test]
    fn a_group_is_written_before_it_grows_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let journal = Arc::new(journal);
        let line_len = encode(LineOp::Write, &record("r0", UsageSource::Reported)).len();
        let n = 3 * GROUP_BYTES / line_len;
        let results = append_from_tasks(journal.clone(), n, true);
        assert!(results.iter().all(|r| r.is_ok()));
        let writes = journal.writes();
        assert!((3..=5).contains(&writes), "{n} lines of {line_len} bytes in {writes} writes");
        for pin in results.into_iter().flatten() {
            pin.commit();
        }
    }

    #[test]
    fn default_folder_sits_beside_an_sqlite_file() {
        assert_eq!(default_dir("sqlite://data/t.db"), PathBuf::from("data/t.db.journal"));
        assert_eq!(default_dir("sqlite:///var/lib/t.db?mode=rwc"), PathBuf::from("/var/lib/t.db.journal"));
        assert_eq!(default_dir("postgres://u@h/db"), PathBuf::from("tollgate-journal"));
        assert_eq!(default_dir("sqlite::memory:"), PathBuf::from("tollgate-journal"));
    }
}
