//! Property tests for every parser that reads bytes a client, an upstream or an operator
//! controls (issue 4, "Fuzzing"): request parsing and rewriting, the SSE parser, usage
//! extraction, local token counting and config parsing.
//!
//! These complement the unit tests and proptests inside `src/metering/{sse,usage,tokens}.rs`
//! rather than repeating them: here the inputs are full-range bytes and end-to-end shapes (an
//! OpenAI stream through the parser *and* the accumulator, a request through `parse` *and*
//! `rewrite`), with exact oracles where the contract allows one. Regression inputs found by
//! `cargo fuzz` (see `fuzz/`) are pinned at the bottom of this file.
//!
//! Case counts are kept modest so the binary stays well under 30 s in a debug build; raise
//! them locally with `PROPTEST_CASES=10000 cargo test --test proptest_parsers`.

use axum::response::IntoResponse;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use tollgate::metering::sse::{SseError, SseEvent, SseParser};
use tollgate::metering::usage::{read_answer, response_text, usage_from_json, ChunkKind, StreamAccumulator, Usage};
use tollgate::policy::request::{parse, parse_full, Endpoint, ParsedRequest};
use tollgate::policy::tokens::{prompt_tokens, prompt_tokens_upper_bound, PromptKind};

/// Cases per property: the `PROPTEST_CASES` environment variable, else `default`.
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

const ENDPOINTS: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

// ================================================================================================
// Request parsing and rewriting

/// The checks every request parse must pass, whatever the input: no panic; a refusal is a
/// 4xx that renders; an acceptance can be rewritten into a JSON object carrying the new model.
fn check_parse(endpoint: Endpoint, body: &[u8], upstream_model: &str) -> Result<(), TestCaseError> {
    let body = &Bytes::copy_from_slice(body);
    check_same_as_full_parse(endpoint, body, upstream_model)?;
    match parse(endpoint, body) {
        Err(e) => {
            let e = tollgate::error::ApiError::from(e);
            let status = e.status();
            prop_assert!(status.is_client_error(), "{endpoint:?}: refusal with status {status}: {e:?}");
            let response = e.into_response();
            prop_assert_eq!(response.status(), status);
        }
        Ok(p) => {
            prop_assert!(!p.model.is_empty());
            prop_assert!((1..=128).contains(&p.n), "n = {}", p.n);
            let out = p.rewrite(body, upstream_model);
            let v: Value = serde_json::from_slice(&out).map_err(|e| {
                TestCaseError::fail(format!("rewrite is not JSON ({e}): {:?}", String::from_utf8_lossy(&out)))
            })?;
            prop_assert_eq!(&v["model"], &json!(upstream_model));
            if p.stream {
                prop_assert_eq!(&v["stream_options"]["include_usage"], &json!(true));
            }
            // The rewritten body parses again, to the same request.
            let again =
                parse(endpoint, &out).map_err(|e| TestCaseError::fail(format!("rewritten body is refused: {e:?}")))?;
            prop_assert_eq!(again.stream, p.stream);
            prop_assert_eq!((again.max_tokens, again.max_completion_tokens), (p.max_tokens, p.max_completion_tokens));
            prop_assert_eq!(again.n, p.n);
        }
    }
    Ok(())
}

/// `parse` reads common chat bodies with a skim instead of the full reader: whatever it
/// accepts that way must come out as the full reader reads it, field by field and in what a
/// rewrite sends upstream; its token bound must bound the full reader's (equal to it when no
/// string holds an escape, which the skim counts at its written length).
fn check_same_as_full_parse(endpoint: Endpoint, body: &Bytes, upstream_model: &str) -> Result<(), TestCaseError> {
    let (fast, full) = (parse(endpoint, body), parse_full(endpoint, body));
    let (fast, full) = match (fast, full) {
        (Ok(fast), Ok(full)) => (fast, full),
        (Err(fast), Err(full)) => {
            prop_assert_eq!(format!("{fast:?}"), format!("{full:?}"));
            return Ok(());
        }
        (fast, full) => return Err(TestCaseError::fail(format!("parse: {fast:?}\nfull parse: {full:?}"))),
    };
    prop_assert_eq!(&fast.model, &full.model);
    prop_assert_eq!(fast.stream, full.stream);
    prop_assert_eq!(fast.client_wants_usage, full.client_wants_usage);
    prop_assert_eq!(fast.max_tokens, full.max_tokens);
    prop_assert_eq!(fast.max_completion_tokens, full.max_completion_tokens);
    prop_assert_eq!(fast.n, full.n);
    prop_assert_eq!(fast.needs, full.needs);
    prop_assert_eq!(fast.prompt.value(), full.prompt.value());
    for upstream in [upstream_model, full.model.as_str()] {
        prop_assert_eq!(fast.rewrite(body, upstream), full.rewrite(body, upstream));
    }
    if let Some(chat) = fast.plain_chat {
        for model in [upstream_model, "gpt-4o", "gpt-3.5-turbo-0301"] {
            let walked = prompt_tokens_upper_bound(PromptKind::Chat, model, full.prompt.value());
            let bound = chat.upper_bound(model);
            prop_assert!(bound >= walked, "{model}: skimmed bound {bound} < walked bound {walked}");
            if !body.contains(&b'\\') {
                prop_assert_eq!(bound, walked, "{}: no escapes, so the bounds agree", model);
            }
            prop_assert!(bound >= prompt_tokens(PromptKind::Chat, model, full.prompt.value()));
        }
    }
    Ok(())
}

/// JSON values shaped like request bodies: the keys tollgate reads, with values of every type.
fn arb_request_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..200).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            Just("gpt-4o".to_string()),
            Just(String::new()),
            Just("user".to_string()),
            Just("image_url".to_string()),
            Just("json_schema".to_string()),
            "\\PC{0,8}",
            "[\"\\\\/\u{0}\u{1f}\u{7f}\u{2028}é😀]{0,4}",
        ]
        .prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just("model"),
        Just("messages"),
        Just("stream"),
        Just("stream_options"),
        Just("include_usage"),
        Just("max_tokens"),
        Just("max_completion_tokens"),
        Just("n"),
        Just("tools"),
        Just("functions"),
        Just("content"),
        Just("role"),
        Just("type"),
        Just("image_url"),
        Just("response_format"),
        Just("prompt"),
        Just("input"),
        Just("temperature"),
        Just("seed"),
        Just("logprobs"),
        Just("user"),
        Just("stop"),
        Just("logit_bias"),
        Just("x"),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((key.clone(), inner), 0..7)
                .prop_map(|e| Value::Object(e.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// An upstream model name: plain, or with characters that need escaping.
fn arb_model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.:/-]{1,24}",
        1 => "\\PC{1,8}",
        1 => "[\"\\\\\u{0}\n\u{2028}é😀a]{1,6}",
    ]
}

