use proptest::prelude::*;
use serde_json::{json, Value};

use super::answer::*;
use super::stream::*;
use super::*;
use crate::metering::sse::SseParser;

#[test]
fn an_openai_usage_chunk_is_skimmed() {
    let chunk = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
    assert_eq!(skim_top(chunk), Some((usage(9, 0, 3).unwrap(), ChunkKind::UsageOnly)));
    let last_content = chunk.replace(r#""choices":[]"#, r#""choices":[{"index":0,"delta":{"content":"!"}}]"#);
    assert_eq!(skim_top(&last_content), Some((usage(9, 0, 3).unwrap(), ChunkKind::Content)));
}

#[test]
fn read_answer_agrees_with_reading_the_parsed_value() {
    let bodies: [&[u8]; 15] = [
        b"{\"choices\":[],\"ignored\":{\"k\xe3y\":1}}",
        // Bodies with a top-level usage object, which the skim reads: a usable report, an
        // unusable one (the text is then needed), a duplicated count, a key with escapes.
        br#"{"choices":[{"message":{"content":"a"}}],"usage":{"prompt_tokens":3,"completion_tokens":1.5}}"#,
        br#"{"choices":[{"message":{"content":"b"}}],"usage":{"prompt_tokens":3,"prompt_tokens":4}}"#,
        br#"{"choices":[{"message":{"content":"c"}}],"us\u0061ge":{"prompt_tokens":5}}"#,
        br#"{"choices":[{"message":{"content":"d"}}],"usage":{"input_tokens":5,"output_tokens":2,"input_tokens_details":{"cached_tokens":9}}}"#,
        br#"{"choices":[{"message":{"content":"e\ud83d\ude00"}}],"usage":{"prompt_tokens":1}}"#,
        br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}} x"#,
        br#"{"choices":[{"message":{"content":"hi there"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
        br#"{"choices":[{"message":{"content":"no usage","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}"#,
        br#"{"choices":[{"text":"legacy"}],"usage":null}"#,
        br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":9,"completion_tokens":1}}"#,
        br#"{"choices":"nonsense","usage":{"prompt_tokens":-1}}"#,
        br#"[1,2,3]"#,
        br#"null"#,
        br#"{"truncated": "#,
    ];
    for bytes in bodies {
        let expected = serde_json::from_slice::<Value>(bytes).ok().filter(Value::is_object).map(|v| {
            let usage = usage_from_json(&v);
            (usage, if usage.is_some() { String::new() } else { response_text(&v) })
        });
        assert_eq!(read_answer(bytes), expected, "{}", String::from_utf8_lossy(bytes));
    }
}

fn usage(input: u64, cached: u64, output: u64) -> Option<Usage> {
    Some(Usage { input_tokens: input, cached_input_tokens: cached, output_tokens: output })
}

// ---- usage_from_json ----

#[test]
fn chat_completion_usage_with_cached_tokens() {
    let body = json!({
        "id": "chatcmpl-abc", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!", "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 15, "total_tokens": 1215,
                  "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
    });
    assert_eq!(usage_from_json(&body), usage(1200, 1024, 15));
}

#[test]
fn chat_usage_without_details_has_no_cached_tokens() {
    let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}});
    assert_eq!(usage_from_json(&body), usage(9, 0, 12));
    let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12,
                                "prompt_tokens_details": null, "completion_tokens_details": null}});
    assert_eq!(usage_from_json(&body), usage(9, 0, 12));
    let body = json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12,
                                "prompt_tokens_details": {"cached_tokens": null}}});
    assert_eq!(usage_from_json(&body), usage(9, 0, 12));
}

#[test]
fn embeddings_usage_has_no_output() {
    let body = json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8}
    });
    assert_eq!(usage_from_json(&body), usage(8, 0, 0));
}

#[test]
fn responses_api_usage() {
    let body = json!({
        "id": "resp_1", "object": "response", "status": "completed",
        "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 128},
                  "output_tokens": 52, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 380}
    });
    assert_eq!(usage_from_json(&body), usage(328, 128, 52));
}

