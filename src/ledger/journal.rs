//! The write-ahead journal: every record is appended to a local file before anyone relies on
//! it, and the database is written from memory behind it, in batches, off the request path.
//!
//! A segment is a file allocated up front and mapped into memory: an append reserves its
//! bytes with one atomic add and copies the line there. Once the copy is done the line is in
//! the kernel's page cache and survives the process being killed (`kill -9`, OOM, panic) —
//! the same promise an SQLite WAL commit with `synchronous = NORMAL` makes, and what a
//! `write(2)` gave before, without the system call, which is made twice per request and
//! costs far more than the copy (it updates the inode's times, and on a quiet server meets
//! the kernel's caches cold). No lock is taken to
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

mod line;
mod segment;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use self::line::LineOp;
pub(crate) use self::line::{decode, encode};
use self::segment::{segment_path, Segment};
use super::RequestRecord;

/// A segment takes appends until it is this long, unless configured otherwise.
pub const SEGMENT_BYTES: u64 = 1024 * 1024;

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
            self.segment.keep();
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
            match segment.append(line) {
                Some(Err(e)) => {
                    // The segment takes no more lines; the next append starts a fresh one.
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(path = %segment.path.display(), error = %e, "journal append failed");
                    }
                    return Err(e);
                }
                Some(Ok(())) => {
                    if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(path = %segment.path.display(), "journal appends work again");
                    }
                    return Ok(Pin { segment, committed: false });
                }
                None => {}
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

fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
