use super::*;
use proptest::prelude::*;

const LIMIT: usize = 1 << 20;

/// Feeds `input` in one chunk, then finishes; returns the events and what is left pending.
fn parse_all(input: &[u8]) -> (Vec<SseEvent>, Vec<u8>) {
    let mut p = SseParser::new(LIMIT);
    let mut events = p.push(input).expect("valid stream");
    events.extend(p.finish().expect("valid stream"));
    (events, p.pending().to_vec())
}

/// Feeds `input` split at `cuts` (sorted offsets), then finishes.
fn parse_split(input: &[u8], cuts: &[usize]) -> Result<(Vec<SseEvent>, Vec<u8>), SseError> {
    let mut p = SseParser::new(LIMIT);
    let mut events = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(from, input.len());
        events.extend(p.push(&input[from..cut])?);
        from = cut;
    }
    events.extend(p.finish()?);
    Ok((events, p.pending().to_vec()))
}

fn datas(events: &[SseEvent]) -> Vec<Option<&str>> {
    events.iter().map(|e| e.data.as_deref()).collect()
}

fn concat(events: &[SseEvent], pending: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
    out.extend_from_slice(pending);
    out
}

#[test]
fn lf_event_has_its_data_and_exact_raw() {
    let (events, pending) = parse_all(b"data: {\"a\":1}\n\n");
    assert_eq!(events.len(), 1);
    assert_eq!(&events[0].raw[..], b"data: {\"a\":1}\n\n");
    assert_eq!(events[0].data.as_deref(), Some("{\"a\":1}"));
    assert_eq!(events[0].event, None);
    assert!(pending.is_empty());
}

#[test]
fn crlf_and_lone_cr_line_ends_are_understood() {
    let input = b"data: a\r\n\r\ndata: b\r\rdata: c\n\r\n";
    let mut p = SseParser::new(LIMIT);
    let events = p.push(input).unwrap();
    assert_eq!(datas(&events), [Some("a"), Some("b"), Some("c")]);
    assert_eq!(&events[0].raw[..], b"data: a\r\n\r\n");
    assert_eq!(&events[1].raw[..], b"data: b\r\r");
    assert_eq!(&events[2].raw[..], b"data: c\n\r\n");
    assert!(p.pending().is_empty());
}

#[test]
fn cr_at_chunk_end_waits_for_a_possible_lf() {
    let mut p = SseParser::new(LIMIT);
    assert!(p.push(b"data: a\r\n\r").unwrap().is_empty(), "must not emit early");
    let events = p.push(b"\ndata: b\r").unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(&events[0].raw[..], b"data: a\r\n\r\n");
    assert_eq!(p.pending(), b"data: b\r");
    // A following byte other than LF settles the CR as a line end of its own.
    let events = p.push(b"\rdata: c\n\n").unwrap();
    assert_eq!(datas(&events), [Some("b"), Some("c")]);
    assert_eq!(&events[0].raw[..], b"data: b\r\r");
}

#[test]
fn finish_returns_an_event_ended_by_a_final_lone_cr() {
    let mut p = SseParser::new(LIMIT);
    assert!(p.push(b"data: x\r\r").unwrap().is_empty());
    assert_eq!(p.pending(), b"data: x\r\r");
    let events = p.finish().unwrap();
    assert_eq!(datas(&events), [Some("x")]);
    assert!(p.pending().is_empty());
}

#[test]
fn cut_off_stream_leaves_the_partial_event_pending() {
    let mut p = SseParser::new(LIMIT);
    let events = p.push(b"data: 1\n\ndata: {\"choices\":[{\"del").unwrap();
    assert_eq!(datas(&events), [Some("1")]);
    assert!(p.finish().unwrap().is_empty());
    assert_eq!(p.pending(), b"data: {\"choices\":[{\"del");
}

#[test]
fn event_without_blank_line_is_not_complete() {
    let mut p = SseParser::new(LIMIT);
    assert!(p.push(b"data: x\n").unwrap().is_empty());
    assert!(p.finish().unwrap().is_empty());
    assert_eq!(p.pending(), b"data: x\n");
}

#[test]
fn comment_only_event_has_no_data() {
    let (events, _) = parse_all(b": keep-alive\n\ndata: x\n\n");
    assert_eq!(datas(&events), [None, Some("x")]);
    assert_eq!(&events[0].raw[..], b": keep-alive\n\n");
}

#[test]
fn comments_inside_an_event_are_skipped() {
    let (events, _) = parse_all(b"data: a\n: note\ndata: b\n\n");
    assert_eq!(datas(&events), [Some("a\nb")]);
}