#[test]
fn responses_api_completed_event_usage_is_nested_under_response() {
    let event = json!({
        "type": "response.completed", "sequence_number": 42,
        "response": {"id": "resp_1", "object": "response", "status": "completed",
                     "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
                               "output_tokens": 87, "total_tokens": 123}}
    });
    assert_eq!(usage_from_json(&event), usage(36, 0, 87));
    let created = json!({"type": "response.created", "response": {"status": "in_progress", "usage": null}});
    assert_eq!(usage_from_json(&created), None);
}

#[test]
fn null_or_missing_usage_is_none() {
    assert_eq!(usage_from_json(&json!({"usage": null})), None);
    assert_eq!(usage_from_json(&json!({"choices": []})), None);
    assert_eq!(usage_from_json(&json!({})), None);
    assert_eq!(usage_from_json(&json!({"usage": {}})), None);
    assert_eq!(usage_from_json(&json!({"usage": {"completion_tokens": 5}})), None);
}

#[test]
fn non_objects_are_none() {
    for v in [json!(null), json!(1), json!("usage"), json!([{"usage": {"prompt_tokens": 1}}])] {
        assert_eq!(usage_from_json(&v), None, "{v}");
    }
    assert_eq!(usage_from_json(&json!({"usage": "lots"})), None);
    assert_eq!(usage_from_json(&json!({"usage": [1, 2]})), None);
}

#[test]
fn hostile_counts_make_usage_unreported() {
    let bad = [
        json!(-1),
        json!(1.5),
        json!(10.0),
        json!("12"),
        json!(true),
        json!([3]),
        json!({"n": 3}),
        json!(u64::MAX),
        json!(MAX_REPORTED_TOKENS + 1),
        json!(1e300),
        json!(i64::MIN),
    ];
    for v in bad {
        let prompt = json!({"usage": {"prompt_tokens": v, "completion_tokens": 1}});
        assert_eq!(usage_from_json(&prompt), None, "prompt_tokens {v}");
        let completion = json!({"usage": {"prompt_tokens": 1, "completion_tokens": v}});
        assert_eq!(usage_from_json(&completion), None, "completion_tokens {v}");
        let cached = json!({"usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                      "prompt_tokens_details": {"cached_tokens": v}}});
        assert_eq!(usage_from_json(&cached), None, "cached_tokens {v}");
        let responses = json!({"usage": {"input_tokens": 5, "output_tokens": v}});
        assert_eq!(usage_from_json(&responses), None, "output_tokens {v}");
    }
    let details = json!({"usage": {"prompt_tokens": 5, "prompt_tokens_details": 7}});
    assert_eq!(usage_from_json(&details), None);
}

#[test]
fn huge_number_beyond_u64_in_text_is_unreported() {
    let v: Value =
        serde_json::from_str(r#"{"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":1}}"#).unwrap();
    assert_eq!(usage_from_json(&v), None);
}

#[test]
fn largest_accepted_count() {
    let body = json!({"usage": {"prompt_tokens": MAX_REPORTED_TOKENS, "completion_tokens": 0}});
    assert_eq!(usage_from_json(&body), usage(MAX_REPORTED_TOKENS, 0, 0));
}

#[test]
fn cached_is_clamped_to_input() {
    let body = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                "prompt_tokens_details": {"cached_tokens": 500}}});
    assert_eq!(usage_from_json(&body), usage(10, 10, 2));
}

#[test]
fn chat_spelling_wins_when_both_are_present() {
    let body = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                "input_tokens": 99, "output_tokens": 99}});
    assert_eq!(usage_from_json(&body), usage(10, 0, 2));
}

#[test]
fn zero_usage_is_reported_not_missing() {
    let body = json!({"usage": {"prompt_tokens": 0, "completion_tokens": 0}});
    assert_eq!(usage_from_json(&body), usage(0, 0, 0));
}

// ---- response_text ----

#[test]
fn response_text_of_a_chat_message() {
    let body = json!({"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": null}},
        {"index": 1, "message": {"role": "assistant", "content": null, "refusal": "I can't."}}
    ]});
    assert_eq!(response_text(&body), "Hello thereI can't.");
}

