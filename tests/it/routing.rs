//! Cost-aware routing: downgrades, their safety checks, fallbacks, dry runs.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

#[tokio::test]
async fn past_the_threshold_requests_are_downgraded_to_the_cheaper_model() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((1000, 0, 100))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let per = nanos(1000, 0, 100, GPT4O.0, GPT4O.1, GPT4O.2); // 3.5 millidollars
                                                              // Threshold at 4 requests' worth of gpt-4o; the limit far above.
    app.create_team("growth", json!({"limit_usd": usd(per * 100), "downgrade_at": 0.04})).await;
    let (_, key) = app.create_key("growth", json!({})).await;
    let b = json!({"model": "gpt-4o", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]});
    let mut served = Vec::new();
    for _ in 0..6 {
        let r = app.chat(&key, &b).await;
        assert_eq!(r.status(), 200);
        let model = r.headers()["x-tollgate-model"].to_str().unwrap().to_string();
        let from = r.headers().get("x-tollgate-downgraded-from").map(|v| v.to_str().unwrap().to_string());
        served.push((model, from));
    }
    let expect_full = (0..4).map(|_| ("gpt-4o".to_string(), None));
    let expect_down = (0..2).map(|_| ("gpt-4o-mini".to_string(), Some("gpt-4o".to_string())));
    assert_eq!(served, expect_full.chain(expect_down).collect::<Vec<_>>());
    // The upstream got the cheaper model; the ledger keeps both names.
    assert_eq!(up.last_body()["model"], "gpt-4o-mini");
    let logs = app.logs().await;
    assert_eq!(logs[0]["model"], "gpt-4o");
    assert_eq!(logs[0]["served_model"], "gpt-4o-mini");
    assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(1000, 0, 100, MINI.0, MINI.1, MINI.2));
}

#[tokio::test]
async fn worst_case_that_does_not_fit_downgrades_below_the_threshold() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 10))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    // $0.01: gpt-4o with max_tokens 2000 needs > $0.02; gpt-4o-mini needs $0.0012.
    app.create_team("t", json!({"limit_usd": 0.01})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    let b = json!({"model": "gpt-4o", "max_tokens": 2000, "messages": [{"role": "user", "content": "hi"}]});
    let r = app.chat(&key, &b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(r.headers()["x-tollgate-downgraded-from"], "gpt-4o");
    // Without max_tokens, the model's max output (16,384 × $0.60/1M ≈ $0.0098) still fits mini.
    let b = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(app.chat(&key, &b).await.headers()["x-tollgate-model"], "gpt-4o-mini");
}

#[tokio::test]
async fn downgrade_skips_models_that_cannot_serve_the_request() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 10))));
    let models = r#"
[[models]]
name = "gpt-4o"
provider = "up"

[[models]]
name = "tiny-ctx"
provider = "up"
input_per_mtok = 0.1
output_per_mtok = 0.1
context_window = 300
max_output_tokens = 200

[[models]]
name = "no-tools"
provider = "up"
input_per_mtok = 0.1
output_per_mtok = 0.1
context_window = 100000
max_output_tokens = 1000
supports_tools = false

[routing]
downgrade = { "gpt-4o" = "tiny-ctx", "tiny-ctx" = "no-tools" }
"#;
    let app = TestApp::start(&up, models).await;
    app.create_team("t", json!({"limit_usd": 0.001})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    // gpt-4o's worst case ($0.0025 for 250 tokens out) does not fit; tiny-ctx's window does not
    // hold a long prompt, so the chain goes on to no-tools.
    let long = "word ".repeat(400);
    let b = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": long}]});
    let r = app.chat(&key, &b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-model"], "no-tools");
    // A short prompt fits tiny-ctx.
    let b = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(app.chat(&key, &b).await.headers()["x-tollgate-model"], "tiny-ctx");
    // With tools and a long prompt nothing cheaper can serve: refused, not mis-served.
    let b = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": long}],
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]});
    let r = app.chat(&key, &b).await;
    assert_eq!(r.status(), 429);
    // An allow-list is respected along the chain.
    let (_, k2) = app.create_key("t", json!({"models": ["gpt-4o", "no-tools"]})).await;
    let b = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(app.chat(&k2, &b).await.headers()["x-tollgate-model"], "no-tools");
}

