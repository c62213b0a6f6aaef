//! Every bad input gets OpenAI's error envelope with the right status; nothing reaches the
//! upstream that should not, and upstream failures map to 502 / 504.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("error body is JSON");
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "envelope: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "envelope: {v}");
    (status, v)
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_are_401() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let body = chat_body("gpt-4o-mini", "x");

    let resp = app.http.post(app.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let (status, v) = error_of(resp).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("invalid_api_key")));

    let (status, _) = error_of(app.chat("tg-notarealkeynotarealkeynotarealkey12", &body).await).await;
    assert_eq!(status, 401);

    // Revocation is immediate.
    let (_, keys) = app.admin(reqwest::Method::GET, "/admin/keys", None).await;
    let id = keys["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(app.chat(&key, &body).await.status(), 200);
    let (status, _) = app.admin(reqwest::Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(status, 200);
    let (status, v) = error_of(app.chat(&key, &body).await).await;
    assert_eq!(status, 401);
    // Never echo a secret.
    assert!(!v.to_string().contains(&key));
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn bad_bodies_are_400_with_the_field_named() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let send = |raw: &'static [u8]| {
        app.http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(raw)
            .send()
    };
    for raw in [&b"not json"[..], b"[1,2,3]", b"{\"model\": \"gpt-4o\", ", b"{\"model\":\"\xff\xfe\"}"] {
        let (status, v) = error_of(send(raw).await.unwrap()).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "invalid_json");
    }
    let deep = format!("{{\"model\":\"gpt-4o\",\"messages\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    let resp = app.http.post(app.url("/v1/chat/completions")).bearer_auth(&key).body(deep).send().await.unwrap();
    assert_eq!(error_of(resp).await.0, 400);

    let cases = [
        (json!({"messages": [{"role": "user", "content": "x"}]}), "model"),
        (json!({"model": 42, "messages": []}), "model"),
        (json!({"model": "gpt-4o", "messages": "nope"}), "messages"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}), "max_tokens"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}), "max_tokens"),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1_000_000}),
            "max_tokens",
        ),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "n": 10_000}), "n"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "stream"),
        // Both output limits are checked against the model's, whichever the reservation reads.
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100, "max_tokens": 1_000_000}),
            "max_tokens",
        ),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "max_completion_tokens": 1_000_000}),
            "max_completion_tokens",
        ),
        // The common fields' types, whether or not tollgate reads the field.
        (
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stop": [1]}), "stop"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "user": 7}), "user"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}), "logprobs"),
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"model": "gpt-4o", "messages": [{"role": "system", "content": "x"}, {"content": "y"}]}),
            "messages[1].role",
        ),
        (json!({"model": "gpt-4o", "messages": ["hi"]}), "messages[0]"),
    ];
    for (body, param) in cases {
        let (status, v) = error_of(app.chat(&key, &body).await).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{body} -> {v}");
    }
    for (path, body, param) in [
        ("/v1/completions", json!({"model": "gpt-4o", "prompt": [1, "a"]}), "prompt"),
        ("/v1/completions", json!({"model": "gpt-4o", "prompt": "x", "echo": 1}), "echo"),
        ("/v1/embeddings", json!({"model": "text-embedding-3-small", "input": [[1], "x"]}), "input"),
        ("/v1/embeddings", json!({"model": "text-embedding-3-small", "input": "x", "dimensions": "8"}), "dimensions"),
    ] {
        let (status, v) = error_of(app.post(path, &key, &body).await).await;
        assert_eq!((status, &v["error"]["param"]), (400, &json!(param)), "{path} {body} -> {v}");
    }
    let dup = br#"{"model":"gpt-4o","model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}"#;
    let (status, _) = error_of(send(dup).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(up.hits(), 0, "nothing invalid reaches the upstream");
    assert!(app.logs().await.is_empty(), "refused requests are not in the ledger");
}

#[tokio::test]
async fn oversized_body_is_413_and_unknown_model_404_and_unknown_path_404() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let big = "x".repeat(9 * 1024 * 1024);
    let resp = app.chat(&key, &chat_body("gpt-4o", &big)).await;
    let (status, v) = error_of(resp).await;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], "request_too_large");

    let (status, v) = error_of(app.chat(&key, &chat_body("gpt-5-ultra", "x")).await).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");

    for path in ["/v1/files", "/v1/audio/speech", "/nope"] {
        let resp = app.http.post(app.url(path)).bearer_auth(&key).body("{}").send().await.unwrap();
        assert_eq!(error_of(resp).await.0, 404, "{path}");
    }
    let resp = app.http.get(app.url("/v1/chat/completions")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(error_of(resp).await.0, 405);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504_and_are_recorded_at_zero_cost() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let body = chat_body("gpt-4o-mini", "x");

    // Forwarded, so metered: the error carries the headers every metered response does.
    let metered = |resp: &reqwest::Response| {
        let h = resp.headers();
        assert_eq!(h.get("x-tollgate-model").map(|v| v.to_str().unwrap()), Some("gpt-4o-mini"), "{h:?}");
        assert_eq!(h.get("x-tollgate-cost-usd").map(|v| v.to_str().unwrap()), Some("0"), "{h:?}");
        assert!(h.contains_key("x-tollgate-request-id"));
    };
    up.reply(Reply::error(503, "overloaded"));
    let resp = app.chat(&key, &body).await;
    metered(&resp);
    let (status, v) = error_of(resp).await;
    assert_eq!(status, 502);
    assert_eq!(v["error"]["type"], "upstream_error");
    assert_eq!(v["error"]["code"], "503");

    up.reply(Reply::new(200, "application/json", "this is not json"));
    let resp = app.chat(&key, &body).await;
    metered(&resp);
    let (status, v) = error_of(resp).await;
    assert_eq!((status, v["error"]["code"].as_str()), (502, Some("invalid_upstream_response")));

    // first_byte_timeout_ms = 2000 in the test config.
    up.reply(Reply::chat_json("late", Some((1, 0, 1))).with_header_delay(Duration::from_millis(3000)));
    let resp = app.chat(&key, &body).await;
    metered(&resp);
    let (status, v) = error_of(resp).await;
    assert_eq!((status, v["error"]["code"].as_str()), (504, Some("upstream_timeout")));

    // The upstream's own 400 reaches the client unchanged.
    let exact =
        r#"{"error":{"message":"bad temperature","type":"invalid_request_error","param":"temperature","code":null}}"#;
    up.reply(Reply::new(400, "application/json", exact));
    let resp = app.chat(&key, &body).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.text().await.unwrap(), exact);

    let logs = app.logs().await;
    let statuses: Vec<i64> = logs.iter().map(|r| r["status"].as_i64().unwrap()).collect();
    assert_eq!(statuses, vec![400, 504, 502, 502]);
    assert!(logs.iter().all(|r| r["cost_usd"].as_f64() == Some(0.0)));
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    // Port 9 on loopback: nothing listens there, the connection is refused at once.
    let text = config_text(db.to_str().unwrap(), "http://127.0.0.1:9/v1", DEFAULT_MODELS);
    drop(up);
    let app = TestApp::start_with_config(dir, &text).await;
    let key = app.team_and_key("t").await;
    let (status, v) = error_of(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await).await;
    assert_eq!(status, 502, "{v}");
    assert!(!v.to_string().contains("sk-upstream-secret"));
}