#[test]
fn response_text_of_tool_calls() {
    let body = json!({"choices": [{"index": 0, "message": {
    "role": "assistant", "content": null,
    "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_time", "arguments": "{}"}}
    ]}}]});
    assert_eq!(response_text(&body), "get_weather{\"city\":\"Paris\"}get_time{}");
}

#[test]
fn response_text_of_a_legacy_function_call() {
    let body = json!({"choices": [{"message": {"role": "assistant", "content": null,
        "function_call": {"name": "f", "arguments": "{\"x\":1}"}}}]});
    assert_eq!(response_text(&body), "f{\"x\":1}");
}

#[test]
fn response_text_of_legacy_completions() {
    let body = json!({"object": "text_completion", "choices": [
        {"text": "\n\nThis is a test.", "index": 0, "logprobs": null, "finish_reason": "length"}]});
    assert_eq!(response_text(&body), "\n\nThis is a test.");
}

#[test]
fn response_text_includes_reasoning_once() {
    let body = json!({"choices": [{"message": {"reasoning_content": "think", "reasoning": "think",
                                               "content": "answer"}}]});
    assert_eq!(response_text(&body), "thinkanswer");
}

#[test]
fn response_text_of_odd_bodies_is_empty_or_partial() {
    assert_eq!(response_text(&json!(null)), "");
    assert_eq!(response_text(&json!({"data": []})), "");
    assert_eq!(response_text(&json!({"choices": "nope"})), "");
    let body = json!({"choices": [5, null, {"message": {"content": 3}}, {"message": {"content": "ok"}}]});
    assert_eq!(response_text(&body), "ok");
}

// ---- StreamAccumulator on OpenAI-shaped streams ----