fn fallback_config(db: &str, primary: &str, backup: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
database_url = "sqlite://{db}"
master_key = "{MASTER}"

[[providers]]
name = "primary"
kind = "openai"
base_url = "{primary}"
connect_timeout_ms = 300
first_byte_timeout_ms = 700
idle_timeout_ms = 1000

[[providers]]
name = "backup"
kind = "openai"
base_url = "{backup}"

[[models]]
name = "gpt-4o"
provider = "primary"

[[models]]
name = "gpt-4o-backup"
provider = "backup"
upstream_model = "gpt-4o"
input_per_mtok = 5.0
output_per_mtok = 15.0

[routing]
fallbacks = {{ "gpt-4o" = ["gpt-4o-backup"] }}
"#
    )
}

#[tokio::test]
async fn failures_before_the_first_byte_fall_back_to_the_next_deployment() {
    let primary = FakeUpstream::start().await;
    let backup = FakeUpstream::start().await;
    backup.reply(Reply::chat_json("from backup", Some((100, 0, 10))));
    let failures: Vec<(&str, Reply)> = vec![
        ("500", Reply::error(500, "boom")),
        ("503", Reply::error(503, "overloaded")),
        ("429", Reply::error(429, "slow down")),
        ("timeout", Reply::chat_json("late", Some((1, 0, 1))).with_header_delay(Duration::from_millis(1500))),
    ];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let app =
        TestApp::start_with_config(dir, &fallback_config(db.to_str().unwrap(), &primary.url(), &backup.url())).await;
    let key = app.team_and_key("t").await;
    let mut expected_records = 0;
    for (name, reply) in failures {
        primary.reply(reply);
        let r = app.chat(&key, &chat_body("gpt-4o", "x")).await;
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.headers()["x-tollgate-model"], "gpt-4o-backup", "{name}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "from backup");
        expected_records += 1;
        let logs = app.logs().await;
        assert_eq!(logs.len(), expected_records, "one record per request ({name})");
        assert_eq!(logs[0]["served_model"], "gpt-4o-backup");
        assert_eq!(logs[0]["model"], "gpt-4o");
        // Priced at the serving deployment's price: $5 / $15 per 1M.
        assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(100, 0, 10, 5_000_000_000, 5_000_000_000, 15_000_000_000));
    }
    assert_eq!(backup.last_body()["model"], "gpt-4o");
}

