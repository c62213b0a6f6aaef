//! Budgets hold under concurrency; periods reset; spend survives restarts; rate limits.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use tollgate::policy::tokens::{prompt_tokens, PromptKind};

use crate::helpers::*;

const MAX_TOKENS: u64 = 100;

fn body(model: &str) -> Value {
    json!({"model": model, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "How much is it?"}]})
}

/// The exact reservation (= cost, as the fake reports the worst case) of `body` on mini.
fn mini_worst_case(b: &Value) -> (u64, i64) {
    let prompt = prompt_tokens(PromptKind::Chat, "gpt-4o-mini", b);
    (prompt, nanos(prompt, 0, MAX_TOKENS, MINI.0, MINI.1, MINI.2))
}

/// A server whose upstream answers every request with its worst case: the fake upstream,
/// the app, the gpt-4o-mini request body, and what each such request costs.
async fn worst_case_app() -> (FakeUpstream, TestApp, Value, i64) {
    let up = FakeUpstream::start().await;
    let b = body("gpt-4o-mini");
    let (prompt, cost) = mini_worst_case(&b);
    up.reply(Reply::chat_json("x", Some((prompt, 0, MAX_TOKENS))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    (up, app, b, cost)
}

fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// The fake reports exactly the worst case, slowly, so every request is in flight at once.
fn worst_case_upstream(up: &FakeUpstream, prompt: u64) {
    up.reply(Reply::chat_json("x", Some((prompt, 0, MAX_TOKENS))).with_header_delay(Duration::from_millis(300)));
}

async fn race(app: &TestApp, key: &str, n: usize, b: &Value) -> (usize, usize, Vec<String>) {
    let results = join_all((0..n).map(|_| async { app.chat(key, b).await })).await;
    let mut ok = 0;
    let mut refused = 0;
    let mut other = Vec::new();
    for r in results {
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(r.headers()["x-should-retry"], "false");
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "budget_exceeded");
                assert_eq!(v["error"]["type"], "insufficient_quota");
                refused += 1;
            }
            s => other.push(format!("{s}: {}", r.text().await.unwrap())),
        }
    }
    (ok, refused, other)
}

#[tokio::test]
async fn hundreds_of_concurrent_requests_against_room_for_n_serve_exactly_n() {
    let up = FakeUpstream::start().await;
    let b = body("gpt-4o-mini");
    let (prompt, cost) = mini_worst_case(&b);
    worst_case_upstream(&up, prompt);
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    const N: i64 = 17;
    // Room for exactly N, and not quite N + 1.
    let limit = N * cost + cost - 1;
    app.create_team("t", json!({"limit_usd": usd(limit)})).await;
    let (_, key) = app.create_key("t", json!({})).await;

    let (ok, refused, other) = race(&app, &key, 300, &b).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok as i64, N, "served");
    assert_eq!(refused, 300 - N as usize);
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), N * cost);
    assert!(usd_to_nanos(&team["spent_usd"]) <= limit);
    assert_eq!(team["reserved_usd"], 0.0);
    assert_eq!(up.hits() as i64, N);
}

#[tokio::test]
async fn a_key_budget_inside_a_team_budget_holds_too() {
    let up = FakeUpstream::start().await;
    let b = body("gpt-4o-mini");
    let (prompt, cost) = mini_worst_case(&b);
    worst_case_upstream(&up, prompt);
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({"limit_usd": usd(10 * cost)})).await;
    let (key_id, small) = app.create_key("t", json!({"limit_usd": usd(4 * cost)})).await;
    let (_, other_key) = app.create_key("t", json!({})).await;

    let (ok, _, other) = race(&app, &small, 100, &b).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok, 4, "the key's own budget binds first");
    // The team has room for 6 more; the other key gets exactly those.
    let (ok, _, other) = race(&app, &other_key, 100, &b).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok, 6);
    let (_, key) = app.admin(Method::GET, &format!("/admin/keys/{key_id}"), None).await;
    assert_eq!(usd_to_nanos(&key["spent_usd"]), 4 * cost);
    assert_eq!(key["remaining_usd"], 0.0);
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), 10 * cost);
}

#[tokio::test]
async fn period_resets_at_utc_midnight_with_an_injected_clock() {
    let (_up, app, b, cost) = worst_case_app().await;
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
    app.clock.set(at("2026-11-28T23:59:00Z"));
    app.create_team("t", json!({"limit_usd": usd(cost), "period": "daily"})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    let refused = app.chat(&key, &b).await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, 60, "seconds to midnight UTC");
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(team["resets_at"], "2026-11-29T00:00:00Z");

    app.clock.set(at("2026-11-29T00:00:01Z"));
    assert_eq!(app.chat(&key, &b).await.status(), 200, "a new day, a new budget");
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), cost);
}

#[tokio::test]
async fn restart_keeps_the_periods_spend() {
    let (up, app, b, cost) = worst_case_app().await;
    app.create_team("t", json!({"limit_usd": usd(3 * cost)})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    for _ in 0..2 {
        assert_eq!(app.chat(&key, &b).await.status(), 200);
    }
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, &up, DEFAULT_MODELS).await;
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), 2 * cost);
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    assert_eq!(app.chat(&key, &b).await.status(), 429, "the budget remembered its spend");
}

#[tokio::test]
async fn spend_without_a_limit_survives_a_restart_and_a_limit_set_later_counts_it() {
    let (up, app, b, cost) = worst_case_app().await;
    app.create_team("t", json!({})).await;
    let (id, key) = app.create_key("t", json!({})).await;
    for _ in 0..2 {
        assert_eq!(app.chat(&key, &b).await.status(), 200);
    }
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, &up, DEFAULT_MODELS).await;
    // A request before anyone reads the spend: it must not hide the earlier process's.
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    let (_, k) = app.admin(Method::GET, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(usd_to_nanos(&k["spent_usd"]), 3 * cost, "{k}");
    let (_, team) = app.admin(Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), 3 * cost, "{team}");

    // The same after a restart with no admin read in between, then a limit on the team.
    let dir = app.stop().await;
    let app = TestApp::start_in(dir, &up, DEFAULT_MODELS).await;
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    let (status, _) = app.admin(Method::PATCH, "/admin/teams/t", Some(json!({"limit_usd": usd(5 * cost)}))).await;
    assert_eq!(status, 200);
    assert_eq!(app.chat(&key, &b).await.status(), 200, "the fifth fits");
    assert_eq!(app.chat(&key, &b).await.status(), 429, "four before the limit and one after");
}

#[tokio::test]
async fn rpm_and_tpm_limits_answer_429_with_retry_after() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("x", Some((10, 0, 5))));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({})).await;
    let (_, key) = app.create_key("t", json!({"rpm": 2})).await;
    let b = chat_body("gpt-4o-mini", "x");
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    let r = app.chat(&key, &b).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // tpm on the team: 15 tokens per request against 20 per minute.
    app.create_team("u", json!({"tpm": 20})).await;
    let (_, key) = app.create_key("u", json!({})).await;
    assert_eq!(app.chat(&key, &b).await.status(), 200);
    let r = app.chat(&key, &b).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn budget_refusals_and_limits_are_not_in_the_ledger() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    app.create_team("t", json!({"limit_usd": 0.0})).await;
    let (_, key) = app.create_key("t", json!({})).await;
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 429);
    assert!(app.logs().await.is_empty());
    assert_eq!(up.hits(), 0);
}
