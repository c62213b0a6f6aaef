//! The SSE parser (and the stream metering behind it) on arbitrary upstream bytes, in
//! arbitrary chunks: never panics, loses no byte, keeps events within the size limit, and an
//! error is final.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::metering::sse::SseParser;
use tollgate::metering::usage::StreamAccumulator;

fuzz_target!(|data: &[u8]| {
    // Byte 0: the event size limit; byte 1: the chunk size; the rest: the stream.
    if data.len() < 2 {
        return;
    }
    let max = 1 + data[0] as usize * 4;
    let chunk = 1 + data[1] as usize % 64;
    let input = &data[2..];
    let mut parser = SseParser::new(max);
    let mut acc = StreamAccumulator::new(256);
    let mut raw = Vec::new();
    let mut failed = None;
    for piece in input.chunks(chunk) {
        match parser.push(piece) {
            Ok(events) => {
                for e in events {
                    assert!(e.raw.len() <= max + 3, "event of {} bytes over the limit {max}", e.raw.len());
                    raw.extend_from_slice(&e.raw);
                    if let Some(d) = &e.data {
                        acc.observe(d);
                    }
                }
                assert!(parser.pending().len() <= max + piece.len() + 3, "pending grew past the limit");
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if failed.is_none() {
        match parser.finish() {
            Ok(events) => raw.extend(events.iter().flat_map(|e| e.raw.iter().copied())),
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        None => {
            raw.extend_from_slice(parser.pending());
            assert_eq!(raw, input, "events + pending must reproduce the input");
        }
        Some(e) => {
            let pending = parser.pending().len();
            assert_eq!(parser.push(b"data: x\n\n"), Err(e));
            assert_eq!(parser.pending().len(), pending);
        }
    }
    if let Some(u) = acc.usage() {
        assert!(u.cached_input_tokens <= u.input_tokens);
    }
});