#[tokio::test]
async fn connection_refused_falls_back_too() {
    let backup = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let app =
        TestApp::start_with_config(dir, &fallback_config(db.to_str().unwrap(), "http://127.0.0.1:9/v1", &backup.url()))
            .await;
    let key = app.team_and_key("t").await;
    let r = app.chat(&key, &chat_body("gpt-4o", "x")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-model"], "gpt-4o-backup");
    // All deployments failing: one clean 502.
    backup.reply(Reply::error(500, "down"));
    let r = app.chat(&key, &chat_body("gpt-4o", "x")).await;
    assert_eq!(r.status(), 502);
}

/// A cheap model on `primary` that falls back to a dear one on `backup`.
pub(crate) fn cheap_to_dear_fallback_config(db: &str, primary: &str, backup: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
database_url = "sqlite://{db}"
master_key = "{MASTER}"

[[providers]]
name = "primary"
kind = "openai"
base_url = "{primary}"

[[providers]]
name = "backup"
kind = "openai"
base_url = "{backup}"
first_byte_timeout_ms = 5000

[[models]]
name = "cheap"
provider = "primary"
upstream_model = "gpt-4o-mini"
input_per_mtok = 0.15
output_per_mtok = 0.60

[[models]]
name = "dear"
provider = "backup"
upstream_model = "gpt-4o"
input_per_mtok = 2.5
output_per_mtok = 10.0

[routing]
fallbacks = {{ "cheap" = ["dear"] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_to_a_dearer_model_is_reserved_at_its_own_price_and_never_overspends() {
    let primary = FakeUpstream::start().await;
    let backup = FakeUpstream::start().await;
    primary.reply(Reply::error(500, "boom"));
    // Slow enough that the racing requests all hold their reservations at once.
    backup.reply(Reply::chat_json("from dear", Some((20, 0, 10))).with_header_delay(Duration::from_millis(600)));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let text = cheap_to_dear_fallback_config(db.to_str().unwrap(), &primary.url(), &backup.url());
    let app = TestApp::start_with_config(dir, &text).await;
    let body = |model: &str| json!({"model": model, "max_tokens": 1000, "messages": [{"role": "user", "content": "hello there"}]});
    // Each model's worst case for this request, as tollgate prices it.
    app.create_team("probe", json!({})).await;
    let (_, probe) = app.create_key("probe", json!({})).await;
    let mut worst = Vec::new();
    for model in ["cheap", "dear"] {
        worst.push(usd_to_nanos(&app.dry_run(&probe, &body(model)).await["max_cost_usd"]));
    }
    let (cheap, dear) = (worst[0], worst[1]);
    assert!(dear > 4 * cheap, "the fallback must be the dearer model: {cheap} vs {dear}");
    // Room for exactly three answers from the dear model, beside the four cheap reservations
    // the racing requests take first (so no ordering of their fallbacks refuses a fourth
    // for lack of room that a release would have made).
    let limit = 3 * dear + 4 * cheap;
    app.create_team("t", json!({"limit_usd": usd(limit)})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    let racing = (0..4).map(|_| {
        let (app, key, body) = (&app, &key, body("cheap"));
        async move { app.chat(key, &body).await.status().as_u16() }
    });
    let statuses = futures::future::join_all(racing).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 3, "exactly what fits at the fallback's price is served: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        1,
        "the fourth finds no fallback that fits: {statuses:?}"
    );
    let (status, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(status, 200, "{team}");
    assert!(usd_to_nanos(&team["spent_usd"]) <= limit, "spent past the limit: {team}");
    assert_eq!(backup.hits(), 3, "a fallback that does not fit is never forwarded");
}

#[tokio::test]
async fn dry_run_routes_without_calling_the_upstream_or_charging() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({"limit_usd": 0.01})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    let dry = |b: Value| {
        app.http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-dry-run", "true")
            .json(&b)
            .send()
    };
    let v: Value = dry(json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["decision"], "serve");
    assert_eq!(v["served_model"], "gpt-4o");
    assert_eq!(v["remaining_usd"], 0.01);
    // 8 prompt tokens and 10 out on gpt-4o.
    assert_eq!(usd_to_nanos(&v["max_cost_usd"]), nanos(8, 0, 10, GPT4O.0, GPT4O.1, GPT4O.2));
    assert_eq!(usd_to_nanos(&v["estimated_cost_usd"]), nanos(8, 0, 0, GPT4O.0, GPT4O.1, GPT4O.2));

    let v: Value = dry(json!({"model": "gpt-4o", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["decision"], "downgrade");
    assert_eq!(v["served_model"], "gpt-4o-mini");
    assert!(v["reason"].as_str().unwrap().contains("does not fit"));

    let v: Value = dry(
        json!({"model": "gpt-4o-mini", "max_tokens": 16000, "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(v["decision"], "refuse");
    assert_eq!(up.hits(), 0);
    assert!(app.logs().await.is_empty());
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(team["reserved_usd"], 0.0);
    assert_eq!(team["spent_usd"], 0.0);
}

#[tokio::test]
async fn an_alias_counts_its_prompt_with_its_upstream_models_tokenizer() {
    let up = FakeUpstream::start().await;
    let models = r#"
[[models]]
name = "legacy"
provider = "up"
upstream_model = "gpt-3.5-turbo"

[[models]]
name = "gpt-3.5-turbo"
provider = "up"
"#;
    let app = TestApp::start(&up, models).await;
    app.create_team("t", json!({"limit_usd": 1.0})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    // cl100k_base (gpt-3.5) and o200k_base split this text into different numbers of tokens.
    let text = "我们的网关按模型计费，精确到每一个词元。".repeat(20);
    let mut estimates = Vec::new();
    for model in ["legacy", "gpt-3.5-turbo"] {
        let b = json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": text}]});
        let resp = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-dry-run", "true")
            .json(&b)
            .send();
        let v: Value = resp.await.unwrap().json().await.unwrap();
        estimates.push((usd_to_nanos(&v["estimated_cost_usd"]), usd_to_nanos(&v["max_cost_usd"])));
    }
    assert_eq!(estimates[0], estimates[1], "the alias is priced on gpt-3.5-turbo's own count");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn dry_run_reports_a_rate_limit_refusal_without_taking_a_slot() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({})).await;
    let (_, key) = app.create_key("t", json!({"rpm": 1})).await;
    let dry = || {
        let b = chat_body("gpt-4o-mini", "hi");
        app.http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-tollgate-dry-run", "true")
            .json(&b)
            .send()
    };
    // Dry runs take no slot from the window: the real request after them is admitted.
    for _ in 0..3 {
        let v: Value = dry().await.unwrap().json().await.unwrap();
        assert_eq!(v["decision"], "serve", "{v}");
    }
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "hi")).await.status(), 200);

    // Now the window is full: the dry run says what the real request meets.
    let v: Value = dry().await.unwrap().json().await.unwrap();
    assert_eq!(v["decision"], "refuse", "{v}");
    assert_eq!(v["served_model"], Value::Null, "{v}");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("Rate limit") && reason.contains("requests per minute"), "{v}");
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "hi")).await.status(), 429);
    assert_eq!(up.hits(), 1);
}