const CHAT_WITH_USAGE: &str = concat!(
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":"! \"Quoted\" \u00e9t\u00e9\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

const CHAT_WITHOUT_USAGE: &str = concat!(
    r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

const TOOL_CALLS: &str = concat!(
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"location"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\":\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-3","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":80,"completion_tokens":16,"total_tokens":96,"prompt_tokens_details":{"cached_tokens":64}}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

const LEGACY_COMPLETIONS: &str = concat!(
    r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":"\n\n","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}"#,
    "\n\n",
    r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":"This is","index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}"#,
    "\n\n",
    r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[{"text":" a test.","index":0,"logprobs":null,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct"}"#,
    "\n\n",
    r#"data: {"id":"cmpl-4","object":"text_completion","created":1,"choices":[],"model":"gpt-3.5-turbo-instruct","usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// Runs a stream through the SSE parser (split at `cut`) and an accumulator.
fn run(stream: &str, cut: usize) -> (StreamAccumulator, Vec<ChunkKind>, Vec<u8>) {
    let mut parser = SseParser::new(1 << 20);
    let mut acc = StreamAccumulator::new(1 << 16);
    let mut kinds = Vec::new();
    let bytes = stream.as_bytes();
    let cut = cut.min(bytes.len());
    for chunk in [&bytes[..cut], &bytes[cut..]] {
        for event in parser.push(chunk).expect("fixture is valid SSE") {
            if let Some(data) = &event.data {
                kinds.push(acc.observe(data));
            }
        }
    }
    (acc, kinds, parser.pending().to_vec())
}

/// Runs a stream's events through `observe_later`, then `finish`.
fn run_later(stream: &str) -> (StreamAccumulator, Vec<Option<ChunkKind>>) {
    let mut parser = SseParser::new(1 << 20);
    let mut acc = StreamAccumulator::new(1 << 16);
    let kinds = parser
        .push(stream.as_bytes())
        .expect("fixture is valid SSE")
        .into_iter()
        .filter_map(|e| e.data)
        .map(|d| acc.observe_later(d))
        .collect();
    acc.finish();
    (acc, kinds)
}

#[test]
fn only_chunks_that_name_usage_or_escape_a_character_may_report_usage() {
    for plain in [
        r#"{"choices":[{"delta":{"content":"hi"}}]}"#,
        r#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
        "{\"choices\":[],\"usage\":null}\n ",
        r#"{"choices":[{"delta":{"content":"the \"usage\" field"}}]}"#,
        r#"{"x":"usage"#,
        "not json",
        "",
    ] {
        assert!(!may_report_usage(plain), "{plain}");
    }
    for may in [
        r#"{"choices":[],"usage":{"prompt_tokens":1}}"#,
        r#"{"usage":null,"choices":[]}"#,
        r#"{"usage":null,"usage":null}"#,
        r#""usage":null}"#,
        r#"{"type":"response.completed","response":{"usage":{"input_tokens":1}}}"#,
        r#"{"\u0075sage":{"prompt_tokens":1}}"#,
        r#"{"choices":[{"delta":{"content":"caf\u00e9"}}],"usage":null}"#,
        r#"{"a":"x","usage":null} {"usage":1}"#,
    ] {
        assert!(may_report_usage(may), "{may}");
    }
}

#[test]
fn a_stream_that_reports_usage_at_its_end_is_read_only_there() {
    use ChunkKind::*;
    let (acc, kinds) = run_later(CHAT_WITH_USAGE);
    // The third chunk spells é with an escape: it is read, and the two before it with it.
    assert_eq!(kinds, [None, None, Some(Content), None, Some(UsageOnly), Some(Done)]);
    assert_eq!(acc.usage(), usage(19, 0, 10));
    assert_eq!(acc.held(), (0, 0));
    assert!(acc.saw_done());
    // Once usage is known, the text that was never read is not needed.
    assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
}

#[test]
fn held_chunks_are_read_in_order_when_the_stream_ends_without_usage() {
    for stream in [CHAT_WITHOUT_USAGE, LEGACY_COMPLETIONS, TOOL_CALLS] {
        let (direct, kinds, _) = run(stream, 0);
        let (later, later_kinds) = run_later(stream);
        assert_eq!(later.usage(), direct.usage(), "{stream}");
        if direct.usage().is_none() {
            assert_eq!(later.produced_text(), direct.produced_text(), "{stream}");
        }
        assert_eq!(later.saw_done(), direct.saw_done());
        // What the pump acts on is the same: `[DONE]` and usage-only chunks.
        let acted = |k: Option<ChunkKind>| matches!(k, Some(ChunkKind::Done | ChunkKind::UsageOnly));
        assert_eq!(
            later_kinds.iter().copied().filter(|k| acted(*k)).collect::<Vec<_>>(),
            kinds.iter().copied().filter(|k| acted(Some(*k))).map(Some).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_chunk_naming_usage_without_reporting_it_reads_the_held_chunks_first() {
    let mut acc = StreamAccumulator::new(1 << 10);
    assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"a"}}]}"#.into()), None);
    assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"b"}}]}"#.into()), None);
    let odd = r#"{"usage":"soon","choices":[{"delta":{"content":"c"}}]}"#;
    assert_eq!(acc.observe_later(odd.into()), Some(ChunkKind::Content));
    assert_eq!(acc.held(), (0, 0));
    assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"d"}}]}"#.into()), None);
    acc.finish();
    assert_eq!((acc.usage(), acc.produced_text()), (None, "abcd"));
}

#[test]
fn held_chunks_take_room_from_the_total_a_quantum_at_a_time() {
    let mut acc = StreamAccumulator::new(1 << 10);
    let chunk = format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}"#, "x".repeat(200));
    let mut takes = 0;
    for _ in 0..12 {
        let before = acc.held_quota;
        assert_eq!(acc.observe_later(chunk.clone()), None);
        takes += usize::from(acc.held_quota != before);
        assert!(acc.held_bytes <= acc.held_quota, "what is held is within the room taken");
    }
    assert_eq!(acc.held().0, 12);
    // 12 chunks of ~260 bytes: 3 KiB, within one quantum (unless other tests filled the
    // total meanwhile, when it takes what each chunk needs).
    assert!(takes == 1 || acc.held_quota == acc.held_bytes, "{takes} takes for a quota of {}", acc.held_quota);
    acc.finish();
    assert_eq!((acc.held_bytes, acc.held_quota), (0, 0), "the room goes back when the stream ends");
}

