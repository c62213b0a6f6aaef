use super::*;

fn parse_chat(body: &str) -> Result<ParsedRequest, RequestError> {
    parse(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes()))
}

#[test]
fn rewrite_touches_only_model_and_usage_option() {
    let body = Bytes::from_static(
        br#"{ "model" : "gpt-4o",  "messages":[{"role":"user","content":"hi"}], "temperature": 1.50, "stream": true }"#,
    );
    let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
    let out = p.rewrite(&body, "gpt-4o-2024-08-06");
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        r#"{ "model" : "gpt-4o-2024-08-06",  "messages":[{"role":"user","content":"hi"}], "temperature": 1.50, "stream": true ,"stream_options":{"include_usage":true}}"#
    );
}

#[test]
fn unchanged_body_is_forwarded_as_is() {
    let body = Bytes::from_static(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#);
    let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
    assert_eq!(p.rewrite(&body, "gpt-4o"), body);
}

#[test]
fn existing_stream_options_keep_their_fields() {
    let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":false}}"#);
    let p = parse_chat(std::str::from_utf8(&body).unwrap()).unwrap();
    assert!(!p.client_wants_usage);
    let out: Value = serde_json::from_slice(&p.rewrite(&body, "m")).unwrap();
    assert_eq!(out["stream_options"]["include_usage"], true);
}

#[test]
fn bad_inputs_name_their_field() {
    let param = |body: &str| match parse_chat(body) {
        Err(RequestError::InvalidParam { param, .. }) => param,
        other => panic!("expected a param error, got {other:?}"),
    };
    assert_eq!(param(r#"{"messages":[{"role":"user","content":"x"}]}"#), "model");
    assert_eq!(param(r#"{"model":5,"messages":[]}"#), "model");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#), "max_tokens");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#), "max_tokens");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":100000}"#), "n");
    assert_eq!(param(r#"{"model":"m","messages":"hi"}"#), "messages");
    assert_eq!(param(r#"{"model":"m","model":"n","messages":[{"role":"user","content":"x"}]}"#), "model");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#), "stream");
    // Both output limits are read, each checked for its type.
    assert_eq!(
        param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":5,"max_tokens":"9"}"#),
        "max_tokens"
    );
    // The common fields' types.
    let chat = |extra: &str| param(&format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#));
    assert_eq!(chat(r#""temperature":"hot""#), "temperature");
    assert_eq!(chat(r#""top_p":true"#), "top_p");
    assert_eq!(chat(r#""seed":1.5"#), "seed");
    assert_eq!(chat(r#""logprobs":1"#), "logprobs");
    assert_eq!(chat(r#""user":5"#), "user");
    assert_eq!(chat(r#""stop":[1]"#), "stop");
    assert_eq!(chat(r#""tools":{}"#), "tools");
    assert_eq!(chat(r#""response_format":"json""#), "response_format");
    // The first mistyped member in the body's order is named.
    assert_eq!(chat(r#""user":5,"temperature":"hot""#), "user");
    assert_eq!(param(r#"{"model":"m","messages":["hi"]}"#), "messages[0]");
    assert_eq!(
        param(r#"{"model":"m","messages":[{"role":"user","content":"x"},{"content":"y"}]}"#),
        "messages[1].role"
    );
    assert_eq!(param(r#"{"model":"m","messages":[{"role":["user"],"content":"y"}]}"#), "messages[0].role");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#), "messages[0].content");
    assert_eq!(param(r#"{"model":"m","messages":[{"role":"user"}]}"#), "messages[0].content");
}

#[test]
fn common_fields_of_their_types_or_null_pass_and_unknown_fields_are_not_checked() {
    let ok = [
        r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[]},{"role":"tool","tool_call_id":"t"},{"role":"user","content":null}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":null,"top_p":1,"seed":-3,"logprobs":true,"top_logprobs":2,"user":"u","stop":["a"],"tools":null,"response_format":null,"parallel_tool_calls":false,"logit_bias":{"1":5},"custom":{"any":"thing"},"echo":"x"}"#,
    ];
    for body in ok {
        parse_chat(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
    }
    let completion = |body: &str| parse(Endpoint::Completions, &Bytes::copy_from_slice(body.as_bytes()));
    for prompt in [r#""x""#, r#"["a","b"]"#, "[1,2]", "[[1],[2,3]]", "[]"] {
        completion(&format!(r#"{{"model":"m","prompt":{prompt},"logprobs":2,"echo":true}}"#)).unwrap();
    }
    for prompt in [r#"["a",1]"#, "[[1],2]", "[1.5]", r#"[["a"]]"#] {
        assert!(
            matches!(completion(&format!(r#"{{"model":"m","prompt":{prompt}}}"#)), Err(RequestError::InvalidParam { param, .. }) if param == "prompt"),
            "{prompt}"
        );
    }
    let embedding = |body: &str| parse(Endpoint::Embeddings, &Bytes::copy_from_slice(body.as_bytes()));
    assert!(
        matches!(embedding(r#"{"model":"m","input":[[1],["x"]]}"#), Err(RequestError::InvalidParam { param, .. }) if param == "input")
    );
    assert!(
        matches!(embedding(r#"{"model":"m","input":"x","dimensions":"8"}"#), Err(RequestError::InvalidParam { param, .. }) if param == "dimensions")
    );
}

#[test]
fn both_output_limits_are_kept_and_the_reservation_reads_max_completion_tokens_first() {
    for body in [
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":900,"max_completion_tokens":10}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":10,"max_tokens":900,"tools":[]}"#,
    ] {
        let p = parse_chat(body).unwrap();
        assert_eq!((p.max_tokens, p.max_completion_tokens, p.max_output()), (Some(900), Some(10), Some(10)), "{body}");
        assert_eq!(p.output_limit_over(100), Some(("max_tokens", 900)), "{body}");
        assert_eq!(p.output_limit_over(1000), None, "{body}");
    }
    let p = parse_chat(
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9,"max_completion_tokens":500}"#,
    )
    .unwrap();
    assert_eq!(p.output_limit_over(100), Some(("max_completion_tokens", 500)));
    let p = parse_chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9}"#).unwrap();
    assert_eq!((p.max_output(), p.output_limit_over(8)), (Some(9), Some(("max_tokens", 9))));
}

#[test]
fn not_json_is_invalid_json() {
    for body in ["", "nope", "[1,2]", "{\"model\":", "\"str\"", "{\"a\":\"\\ud800\"}x"] {
        assert!(
            matches!(
                parse(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes())),
                Err(RequestError::InvalidJson(_))
            ),
            "{body}"
        );
    }
    assert!(matches!(
        parse(Endpoint::Chat, &Bytes::from_static(b"{\"model\":\"\xff\"}")),
        Err(RequestError::InvalidJson(_))
    ));
    let deep = "[".repeat(10_000);
    assert!(matches!(
        parse(Endpoint::Chat, &Bytes::from(format!("{{\"model\":{deep}"))),
        Err(RequestError::InvalidJson(_))
    ));
}

#[test]
fn common_chat_bodies_are_skimmed_and_the_rest_read_in_full() {
    let skimmed = [
        r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be \"brief\".\n"},{"role":"user","name":"ann","content":"hi"}]}"#,
        r#" { "messages" : [ {"role":"user","content":"x"} ] , "model" : "m", "stream":true, "stream_options":{"include_usage":true}, "max_tokens":null, "n":2, "temperature":0.75, "response_format":{"type":"json_schema","json_schema":{"name":"x"}}, "metadata":{"a":[1,{"b":null}]} } "#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":-0.5,"presence_penalty":null,"frequency_penalty":1,"seed":7,"top_logprobs":null,"logprobs":false,"parallel_tool_calls":true,"user":"\u00e9","stop":["\n",""],"logit_bias":{"1":-100}}"#,
    ];
    for body in skimmed {
        let p = parse_chat(body).unwrap();
        assert!(p.plain_chat.is_some(), "{body}");
        let full = parse_full(Endpoint::Chat, &Bytes::copy_from_slice(body.as_bytes())).unwrap();
        assert_eq!(
            (p.stream, p.client_wants_usage, p.n, p.needs),
            (full.stream, full.client_wants_usage, full.n, full.needs)
        );
    }
    let chat = parse_chat(skimmed[0]).unwrap().plain_chat.unwrap();
    assert_eq!(chat, PlainChat { messages: 2, names: 1, text_bytes: 6 + 15 + 4 + 3 + 2 });
    let full = [
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[]}"#,
        r#"{"model":"m\u0041","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","c\u006fntent":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x","content":"y"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1e0}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":-1}"#,
        r#"{"model":"m","messages":[{"role":"assistant","content":"x"},{"role":"tool","tool_call_id":"t"}]}"#,
    ];
    for body in full {
        assert!(parse_chat(body).unwrap().plain_chat.is_none(), "{body}");
    }
}

#[test]
fn a_streams_body_is_kept_apart_from_the_buffer_it_arrived_in() {
    let chat = br#"{"model":"m","stream":STREAM,"messages":[{"role":"user","content":"x"}]}"#;
    for stream in [true, false] {
        let text = String::from_utf8_lossy(chat).replace("STREAM", &stream.to_string());
        // As hyper hands a body over: a slice of the connection's larger read buffer.
        let buffer = Bytes::from(format!("{text}{}", " ".repeat(8192)));
        let body = buffer.slice(..text.len());
        let p = parse(Endpoint::Chat, &body).unwrap();
        let within = buffer.as_ptr_range().contains(&p.prompt.body.as_ptr());
        assert_eq!(within, !stream, "stream: {stream}");
        assert_eq!(p.prompt.value()["model"], "m");
    }
}

#[test]
fn capabilities_are_detected() {
    let p = parse_chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://x"}}]}],"tools":[{"type":"function","function":{"name":"f"}}],"response_format":{"type":"json_schema"}}"#).unwrap();
    assert_eq!(p.needs, Capabilities::ALL);
}