// ---- Well-formed chat bodies with known spans ---------------------------------------------------

/// A chat body built token by token, with the byte spans `rewrite` may touch.
#[derive(Debug, Clone)]
struct ChatBody {
    text: String,
    model: String,
    model_span: (usize, usize),
    stream: bool,
    /// `stream_options` as sent, and the span of its value.
    stream_options: Option<(Value, (usize, usize))>,
    n: u64,
    max_output: Option<u64>,
}

fn ws() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just(String::new()), 1 => "[ \t\r\n]{1,3}"]
}

/// JSON text for a string, with serde's escaping or with every character escaped as `\uXXXX`.
fn json_string_text(s: &str, escape_all: bool) -> String {
    if !escape_all {
        return serde_json::to_string(s).unwrap();
    }
    let mut out = String::from("\"");
    for unit in s.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
    out
}

fn arb_message() -> impl Strategy<Value = Value> {
    let text = prop_oneof!["\\PC{0,24}", "[a-z ]{0,40}", Just("<|endoftext|>".to_string())];
    let role = prop_oneof![Just("system"), Just("developer"), Just("user"), Just("assistant"), Just("tool")];
    (role, text.clone(), prop::option::of("[a-z_]{1,8}"), any::<bool>(), text).prop_map(
        |(role, content, name, parts, extra)| {
            let mut m = json!({"role": role});
            m["content"] = if parts {
                json!([{"type": "text", "text": content}, {"type": "text", "text": extra}])
            } else {
                json!(content)
            };
            if let Some(name) = name {
                m["name"] = json!(name);
            }
            m
        },
    )
}

/// Other top-level members a client may send (passed through untouched).
fn arb_extra_member() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop_oneof![Just("0.7"), Just("1.50"), Just("1e-3"), Just("0"), Just("-0.0"), Just("2E+0")]
            .prop_map(|t| ("temperature".to_string(), t.to_string())),
        "\\PC{0,12}".prop_map(|u| ("user".to_string(), serde_json::to_string(&u).unwrap())),
        arb_request_json().prop_map(|v| ("metadata".to_string(), v.to_string())),
        Just((
            "tools".to_string(),
            r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"string","enum":["x","y"]}}}}}]"#
                .to_string()
        )),
        Just(("response_format".to_string(), r#"{"type":"json_object"}"#.to_string())),
        Just(("seed".to_string(), "18446744073709551615".to_string())),
        // Every common field, with a value of its type (or `null`).
        (prop::sample::select(CHAT_FIELDS[..12].to_vec()), any::<prop::sample::Index>(), any::<bool>()).prop_map(|((field, good, _), pick, null)| {
            let value = if null { "null" } else { good[pick.index(good.len())] };
            (field.to_string(), value.to_string())
        }),
    ]
}

/// A field, JSON texts of values of its type, and of values of other types.
type FieldCase = (&'static str, &'static [&'static str], &'static [&'static str]);

/// The common chat fields whose types both readers check (the last, read for the
/// reservation, is left out of the extra members `arb_chat_body` adds).
const CHAT_FIELDS: [FieldCase; 13] = [
    ("temperature", &["0.7", "1", "0", "-0.5", "2E+0"], &["\"0.7\"", "true", "[1]", "{}"]),
    ("top_p", &["0.9", "1"], &["\"1\"", "false"]),
    ("presence_penalty", &["-1.5", "0"], &["\"x\"", "[]"]),
    ("frequency_penalty", &["0.25", "2"], &["{\"a\":1}", "true"]),
    ("seed", &["42", "0", "-7", "18446744073709551615"], &["4.5", "\"42\"", "1e3", "99999999999999999999999"]),
    ("top_logprobs", &["5", "0"], &["5.0", "\"5\"", "true"]),
    ("logprobs", &["true", "false"], &["1", "\"true\""]),
    ("parallel_tool_calls", &["false", "true"], &["0", "\"no\""]),
    ("user", &["\"u-1\"", "\"\\u00e9\"", "\"\""], &["7", "[\"u\"]", "{}"]),
    ("stop", &["\"\\n\"", "[\"a\",\"b\"]", "[]"], &["5", "[1]", "[\"a\",null]", "{}"]),
    ("logit_bias", &["{\"50256\":-100}", "{}"], &["[]", "\"x\"", "1"]),
    (
        "response_format",
        &["{\"type\":\"text\"}", "{\"type\":\"json_schema\",\"json_schema\":{}}"],
        &["\"json\"", "[]", "true"],
    ),
    ("max_completion_tokens", &["16", "0"], &["16.5", "-1", "\"16\""]),
];

fn arb_stream_options() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop_oneof![
        Just(Value::Null),
        Just(json!({})),
        Just(json!({"include_usage": true})),
        Just(json!({"include_usage": false})),
        Just(json!({"include_usage": null})),
        Just(json!({"include_usage": false, "continuous_usage_stats": true})),
        Just(json!({"other": [1, {"a": "b"}]})),
    ])
}

prop_compose! {
    fn arb_chat_body()(
        model in arb_model_name(),
        escape_model in any::<bool>(),
        messages in prop::collection::vec(arb_message(), 1..4),
        stream in prop::option::of(prop_oneof![Just("true"), Just("false"), Just("null")]),
        stream_options in arb_stream_options(),
        n in prop::option::of(1u64..=128),
        max_tokens in prop::option::of(prop_oneof![Just("max_tokens"), Just("max_completion_tokens")]),
        max_value in 0u64..100_000,
        extras in prop::collection::vec(arb_extra_member(), 0..3),
        order in any::<prop::sample::Index>(),
        spaces in prop::collection::vec(ws(), 40),
    ) -> ChatBody {
        let model_text = json_string_text(&model, escape_model && model.is_ascii());
        let mut members: Vec<(String, String)> = vec![
            ("model".into(), model_text),
            ("messages".into(), Value::Array(messages).to_string()),
        ];
        if let Some(s) = stream {
            members.push(("stream".into(), s.into()));
        }
        if let Some(o) = &stream_options {
            members.push(("stream_options".into(), o.to_string()));
        }
        if let Some(n) = n {
            members.push(("n".into(), n.to_string()));
        }
        if let Some(field) = max_tokens {
            members.push((field.into(), max_value.to_string()));
        }
        let mut seen: Vec<String> = members.iter().map(|m| m.0.clone()).collect();
        for (k, v) in extras {
            if !seen.contains(&k) {
                seen.push(k.clone());
                members.push((k, v));
            }
        }
        // Rotate the members so `model` is not always first.
        let k = order.index(members.len());
        members.rotate_left(k);

        let mut sp = spaces.into_iter().cycle();
        let mut text = sp.next().unwrap();
        text.push('{');
        let mut model_span = (0, 0);
        let mut so_span = None;
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&sp.next().unwrap());
            text.push_str(&serde_json::to_string(key).unwrap());
            text.push_str(&sp.next().unwrap());
            text.push(':');
            text.push_str(&sp.next().unwrap());
            let start = text.len();
            text.push_str(value);
            let span = (start, text.len());
            text.push_str(&sp.next().unwrap());
            match key.as_str() {
                "model" => model_span = span,
                "stream_options" => so_span = Some(span),
                _ => {}
            }
        }
        text.push('}');
        text.push_str(&sp.next().unwrap());
        ChatBody {
            text,
            model,
            model_span,
            stream: stream == Some("true"),
            stream_options: stream_options.map(|o| (o, so_span.unwrap())),
            n: n.unwrap_or(1),
            max_output: max_tokens.map(|_| max_value),
        }
    }
}

