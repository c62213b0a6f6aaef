//! One segment of the journal: a file allocated whole up front and, where that is safe,
//! mapped into memory; an append reserves its bytes with one atomic add and copies the line
//! there. The journal's only `unsafe` code (the mapping, the allocation, the filesystem
//! check) is here.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One segment file, allocated whole and, where that is safe, mapped.
pub(super) struct Segment {
    /// Its place in the journal: lines in a higher-numbered segment were appended later.
    pub(super) number: u64,
    pub(super) path: PathBuf,
    /// `None` only in the stand-in for a segment that could not be started.
    file: Option<File>,
    /// `None` on filesystems where a write into a mapping could fault (appends `pwrite`).
    pub(super) map: Option<memmap2::MmapRaw>,
    pub(super) capacity: u64,
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

impl Segment {
    /// Creates segment `number` (never over an existing file), allocates `capacity` bytes of
    /// disk for it and, if `map` and on a filesystem where that is safe, maps it.
    pub(super) fn create(dir: &Path, number: u64, capacity: u64, map: bool) -> io::Result<Segment> {
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
    pub(super) fn full_placeholder(number: u64, path: PathBuf) -> Segment {
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
    /// In steps of [`PREFAULT_STEP`] bytes, yielding the CPU between them: faulting a whole
    /// segment in one call holds a core inside the kernel, where nothing preempts it, long
    /// enough that a request worker waiting for that core visibly waits.
    pub(super) fn prefault(&self) {
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

    /// Reserves `line.len()` bytes and copies `line` there; `None` when it does not fit
    /// (the segment is full: the line goes to the next one). Concurrent appends get disjoint
    /// ranges, so none takes a lock. An append that fails to copy may leave a partial line:
    /// the segment is then kept for the next start (which skips a torn line) and takes no
    /// more lines.
    pub(super) fn append(&self, line: &[u8]) -> Option<io::Result<()>> {
        let len = line.len() as u64;
        let at = self.reserved.fetch_add(len, Ordering::Relaxed);
        if at + len > self.capacity {
            return None;
        }
        let copied = match &self.map {
            Some(map) => {
                // SAFETY: `at..at + len` lies inside the mapping (`capacity` bytes, alive as
                // long as `self`) and was reserved by this call alone (`fetch_add` above), so
                // no other thread writes it; nothing else writes the file while this process
                // holds the folder's lock, and nothing in this process reads the mapping.
                unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), map.as_mut_ptr().add(at as usize), line.len()) };
                Ok(())
            }
            None => match &self.file {
                Some(file) => std::os::unix::fs::FileExt::write_all_at(file, line, at),
                None => Err(io::Error::other("no journal segment")),
            },
        };
        if copied.is_err() {
            self.keep();
            self.reserved.store(u64::MAX / 2, Ordering::Relaxed);
        }
        Some(copied)
    }

    /// Keeps the file on disk when the segment is dropped, for the next start to replay.
    pub(super) fn keep(&self) {
        self.keep.store(true, Ordering::Release);
    }
}

/// How much of a segment's mapping [`Segment::prefault`] faults in at a time (16 pages): a
/// short hold of the core, and few enough system calls.
const PREFAULT_STEP: usize = 64 * 1024;

/// Whether blocks allocated to `file` are the ones later writes land in (ext4, XFS, tmpfs):
/// only then can a mapping of it never meet a full disk.
pub(super) fn allocation_is_kept(file: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const TMPFS: i64 = 0x0102_1994;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `fstatfs` fills the struct it is given for a descriptor `file` owns.
    if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, reason = "`f_type`'s width differs across targets")]
    // SAFETY: initialised by the successful call above.
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
pub(super) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.log"))
}