#[test]
fn stray_blank_lines_are_returned_so_no_byte_is_lost() {
    let (events, pending) = parse_all(b"\n\r\ndata: x\n\n\n");
    assert_eq!(datas(&events), [None, None, Some("x"), None]);
    assert_eq!(concat(&events, &pending), b"\n\r\ndata: x\n\n\n");
}

#[test]
fn multi_line_data_is_joined_with_newlines() {
    let (events, _) = parse_all(b"data: line one\ndata:line two\ndata:  indented\ndata\n\n");
    assert_eq!(datas(&events), [Some("line one\nline two\n indented\n")]);
}

#[test]
fn field_without_colon_has_empty_value() {
    let (events, _) = parse_all(b"data\n\nevent\ndata: x\n\n");
    assert_eq!(datas(&events), [Some(""), Some("x")]);
    assert_eq!(events[1].event.as_deref(), Some(""));
}

#[test]
fn empty_data_line_gives_empty_string_not_none() {
    let (events, _) = parse_all(b"data:\n\n");
    assert_eq!(datas(&events), [Some("")]);
}

#[test]
fn event_id_retry_and_unknown_fields() {
    let input = b"event: response.completed\nid: 7\nretry: 10\nfoo: bar\ndata: {}\n\n";
    let (events, _) = parse_all(input);
    assert_eq!(events[0].event.as_deref(), Some("response.completed"));
    assert_eq!(events[0].data.as_deref(), Some("{}"));
    assert_eq!(&events[0].raw[..], input);
}

#[test]
fn last_event_field_wins() {
    let (events, _) = parse_all(b"event: a\nevent: b\ndata: x\n\n");
    assert_eq!(events[0].event.as_deref(), Some("b"));
}

#[test]
fn only_one_space_after_the_colon_is_stripped() {
    let (events, _) = parse_all(b"data:  two\n\ndata:\tkept\n\n");
    assert_eq!(datas(&events), [Some(" two"), Some("\tkept")]);
}

#[test]
fn several_events_in_one_chunk_come_out_in_order() {
    let input = b"data: 1\n\ndata: 2\n\n: ping\n\ndata: 3\n\ndata: 4";
    let mut p = SseParser::new(LIMIT);
    let events = p.push(input).unwrap();
    assert_eq!(datas(&events), [Some("1"), Some("2"), None, Some("3")]);
    assert_eq!(p.pending(), b"data: 4");
}

#[test]
fn bom_at_stream_start_is_skipped_but_kept_in_raw() {
    let input = b"\xEF\xBB\xBFdata: x\n\n";
    let (events, _) = parse_all(input);
    assert_eq!(datas(&events), [Some("x")]);
    assert_eq!(&events[0].raw[..], input);
}

#[test]
fn bom_split_across_chunks_is_skipped() {
    let input = b"\xEF\xBB\xBFdata: x\n\n";
    for cut in 0..=input.len() {
        let (events, _) = parse_split(input, &[cut]).unwrap();
        assert_eq!(datas(&events), [Some("x")], "cut at {cut}");
    }
}

#[test]
fn bom_is_only_skipped_at_stream_start() {
    // Later on it is an ordinary part of the line, so the field name is not `data`.
    let (events, _) = parse_all(b"data: a\n\n\xEF\xBB\xBFdata: b\n\n");
    assert_eq!(datas(&events), [Some("a"), None]);
}

#[test]
fn bom_before_a_blank_line() {
    let (events, pending) = parse_all(b"\xEF\xBB\xBF\ndata: x\n\n");
    assert_eq!(datas(&events), [None, Some("x")]);
    assert!(pending.is_empty());
}

#[test]
fn invalid_utf8_in_data_is_an_error() {
    let mut p = SseParser::new(LIMIT);
    assert_eq!(p.push(b"data: \xff\xfe\n\n"), Err(SseError::InvalidUtf8));
    // The error is final.
    assert_eq!(p.push(b"data: ok\n\n"), Err(SseError::InvalidUtf8));
    assert_eq!(p.finish(), Err(SseError::InvalidUtf8));
}

#[test]
fn invalid_utf8_in_event_name_is_an_error() {
    let mut p = SseParser::new(LIMIT);
    assert_eq!(p.push(b"event: \xc3\x28\n"), Err(SseError::InvalidUtf8));
}

#[test]
fn invalid_utf8_in_a_comment_or_unknown_field_is_ignored() {
    let (events, _) = parse_all(b": \xff\nid: \xff\ndata: x\n\n");
    assert_eq!(datas(&events), [Some("x")]);
}