/// Checks `out` against `input` with the known edit at `known` (span → exact new text) and at
/// most one other edit at `other` (span, possibly empty, whose new text is returned).
fn splice_check<'a>(
    input: &str,
    out: &'a str,
    known: Option<((usize, usize), String)>,
    other: Option<(usize, usize)>,
) -> Result<&'a str, TestCaseError> {
    // Apply the known edit to the input, shifting the other span.
    let (mut expected, mut other) = (input.to_string(), other);
    if let Some(((s, e), text)) = &known {
        expected = format!("{}{}{}", &input[..*s], text, &input[*e..]);
        if let Some((os, oe)) = other {
            if os >= *e {
                let shift = |x: usize| x + text.len() - (e - s);
                other = Some((shift(os), shift(oe)));
            }
        }
    }
    match other {
        None => {
            prop_assert_eq!(out, expected.as_str());
            Ok("")
        }
        Some((os, oe)) => {
            let (prefix, suffix) = (&expected.as_bytes()[..os], &expected.as_bytes()[oe..]);
            let o = out.as_bytes();
            prop_assert!(o.len() >= prefix.len() + suffix.len(), "output shorter than the untouched bytes");
            prop_assert_eq!(&o[..os], prefix, "bytes before the edit changed");
            prop_assert_eq!(&o[o.len() - suffix.len()..], suffix, "bytes after the edit changed");
            Ok(&out[os..out.len() - suffix.len()])
        }
    }
}

