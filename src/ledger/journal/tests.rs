//! The journal's unit tests: line encoding, replay, segment rotation and failures.

use super::line::{needs_escape, Line};
use super::segment::allocation_is_kept;
use super::*;
use crate::ledger::UsageSource;
use crate::policy::pricing::{NanoUsd, Usage};

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
                            let line = encode(LineOp::Write, &record(&format!("t{t}-{i:03}"), UsageSource::Reported));
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
