//! The write-ahead journal: every record is appended to a local file before anyone relies on
//! it, and the database is written from memory behind it, in batches, off the request path.
//!
//! A segment is a file allocated up front and mapped into memory: an append reserves its
//! bytes with one atomic add and copies the line there. Once the copy is done the line is in
//! the kernel's page cache and survives the process being killed (`kill -9`, OOM, panic) —
//! the same promise an SQLite WAL commit with `synchronous = NORMAL` makes, and what a
//! `write(2)` gave before, without the system call: a `write(2)` to an ext4 file cost
//! 0.7 µs on a busy server and ~27 µs on a quiet one (the inode's times are updated, the
//! kernel's caches are cold), twice per request (docs/benchmarks.md). No lock is taken to
//! append; concurrent appends get disjoint byte ranges. The space is allocated when the
//! segment starts (`posix_fallocate`), so a full disk fails there, as an error. That holds
//! on ext4, XFS and tmpfs, where allocated blocks are the blocks later written; elsewhere
//! (btrfs and ZFS allocate anew on every write, NFS and FUSE may not allocate at all) a
//! write into a mapping could find no space and fault, so there segments are not mapped and
//! each append is a `pwrite(2)` into its reserved range instead, which reports a full disk
//! as an error. (On ext4 and XFS a mapping still faults if the disk fails under it and the
//! filesystem turns read-only: the process then dies and the next start replays the
//! journal, where a `write(2)` would have returned an error.)
//!
//! The journal is a folder of numbered segments. The current one takes appends until the
//! next line would not fit in its `SEGMENT_BYTES`, then the next one takes over (the rest of
//! the full one stays zero; replay skips zero bytes). The next segment is started ahead of
//! need by the journal's own thread — created, allocated, mapped, and its pages faulted in
//! writable — so a request neither waits for that nor takes a page fault per 4 KiB of lines;
//! a rotation that finds none ready starts one itself. A segment is deleted when it is no longer
//! current and every record appended to it has been committed to the database (each queued
//! record holds a [`Pin`] on its segment). A record dropped uncommitted (the process stopping
//! with the database down) marks its segment to be kept. On start, leftover segments are
//! replayed into the database in order — every write is an idempotent upsert — and removed.
//!
//! One process owns a journal folder at a time (an exclusive file lock); a second server
//! pointed at the same folder refuses to start.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{RequestRecord, UsageSource};
use crate::pricing::NanoUsd;
use crate::pricing::Usage;

/// A segment takes appends until it is this long, unless configured otherwise.
pub const SEGMENT_BYTES: u64 = 1024 * 1024;

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

/// Encodes `record` as one journal line (ending in `\n`): the JSON `serde_json` writes for
/// [`Line`], written directly. Two lines per request made serde's per-byte string escaping
/// and per-field calls ~5% of the instructions a proxied request costs; here the strings
/// (ids, names, model names: nothing to escape, as a rule) are copied whole.
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
fn needs_escape(bytes: &[u8]) -> bool {
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

/// One segment file, allocated whole and, where that is safe, mapped.
pub(crate) struct Segment {
    /// Its place in the journal: lines in a higher-numbered segment were appended later.
    number: u64,
    path: PathBuf,
    /// `None` only in the stand-in for a segment that could not be started.
    file: Option<File>,
    /// `None` on filesystems where a write into a mapping could fault (appends `pwrite`).
    map: Option<memmap2::MmapRaw>,
    capacity: u64,
    /// Bytes handed out to appends so far (may run past `capacity`: the append that crossed
    /// it went to the next segment).
    reserved: AtomicU64,
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
    segment_bytes: u64,
    /// Whether segments may be mapped (where their filesystem allows it).
    map_segments: bool,
    failing: AtomicBool,
    /// The next segment, started ahead by `preparer`.
    ahead: Arc<Ahead>,
    preparer: Option<std::thread::JoinHandle<()>>,
    /// Held for the journal's life: the folder's exclusive lock.
    _lock: File,
}

/// The segment the next rotation takes, and what the thread starting it ahead shares with
/// the journal.
struct Ahead {
    spare: Mutex<Option<Segment>>,
    /// Signalled when the spare is taken or thrown away (start another) and at close.
    wanted: Condvar,
    closed: AtomicBool,
    /// The number the next segment started gets.
    next_number: AtomicU64,
}

impl Ahead {
    fn number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::Relaxed)
    }
}