fn without(v: &Value, keys: &[&str]) -> Map<String, Value> {
    let mut m = v.as_object().unwrap().clone();
    for k in keys {
        m.remove(*k);
    }
    m
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(
        body in prop::collection::vec(any::<u8>(), 0..256),
        upstream in arb_model_name(),
    ) {
        for endpoint in ENDPOINTS {
            check_parse(endpoint, &body, &upstream)?;
        }
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_bodies(
        body in arb_chat_body(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        upstream in arb_model_name(),
    ) {
        let mut bytes = body.text.into_bytes();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.push(byte),
            }
        }
        for endpoint in ENDPOINTS {
            check_parse(endpoint, &bytes, &upstream)?;
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_json_values(
        v in arb_request_json(),
        pretty in any::<bool>(),
        upstream in arb_model_name(),
    ) {
        let text = if pretty { serde_json::to_vec_pretty(&v).unwrap() } else { serde_json::to_vec(&v).unwrap() };
        for endpoint in ENDPOINTS {
            check_parse(endpoint, &text, &upstream)?;
        }
    }

    /// `rewrite` changes exactly `model` (when the upstream name differs) and, for a stream
    /// whose client did not ask for usage, `stream_options.include_usage`; every other byte is
    /// the client's.
    #[test]
    fn rewrite_touches_only_model_and_the_usage_option(body in arb_chat_body(), upstream in arb_model_name(), same in any::<bool>()) {
        let upstream = if same { body.model.clone() } else { upstream };
        check_same_as_full_parse(Endpoint::Chat, &Bytes::from(body.text.clone()), &upstream)?;
        let p: ParsedRequest = parse(Endpoint::Chat, &Bytes::from(body.text.clone()))
            .map_err(|e| TestCaseError::fail(format!("valid body refused: {e:?}\n{}", body.text)))?;
        let wants_usage = matches!(&body.stream_options, Some((o, _)) if o["include_usage"] == json!(true));
        prop_assert_eq!(&p.model, &body.model);
        prop_assert_eq!(p.stream, body.stream);
        prop_assert_eq!(p.client_wants_usage, wants_usage);
        prop_assert_eq!(p.n, body.n);
        prop_assert_eq!(p.max_output(), body.max_output);

        let input_bytes = Bytes::from(body.text.clone());
        let out = p.rewrite(&input_bytes, &upstream);
        let out_text = std::str::from_utf8(&out).map_err(|e| TestCaseError::fail(format!("not UTF-8: {e}")))?;
        let input: Value = serde_json::from_str(&body.text).unwrap();
        let output: Value = serde_json::from_str(out_text)
            .map_err(|e| TestCaseError::fail(format!("rewrite is not JSON ({e}): {out_text}")))?;

        // JSON level: model replaced, usage asked for when needed, all else equal.
        prop_assert_eq!(&output["model"], &json!(upstream));
        let adds_usage = body.stream && !wants_usage;
        if adds_usage {
            prop_assert_eq!(&output["stream_options"]["include_usage"], &json!(true));
            let mut want = input.get("stream_options").and_then(Value::as_object).cloned().unwrap_or_default();
            want.insert("include_usage".into(), json!(true));
            prop_assert_eq!(output["stream_options"].as_object().unwrap(), &want, "other stream_options kept");
            prop_assert_eq!(without(&output, &["model", "stream_options"]), without(&input, &["model", "stream_options"]));
        } else {
            prop_assert_eq!(without(&output, &["model"]), without(&input, &["model"]));
        }

        // Byte level: nothing outside the two spans moved.
        let known = (upstream != body.model).then(|| (body.model_span, serde_json::to_string(&upstream).unwrap()));
        let other = adds_usage.then(|| match &body.stream_options {
            Some((_, span)) => *span,
            None => {
                let close = body.text.rfind('}').unwrap();
                (close, close)
            }
        });
        if known.is_none() && other.is_none() {
            prop_assert_eq!(&out, &input_bytes, "an unchanged body is forwarded as is");
        }
        let replaced = splice_check(&body.text, out_text, known, other)?;
        if adds_usage && body.stream_options.is_none() {
            // Inserted before the closing brace: a member of the top-level object.
            let member: Value = serde_json::from_str(&format!("{{{}}}", replaced.trim_start_matches(',')))
                .map_err(|e| TestCaseError::fail(format!("inserted text {replaced:?} is not a member: {e}")))?;
            prop_assert_eq!(member, json!({"stream_options": {"include_usage": true}}));
        } else if adds_usage {
            let v: Value = serde_json::from_str(replaced)
                .map_err(|e| TestCaseError::fail(format!("stream_options text {replaced:?}: {e}")))?;
            prop_assert_eq!(&v, &output["stream_options"]);
        }
    }
}

/// `body` with the member `field: value` in place of (or in addition to) its own.
fn with_member(body: &str, field: &str, value: &str) -> String {
    let mut v: Map<String, Value> = serde_json::from_str(body).unwrap();
    v.remove(field);
    let text = Value::Object(v).to_string();
    let open = if text == "{}" { "" } else { "," };
    format!("{}{open}{}:{value}}}", &text[..text.len() - 1], serde_json::to_string(field).unwrap())
}

/// A refusal's `param`.
fn refused_param(endpoint: Endpoint, body: &str) -> Result<String, TestCaseError> {
    match parse(endpoint, &Bytes::copy_from_slice(body.as_bytes())) {
        Err(tollgate::policy::request::RequestError::InvalidParam { param, .. }) => Ok(param),
        other => Err(TestCaseError::fail(format!("expected a refusal naming a field, got {other:?}\n{body}"))),
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// A common field of the right type (or `null`) is accepted and forwarded untouched; of
    /// another type, refused by both readers with the field named.
    #[test]
    fn common_fields_are_type_checked_by_both_readers(
        body in arb_chat_body(),
        field in prop::sample::select(CHAT_FIELDS.to_vec()),
        pick in any::<prop::sample::Index>(),
    ) {
        let (name, good, bad) = field;
        let ok = with_member(&body.text, name, good[pick.index(good.len())]);
        check_same_as_full_parse(Endpoint::Chat, &Bytes::from(ok.clone()), "up")?;
        prop_assert!(parse(Endpoint::Chat, &Bytes::from(ok.clone())).is_ok(), "{}", ok);
        let refused = with_member(&body.text, name, bad[pick.index(bad.len())]);
        check_same_as_full_parse(Endpoint::Chat, &Bytes::from(refused.clone()), "up")?;
        prop_assert_eq!(refused_param(Endpoint::Chat, &refused)?, name);
    }

    /// A message that is not an object, or whose `role` or `content` is missing or of another
    /// type, is refused by both readers, naming the message's field.
    #[test]
    fn mistyped_messages_are_refused_naming_the_message(
        body in arb_chat_body(),
        at in any::<prop::sample::Index>(),
        fault in 0u8..6,
    ) {
        let v: Value = serde_json::from_str(&body.text).unwrap();
        let mut messages = v["messages"].as_array().unwrap().clone();
        let i = at.index(messages.len());
        let m = &mut messages[i];
        let param = match fault {
            0 => {
                *m = json!("hi");
                format!("messages[{i}]")
            }
            1 => {
                m.as_object_mut().unwrap().remove("role");
                format!("messages[{i}].role")
            }
            2 => {
                m["role"] = json!(1);
                format!("messages[{i}].role")
            }
            3 => {
                m["content"] = json!(42);
                format!("messages[{i}].content")
            }
            4 => {
                m["content"] = json!({"text": "x"});
                format!("messages[{i}].content")
            }
            _ => {
                m["role"] = json!("user");
                m.as_object_mut().unwrap().remove("content");
                format!("messages[{i}].content")
            }
        };
        let refused = with_member(&body.text, "messages", &Value::Array(messages.clone()).to_string());
        check_same_as_full_parse(Endpoint::Chat, &Bytes::from(refused.clone()), "up")?;
        prop_assert_eq!(refused_param(Endpoint::Chat, &refused)?, param);

        // An assistant's or a tool's message may leave `content` out; any message's may be null.
        messages[i] = json!({"role": if fault % 2 == 0 { "assistant" } else { "tool" }});
        if fault > 3 {
            messages[i]["content"] = Value::Null;
        }
        let ok = with_member(&body.text, "messages", &Value::Array(messages).to_string());
        check_same_as_full_parse(Endpoint::Chat, &Bytes::from(ok.clone()), "up")?;
        prop_assert!(parse(Endpoint::Chat, &Bytes::from(ok.clone())).is_ok(), "{}", ok);
    }

    /// `prompt` and `input`: a string, or an array of strings, of token ids or of token-id
    /// arrays; anything else is refused naming the field, and so are the endpoints' other
    /// common fields of the wrong type.
    #[test]
    fn prompts_and_inputs_are_type_checked(
        text in prop::collection::vec("\\PC{0,6}", 0..4),
        tokens in prop::collection::vec(0u32..200_000, 0..4),
        lists in prop::collection::vec(prop::collection::vec(0u32..200_000, 0..3), 0..3),
        bad in prop_oneof![
            Just(json!([1, "a"])), Just(json!(["a", ["b"]])), Just(json!([[1], 2])), Just(json!([1.5])),
            Just(json!([[1, "a"]])), Just(json!([null])), Just(json!({"a": 1})), Just(json!(7)),
        ],
    ) {
        for (endpoint, field, model) in [(Endpoint::Completions, "prompt", "gpt-3.5-turbo-instruct"), (Endpoint::Embeddings, "input", "text-embedding-3-small")] {
            for good in [json!(text.concat()), json!(text), json!(tokens), json!(lists)] {
                let body = json!({"model": model, field: good}).to_string();
                prop_assert!(parse(endpoint, &Bytes::from(body.clone())).is_ok(), "{}", body);
            }
            let body = json!({"model": model, field: bad}).to_string();
            prop_assert_eq!(refused_param(endpoint, &body)?, field);
        }
        let completion = |extra: Value| {
            let mut b = json!({"model": "m", "prompt": "x"});
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            b.to_string()
        };
        for (field, ok, wrong) in [
            ("logprobs", json!(3), json!(true)),
            ("echo", json!(true), json!(1)),
            ("best_of", json!(2), json!(2.5)),
            ("suffix", json!("s"), json!(5)),
            ("stop", json!(["a"]), json!([1])),
            ("temperature", json!(0.5), json!("hot")),
        ] {
            prop_assert!(parse(Endpoint::Completions, &Bytes::from(completion(json!({field: ok})))).is_ok(), "{}", field);
            prop_assert_eq!(refused_param(Endpoint::Completions, &completion(json!({field: wrong})))?, field);
        }
        let embedding = |extra: Value| {
            let mut b = json!({"model": "m", "input": "x"});
            b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            b.to_string()
        };
        for (field, ok, wrong) in [("dimensions", json!(256), json!("256")), ("encoding_format", json!("float"), json!(1)), ("user", json!("u"), json!(["u"]))] {
            prop_assert!(parse(Endpoint::Embeddings, &Bytes::from(embedding(json!({field: ok})))).is_ok(), "{}", field);
            prop_assert_eq!(refused_param(Endpoint::Embeddings, &embedding(json!({field: wrong})))?, field);
        }
        // Fields of another endpoint, or unknown ones, pass through unchecked.
        let unchecked = embedding(json!({"temperature": "x", "echo": 3, "custom": [1]}));
        prop_assert!(parse(Endpoint::Embeddings, &Bytes::from(unchecked.clone())).is_ok(), "{}", unchecked);
    }
}

// ================================================================================================
// SSE parser and stream metering

/// Splits `input` at the sorted `cuts` and feeds the pieces; checks the parser's invariants
/// along the way and returns the events and the final error, if any.
fn feed(max: usize, input: &[u8], cuts: &[usize]) -> Result<(Vec<SseEvent>, Option<SseError>), TestCaseError> {
    let mut p = SseParser::new(max);
    let mut events = Vec::new();
    let mut from = 0;
    let mut error = None;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let piece = &input[from..cut];
        from = cut;
        match p.push(piece) {
            Ok(more) => events.extend(more),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        // Memory stays bounded: one event in the making (plus the chunk that overflowed it).
        prop_assert!(
            p.pending().len() <= max + piece.len() + 3,
            "pending {} > limit {max} + chunk {}",
            p.pending().len(),
            piece.len()
        );
    }
    if error.is_none() {
        match p.finish() {
            Ok(more) => events.extend(more),
            Err(e) => error = Some(e),
        }
    }
    if error.is_none() {
        if let Err(e) = p.push(b"") {
            error = Some(e);
        }
    }
    for e in &events {
        prop_assert!(e.raw.len() <= max + 3, "event of {} bytes past the limit {max}", e.raw.len());
    }
    match error {
        None => {
            // Lossless: the events and the remainder are the input, byte for byte.
            let mut all: Vec<u8> = events.iter().flat_map(|e| e.raw.iter().copied()).collect();
            all.extend_from_slice(p.pending());
            prop_assert_eq!(all, input.to_vec());
        }
        Some(e) => {
            // An error is final, and nothing more is buffered after it.
            let pending = p.pending().len();
            prop_assert_eq!(p.push(b"more bytes\n\n"), Err(e));
            prop_assert_eq!(p.finish(), Err(e));
            prop_assert_eq!(p.pending().len(), pending);
        }
    }
    Ok((events, error))
}

fn sorted_cuts(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
    let mut c: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    c.sort_unstable();
    c
}

/// An OpenAI-style stream: chunks of text, an optional usage chunk, `[DONE]` or a cut.
#[derive(Debug, Clone)]
struct OpenAiStream {
    wire: Vec<u8>,
    datas: Vec<String>,
    text: String,
    usage: Option<(u64, u64, u64)>,
    done: bool,
}

prop_compose! {
    fn arb_openai_stream()(
        pieces in prop::collection::vec("\\PC{0,12}", 0..8),
        usage in prop::option::of((0u64..1_000_000, 0u64..1_000_000, 0u64..100_000)),
        done in any::<bool>(),
        crlf in any::<bool>(),
        comments in prop::collection::vec(any::<bool>(), 12),
        bom in any::<bool>(),
    ) -> OpenAiStream {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut datas = Vec::new();
        for p in &pieces {
            datas.push(json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]}).to_string());
        }
        if let Some((p, c, o)) = usage {
            datas.push(json!({"id": "c", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": o, "prompt_tokens_details": {"cached_tokens": c}}}).to_string());
        }
        if done {
            datas.push("[DONE]".to_string());
        }
        let mut wire = Vec::new();
        if bom {
            wire.extend_from_slice(b"\xEF\xBB\xBF");
        }
        for (i, d) in datas.iter().enumerate() {
            if comments[i % comments.len()] {
                wire.extend_from_slice(format!(": keep-alive{eol}{eol}").as_bytes());
            }
            wire.extend_from_slice(format!("data: {d}{eol}{eol}").as_bytes());
        }
        OpenAiStream { wire, datas, text: pieces.concat(), usage, done }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn sse_parser_never_panics_and_loses_no_byte(
        input in prop::collection::vec(any::<u8>(), 0..512),
        max in 1usize..300,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let cuts = sorted_cuts(&cuts, input.len());
        let (events, _) = feed(max, &input, &cuts)?;
        let mut acc = StreamAccumulator::new(64);
        for e in &events {
            if let Some(d) = &e.data {
                acc.observe(d);
            }
        }
        if let Some(u) = acc.usage() {
            prop_assert!(u.cached_input_tokens <= u.input_tokens);
        }
    }

    #[test]
    fn sse_parser_on_sse_like_bytes(
        input in prop::collection::vec(
            prop_oneof![
                6 => prop::sample::select(b"data: {}[]\"event:id\r\n".to_vec()),
                1 => any::<u8>(),
            ],
            0..400,
        ),
        max in prop_oneof![1usize..64, Just(16 * 1024 * 1024)],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let cuts = sorted_cuts(&cuts, input.len());
        let whole = feed(max, &input, &[])?;
        let split = feed(max, &input, &cuts)?;
        // Chunking never changes what comes out.
        prop_assert_eq!(whole, split);
    }

    /// An OpenAI stream, cut anywhere and chunked anyhow, meters the same: the data of every
    /// event in order, the usage chunk's usage, the generated text, and `[DONE]` seen iff sent.
    #[test]
    fn openai_streams_meter_the_same_however_they_are_chunked(
        s in arb_openai_stream(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let cuts = sorted_cuts(&cuts, s.wire.len());
        let (events, error) = feed(16 * 1024 * 1024, &s.wire, &cuts)?;
        prop_assert_eq!(error, None);
        let datas: Vec<String> = events.iter().filter_map(|e| e.data.clone()).collect();
        prop_assert_eq!(&datas, &s.datas);
        let mut acc = StreamAccumulator::new(1 << 20);
        let mut kinds = Vec::new();
        for d in &datas {
            kinds.push(acc.observe(d));
        }
        prop_assert_eq!(acc.produced_text(), s.text.as_str());
        prop_assert_eq!(acc.saw_done(), s.done);
        let want = s.usage.map(|(p, c, o)| Usage { input_tokens: p, cached_input_tokens: c.min(p), output_tokens: o });
        prop_assert_eq!(acc.usage(), want);
        prop_assert_eq!(kinds.iter().filter(|k| **k == ChunkKind::UsageOnly).count(), usize::from(s.usage.is_some()));
        prop_assert_eq!(kinds.iter().filter(|k| **k == ChunkKind::Done).count(), usize::from(s.done));

        // As the proxy reads them: chunks that cannot report usage held unread until the end.
        let mut later = StreamAccumulator::new(1 << 20);
        let mut acted = Vec::new();
        for d in &datas {
            if let Some(kind @ (ChunkKind::Done | ChunkKind::UsageOnly)) = later.observe_later(d.clone()) {
                acted.push(kind);
            }
        }
        later.finish();
        prop_assert_eq!(later.usage(), want);
        prop_assert_eq!(later.saw_done(), s.done);
        if want.is_none() {
            prop_assert_eq!(later.produced_text(), s.text.as_str());
        }
        let acted_direct: Vec<ChunkKind> =
            kinds.into_iter().filter(|k| matches!(k, ChunkKind::Done | ChunkKind::UsageOnly)).collect();
        prop_assert_eq!(acted, acted_direct);
    }
}

// ================================================================================================
// Usage extraction

/// A token count as an upstream might send it, with what the contract makes of it:
/// `Ok(Some(n))` usable, `Ok(None)` absent (missing or null), `Err(())` unusable.
#[derive(Debug, Clone)]
enum Spelled {
    Missing,
    Present(Value, Result<Option<u64>, ()>),
}

fn arb_count() -> impl Strategy<Value = Spelled> {
    const MAX: u64 = tollgate::metering::usage::MAX_REPORTED_TOKENS;
    prop_oneof![
        2 => Just(Spelled::Missing),
        1 => Just(Spelled::Present(Value::Null, Ok(None))),
        4 => (0u64..=MAX).prop_map(|n| Spelled::Present(json!(n), Ok(Some(n)))),
        // Small counts, so cached-versus-input edges (0, equal, one more) come up often.
        4 => (0u64..4).prop_map(|n| Spelled::Present(json!(n), Ok(Some(n)))),
        1 => Just(Spelled::Present(json!(MAX), Ok(Some(MAX)))),
        1 => (MAX + 1..=u64::MAX).prop_map(|n| Spelled::Present(json!(n), Err(()))),
        1 => (i64::MIN..0).prop_map(|n| Spelled::Present(json!(n), Err(()))),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| Spelled::Present(json!(f), Err(()))),
        1 => Just(Spelled::Present(json!(5.0), Err(()))),
        1 => "[0-9]{1,4}".prop_map(|s| Spelled::Present(json!(s), Err(()))),
        1 => any::<bool>().prop_map(|b| Spelled::Present(json!(b), Err(()))),
        1 => Just(Spelled::Present(json!([1]), Err(()))),
        1 => Just(Spelled::Present(json!({"n": 1}), Err(()))),
    ]
}

/// `prompt_tokens_details` / `input_tokens_details`: missing, null, a non-object, or an
/// object with a `cached_tokens` count.
#[derive(Debug, Clone)]
enum Details {
    Missing,
    Null,
    NotObject(Value),
    Object(Spelled),
}

fn arb_details() -> impl Strategy<Value = Details> {
    prop_oneof![
        2 => Just(Details::Missing),
        1 => Just(Details::Null),
        1 => prop_oneof![Just(json!(3)), Just(json!("x")), Just(json!([]))].prop_map(Details::NotObject),
        4 => arb_count().prop_map(Details::Object),
    ]
}

impl Details {
    fn cached(&self) -> Result<Option<u64>, ()> {
        match self {
            Details::Missing | Details::Null => Ok(None),
            Details::NotObject(_) => Err(()),
            Details::Object(Spelled::Missing) => Ok(None),
            Details::Object(Spelled::Present(_, r)) => *r,
        }
    }
    fn put(&self, m: &mut Map<String, Value>, key: &str) {
        match self {
            Details::Missing => {}
            Details::Null => {
                m.insert(key.into(), Value::Null);
            }
            Details::NotObject(v) => {
                m.insert(key.into(), v.clone());
            }
            Details::Object(c) => {
                let mut d = Map::new();
                put_count(&mut d, "cached_tokens", c);
                d.insert("audio_tokens".into(), json!(0));
                m.insert(key.into(), Value::Object(d));
            }
        }
    }
}

fn put_count(m: &mut Map<String, Value>, key: &str, c: &Spelled) {
    if let Spelled::Present(v, _) = c {
        m.insert(key.into(), v.clone());
    }
}

fn count_of(c: &Spelled) -> Result<Option<u64>, ()> {
    match c {
        Spelled::Missing => Ok(None),
        Spelled::Present(_, r) => *r,
    }
}

/// The first spelling that is present (chat's wins over the Responses API's).
fn either(a: Result<Option<u64>, ()>, b: Result<Option<u64>, ()>) -> Result<Option<u64>, ()> {
    match a {
        Ok(None) => b,
        other => other,
    }
}

prop_compose! {
    fn arb_usage()(
        prompt in arb_count(), completion in arb_count(), prompt_details in arb_details(),
        input in arb_count(), output in arb_count(), input_details in arb_details(),
        total in arb_count(),
    ) -> (Value, Option<Usage>) {
        let mut m = Map::new();
        put_count(&mut m, "prompt_tokens", &prompt);
        put_count(&mut m, "completion_tokens", &completion);
        put_count(&mut m, "total_tokens", &total);
        prompt_details.put(&mut m, "prompt_tokens_details");
        put_count(&mut m, "input_tokens", &input);
        put_count(&mut m, "output_tokens", &output);
        input_details.put(&mut m, "input_tokens_details");
        // The documented contract, as an oracle.
        let expected = (|| {
            let input = either(count_of(&prompt), count_of(&input)).ok()??;
            let output = either(count_of(&completion), count_of(&output)).ok()?.unwrap_or(0);
            let cached = either(prompt_details.cached(), input_details.cached()).ok()?.unwrap_or(0);
            Some(Usage { input_tokens: input, cached_input_tokens: cached.min(input), output_tokens: output })
        })();
        (Value::Object(m), expected)
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// Usage in every spelling and every hostile count type comes out exactly as documented:
    /// chat spelling first, absent counts as 0 (input required), any unusable count spoils the
    /// whole report, cached clamped to input. Also nested in a Responses API event.
    #[test]
    fn usage_extraction_follows_the_contract((usage, expected) in arb_usage(), shape in 0u8..4) {
        let body = match shape {
            0 => json!({"id": "x", "object": "chat.completion", "choices": [], "usage": usage}),
            1 => json!({"object": "list", "data": [{"embedding": [0.1]}], "usage": usage}),
            2 => json!({"type": "response.completed", "response": {"usage": usage}}),
            _ => json!({"type": "response.completed", "usage": null, "response": {"usage": usage}}),
        };
        let got = usage_from_json(&body);
        prop_assert_eq!(got, expected, "{}", body);
        if let Some(u) = got {
            prop_assert!(u.cached_input_tokens <= u.input_tokens);
        }
        // The stream path agrees with the whole-body path.
        let mut acc = StreamAccumulator::new(16);
        acc.observe(&body.to_string());
        prop_assert_eq!(acc.usage(), expected);
        // A non-streamed answer read from its bytes (the skim and the typed reader) agrees too,
        // written compactly or pretty, with text in the choices or not.
        let mut answer = body.clone();
        if shape == 0 {
            answer["choices"] = json!([{"index": 0, "message": {"role": "assistant", "content": "Hi \"there\"\n"}}]);
        }
        let text = if expected.is_some() { String::new() } else { response_text(&answer) };
        for bytes in [answer.to_string(), serde_json::to_string_pretty(&answer).unwrap()] {
            prop_assert_eq!(read_answer(bytes.as_bytes()), Some((expected, text.clone())), "{}", bytes);
        }
    }

    #[test]
    fn usage_extraction_never_panics_on_arbitrary_json(v in arb_request_json()) {
        if let Some(u) = usage_from_json(&v) {
            prop_assert!(u.cached_input_tokens <= u.input_tokens);
        }
        let _ = response_text(&v);
        let _ = response_text(&json!({"choices": [{"message": v.clone(), "delta": v.clone(), "text": v}]}));
    }
}

// ================================================================================================
// Local token counting

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A data URL of an image header with the given size, in one of the formats counted.
fn image_url(format: u8, w: u32, h: u32) -> String {
    let (mime, bytes): (&str, Vec<u8>) = match format % 4 {
        0 => {
            let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
            b.extend_from_slice(&w.to_be_bytes());
            b.extend_from_slice(&h.to_be_bytes());
            b.extend_from_slice(&[8, 6, 0, 0, 0]);
            ("png", b)
        }
        1 => {
            let mut b = b"GIF89a".to_vec();
            b.extend_from_slice(&(w as u16).to_le_bytes());
            b.extend_from_slice(&(h as u16).to_le_bytes());
            ("gif", b)
        }
        2 => {
            let mut b = vec![0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0, 0xff, 0xc0, 0, 17, 8];
            b.extend_from_slice(&(h as u16).to_be_bytes());
            b.extend_from_slice(&(w as u16).to_be_bytes());
            b.push(3);
            ("jpeg", b)
        }
        _ => {
            let mut b = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
            let (w1, h1) = (w.clamp(1, 1 << 24) - 1, h.clamp(1, 1 << 24) - 1);
            b.extend_from_slice(&w1.to_le_bytes()[..3]);
            b.extend_from_slice(&h1.to_le_bytes()[..3]);
            ("webp", b)
        }
    };
    format!("data:image/{mime};base64,{}", b64(&bytes))
}

fn arb_content_part() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => "\\PC{0,16}".prop_map(|t| json!({"type": "text", "text": t})),
        2 => (any::<u8>(), 0u32..20_000, 0u32..20_000, prop_oneof![Just("low"), Just("high"), Just("auto"), Just("weird")])
            .prop_map(|(f, w, h, d)| json!({"type": "image_url", "image_url": {"url": image_url(f, w, h), "detail": d}})),
        1 => Just(json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})),
        1 => Just(json!({"type": "image_url", "image_url": "data:image/png;base64,iVBORw0KGgo="})),
        1 => arb_request_json(),
    ]
}

fn arb_chat_message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("tool"), Just("function")];
    let content = prop_oneof![
        3 => "\\PC{0,32}".prop_map(Value::from),
        2 => prop::collection::vec(arb_content_part(), 0..3).prop_map(Value::from),
        1 => Just(Value::Null),
    ];
    let tool_calls = prop::option::of(prop::collection::vec(("[a-z_]{1,8}", "\\PC{0,24}"), 1..3));
    (role, content, prop::option::of("[a-zA-Z_]{1,8}"), tool_calls).prop_map(|(role, content, name, calls)| {
        let mut m = json!({"role": role, "content": content});
        if let Some(n) = name {
            m["name"] = json!(n);
        }
        if let Some(calls) = calls {
            m["tool_calls"] = calls
                .into_iter()
                .map(|(n, a)| json!({"id": "call", "type": "function", "function": {"name": n, "arguments": a}}))
                .collect();
        }
        m
    })
}

