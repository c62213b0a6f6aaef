//! Forwarding and metering of non-streamed requests.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn chat_is_forwarded_metered_and_recorded_to_the_nano_dollar() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("hello", Some((1234, 200, 567))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("search").await;

    let resp = app.chat(&key, &chat_body("gpt-4o", "hi")).await;
    assert_eq!(resp.status(), 200);
    let expected = nanos(1234, 200, 567, GPT4O.0, GPT4O.1, GPT4O.2);
    let header = resp.headers()["x-tollgate-cost-usd"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["x-tollgate-model"], "gpt-4o");
    assert!(resp.headers().contains_key("x-tollgate-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hello");
    // The header is the exact decimal of the nano-dollar cost.
    let header_nanos: i64 = {
        let (whole, frac) = header.split_once('.').unwrap_or((&header, ""));
        whole.parse::<i64>().unwrap() * 1_000_000_000 + format!("{frac:0<9}").parse::<i64>().unwrap()
    };
    assert_eq!(header_nanos, expected);

    // The record is durable before the response: no waiting needed.
    let logs = app.logs().await;
    assert_eq!(logs.len(), 1);
    let r = &logs[0];
    assert_eq!(r["input_tokens"], 1234);
    assert_eq!(r["cached_input_tokens"], 200);
    assert_eq!(r["output_tokens"], 567);
    assert_eq!(r["usage_source"], "reported");
    assert_eq!(r["model"], "gpt-4o");
    assert_eq!(r["served_model"], "gpt-4o");
    assert_eq!(r["team"], "search");
    assert_eq!(r["status"], 200);
    assert_eq!(usd_to_nanos(&r["cost_usd"]), expected);
}

#[tokio::test]
async fn body_is_forwarded_byte_for_byte_except_model() {
    let up = FakeUpstream::start().await;
    let models = r#"
[[models]]
name = "fast"
provider = "up"
upstream_model = "gpt-4o-mini-2024-07-18"
"#;
    let app = TestApp::start(&up, models).await;
    let key = app.team_and_key("t").await;
    let raw = r#"{"model":"fast",  "messages":[{"role":"user","content":"h\u00e9 \ud83d\ude00"}],"temperature":0.70,"extra_field":{"keep":[1,2.50,"x"]}}"#;
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let forwarded = up.last_raw_body();
    assert_eq!(
        std::str::from_utf8(&forwarded).unwrap(),
        raw.replace(r#""model":"fast""#, r#""model":"gpt-4o-mini-2024-07-18""#)
    );
    // The provider's key is sent upstream, not the client's virtual key.
    assert_eq!(up.state.auth.lock().unwrap().last().unwrap(), "Bearer sk-upstream-secret-999");
}

#[tokio::test]
async fn response_body_reaches_the_client_unchanged() {
    let up = FakeUpstream::start().await;
    let exact = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"a"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},   "odd_spacing" : 1.0}"#;
    up.reply(Reply::new(200, "application/json", exact));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), exact);
}

#[tokio::test]
async fn missing_usage_is_estimated_with_the_tokenizer() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("Hello world, this is a reply.", None));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "Hello there")).await;
    assert_eq!(resp.status(), 200);
    let r = &app.logs().await[0];
    assert_eq!(r["usage_source"], "estimated");
    // o200k: "user" 1 + "Hello there" 2 + 3 per message + 3 priming = 9; the reply is 8 tokens.
    assert_eq!(r["input_tokens"], 9);
    assert_eq!(r["output_tokens"], 8);
    assert_eq!(usd_to_nanos(&r["cost_usd"]), nanos(9, 0, 8, MINI.0, MINI.1, MINI.2));
}

#[tokio::test]
async fn embeddings_and_legacy_completions_are_metered() {
    let up = FakeUpstream::start().await;
    up.script(|req| {
        if req.get("input").is_some() {
            Reply::new(
                200,
                "application/json",
                json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                       "model": "text-embedding-3-small", "usage": {"prompt_tokens": 1000, "total_tokens": 1000}})
                .to_string(),
            )
        } else {
            Reply::new(
                200,
                "application/json",
                json!({"id": "c", "object": "text_completion", "choices": [{"text": "ok", "index": 0, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
                .to_string(),
            )
        }
    });
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.post("/v1/embeddings", &key, &json!({"model": "text-embedding-3-small", "input": "hello"})).await;
    assert_eq!(resp.status(), 200);
    // $0.02 / 1M tokens: 1000 tokens = 20,000 nano-dollars.
    assert_eq!(resp.headers()["x-tollgate-cost-usd"], "0.00002");
    let resp = app.post("/v1/completions", &key, &json!({"model": "gpt-4o-mini", "prompt": "Say"})).await;
    assert_eq!(resp.status(), 200);
    let logs = app.logs().await;
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[0]["endpoint"], "completions");
    assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(10, 0, 2, MINI.0, MINI.1, MINI.2));
    assert_eq!(logs[1]["endpoint"], "embeddings");
}

