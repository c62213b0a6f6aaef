//! Usage extraction and response text on arbitrary upstream JSON: never panics, cached never
//! exceeds input, counts stay within the accepted maximum, the stream path agrees with the
//! whole-body path, and the direct reader of a non-streamed answer agrees with reading the
//! parsed value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::metering::usage::{read_answer, response_text, usage_from_json, StreamAccumulator, MAX_REPORTED_TOKENS};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut acc = StreamAccumulator::new(64);
    acc.observe(&text);
    assert!(acc.produced_text().len() <= 64);
    let v = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        // A `Value` refuses a number past f64's range that the typed reader skips, as the
        // clients' parsers accept it: such a body is well-formed JSON, not a refusal.
        Err(e) if e.to_string().starts_with("number out of range") => return,
        Err(_) => {
            assert_eq!(read_answer(data), None, "read_answer accepted what is not JSON");
            return;
        }
    };
    let usage = usage_from_json(&v);
    if let Some(u) = usage {
        assert!(u.cached_input_tokens <= u.input_tokens);
        assert!(u.input_tokens <= MAX_REPORTED_TOKENS && u.output_tokens <= MAX_REPORTED_TOKENS);
    }
    let text = response_text(&v);
    let expected = v.is_object().then(|| (usage, if usage.is_some() { String::new() } else { text }));
    assert_eq!(read_answer(data), expected, "read_answer disagrees with the Value-based readers");
    let mut acc = StreamAccumulator::new(64);
    acc.observe(&v.to_string());
    assert_eq!(acc.usage(), usage, "stream and body paths disagree");
});