fn arb_schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "integer", "description": "a number"})),
        "\\PC{0,8}".prop_map(|d| json!({"type": "string", "description": d, "enum": ["a", d]})),
        Just(json!({"type": "number", "enum": [1, 2.5, -3]})),
        Just(json!({"type": "boolean"})),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::btree_map("[a-z]{1,6}", inner.clone(), 0..3).prop_map(
                |props| json!({"type": "object", "properties": props, "required": props.keys().collect::<Vec<_>>()})
            ),
            inner.prop_map(|items| json!({"type": "array", "items": items})),
        ]
    })
}

prop_compose! {
    fn arb_tokens_body()(
        messages in prop::collection::vec(arb_chat_message(), 0..4),
        tools in prop::option::of(prop::collection::vec(("[a-z_]{1,10}", "\\PC{0,16}", arb_schema()), 1..3)),
        prompt in prop_oneof![
            "\\PC{0,32}".prop_map(Value::from),
            prop::collection::vec("\\PC{0,8}", 0..3).prop_map(Value::from),
            prop::collection::vec(0u32..200_000, 0..8).prop_map(Value::from),
            prop::collection::vec(prop::collection::vec(0u32..100, 0..4), 0..3).prop_map(Value::from),
            arb_request_json(),
        ],
    ) -> Value {
        let mut body = json!({"messages": messages, "prompt": prompt.clone(), "input": prompt});
        if let Some(tools) = tools {
            body["tools"] = tools
                .into_iter()
                .map(|(n, d, p)| json!({"type": "function", "function": {"name": n, "description": d, "parameters": p}}))
                .collect();
        }
        body
    }
}