#[test]
fn multibyte_utf8_split_across_chunks_is_fine() {
    let input = "data: héllo 世界 🦀\n\n".as_bytes();
    for cut in 0..=input.len() {
        let (events, _) = parse_split(input, &[cut]).unwrap();
        assert_eq!(datas(&events), [Some("héllo 世界 🦀")], "cut at {cut}");
    }
}

#[test]
fn events_before_an_error_in_the_same_chunk_are_delivered_first() {
    let mut p = SseParser::new(LIMIT);
    let events = p.push(b"data: good\n\ndata: \xff\n\n").unwrap();
    assert_eq!(datas(&events), [Some("good")]);
    assert_eq!(p.pending(), b"data: \xff\n\n");
    assert_eq!(p.push(b"data: more\n\n"), Err(SseError::InvalidUtf8));
}

#[test]
fn event_growing_past_the_limit_is_an_error() {
    let mut p = SseParser::new(16);
    assert!(p.push(b"data: 0123456").unwrap().is_empty());
    assert_eq!(p.push(b"789abc"), Err(SseError::EventTooLarge { limit: 16 }));
    assert_eq!(p.push(b"\n\n"), Err(SseError::EventTooLarge { limit: 16 }));
}

#[test]
fn event_over_the_limit_in_one_chunk_is_an_error_too() {
    let mut p = SseParser::new(16);
    assert_eq!(p.push(b"data: 0123456789abcdef\n\n"), Err(SseError::EventTooLarge { limit: 16 }));
}

#[test]
fn the_limit_is_per_event_not_per_chunk() {
    let mut p = SseParser::new(16);
    let chunk = b"data: 12345678\n\n".repeat(100);
    assert_eq!(p.push(&chunk).unwrap().len(), 100);
}

#[test]
fn event_exactly_at_the_limit_is_accepted() {
    let mut p = SseParser::new(16);
    let events = p.push(b"data: 12345678\n\n").unwrap();
    assert_eq!(events.len(), 1);
}

#[test]
fn an_event_whose_blank_line_passes_the_limit_is_an_error() {
    // The data line fits (15 bytes); the blank line after it makes 16.
    for split in [None, Some(15)] {
        let input = b"data: 12345678\n\n";
        let mut p = SseParser::new(15);
        let result = match split {
            None => p.push(input),
            Some(at) => p.push(&input[..at]).and_then(|_| p.push(&input[at..])),
        };
        assert_eq!(result, Err(SseError::EventTooLarge { limit: 15 }), "split at {split:?}");
    }
}

#[test]
fn every_split_point_gives_the_same_events() {
    let input: &[u8] =
        b"\xEF\xBB\xBF: hi\r\n\r\nevent: e\rdata: a\r\ndata:b\n\r\rdata: {\"x\":\"\\n\"}\r\n\r\n\ndata: tail";
    let (whole, whole_pending) = parse_all(input);
    for i in 0..=input.len() {
        for j in i..=input.len() {
            let (events, pending) = parse_split(input, &[i, j]).unwrap();
            assert_eq!(events, whole, "cuts at {i}, {j}");
            assert_eq!(pending, whole_pending);
        }
    }
    assert_eq!(concat(&whole, &whole_pending), input);
}

#[test]
fn byte_at_a_time_scans_each_byte_about_once() {
    let mut input = b"data: ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 200_000));
    input.extend_from_slice(b"\r\r\n");
    let mut p = SseParser::new(LIMIT);
    let mut events = Vec::new();
    for b in &input {
        events.extend(p.push(std::slice::from_ref(b)).unwrap());
    }
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data.as_ref().map(String::len), Some(200_000));
    // Only a CR at a chunk's end is looked at twice.
    assert!(p.scanned <= input.len() + 2, "scanned {} bytes", p.scanned);
}

#[test]
fn empty_chunks_are_harmless() {
    let mut p = SseParser::new(LIMIT);
    assert!(p.push(b"").unwrap().is_empty());
    assert!(p.push(b"data: x\n").unwrap().is_empty());
    assert!(p.push(b"").unwrap().is_empty());
    assert_eq!(p.push(b"\n").unwrap().len(), 1);
}

/// One line of a generated event, before encoding.
#[derive(Clone, Debug)]
enum Line {
    Data(String),
    Event(String),
    Comment(String),
    Id(String),
    /// `data` with no colon: an empty data line.
    BareData,
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof!["[^\r\n]{0,12}", "[ a-z:{}\"\\\\]{0,12}", Just(String::new()), Just(" leading".to_owned()),]
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        4 => value().prop_map(Line::Data),
        1 => value().prop_map(Line::Event),
        1 => value().prop_map(Line::Comment),
        1 => value().prop_map(Line::Id),
        1 => Just(Line::BareData),
    ]
}