/// How long the preparer waits before trying again after it could not start a segment (a
/// full disk); a rotation that needs one meanwhile starts it itself, and reports why not.
const RETRY_AHEAD: Duration = Duration::from_secs(1);

/// The preparer thread: keeps one spare segment ready until the journal closes.
fn prepare_ahead(ahead: Arc<Ahead>, dir: PathBuf, segment_bytes: u64, map: bool) {
    loop {
        {
            let mut spare = ahead.spare.lock().unwrap_or_else(|p| p.into_inner());
            while spare.is_some() && !ahead.closed.load(Ordering::Acquire) {
                spare = ahead.wanted.wait(spare).unwrap_or_else(|p| p.into_inner());
            }
            if ahead.closed.load(Ordering::Acquire) {
                return;
            }
        }
        match Segment::create(&dir, ahead.number(), segment_bytes, map) {
            Ok(segment) => {
                segment.prefault();
                *ahead.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(segment);
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "could not start a journal segment ahead");
                let spare = ahead.spare.lock().unwrap_or_else(|p| p.into_inner());
                if !ahead.closed.load(Ordering::Acquire) {
                    let _ = ahead.wanted.wait_timeout(spare, RETRY_AHEAD);
                }
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        {
            // Under the lock, so the preparer cannot miss it between its check and its wait.
            let _spare = self.ahead.spare.lock().unwrap_or_else(|p| p.into_inner());
            self.ahead.closed.store(true, Ordering::Release);
            self.ahead.wanted.notify_all();
        }
        if let Some(preparer) = self.preparer.take() {
            let _ = preparer.join();
        }
        // The spare, never written, goes with `ahead` (its file is removed).
    }
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
        Journal::open_with(dir, segment_bytes, true)
    }

    /// [`Journal::open`], with segments written by `pwrite(2)` even where they could be mapped.
    #[cfg(test)]
    fn open_unmapped(dir: &Path, segment_bytes: u64) -> io::Result<(Journal, Leftovers)> {
        Journal::open_with(dir, segment_bytes, false)
    }

    fn open_with(dir: &Path, segment_bytes: u64, map_segments: bool) -> io::Result<(Journal, Leftovers)> {
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
            // Zero bytes are space never written: the unused end of a segment, or the range
            // of an append the process died before copying.
            for line in bytes.split(|&b| b == b'\n' || b == 0).filter(|l| !l.is_empty()) {
                match std::str::from_utf8(line).ok().and_then(decode) {
                    Some(entry) => leftovers.lines.push(entry),
                    None => leftovers.torn += 1,
                }
            }
            leftovers.files.push(path);
        }
        let segment_bytes = segment_bytes.max(1);
        // With no room for a first segment (a full disk), start anyway: the leftovers can
        // still be replayed and removed, and appends start a segment once there is room
        // (until then they fail, and the ledger's policy decides).
        let first = match Segment::create(dir, next, segment_bytes, map_segments) {
            Ok(segment) => segment,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "could not start a journal segment; appends fail until one can be");
                Segment::full_placeholder(next, segment_path(dir, next))
            }
        };
        first.prefault();
        let first = Arc::new(first);
        let ahead = Arc::new(Ahead {
            spare: Mutex::new(None),
            wanted: Condvar::new(),
            closed: AtomicBool::new(false),
            next_number: AtomicU64::new(next + 1),
        });
        let preparer = {
            let (ahead, dir) = (ahead.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name("tollgate-journal".into())
                .spawn(move || prepare_ahead(ahead, dir, segment_bytes, map_segments))?
        };
        let journal = Journal {
            dir: dir.to_path_buf(),
            current: Mutex::new(first),
            segment_bytes,
            map_segments,
            failing: AtomicBool::new(false),
            ahead,
            preparer: Some(preparer),
            _lock: lock,
        };
        Ok((journal, leftovers))
    }

    /// Whether the last append failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Appends `record` with `op` (as the ledger does; public for benchmarks and tools).
    pub fn append_record(&self, op: LineOp, record: &RequestRecord) -> io::Result<Pin> {
        self.append(&encode(op, record))
    }

    /// Appends one line; once this returns `Ok`, the line survives the process dying. An
    /// append that fails (no new segment could be started) is tried once more: space may
    /// have been freed since.
    pub(crate) fn append(&self, line: &[u8]) -> io::Result<Pin> {
        match self.try_append(line) {
            Ok(pin) => Ok(pin),
            Err(_) => self.try_append(line),
        }
    }

    fn try_append(&self, line: &[u8]) -> io::Result<Pin> {
        let len = line.len() as u64;
        let mut segment = self.current();
        loop {
            let at = segment.reserved.fetch_add(len, Ordering::Relaxed);
            if at + len <= segment.capacity {
                // SAFETY: `at..at + len` lies within `capacity` and was reserved by this
                // append alone (`fetch_add` above).
                if let Err(e) = unsafe { segment.copy_in(at, line) } {
                    // A partial line may be there: keep the segment for the next start (a
                    // torn line is skipped there) and move later appends to a fresh one.
                    segment.keep.store(true, Ordering::Release);
                    segment.reserved.store(u64::MAX / 2, Ordering::Relaxed);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(path = %segment.path.display(), error = %e, "journal append failed");
                    }
                    return Err(e);
                }
                if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %segment.path.display(), "journal appends work again");
                }
                return Ok(Pin { segment, committed: false });
            }
            // Full: a fresh segment (big enough for this line) takes it, and later appends.
            segment = match self.rotate(&segment, len) {
                Ok(fresh) => fresh,
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(dir = %self.dir.display(), error = %e, "journal append failed: no segment could be started");
                    }
                    return Err(e);
                }
            };
        }
    }

    fn current(&self) -> Arc<Segment> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes a new segment current in place of `full`, unless another append already
    /// replaced it; returns the current one. The file is created and allocated before the
    /// lock is taken: the lock only swaps a pointer.
    fn rotate(&self, full: &Arc<Segment>, line_len: u64) -> io::Result<Arc<Segment>> {
        {
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if !Arc::ptr_eq(&current, full) {
                return Ok(current.clone());
            }
        }
        let fresh = match self.take_spare(full.number, line_len) {
            Some(spare) => spare,
            None => {
                let number = self.ahead.number();
                Segment::create(&self.dir, number, self.segment_bytes.max(line_len), self.map_segments)?
            }
        };
        let fresh = Arc::new(fresh);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, full) {
            *current = fresh;
        }
        // else: another append rotated meanwhile; `fresh` is dropped unused, its file removed.
        Ok(current.clone())
    }

    /// The spare segment, if one is ready that can follow segment `after` and hold a line of
    /// `line_len` bytes; the preparer is asked for the next. A spare numbered below `after`
    /// (a rotation that found none ready started a later-numbered one) is thrown away: lines
    /// must land in segments in the order replay reads them.
    fn take_spare(&self, after: u64, line_len: u64) -> Option<Segment> {
        let mut spare = self.ahead.spare.lock().unwrap_or_else(|p| p.into_inner());
        let fits = spare.as_ref().is_some_and(|s| s.number > after && s.capacity >= line_len);
        let stale = spare.as_ref().is_some_and(|s| s.number <= after);
        let taken = if fits || stale { spare.take() } else { None };
        if taken.is_some() {
            self.ahead.wanted.notify_one();
        }
        drop(spare);
        // A stale spare is dropped here, outside the lock (its file is removed).
        taken.filter(|_| fits)
    }
}