const TOKEN_MODELS: [&str; 10] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o4-mini",
    "gpt-4",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "o1",
    "some-future-model",
];

proptest! {
    #![proptest_config(cases(96))]

    #[test]
    fn prompt_tokens_upper_bound_is_an_upper_bound(body in arb_tokens_body(), model in prop::sample::select(TOKEN_MODELS.to_vec())) {
        for kind in [PromptKind::Chat, PromptKind::Completion, PromptKind::Embedding] {
            let exact = prompt_tokens(kind, model, &body);
            let bound = prompt_tokens_upper_bound(kind, model, &body);
            prop_assert!(bound >= exact, "{kind:?} {model}: bound {bound} < exact {exact} for {body}");
        }
    }
}

// ================================================================================================
// Config

/// A valid config to mutate.
const BASE_CONFIG: &str = r#"
listen = "127.0.0.1:4000"
database_url = "sqlite://data/tollgate.db"
master_key = "${MASTER}"
max_body_bytes = 8388608
header_read_timeout_ms = 10000

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"

[[models]]
name = "gpt-4o-mini"
provider = "openai"
input_per_mtok = 0.15

[[models]]
name = "gpt-4o"
provider = "openai"

[routing]
downgrade = { "gpt-4o" = "gpt-4o-mini" }
fallbacks = { "gpt-4o" = ["gpt-4o-mini"] }
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "MASTER" => Some("sk-admin".into()),
        "OPENAI_API_KEY" => Some("sk-x".into()),
        "WEIRD" => Some("${MASTER}$${\u{0}é".into()),
        _ => None,
    }
}