#[tokio::test]
async fn models_lists_only_what_the_key_may_use() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({"models": ["gpt-4o-mini", "gpt-4o"]})).await;
    let (_, key) = app.create_key("t", json!({"models": ["gpt-4o-mini"]})).await;
    let resp = app.http.get(app.url("/v1/models")).bearer_auth(&key).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gpt-4o-mini"]);
    let resp = app.chat(&key, &chat_body("gpt-4o", "x")).await;
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_allowed");
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn the_openai_paths_answer_with_and_without_the_v1_prefix() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    for prefix in ["/v1", ""] {
        let resp = app.post(&format!("{prefix}/chat/completions"), &key, &chat_body("gpt-4o-mini", "hi")).await;
        assert_eq!(resp.status(), 200, "{prefix}/chat/completions");
        assert!(resp.headers().contains_key("x-tollgate-cost-usd"));
        let body = json!({"model": "text-embedding-3-small", "input": "hi"});
        assert_eq!(app.post(&format!("{prefix}/embeddings"), &key, &body).await.status(), 200, "{prefix}/embeddings");
        let resp = app.http.get(app.url(&format!("{prefix}/models"))).bearer_auth(&key).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{prefix}/models");
        let resp = app.http.get(app.url(&format!("{prefix}/completions"))).bearer_auth(&key).send().await.unwrap();
        assert_eq!(resp.status(), 405, "GET {prefix}/completions");
    }
    assert_eq!(up.hits(), 4);
    assert_eq!(app.logs().await.len(), 4);
}

#[tokio::test]
async fn spend_groups_by_team_model_and_day_and_keys_see_only_their_own() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((100, 0, 10))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let a = app.team_and_key("alpha").await;
    let b = app.team_and_key("beta").await;
    for _ in 0..3 {
        assert_eq!(app.chat(&a, &chat_body("gpt-4o", "x")).await.status(), 200);
    }
    assert_eq!(app.chat(&b, &chat_body("gpt-4o-mini", "x")).await.status(), 200);

    let v: Value = app
        .http
        .get(app.url("/spend?group_by=team,model,day"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"]["requests"], 4);
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0]["team"], "alpha");
    assert_eq!(groups[0]["model"], "gpt-4o");
    assert_eq!(groups[0]["requests"], 3);
    assert!(groups[0]["day"].as_str().unwrap().len() == 10);
    assert_eq!(usd_to_nanos(&groups[0]["cost_usd"]), 3 * nanos(100, 0, 10, GPT4O.0, GPT4O.1, GPT4O.2));
    assert_eq!(groups[1]["team"], "beta");

    // A virtual key sees its own spend only.
    let v: Value = app.http.get(app.url("/spend")).bearer_auth(&b).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["total"]["requests"], 1);
    let v: Value = app.http.get(app.url("/spend/logs")).bearer_auth(&b).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["team"], "beta");

    // CSV.
    let csv = app.http.get(app.url("/spend?group_by=team&format=csv")).bearer_auth(MASTER).send().await.unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    assert!(text.starts_with("team,requests,input_tokens,cached_input_tokens,output_tokens,cost_usd\n"), "{text}");
    assert!(text.contains("alpha,3,300,0,30,"), "{text}");

    // Time filters: nothing before 2000.
    let v: Value =
        app.http.get(app.url("/spend?to=2000-01-01")).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["total"]["requests"], 0);
}

#[tokio::test]
async fn spend_ranges_take_whole_days_and_utc_times_and_open_ranges_are_all_time() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
    app.clock.set(at("2026-12-07T10:00:00Z"));
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    app.wait_records(1).await;
    let app = &app;
    let spend = move |query: &'static str| async move {
        let resp = app.http.get(app.url(&format!("/spend{query}"))).bearer_auth(MASTER).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        resp.json::<Value>().await.unwrap()
    };

    // A date as `to` includes its whole day: from = to = today finds today's request.
    let v = spend("?from=2026-12-07&to=2026-12-07").await;
    assert_eq!(v["total"]["requests"], 1, "{v}");
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("2026-12-07T00:00:00Z"), Some("2026-12-08T00:00:00Z")),
        "{v}"
    );
    assert_eq!(spend("?to=2026-12-06").await["total"]["requests"], 0);
    // A date and time without a zone is UTC.
    let v = spend("?from=2026-12-07T04:00:00&to=2026-12-07T10:00:01").await;
    assert_eq!(v["total"]["requests"], 1, "{v}");
    assert_eq!(v["from"], "2026-12-07T04:00:00Z", "{v}");
    assert_eq!(spend("?to=2026-12-07T09:59:59").await["total"]["requests"], 0);
    assert_eq!(spend("?from=2026-12-07%2010:00:01").await["total"]["requests"], 0);

    // An open range is all time, up to the query's time; groups default to team and model.
    let v = spend("").await;
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str()),
        (Some("1970-01-01T00:00:00Z"), Some("2026-12-07T10:00:00Z")),
        "{v}"
    );
    assert_eq!(
        v["groups"],
        json!([{"team": "t", "model": "gpt-4o-mini", "requests": 1, "input_tokens": 10,
        "cached_input_tokens": 0, "output_tokens": 5, "cost_usd": v["total"]["cost_usd"]}]),
        "{v}"
    );
    // An empty group_by asks for the total alone.
    assert_eq!(spend("?group_by=").await["groups"], json!([]));

    // The CLI's `spend --json` answers in the same shape.
    let db = app.dir.path().join("tollgate.db");
    let config = app.dir.path().join("cli.toml");
    std::fs::write(&config, config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS)).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&config)
        .args(["spend", "--json", "--from", "2026-12-07", "--to", "2026-12-07"])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let api = spend("?from=2026-12-07&to=2026-12-07").await;
    assert_eq!(cli, api, "the CLI and the API agree");
}