impl Segment {
    /// Creates segment `number` (never over an existing file), allocates `capacity` bytes of
    /// disk for it and, if `map` and on a filesystem where that is safe, maps it.
    fn create(dir: &Path, number: u64, capacity: u64, map: bool) -> io::Result<Segment> {
        let path = segment_path(dir, number);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let mapped = allocate(&file, capacity).and_then(|()| {
            if !map || !allocation_is_kept(&file)? {
                return Ok(None);
            }
            let len = usize::try_from(capacity).map_err(|_| io::Error::other("journal segment too large"))?;
            memmap2::MmapOptions::new().len(len).map_raw(&file).map(Some)
        });
        match mapped {
            Ok(map) => Ok(Segment {
                number,
                path,
                file: Some(file),
                map,
                capacity,
                reserved: AtomicU64::new(0),
                keep: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// A stand-in for a segment that could not be started: it takes no line, so the first
    /// append tries to start a real one.
    fn full_placeholder(number: u64, path: PathBuf) -> Segment {
        // Nothing of ours is at `path`: `keep` so that it is never removed.
        Segment {
            number,
            path,
            file: None,
            map: None,
            capacity: 0,
            reserved: AtomicU64::new(0),
            keep: AtomicBool::new(true),
        }
    }

    /// Faults the mapping's pages in, writable, so appends do not (one fault per 4 KiB of
    /// lines otherwise, each costing more than the copy). Best effort: before Linux 5.14, or
    /// short of memory, the appends fault them in as before.
    ///
    /// In steps of [`PREFAULT_STEP`] bytes, yielding the CPU between them: one call for a
    /// whole 1 MiB segment held a core for ~1.3 ms inside the kernel, and a request worker
    /// waiting for that core waited as long (`perf sched` at c=64: the journal thread was
    /// behind a fifth of the workers' waits over a millisecond).
    fn prefault(&self) {
        #[cfg(target_os = "linux")]
        if let Some(map) = &self.map {
            let mut at = 0;
            while at < map.len() {
                if at > 0 {
                    std::thread::yield_now();
                }
                let step = PREFAULT_STEP.min(map.len() - at);
                if map.advise_range(memmap2::Advice::PopulateWrite, at, step).is_err() {
                    return;
                }
                at += step;
            }
        }
    }

    /// Copies `line` to `at`.
    ///
    /// # Safety
    /// `at..at + line.len()` must lie within `capacity` and be reserved for this call alone.
    unsafe fn copy_in(&self, at: u64, line: &[u8]) -> io::Result<()> {
        assert!(at + line.len() as u64 <= self.capacity);
        match &self.map {
            // SAFETY: the range lies inside the mapping (`capacity` bytes, alive as long as
            // `self`) and no other thread writes it (the caller's contract); nothing else
            // writes the file while this process holds the folder's lock, and nothing in this
            // process reads the mapping.
            Some(map) => {
                unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), map.as_mut_ptr().add(at as usize), line.len()) };
                Ok(())
            }
            None => match &self.file {
                Some(file) => std::os::unix::fs::FileExt::write_all_at(file, line, at),
                None => Err(io::Error::other("no journal segment")),
            },
        }
    }
}

/// How much of a segment's mapping [`Segment::prefault`] faults in at a time (16 pages:
/// ~0.1 ms of one core).
const PREFAULT_STEP: usize = 64 * 1024;

/// Whether blocks allocated to `file` are the ones later writes land in (ext4, XFS, tmpfs):
/// only then can a mapping of it never meet a full disk.
fn allocation_is_kept(file: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const TMPFS: i64 = 0x0102_1994;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `fstatfs` fills the struct it is given for a descriptor `file` owns.
    if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call above.
    #[allow(clippy::unnecessary_cast)] // `f_type`'s width differs across targets
    let kind = unsafe { fs.assume_init() }.f_type as i64;
    Ok(matches!(kind, EXT4 | XFS | TMPFS))
}

/// Gives `file` `len` bytes of real disk blocks (not a sparse hole): an append into the
/// mapping can then never need a block the disk does not have.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // More than the disk has free fails at once (glibc emulates `posix_fallocate` where the
    // filesystem lacks it by writing every block, which would first fill the disk).
    let mut vfs = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `fstatvfs` fills the struct it is given for a descriptor `file` owns.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), vfs.as_mut_ptr()) } == 0 {
        // SAFETY: initialised by the successful call above.
        let vfs = unsafe { vfs.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the fields' widths differ across targets
        let free = (vfs.f_bavail as u64).saturating_mul(vfs.f_frsize as u64);
        if len > free {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("journal segment too large"))?;
    // SAFETY: a plain system call on a descriptor `file` owns for the call's duration.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Where segment `number` lives (names sort in number order; [`segment_number`] reads one).
fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.log"))
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

    proptest::proptest! {
        /// The word-at-a-time check agrees with a byte-by-byte one, wherever in a word the
        /// byte that needs escaping sits.
        #[test]
        fn needs_escape_agrees_with_a_byte_by_byte_check(bytes in proptest::collection::vec(proptest::prop_oneof![30 => 0x20u8..=0xff, 1 => proptest::prelude::any::<u8>()], 0..40)) {
            let slow = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            proptest::prop_assert_eq!(needs_escape(&bytes), slow);
        }
    }

    /// The line `serde_json` writes for the same record.
    fn serde_line(op: LineOp, r: &RequestRecord) -> Vec<u8> {
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
        let mut buf = serde_json::to_vec(&line).unwrap();
        buf.push(b'\n');
        buf
    }

    proptest::proptest! {
        /// The hand-written encoder writes byte for byte what serde_json writes (so lines
        /// journaled by older versions and by this one read the same), for any strings,
        /// numbers and flags.
        #[test]
        fn encoding_matches_serde_json(
            strings in proptest::array::uniform5("(\\PC|[\\x00-\\x1f\"\\\\\\x7f])*"),
            numbers in proptest::array::uniform5(proptest::prelude::any::<u64>()),
            signed in proptest::array::uniform2(proptest::prelude::any::<i64>()),
            status in proptest::prelude::any::<u16>(),
            flags in proptest::array::uniform2(proptest::prelude::any::<bool>()),
            source in 0..4usize,
        ) {
            let [id, key, team, model, served] = strings;
            let r = RequestRecord {
                request_id: id,
                time_ms: signed[0],
                key_id: key,
                team,
                endpoint: ["chat.completions", "completions", "embeddings"][numbers[4] as usize % 3],
                model,
                served_model: served,
                usage: Usage { input_tokens: numbers[0], cached_input_tokens: numbers[1], output_tokens: numbers[2] },
                cost: NanoUsd(signed[1]),
                usage_source: [UsageSource::Reported, UsageSource::Estimated, UsageSource::Pending, UsageSource::Interrupted][source],
                status,
                latency_ms: numbers[3],
                stream: flags[0],
            };
            let op = if flags[1] { LineOp::Write } else { LineOp::Retract };
            let ours = encode(op, &r);
            let theirs = serde_line(op, &r);
            proptest::prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
            let (back_op, back) = decode(std::str::from_utf8(&ours[..ours.len() - 1]).unwrap()).unwrap();
            proptest::prop_assert_eq!(back_op, op);
            proptest::prop_assert_eq!(format!("{back:?}"), format!("{r:?}"));
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
        let logs = segment_files(dir.path());
        assert!(logs.is_empty(), "{logs:?}");
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn appends_racing_on_several_threads_all_land_whole_across_segment_changes() {
        appends_racing(true);
    }

    #[test]
    fn appends_racing_on_several_threads_all_land_whole_across_segment_changes_unmapped() {
        appends_racing(false);
    }

    fn appends_racing(mapped: bool) {
        let dir = tempfile::tempdir().unwrap();
        let line_len = encode(LineOp::Write, &record("t0-000", UsageSource::Reported)).len() as u64;
        {
            // Small segments: the threads race through many segment changes.
            let open = if mapped { Journal::open } else { Journal::open_unmapped };
            let (journal, _) = open(dir.path(), 10 * line_len).unwrap();
            let probe = File::create(dir.path().join("probe")).unwrap();
            let mappable = allocation_is_kept(&probe).unwrap();
            if mapped && !mappable {
                eprintln!("note: {} is not on ext4, XFS or tmpfs: the mapped case runs unmapped", dir.path().display());
            }
            assert_eq!(journal.current().map.is_some(), mapped && mappable);
            let journal = Arc::new(journal);
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let journal = journal.clone();
                    std::thread::spawn(move || {
                        (0..500)
                            .map(|i| {
                                let line =
                                    encode(LineOp::Write, &record(&format!("t{t}-{i:03}"), UsageSource::Reported));
                                journal.append(&line).unwrap()
                            })
                            .collect::<Vec<Pin>>()
                    })
                })
                .collect();
            // Dropped uncommitted: every segment stays, as after a crash.
            for t in threads {
                drop(t.join().unwrap());
            }
            assert!(segment_files(dir.path()).len() >= 200, "{} segments", segment_files(dir.path()).len());
        }
        let (_journal, left) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(left.torn, 0);
        let ids: std::collections::BTreeSet<String> = left.lines.iter().map(|(_, r)| r.request_id.clone()).collect();
        assert_eq!((left.lines.len(), ids.len()), (2000, 2000), "every line once, whole");
        // Each thread's lines replay in the order it appended them.
        for t in 0..4 {
            let prefix = format!("t{t}-");
            let mine: Vec<&str> =
                left.lines.iter().map(|(_, r)| r.request_id.as_str()).filter(|id| id.starts_with(&prefix)).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "thread {t} out of order");
        }
    }

    #[test]
    fn a_line_longer_than_a_segment_gets_a_segment_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), 64).unwrap();
        let long = encode(LineOp::Write, &record(&"x".repeat(5_000), UsageSource::Reported));
        let pin = journal.append(&long).unwrap();
        let short = journal.append(&encode(LineOp::Write, &record("s", UsageSource::Reported))).unwrap();
        drop((pin, short));
        drop(journal);
        let (_journal, left) = Journal::open(dir.path(), 64).unwrap();
        let ids: Vec<usize> = left.lines.iter().map(|(_, r)| r.request_id.len()).collect();
        assert_eq!(ids, [5_000, 1]);
    }

    #[test]
    fn replay_skips_unwritten_space_and_counts_a_line_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        // A segment as a crash leaves it: a whole line, a line whose copy was cut short, an
        // append reserved but never copied (zeros), another whole line, the unused rest.
        let whole = |id: &str| encode(LineOp::Write, &record(id, UsageSource::Reported));
        let mut bytes = whole("a");
        bytes.extend_from_slice(&whole("b")[..30]);
        bytes.extend_from_slice(&vec![0; whole("b").len() - 30 + 200]);
        bytes.extend_from_slice(&whole("c"));
        bytes.extend_from_slice(&vec![0; 4096]);
        fs::write(dir.path().join("000000000007.log"), bytes).unwrap();
        let (journal, left) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let ids: Vec<&str> = left.lines.iter().map(|(_, r)| r.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(left.torn, 1);
        // New appends go to a later segment, never over the leftover.
        let pin = journal.append(&whole("d")).unwrap();
        assert_eq!(pin.segment.number, 8);
        pin.commit();
        assert!(fs::read(dir.path().join("000000000007.log")).unwrap().starts_with(&whole("a")));
    }

    /// Waits until the preparer has a spare segment ready.
    fn wait_for_spare(journal: &Journal) -> u64 {
        for _ in 0..1000 {
            if let Some(spare) = journal.ahead.spare.lock().unwrap().as_ref() {
                return spare.number;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no spare segment was started");
    }

    #[test]
    fn rotations_take_the_segment_started_ahead_and_never_one_numbered_behind() {
        let dir = tempfile::tempdir().unwrap();
        let line = encode(LineOp::Write, &record("a", UsageSource::Reported));
        let (journal, _) = Journal::open(dir.path(), 4 * line.len() as u64).unwrap();
        let mut pins = Vec::new();
        let spare = wait_for_spare(&journal);
        assert_eq!(spare, 2);
        for _ in 0..5 {
            pins.push(journal.append(&line).unwrap());
        }
        // The fifth line did not fit in segment 1: it went to the spare, and another is started.
        assert_eq!(pins.iter().map(|p| p.segment.number).collect::<Vec<_>>(), [1, 1, 1, 1, 2]);
        assert_eq!(wait_for_spare(&journal), 3);
        // A line too long for a spare gets a segment of its own, started then (number 4) ...
        let long = encode(LineOp::Write, &record(&"x".repeat(10 * line.len()), UsageSource::Reported));
        pins.push(journal.append(&long).unwrap());
        assert_eq!(pins.last().unwrap().segment.number, 4);
        // ... so spare 3 may no longer follow: the next rotation throws it away.
        pins.push(journal.append(&line).unwrap());
        assert!(pins.last().unwrap().segment.number > 4);
        assert!(!dir.path().join("000000000003.log").exists(), "the stale spare is removed");
        // Replayed in the order appended.
        drop(pins);
        drop(journal);
        let (_journal, left) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let lens: Vec<usize> = left.lines.iter().map(|(_, r)| r.request_id.len()).collect();
        assert_eq!(lens, [1, 1, 1, 1, 1, 10 * line.len(), 1]);
    }

    #[test]
    fn a_segment_that_cannot_be_started_fails_the_append_and_the_next_one_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), 1).unwrap();
        let line = encode(LineOp::Write, &record("a", UsageSource::Reported));
        journal.append(&line).unwrap().commit();
        // Every line needs a segment of its own, larger than the spare (which then stays put):
        // the next two segment names are taken (what a full disk or a stray file does to the
        // next segment): the append and its retry fail, and the journal says so.
        // (The preparer may take one of them too, when it replaces a spare numbered behind.)
        wait_for_spare(&journal);
        let next = journal.ahead.next_number.load(Ordering::Relaxed);
        let taken: Vec<PathBuf> = (next..next + 8).map(|n| dir.path().join(format!("{n:012}.log"))).collect();
        for name in &taken {
            fs::write(name, b"not ours").unwrap();
        }
        assert!(journal.append(&line).is_err());
        assert!(journal.failing());
        for name in &taken {
            assert_eq!(fs::read(name).unwrap(), b"not ours", "never written over");
            fs::remove_file(name).unwrap();
        }
        journal.append(&line).unwrap().commit();
        assert!(!journal.failing());
    }

    #[test]
    fn a_journal_starts_without_room_for_a_segment_and_its_appends_fail() {
        let dir = tempfile::tempdir().unwrap();
        // No disk has a petabyte to allocate: no segment can start.
        let (journal, left) = Journal::open(dir.path(), 1 << 50).unwrap();
        assert!(left.lines.is_empty());
        let line = encode(LineOp::Write, &record("a", UsageSource::Reported));
        assert!(journal.append(&line).is_err());
        assert!(journal.failing());
        drop(journal);
        assert!(segment_files(dir.path()).is_empty(), "no file left behind");
        // With a size that fits, the same folder works.
        let (journal, _) = Journal::open(dir.path(), SEGMENT_BYTES).unwrap();
        journal.append(&line).unwrap().commit();
    }

    #[test]
    fn default_folder_sits_beside_an_sqlite_file() {
        assert_eq!(default_dir("sqlite://data/t.db"), PathBuf::from("data/t.db.journal"));
        assert_eq!(default_dir("sqlite:///var/lib/t.db?mode=rwc"), PathBuf::from("/var/lib/t.db.journal"));
        assert_eq!(default_dir("postgres://u@h/db"), PathBuf::from("tollgate-journal"));
        assert_eq!(default_dir("sqlite::memory:"), PathBuf::from("tollgate-journal"));
    }
}
