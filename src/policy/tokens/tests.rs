use super::image::*;
use super::py_json::*;
use super::rules::*;
use super::*;
use serde_json::{json, Map};
use std::time::{Duration, Instant};

/// Chat, completion and embedding bodies with the oracle's counts, written by
/// `gen_token_oracle.py` (delivered with this module): Python tiktoken 0.14 through
/// `shared/oracle/count_tokens.py`'s `count_request` for chat bodies, and
/// `len(enc.encode(s, disallowed_special=()))` per string for completion and embedding bodies.
/// Bodies are stored (and were counted) with sorted keys, so the nested tool schemas the oracle
/// serializes read the same here with or without serde_json's `preserve_order`. Every image in
/// it has a size the oracle can read and a model with a published rule: the cases where this
/// module deliberately counts more are tested separately below.
const ORACLE_FIXTURE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/token_oracle.json"));

fn kind_of(name: &str) -> PromptKind {
    match name {
        "chat" => PromptKind::Chat,
        "completion" => PromptKind::Completion,
        "embedding" => PromptKind::Embedding,
        other => panic!("unknown fixture kind {other}"),
    }
}

#[test]
fn counts_match_the_oracle_on_every_fixture() {
    let cases: Vec<Value> = serde_json::from_str(ORACLE_FIXTURE).expect("fixture is JSON");
    assert!(cases.len() >= 40, "fixture has {} cases", cases.len());
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let kind = kind_of(case["kind"].as_str().expect("kind"));
        let model = case["model"].as_str().expect("model");
        let expected = case["expected"].as_u64().expect("expected");
        let got = prompt_tokens(kind, model, &case["body"]);
        let bound = prompt_tokens_upper_bound(kind, model, &case["body"]);
        if got != expected {
            failures.push(format!("#{i} {kind:?} {model}: got {got}, oracle {expected}"));
        }
        assert!(bound >= got, "#{i} {model}: bound {bound} < exact {got}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bpe_count_equals_the_length_of_the_encoding() {
    // `count` skips building the token vector; check it agrees with `encode` on every string
    // of the fixture, for both vocabularies.
    let cases: Value = serde_json::from_str(ORACLE_FIXTURE).expect("fixture is JSON");
    let mut stack = vec![&cases];
    let mut strings = 0;
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => {
                for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
                    let encoded = enc.tokenizer().encode(s.as_str()).len();
                    assert_eq!(count_text(enc, s), to_u64(encoded), "{enc:?} {s:?}");
                }
                strings += 1;
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    assert!(strings > 200);
}

#[test]
fn cookbook_examples_match_the_prompt_tokens_openai_reported() {
    // The prompt_tokens the OpenAI API reported in the cookbook notebook (the oracle's selftest).
    let messages = json!([
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]);
    let tools = json!([{"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}},
            "required": ["location"]}}}]);
    let tool_messages = json!([
        {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
        {"role": "user", "content": "What's the weather like in San Francisco?"},
    ]);
    for (model, want) in [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)] {
        let body = json!({"model": model, "messages": messages});
        assert_eq!(prompt_tokens(PromptKind::Chat, model, &body), want, "{model}");
    }
    for (model, want) in [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)] {
        let body = json!({"model": model, "messages": tool_messages, "tools": tools});
        assert_eq!(prompt_tokens(PromptKind::Chat, model, &body), want, "{model} with tools");
    }
}

#[test]
fn special_token_lookalikes_are_ordinary_text() {
    // tiktoken 0.14's len(enc.encode(s, disallowed_special=())).
    for (enc, mixed) in [(Encoding::O200kBase, 15), (Encoding::Cl100kBase, 16)] {
        assert_eq!(count_text(enc, "<|endoftext|>"), 7, "{enc:?}");
        assert_eq!(count_text(enc, "a<|endoftext|>b<|fim_prefix|>"), mixed, "{enc:?}");
        let text = "x <|endoftext|> y";
        assert_eq!(count_text(enc, text), to_u64(enc.tokenizer().encode(text).len()));
    }
}