#[test]
fn chunks_after_a_usage_report_are_neither_held_nor_read() {
    let mut acc = StreamAccumulator::new(1 << 10);
    acc.observe_later(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#.into());
    assert_eq!(acc.observe_later(r#"{"choices":[{"delta":{"content":"x"}}]}"#.into()), None);
    assert_eq!(acc.held(), (0, 0));
    acc.finish();
    assert_eq!(acc.usage(), usage(3, 0, 1));
}

#[test]
fn a_stream_holds_at_most_its_bound_and_its_text_stays_whole() {
    let mut acc = StreamAccumulator::new(1 << 20);
    let mut want = String::new();
    for i in 0..2_000 {
        let piece = format!("w{i} ");
        want.push_str(&piece);
        acc.observe_later(format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}"#));
        assert!(acc.held().1 <= MAX_HELD_PER_STREAM);
    }
    assert!(acc.held().0 > 0);
    acc.finish();
    assert_eq!(acc.held(), (0, 0));
    assert_eq!(acc.produced_text(), want);
}

#[test]
fn stream_with_include_usage_reports_usage_in_the_last_chunk() {
    use ChunkKind::*;
    for cut in 0..=CHAT_WITH_USAGE.len() {
        let (acc, kinds, pending) = run(CHAT_WITH_USAGE, cut);
        assert_eq!(kinds, [Content, Content, Content, Content, UsageOnly, Done]);
        assert_eq!(acc.usage(), usage(19, 0, 10));
        assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
        assert!(acc.saw_done());
        assert!(pending.is_empty());
    }
}

#[test]
fn stream_without_usage_keeps_the_text_for_estimation() {
    use ChunkKind::*;
    let (acc, kinds, _) = run(CHAT_WITHOUT_USAGE, 0);
    assert_eq!(kinds, [Content, Content, Content, Done]);
    assert_eq!(acc.usage(), None);
    assert_eq!(acc.produced_text(), "Hi");
    assert!(acc.saw_done());
}

#[test]
fn cut_off_stream_has_no_usage_and_no_done() {
    let cut_at = CHAT_WITH_USAGE.find(r#""choices":[],"#).unwrap();
    let (acc, kinds, pending) = run(&CHAT_WITH_USAGE[..cut_at], usize::MAX);
    assert_eq!(kinds.len(), 4);
    assert_eq!(acc.usage(), None);
    assert!(!acc.saw_done());
    assert_eq!(acc.produced_text(), "Hello! \"Quoted\" été\n");
    assert!(pending.starts_with(b"data: {"));
}

#[test]
fn tool_call_deltas_are_kept_as_text() {
    use ChunkKind::*;
    for cut in 0..=TOOL_CALLS.len() {
        let (acc, kinds, _) = run(TOOL_CALLS, cut);
        assert_eq!(kinds, [Content, Content, Content, Content, Content, UsageOnly, Done]);
        assert_eq!(acc.produced_text(), "get_weather{\"location\":\"Paris\"}");
        assert_eq!(acc.usage(), usage(80, 64, 16));
    }
}

#[test]
fn legacy_completions_stream() {
    use ChunkKind::*;
    let (acc, kinds, _) = run(LEGACY_COMPLETIONS, 17);
    assert_eq!(kinds, [Content, Content, Content, UsageOnly, Done]);
    assert_eq!(acc.produced_text(), "\n\nThis is a test.");
    assert_eq!(acc.usage(), usage(5, 0, 6));
}

#[test]
fn responses_api_stream_usage_comes_from_response_completed() {
    let stream = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","usage":null}}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}}"#,
        "\n\n",
    );
    let (acc, kinds, _) = run(stream, 100);
    assert_eq!(kinds, [ChunkKind::Content; 3]);
    assert_eq!(acc.usage(), usage(36, 0, 87));
}

#[test]
fn error_object_in_the_stream() {
    let mut acc = StreamAccumulator::new(100);
    let kind = acc.observe(
        r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
    );
    assert_eq!(kind, ChunkKind::Error);
    assert_eq!(acc.observe(r#"{"type":"error","code":"server_error","message":"x"}"#), ChunkKind::Error);
    assert_eq!(acc.observe(r#"{"error":"overloaded"}"#), ChunkKind::Error);
    // `"error": null` is not an error.
    assert_eq!(acc.observe(r#"{"choices":[],"error":null}"#), ChunkKind::Content);
}

#[test]
fn done_and_not_json() {
    let mut acc = StreamAccumulator::new(100);
    assert_eq!(acc.observe("hello"), ChunkKind::NotJson);
    assert_eq!(acc.observe(""), ChunkKind::NotJson);
    assert_eq!(acc.observe("{\"choices\": ["), ChunkKind::NotJson);
    assert_eq!(acc.observe("{} trailing"), ChunkKind::NotJson);
    assert!(!acc.saw_done());
    assert_eq!(acc.observe(" [DONE]\n"), ChunkKind::Done);
    assert!(acc.saw_done());
}

#[test]
fn json_that_is_not_an_object_is_content() {
    let mut acc = StreamAccumulator::new(100);
    for data in ["42", "\"text\"", "[1,2]", "null", "true"] {
        assert_eq!(acc.observe(data), ChunkKind::Content, "{data}");
    }
    assert_eq!(acc.produced_text(), "");
}

#[test]
fn azure_prompt_filter_chunk_without_usage_is_content() {
    let mut acc = StreamAccumulator::new(100);
    let kind = acc.observe(
        r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}"#,
    );
    assert_eq!(kind, ChunkKind::Content);
    assert_eq!(acc.observe(r#"{"choices":[],"usage":null}"#), ChunkKind::Content);
}

#[test]
fn usage_chunk_without_a_choices_key_is_usage_only() {
    let mut acc = StreamAccumulator::new(100);
    let kind = acc.observe(r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
    assert_eq!(kind, ChunkKind::UsageOnly);
    assert_eq!(acc.usage(), usage(3, 0, 4));
}

#[test]
fn usage_chunk_with_garbage_counts_is_still_the_usage_chunk() {
    let mut acc = StreamAccumulator::new(100);
    let kind = acc.observe(r#"{"choices":[],"usage":{"prompt_tokens":-3,"completion_tokens":4}}"#);
    assert_eq!(kind, ChunkKind::UsageOnly);
    assert_eq!(acc.usage(), None);
}

#[test]
fn usage_on_every_chunk_keeps_the_latest_and_stays_content() {
    // vLLM's continuous usage stats: running totals on chunks that also carry content.
    let mut acc = StreamAccumulator::new(100);
    let a = r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
    let b = r#"{"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
    assert_eq!(acc.observe(a), ChunkKind::Content);
    assert_eq!(acc.observe(b), ChunkKind::Content);
    assert_eq!(acc.usage(), usage(5, 0, 2));
    // A later broken report does not erase a good one.
    acc.observe(r#"{"choices":[],"usage":{"prompt_tokens":"5"}}"#);
    assert_eq!(acc.usage(), usage(5, 0, 2));
}

#[test]
fn reasoning_refusal_and_legacy_function_call_deltas_are_text() {
    let mut acc = StreamAccumulator::new(100);
    acc.observe(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm "}}]}"#);
    acc.observe(r#"{"choices":[{"index":0,"delta":{"reasoning":"plan "}}]}"#);
    acc.observe(r#"{"choices":[{"index":0,"delta":{"refusal":"no "}}]}"#);
    acc.observe(r#"{"choices":[{"index":0,"delta":{"function_call":{"name":"f","arguments":"{}"}}}]}"#);
    assert_eq!(acc.produced_text(), "hmm plan no f{}");
}

#[test]
fn several_choices_are_all_kept() {
    let mut acc = StreamAccumulator::new(100);
    acc.observe(r#"{"choices":[{"index":0,"delta":{"content":"A"}},{"index":1,"delta":{"content":"B"}}]}"#);
    assert_eq!(acc.produced_text(), "AB");
}

#[test]
fn odd_field_types_do_not_lose_the_rest_of_the_chunk() {
    let mut acc = StreamAccumulator::new(100);
    let kind = acc.observe(
        r#"{"choices":[7,{"index":0,"delta":{"content":["x"],"refusal":{"a":1},"tool_calls":"no"},"text":12},{"delta":{"content":"ok"}}],"usage":{"prompt_tokens":2,"completion_tokens":1,"extra":[{"deep":[1,2,{"x":null}]}]}}"#,
    );
    assert_eq!(kind, ChunkKind::Content);
    assert_eq!(acc.produced_text(), "ok");
    assert_eq!(acc.usage(), usage(2, 0, 1));
}

#[test]
fn duplicate_keys_fall_back_to_last_one_wins() {
    let mut acc = StreamAccumulator::new(100);
    let kind =
        acc.observe(r#"{"choices":[{"delta":{"content":"a","content":"b"}}],"choices":[{"delta":{"content":"c"}}]}"#);
    assert_eq!(kind, ChunkKind::Content);
    assert_eq!(acc.produced_text(), "c");
}

#[test]
fn deeply_nested_json_does_not_overflow_the_stack() {
    // Past the few levels metering reads, values are skipped by serde_json without recursion.
    let mut acc = StreamAccumulator::new(100);
    let deep = format!("{{\"choices\":[{}{}]}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(acc.observe(&deep), ChunkKind::Content);
    let deep = format!("{{\"usage\":{{\"x\":{}1{}}}}}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    assert_eq!(acc.observe(&deep), ChunkKind::UsageOnly);
    // With a duplicate key the fallback parses a `Value`, whose depth limit refuses it.
    let deep = format!("{{\"a\":1,\"error\":null,\"error\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(acc.observe(&deep), ChunkKind::NotJson);
    assert_eq!(acc.usage(), None);
}

#[test]
fn text_past_the_bound_is_only_counted() {
    let mut acc = StreamAccumulator::new(10);
    acc.observe(r#"{"choices":[{"delta":{"content":"12345678"}}]}"#);
    acc.observe(r#"{"choices":[{"delta":{"content":"abcd"}}]}"#);
    acc.observe(r#"{"choices":[{"delta":{"content":"x"}}]}"#);
    assert_eq!(acc.produced_text(), "12345678ab");
    assert_eq!(acc.overflow_bytes(), 3);
}

#[test]
fn the_bound_never_splits_a_character() {
    let mut acc = StreamAccumulator::new(5);
    // "é" is 2 bytes: 4 fit, the fifth byte would split the third "é".
    acc.observe(r#"{"choices":[{"delta":{"content":"ééé"}}]}"#);
    assert_eq!(acc.produced_text(), "éé");
    assert_eq!(acc.overflow_bytes(), 2);
    // Nothing more is kept once text has been dropped, even if it would fit.
    acc.observe(r#"{"choices":[{"delta":{"content":"a"}}]}"#);
    assert_eq!(acc.produced_text(), "éé");
    assert_eq!(acc.overflow_bytes(), 3);
}

#[test]
fn zero_bound_keeps_nothing_but_counts_everything() {
    let mut acc = StreamAccumulator::new(0);
    acc.observe(r#"{"choices":[{"delta":{"content":"héllo"}}]}"#);
    assert_eq!(acc.produced_text(), "");
    assert_eq!(acc.overflow_bytes(), 6);
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..100).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z\"\\\\é]{0,6}".prop_map(Value::from),
    ];
    let keys = prop_oneof![
        Just("usage"),
        Just("choices"),
        Just("delta"),
        Just("message"),
        Just("content"),
        Just("text"),
        Just("prompt_tokens"),
        Just("completion_tokens"),
        Just("input_tokens"),
        Just("output_tokens"),
        Just("prompt_tokens_details"),
        Just("cached_tokens"),
        Just("tool_calls"),
        Just("function"),
        Just("arguments"),
        Just("name"),
        Just("error"),
        Just("response"),
        Just("type"),
        Just("input_tokens_details"),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((keys.clone(), inner), 0..6)
                .prop_map(|entries| { Value::Object(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()) }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_json_never_panics_and_usage_is_sane(v in arb_json()) {
        if let Some(u) = usage_from_json(&v) {
            prop_assert!(u.cached_input_tokens <= u.input_tokens);
            prop_assert!(u.input_tokens <= MAX_REPORTED_TOKENS);
            prop_assert!(u.output_tokens <= MAX_REPORTED_TOKENS);
        }
        let _ = response_text(&v);
        let mut acc = StreamAccumulator::new(8);
        let kind = acc.observe(&v.to_string());
        prop_assert_ne!(kind, ChunkKind::NotJson);
        prop_assert_eq!(acc.usage(), usage_from_json(&v));
        prop_assert!(acc.produced_text().len() <= 8);
    }

    /// Holding chunks unread never changes the usage, nor the text when no usage is
    /// reported, nor what the pump acts on (`[DONE]`, usage-only chunks).
    #[test]
    fn holding_chunks_meters_as_reading_them_all(
        chunks in prop::collection::vec(
            prop_oneof![
                4 => arb_json().prop_map(|v| v.to_string()),
                2 => "[a-z]{1,6}".prop_map(|t| format!(r#"{{"choices":[{{"delta":{{"content":"{t}"}}}}],"usage":null}}"#)),
                1 => Just("[DONE]".to_string()),
                1 => "\\PC{0,24}",
            ],
            0..12,
        ),
        max in prop_oneof![Just(0usize), Just(7), Just(1 << 16)],
    ) {
        let mut direct = StreamAccumulator::new(max);
        let mut later = StreamAccumulator::new(max);
        for chunk in &chunks {
            let kind = direct.observe(chunk);
            let held = later.observe_later(chunk.clone());
            let acted = matches!(kind, ChunkKind::Done | ChunkKind::UsageOnly);
            prop_assert_eq!(held.is_some_and(|k| k == kind), acted || held.is_some(), "{}", chunk);
            if acted {
                prop_assert_eq!(held, Some(kind));
            }
        }
        later.finish();
        prop_assert_eq!(later.usage(), direct.usage());
        prop_assert_eq!(later.saw_done(), direct.saw_done());
        if direct.usage().is_none() {
            prop_assert_eq!(later.produced_text(), direct.produced_text());
            prop_assert_eq!(later.overflow_bytes(), direct.overflow_bytes());
        }
        prop_assert_eq!(later.held(), (0, 0));
    }

    /// The skim of a chunk with a usage report answers what reading it in full does.
    #[test]
    fn skimmed_chunks_meter_as_read_ones(
        usage in prop_oneof![
            3 => (0u64..5000, 0u64..5000, prop::option::of(0u64..9000)).prop_map(|(i, o, c)| match c {
                Some(c) => json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o,
                                  "prompt_tokens_details": {"cached_tokens": c, "audio_tokens": 0}}),
                None => json!({"input_tokens": i, "output_tokens": o, "input_tokens_details": null}),
            }),
            1 => arb_json(),
        ],
        choices in prop_oneof![Just(None), Just(Some(json!([]))), Just(Some(json!(null))), Just(Some(json!("x"))),
                               Just(Some(json!([{"delta": {"content": "hi"}}]))), Just(Some(json!([1])))],
        error in prop_oneof![Just(None), Just(Some(json!(null))), Just(Some(json!({"message": "boom"}))), Just(Some(json!(0)))],
        kind in prop_oneof![Just(None), Just(Some(json!("error"))), Just(Some(json!("response.completed"))), Just(Some(json!(7)))],
        extra in prop::option::of(arb_json()),
        pretty in any::<bool>(),
    ) {
        let mut body = serde_json::Map::new();
        body.insert("id".into(), json!("chatcmpl-1"));
        for (key, value) in [("choices", choices), ("error", error), ("type", kind), ("extra", extra)] {
            if let Some(value) = value {
                body.insert(key.into(), value);
            }
        }
        body.insert("usage".into(), usage);
        let body = Value::Object(body);
        let text = if pretty { serde_json::to_string_pretty(&body).unwrap() } else { body.to_string() };
        let mut read = StreamAccumulator::new(0);
        let read_kind = read.observe(&text);
        // (When the skim cannot tell, the full reader decides: nothing to compare.)
        if let Some((usage, kind)) = skim_top(&text) {
            prop_assert_eq!(Some(usage), read.usage(), "{}", text);
            prop_assert_eq!(kind, read_kind, "{}", text);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,64}") {
        let mut acc = StreamAccumulator::new(8);
        let _ = acc.observe(&s);
    }
}