#[tokio::test]
async fn spend_logs_paginate_newest_first() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    for _ in 0..5 {
        assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    }
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = app.url("/spend/logs?limit=2");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let v: Value = app.http.get(url).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
        for r in v["data"].as_array().unwrap() {
            seen.push(r["request_id"].as_str().unwrap().to_string());
        }
        match v["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first");
}

#[tokio::test]
async fn graceful_restart_keeps_the_ledger() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, &up, DEFAULT_MODELS).await;
    assert_eq!(app.logs().await.len(), 1);
    // The key still works after the restart.
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    assert_eq!(app.logs().await.len(), 2);
}

#[tokio::test]
async fn any_number_of_worker_threads_serves_concurrent_connections_and_records_them_all() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("hello", Some((12, 0, 3))));
    // One worker, and more workers than this machine has CPUs.
    for workers in [1, 5] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tollgate.db");
        let text = format!("workers = {workers}\n{}", config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS));
        let app = TestApp::start_with_config(dir, &text).await;
        let key = app.team_and_key("t").await;
        // Each request on its own connection, all at once: the accept loop hands them
        // round robin to the workers.
        let requests = (0..20).map(|_| {
            let (url, key) = (app.url("/v1/chat/completions"), key.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
                let resp =
                    client.post(url).bearer_auth(key).json(&chat_body("gpt-4o-mini", "hi")).send().await.unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            })
        });
        for done in futures::future::join_all(requests).await {
            let (status, text) = done.unwrap();
            assert_eq!(status, 200, "workers = {workers}: {text}");
            assert!(text.contains("hello"), "{text}");
        }
        let records = app.wait_records(20).await;
        assert_eq!(records.len(), 20, "workers = {workers}");
        assert!(records.iter().all(|r| r["output_tokens"] == 3 && r["status"] == 200), "{records:?}");
        app.stop().await;
    }
}

/// Starts a server whose upstream holds its answer (321 / 0 / 45 tokens) back for 600 ms,
/// sends a chat request, and hangs up once the upstream has it, before the answer arrives.
async fn hang_up_before_a_late_answer() -> (FakeUpstream, TestApp) {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("late", Some((321, 0, 45))).with_header_delay(Duration::from_millis(600)));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let body = chat_body("gpt-4o-mini", "hi");
    let hung_up = tokio::time::timeout(Duration::from_millis(200), app.chat(&key, &body)).await;
    assert!(hung_up.is_err(), "the answer must still be on its way when the client hangs up");
    assert_eq!(up.hits(), 1);
    (up, app)
}

#[tokio::test]
async fn client_that_hangs_up_before_the_answer_is_still_charged_from_upstream_usage() {
    let (_up, app) = hang_up_before_a_late_answer().await;
    // tollgate waited for the upstream's answer and recorded its reported usage.
    let logs = app.wait_records(1).await;
    assert_eq!(logs[0]["usage_source"], "reported");
    assert_eq!(logs[0]["input_tokens"], 321);
    assert_eq!(logs[0]["output_tokens"], 45);
    assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(321, 0, 45, MINI.0, MINI.1, MINI.2));
    // And the team's spend has it.
    let (status, spend) = app.admin(reqwest::Method::GET, "/spend?team=t", None).await;
    assert_eq!(status, 200, "{spend}");
    assert_eq!(usd_to_nanos(&spend["total"]["cost_usd"]), nanos(321, 0, 45, MINI.0, MINI.1, MINI.2), "{spend}");
    // The budget was charged, and its reservation given back.
    let (status, team) = app.admin(reqwest::Method::GET, "/admin/teams/t", None).await;
    assert_eq!(status, 200, "{team}");
    assert_eq!(usd_to_nanos(&team["spent_usd"]), nanos(321, 0, 45, MINI.0, MINI.1, MINI.2), "{team}");
    assert_eq!(usd_to_nanos(&team["reserved_usd"]), 0, "{team}");
}

#[tokio::test]
async fn shutdown_waits_for_a_request_whose_client_hung_up_and_records_it_settled() {
    let (up, app) = hang_up_before_a_late_answer().await;
    // With the client gone the connection closes at once; the forwarding it left behind
    // must still be waited for, or the journal would mark the request interrupted.
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, &up, DEFAULT_MODELS).await;
    let logs = app.logs().await;
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0]["usage_source"], "reported");
    assert_eq!(logs[0]["output_tokens"], 45);
}