#[test]
fn encoding_follows_the_model_family() {
    use Encoding::{Cl100kBase as Cl, O200kBase as O2};
    for (model, enc) in [
        ("gpt-4o", O2),
        ("gpt-4o-mini-2024-07-18", O2),
        ("gpt-4.1-nano", O2),
        ("o1", O2),
        ("o3-mini", O2),
        ("gpt-5", O2),
        ("some-new-model", O2),
        ("gpt-4", Cl),
        ("gpt-4-0613", Cl),
        ("gpt-4-turbo", Cl),
        ("gpt-3.5-turbo-0125", Cl),
        ("gpt-3.5-turbo-instruct", Cl),
        ("gpt-35-turbo", Cl),
        ("text-embedding-3-small", Cl),
        ("text-embedding-ada-002", Cl),
        ("ft:gpt-3.5-turbo-0125:acme::abc123", Cl),
        ("ft:gpt-4o-2024-08-06:acme::abc123", O2),
        ("azure/gpt-4", Cl),
        ("openai/gpt-4o", O2),
        ("", O2),
    ] {
        assert_eq!(Encoding::for_model(model), enc, "{model}");
    }
}

#[test]
fn tool_constants_follow_the_model_family_including_fine_tunes() {
    let body = json!({"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]});
    let gpt4 = prompt_tokens(PromptKind::Chat, "gpt-4", &body);
    let gpt4o = prompt_tokens(PromptKind::Chat, "gpt-4o", &body);
    assert_eq!(gpt4, gpt4o + 3, "func_init is 10 for gpt-4, 7 for gpt-4o");
    // The oracle would give a gpt-4 fine-tune gpt-4o's constants; its base model's are right.
    assert_eq!(prompt_tokens(PromptKind::Chat, "ft:gpt-4-0613:acme::x", &body), gpt4);
}

fn image_body(model: &str, url: &str, detail: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]})
}

/// Messages overhead of `image_body`: 3 per message + "user" (1) + 3 priming.
const IMAGE_BODY_TEXT: u64 = 7;

#[test]
fn images_of_unknown_size_are_charged_the_worst_case() {
    for (model, detail, want) in [
        ("gpt-4o", "high", 85 + 8 * 170),
        ("gpt-4o", "auto", 85 + 8 * 170),
        ("gpt-4o", "low", 85),
        ("gpt-4o-mini", "auto", 2833 + 8 * 5667),
        ("o1", "high", 75 + 8 * 150),
        ("gpt-4.1-mini", "low", 2489), // ceil(1536 * 1.62): patches ignore detail
        ("gpt-4.1-nano", "high", 3779),
        ("o4-mini", "auto", 2642),
        ("gpt-5", "high", 85 + 8 * 170), // no published rule: gpt-4o's
    ] {
        for url in [
            "https://example.com/cat.png",
            "data:image/png;base64,iVBORw0KGgo=", // truncated before the size
            "data:image/png;charset=x;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
        ] {
            let body = image_body(model, url, detail);
            let got = prompt_tokens(PromptKind::Chat, model, &body);
            assert_eq!(got, IMAGE_BODY_TEXT + want, "{model} {detail} {url}");
            assert!(prompt_tokens_upper_bound(PromptKind::Chat, model, &body) >= got);
        }
    }
}

#[test]
fn image_rules_reproduce_openais_published_examples() {
    // OpenAI's vision guide and the oracle's selftest.
    assert_eq!(TILES_4O.tokens(Some((1024, 1024)), false), 765);
    assert_eq!(TILES_4O.tokens(Some((2048, 4096)), false), 1105);
    assert_eq!(TILES_4O.tokens(Some((4096, 8192)), true), 85);
    assert_eq!(TILES_4O.tokens(Some((128, 64)), false), 255);
    let mini = ImageRule::for_base_model("gpt-4o-mini");
    assert_eq!(mini.tokens(Some((128, 64)), true), 2833);
    assert_eq!(mini.tokens(Some((128, 64)), false), 8500);
    // Patch rule: the oracle's image_tokens("gpt-4.1-mini", 1024, 1024, "auto") and so on.
    let patches = ImageRule::for_base_model("gpt-4.1-mini");
    assert_eq!(patches.tokens(Some((1024, 1024)), false), 1659);
    assert_eq!(patches.tokens(Some((1800, 2400)), false), 2353);
    assert_eq!(ImageRule::for_base_model("o4-mini").tokens(Some((1, 100_000)), false), 0);
}