/// A TOML-ish line: keys the config knows with values of any type.
fn arb_config_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "listen",
        "database_url",
        "master_key",
        "max_body_bytes",
        "max_response_bytes",
        "shutdown_grace_ms",
        "header_read_timeout_ms",
        "body_read_timeout_ms",
        "on_ledger_error",
        "ledger_queue_capacity",
        "name",
        "kind",
        "provider",
        "base_url",
        "api_key",
        "upstream_model",
        "input_per_mtok",
        "cached_input_per_mtok",
        "output_per_mtok",
        "context_window",
        "max_output_tokens",
        "connect_timeout_ms",
        "first_byte_timeout_ms",
        "idle_timeout_ms",
        "downgrade",
        "fallbacks",
        "nope",
    ]);
    let value = prop::sample::select(vec![
        "0",
        "-1",
        "1e400",
        "nan",
        "inf",
        "-inf",
        "18446744073709551615",
        "9223372036854775807",
        "1.5",
        "\"\"",
        "\"mock\"",
        "\"openai\"",
        "\"${MISSING}\"",
        "\"${WEIRD}\"",
        "\"${\"",
        "\"$${X}\"",
        "\"${}\"",
        "\"serve\"",
        "\"reject\"",
        "true",
        "[]",
        "{}",
        "{ \"a\" = \"b\" }",
        "{ \"gpt-4o\" = [\"gpt-4o\"] }",
        "\"gpt-4o\"",
        "\"sqlite::memory:\"",
        "\"postgres://x\"",
        "1979-05-27T07:32:00Z",
    ]);
    prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop::sample::select(vec!["[[providers]]", "[[models]]", "[routing]", "[routing.downgrade]", "[x]", "[[routing]]"])
            .prop_map(str::to_string),
        1 => "\\PC{0,24}",
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn config_parsing_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = tollgate::Config::from_toml(&text, env);
    }

    #[test]
    fn config_parsing_never_panics_on_mutated_configs(
        edits in prop::collection::vec((any::<prop::sample::Index>(), arb_config_line(), 0u8..3), 1..6),
    ) {
        let mut lines: Vec<String> = BASE_CONFIG.lines().map(str::to_string).collect();
        for (at, line, op) in edits {
            let i = at.index(lines.len() + 1);
            match op {
                0 => lines.insert(i, line),
                1 if i < lines.len() => lines[i] = line,
                _ if i < lines.len() => { lines.remove(i); }
                _ => lines.push(line),
            }
        }
        let text = lines.join("\n");
        if let Ok(config) = tollgate::Config::from_toml(&text, env) {
            // Whatever got through is usable: positive limits, known providers.
            prop_assert!(config.max_body_bytes > 0);
            prop_assert!(config.header_read_timeout_ms > 0 && config.body_read_timeout_ms > 0);
            for m in config.catalog.models.values() {
                prop_assert!(config.providers.iter().any(|p| p.name == m.provider));
                prop_assert!(m.context_window > 0);
            }
        }
    }
}