fn terminator() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]
}

type Event = Vec<(Line, &'static str, bool)>;

/// An event: its lines, each with a line end and whether to omit the optional space.
fn event() -> impl Strategy<Value = (Event, &'static str)> {
    (prop::collection::vec((line(), terminator(), any::<bool>()), 0..5), terminator())
}

/// Encodes `lines`, returning the expected `(data, event)` of the event they make.
fn encode_lines(out: &mut Vec<u8>, last_end: &mut &'static str, lines: &Event) -> (Option<String>, Option<String>) {
    let (mut data, mut event): (Option<String>, Option<String>) = (None, None);
    for (line, end, tight) in lines {
        let field = |out: &mut Vec<u8>, name: &str, v: &str| {
            out.extend_from_slice(name.as_bytes());
            // Without the optional space a value that starts with one would lose it.
            out.extend_from_slice(if *tight && !v.starts_with(' ') { b":" } else { b": " });
            out.extend_from_slice(v.as_bytes());
        };
        match line {
            Line::Data(v) => {
                field(out, "data", v);
                data = Some(match data {
                    Some(d) => format!("{d}\n{v}"),
                    None => v.clone(),
                });
            }
            Line::Event(v) => {
                field(out, "event", v);
                event = Some(v.clone());
            }
            Line::Comment(v) => {
                out.push(b':');
                out.extend_from_slice(v.as_bytes());
            }
            Line::Id(v) => field(out, "id", v),
            Line::BareData => {
                out.extend_from_slice(b"data");
                data = Some(match data {
                    Some(d) => format!("{d}\n"),
                    None => String::new(),
                });
            }
        }
        out.extend_from_slice(end.as_bytes());
        *last_end = end;
    }
    (data, event)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn roundtrip_at_random_split_points(
        bom in any::<bool>(),
        events in prop::collection::vec(event(), 0..8),
        tail in prop::collection::vec((line(), terminator(), any::<bool>()), 0..3),
        tail_end_cut in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut input = Vec::new();
        if bom {
            input.extend_from_slice(BOM);
        }
        let mut expected = Vec::new();
        let mut last_end: &'static str = "";
        for (lines, blank) in &events {
            expected.push(encode_lines(&mut input, &mut last_end, lines));
            // "\r" then a blank line "\n" would read as one "\r\n": the encoder must not
            // write an ambiguous stream, so use "\r" for that blank line instead.
            let blank = if last_end == "\r" && *blank == "\n" { "\r" } else { *blank };
            input.extend_from_slice(blank.as_bytes());
            last_end = blank;
        }
        // The BOM belongs to the first event, so with no event it is left pending too.
        let tail_start = if events.is_empty() { 0 } else { input.len() };
        encode_lines(&mut input, &mut last_end, &tail);
        if tail_end_cut && input.len() > tail_start + 1 {
            // Cut the tail mid-line, as a dropped connection would.
            input.pop();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.sort_unstable();

        let (got, pending) = parse_split(&input, &cuts).expect("generated stream is valid");
        prop_assert_eq!(concat(&got, &pending), input.clone());
        let got: Vec<_> = got.into_iter().map(|e| (e.data, e.event)).collect();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(&pending[..], &input[tail_start..]);
    }

    #[test]
    fn chunking_never_changes_the_outcome(
        input in prop::collection::vec(
            prop_oneof![
                Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'd'),
                Just(b'a'), Just(b't'), Just(0xEF), Just(0xBB), Just(0xBF), Just(0xFF),
            ],
            0..64,
        ),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        // A `data` prefix makes data lines likely among the random bytes.
        let input = [b"data".as_slice(), &input].concat();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        cuts.sort_unstable();
        let whole = collect_until_error(&input, &[]);
        let split = collect_until_error(&input, &cuts);
        prop_assert_eq!(&split, &whole);
        if let (events, Ok(pending)) = whole {
            prop_assert_eq!(concat(&events, &pending), input);
        }
    }
}

/// Events up to the first error, then the error or the pending bytes.
fn collect_until_error(input: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, Result<Vec<u8>, SseError>) {
    let mut p = SseParser::new(40);
    let mut events = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        match p.push(&input[from..cut]) {
            Ok(more) => events.extend(more),
            Err(e) => return (events, Err(e)),
        }
        from = cut;
    }
    match p.finish() {
        Ok(more) => events.extend(more),
        Err(e) => return (events, Err(e)),
    }
    // A deferred error surfaces on the next call.
    match p.push(b"") {
        Ok(_) => (events, Ok(p.pending().to_vec())),
        Err(e) => (events, Err(e)),
    }
}