#[test]
fn no_image_exceeds_its_worst_case() {
    let mut rng = SplitMix64(7);
    for rule in [TILES_4O, ImageRule::for_base_model("gpt-4.1-nano")] {
        let worst = rule.tokens(None, false);
        for _ in 0..20_000 {
            let w = 1 + rng.next() % (1 << rng.below(33));
            let h = 1 + rng.next() % (1 << rng.below(33));
            assert!(rule.tokens(Some((w, h)), false) <= worst, "{rule:?} {w}x{h}");
        }
    }
}

#[test]
fn data_url_decoding_matches_pythons_lenient_base64() {
    // Expected values from CPython 3.11: base64.b64decode(s + "====", validate=False).
    let cases: [(&str, Option<&[u8]>); 9] = [
        ("", Some(b"")),
        ("QQ", Some(b"A")),
        ("QUI", Some(b"AB")),
        ("QUJD", Some(b"ABC")),
        ("Q", None),
        ("QUJDR", None),
        ("QU\nJD\r\n", Some(b"ABC")),
        ("QU=JD", Some(b"ABC")),   // a pad after one char of a quad is ignored
        ("QUI=QUJD", Some(b"AB")), // a complete pad sequence ends the input
    ];
    for (input, want) in cases {
        let got = py_b64decode_lenient(input.as_bytes(), usize::MAX);
        assert_eq!(got.as_deref(), want, "{input:?}");
    }
    assert_eq!(py_b64decode_lenient(b"QUJDQUJD", 4).as_deref(), Some(&b"ABCA"[..]));
}