#[test]
fn base_config_is_valid() {
    tollgate::Config::from_toml(BASE_CONFIG, env).expect("the base of the mutation test is valid");
}

// ================================================================================================
// Regressions found by fuzzing (fuzz/): each input that once crashed or broke an invariant.

/// fuzz/usage_extraction: a number past f64's range (`3999993e999999910`) in a member the
/// answer reader skips. serde_json's `Value` refuses such a body ("number out of range"); the
/// typed reader, like the clients' JSON parsers (Python's reads it as `inf`), accepts it. The
/// reader is lenient on purpose: the answer is well-formed JSON, so its usage is read.
#[test]
fn a_number_past_f64_range_in_a_skipped_member_does_not_hide_the_usage() {
    let huge = "3999993e999999910";
    let body = format!(r#"{{"id":"x","extra":{{"n":{huge}}},"usage":{{"prompt_tokens":7,"completion_tokens":3}}}}"#);
    assert!(serde_json::from_str::<Value>(&body).unwrap_err().to_string().starts_with("number out of range"));
    let (usage, text) = read_answer(body.as_bytes()).expect("well-formed JSON is read");
    assert_eq!(usage.map(|u| (u.input_tokens, u.output_tokens)), Some((7, 3)));
    assert_eq!(text, "");
    let mut acc = StreamAccumulator::new(64);
    acc.observe(&body);
    assert_eq!(acc.usage(), usage, "the stream path reads a chunk as the body path reads a body");

    // The fuzzer's input: no usage, and nothing generated.
    let crash = br#"{"id":"cse.completed","r\\\\\b\\i-\"id\\\\\b\\id\\\\\b\\\\\\\f\\esponse":{"usage":{"inpqt_tokens":7,"output_tokens":3999993e999999910}}}"#;
    assert_eq!(read_answer(crash), Some((None, String::new())));

    // In a member the reader reads, the number makes the answer unreadable, as it does for
    // `Value` (the proxy then answers 502 invalid upstream response).
    let body = format!(r#"{{"usage":{{"prompt_tokens":{huge},"completion_tokens":3}}}}"#);
    assert_eq!(read_answer(body.as_bytes()), None);
}