#[test]
fn image_headers_are_read_like_the_oracle() {
    let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    assert_eq!(image_size_from_data_url(png), Some((1, 1)));
    let gif = b"GIF89a\x40\x01\xf0\x00";
    assert_eq!(image_size_from_bytes(gif), Some((320, 240)));
    // A WebP VP8X header cut short: Python's int.from_bytes reads what is there.
    assert_eq!(image_size_from_bytes(b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0\0\0\0\0\x10"), Some((1, 4097)));
    // A JPEG whose frame header lies beyond the 49,152 bytes the oracle decodes is unknown.
    let mut jpeg = vec![0xff, 0xd8];
    for _ in 0..2 {
        jpeg.extend_from_slice(&[0xff, 0xe1, 0xff, 0xff]);
        jpeg.resize(jpeg.len() + 0xfffd, 0);
    }
    jpeg.extend_from_slice(&[0xff, 0xc0, 0, 17, 8, 0x01, 0x00, 0x02, 0x00, 3]);
    assert_eq!(image_size_from_bytes(&jpeg), Some((512, 256)));
    let url = format!("data:image/jpeg;base64,{}", b64(&jpeg));
    assert_eq!(image_size_from_data_url(&url), None);
    // Non-ASCII inside the base64 makes Python's b64decode raise.
    assert_eq!(image_size_from_data_url("data:image/gif;base64,R0lGODlhQAHwAA==é"), None);
    assert_eq!(image_size_from_data_url("data:image/gif;base64,R0lGODlhQAHwAA=="), Some((320, 240)));
}

#[test]
fn python_spellings_of_json_values() {
    for (x, want) in [
        (1.0, "1.0"),
        (0.5, "0.5"),
        (-2.25, "-2.25"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (1234567890123456.7, "1234567890123456.8"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (5e-324, "5e-324"),
        (-0.0, "-0.0"),
        (123.456, "123.456"),
        (0.1 + 0.2, "0.30000000000000004"),
    ] {
        assert_eq!(py_float_repr(x), want);
    }
    // serde_json keeps source key order (the `preserve_order` feature), as Python does.
    let v = json!({"a": "é😀\"\\\n\u{1}\u{7f}~", "b": [1, 2.0, null, true]});
    let mut out = String::new();
    write_py_json(&v, &mut out);
    assert_eq!(out, r#"{"a":"\u00e9\ud83d\ude00\"\\\n\u0001\u007f~","b":[1,2.0,null,true]}"#);
    let mut len = JsonLen(0);
    write_py_json(&v, &mut len);
    assert_eq!(len.0, to_u64(out.len()));
    assert_eq!(py_str(&json!(null)), "None");
    assert_eq!(py_str(&json!(false)), "False");
    assert_eq!(py_str(&json!(-7)), "-7");
    assert_eq!(py_str(&json!(u64::MAX)), u64::MAX.to_string());
    assert!(py_isspace('\u{1f}') && py_isspace('\u{3000}') && !py_isspace('\u{200b}'));
}

#[test]
fn completion_and_embedding_inputs_in_every_shape() {
    let model = "gpt-3.5-turbo-instruct";
    let hello = count_text(Encoding::Cl100kBase, "Hello, world");
    for (prompt, want) in [
        (json!("Hello, world"), hello),
        (json!(["Hello, world", "Hello, world"]), 2 * hello),
        (json!([1, 2, 3]), 3),
        (json!([[1, 2], [3], []]), 3),
        (json!(null), 0),
        (json!({"text": "x"}), 0),
    ] {
        let body = json!({"model": model, "prompt": prompt});
        assert_eq!(prompt_tokens(PromptKind::Completion, model, &body), want, "{prompt}");
        let body = json!({"model": model, "input": prompt});
        assert_eq!(prompt_tokens(PromptKind::Embedding, model, &body), want, "{prompt}");
    }
    assert_eq!(prompt_tokens(PromptKind::Chat, "gpt-4o", &json!("not an object")), 0);
    assert_eq!(prompt_tokens(PromptKind::Chat, "gpt-4o", &json!({})), 3);
}

// --------------------------------------------------------------------------------- hostile

/// A small deterministic PRNG (SplitMix64), easy to reproduce in Python for the oracle.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `len` characters of base62, each `ALPHABET[next() % 62]` from SplitMix64 seeded with 62.
fn random_base62(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = SplitMix64(62);
    (0..len).map(|_| char::from(ALPHABET[(rng.below(62)) as usize])).collect()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn hostile_megabytes_count_like_tiktoken_and_quickly() {
    const MIB: usize = 1 << 20;
    let one_letter = "a".repeat(MIB);
    let base62 = random_base62(MIB);
    // From `count_tokens.py --text-file F --encoding E` (tiktoken 0.14), F holding the same
    // string written by the same SplitMix64 in Python.
    for (name, text, o200k, cl100k) in
        [("1 MiB of 'a'", &one_letter, 131_072, 131_072), ("1 MiB of base62", &base62, 711_068, 750_395)]
    {
        for (enc, want) in [(Encoding::O200kBase, o200k), (Encoding::Cl100kBase, cl100k)] {
            let start = Instant::now();
            assert_eq!(count_text(enc, text), want, "{name} {enc:?}");
            // Generous for an unoptimized build on a shared machine; tiktoken's quadratic
            // merge needs minutes here. Release builds take ~10 ms.
            assert!(start.elapsed() < Duration::from_secs(20), "{name} {enc:?} took {:?}", start.elapsed());
        }
    }
}

/// A random JSON value shaped like a chat body: the right keys with values of any type.
fn random_value(rng: &mut SplitMix64, depth: u32) -> Value {
    const KEYS: [&str; 16] = [
        "role",
        "content",
        "name",
        "tool_calls",
        "function_call",
        "function",
        "arguments",
        "type",
        "text",
        "image_url",
        "url",
        "detail",
        "description",
        "parameters",
        "properties",
        "enum",
    ];
    const STRINGS: [&str; 12] = [
        "",
        "user",
        "text",
        "image_url",
        "low",
        "high",
        ".",
        "hello world. ",
        "<|endoftext|>",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ",
        "data:image/gif;base64,R0lGODlhQAHwAA",
        "数据 😀\r\n",
    ];
    let leaf = depth == 0 || rng.below(3) == 0;
    match rng.below(if leaf { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => match rng.below(3) {
            0 => json!(rng.next() as i64),
            1 => json!(rng.below(10)),
            _ => json!((rng.next() as f64) / 3.0e7 - 3.0e11),
        },
        3 | 4 => {
            if rng.below(4) == 0 {
                // Random bytes after an image magic number, to exercise the header parsers.
                let magic: [&[u8]; 5] =
                    [b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8X", b"RIFF\0\0\0\0WEBPVP8 ", b"\xff\xd8"];
                let mut bytes = magic[rng.below(5) as usize].to_vec();
                bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8));
                Value::String(format!("data:image/x;base64,{}", b64(&bytes)))
            } else {
                Value::String(STRINGS[rng.below(STRINGS.len() as u64) as usize].to_string())
            }
        }
        5 => Value::Array((0..rng.below(5)).map(|_| random_value(rng, depth - 1)).collect()),
        _ => Value::Object(
            (0..rng.below(6))
                .map(|_| (KEYS[rng.below(KEYS.len() as u64) as usize].to_string(), random_value(rng, depth - 1)))
                .collect(),
        ),
    }
}

#[test]
fn random_bodies_never_panic_and_stay_under_the_bound() {
    let mut rng = SplitMix64(2024);
    let models = ["gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo-0301", "gpt-4.1-nano", "o1", "x/ft:gpt-4o:a::b"];
    for round in 0..3000 {
        let mut body = Map::new();
        for key in ["messages", "tools", "functions", "prompt", "input"] {
            if rng.below(3) != 0 {
                body.insert(key.to_string(), random_value(&mut rng, 5));
            }
        }
        // Bias towards well-formed shapes so the deep paths (tools, images) are reached.
        if rng.below(2) == 0 {
            let part = json!({"type": "image_url", "image_url": {"url": random_value(&mut rng, 0), "detail": "high"}});
            let props = json!({"p": {"type": random_value(&mut rng, 1), "enum": random_value(&mut rng, 2),
                                     "items": random_value(&mut rng, 3), "description": random_value(&mut rng, 0)}});
            body.insert(
                "messages".into(),
                json!([{"role": "user", "name": "n", "content": [part, random_value(&mut rng, 2)]}]),
            );
            body.insert(
                "tools".into(),
                json!([{"function": {"name": random_value(&mut rng, 0), "parameters": {"properties": props}}}]),
            );
        }
        let body = Value::Object(body);
        let model = models[round % models.len()];
        for kind in [PromptKind::Chat, PromptKind::Completion, PromptKind::Embedding] {
            let exact = prompt_tokens(kind, model, &body);
            let bound = prompt_tokens_upper_bound(kind, model, &body);
            assert!(bound >= exact, "{kind:?} {model}: bound {bound} < exact {exact} for {body}");
        }
    }
}

#[test]
fn deeply_nested_schemas_do_not_overflow_the_stack() {
    let mut nested = json!("leaf");
    for _ in 0..100_000 {
        // Not `json!([nested])`: that round-trips through the (recursive) serializer.
        nested = Value::Array(vec![nested]);
    }
    let mut len = JsonLen(0);
    write_py_json(&nested, &mut len);
    assert_eq!(len.0, 2 * 100_000 + 6);
    // serde_json drops values recursively; unwind the nesting by hand so the test itself
    // does not overflow.
    while let Value::Array(mut items) = nested {
        nested = items.pop().unwrap_or(Value::Null);
    }
}

/// About 128k o200k tokens of mixed prose, code, JSON and CJK, as one user message.
fn document_128k() -> Value {
    let chunk = concat!(
        "The gateway reserves an estimate before each upstream call and settles it afterwards. ",
        "fn main() { let x: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!(\"{x:?}\"); }\n",
        "{\"id\": 42, \"tags\": [\"alpha\", \"beta\"], \"price\": 0.075, \"ok\": true}\r\n",
        "预算在达到限制之前会降级到更便宜的模型。 😀 ",
    );
    let mut text = String::new();
    while count_text(Encoding::O200kBase, &text) < 128_000 {
        for _ in 0..200 {
            text.push_str(chunk);
        }
    }
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
}

#[test]
fn upper_bound_is_at_least_ten_times_faster_on_a_long_document() {
    let body = document_128k();
    let model = "gpt-4o";
    let _ = prompt_tokens(PromptKind::Chat, model, &json!({})); // load the vocabulary first
    let time = |f: &dyn Fn() -> u64| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let exact_time = time(&|| prompt_tokens(PromptKind::Chat, model, &body));
    let bound_time = time(&|| prompt_tokens_upper_bound(PromptKind::Chat, model, &body));
    let exact = prompt_tokens(PromptKind::Chat, model, &body);
    let bound = prompt_tokens_upper_bound(PromptKind::Chat, model, &body);
    eprintln!("128k-token document: exact {exact} tokens in {exact_time:?}, bound {bound} in {bound_time:?}");
    assert!(bound >= exact);
    assert!(bound_time * 10 <= exact_time, "bound {bound_time:?} vs exact {exact_time:?}");
}
