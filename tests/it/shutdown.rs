//! Graceful shutdown: what is still in flight when `shutdown_grace_ms` runs out is cut —
//! client connection closed, upstream request dropped — and still settled and recorded.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

/// A server on a fresh data dir with `shutdown_grace_ms = grace_ms`.
///
/// The cut requests below are charged by estimate, with gpt-4o-mini's tokenizer. Its first
/// use in a process loads it (~100 ms in a release build, seconds in a debug one), which
/// would fall inside the shutdown these tests time: it is loaded here, before the clock runs.
async fn app_with_grace(up: &FakeUpstream, grace_ms: u64) -> TestApp {
    tollgate::policy::tokens::count_text(tollgate::policy::tokens::Encoding::O200kBase, "");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let text = config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS)
        .replace("shutdown_grace_ms = 5000", &format!("shutdown_grace_ms = {grace_ms}"));
    TestApp::start_with_config(dir, &text).await
}

/// Stops `app` and returns its data dir and how long `run` took to return. Fails at once if
/// it takes more than 5 s (the upstreams below answer after 10 s).
async fn stop_timed(app: TestApp) -> (tempfile::TempDir, Duration) {
    let signalled = Instant::now();
    let dir = tokio::time::timeout(Duration::from_secs(5), app.stop())
        .await
        .expect("run() must return soon after the grace period, not when the upstream finishes");
    (dir, signalled.elapsed())
}

/// The only record in the ledger of a server restarted on `dir`, and that restart's app.
async fn only_record_after_restart(dir: tempfile::TempDir, up: &FakeUpstream) -> (TestApp, Value) {
    let app = TestApp::start_in(dir, up, DEFAULT_MODELS).await;
    let logs = app.logs().await;
    assert_eq!(logs.len(), 1, "exactly one record for the cut request: {logs:?}");
    (app, logs[0].clone())
}

async fn wait_for_upstream_hit(up: &FakeUpstream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn slow_stream() -> Reply {
    let pieces: Vec<String> = (0..40).map(|i| format!("word{i} ")).collect();
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    // 43 events 250 ms apart: ~10 s, with its usage report (never reached) at the end.
    Reply::chat_sse(&pieces, Some((9, 0, 40)), true).with_chunk_delay(Duration::from_millis(250))
}

#[tokio::test]
async fn a_request_still_waiting_on_the_upstream_when_the_grace_period_ends_is_cut_and_recorded() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("late", Some((321, 0, 45))).with_header_delay(Duration::from_secs(10)));
    let app = app_with_grace(&up, 300).await;
    let key = app.team_and_key("t").await;
    let (client, url) = (app.http.clone(), app.url("/v1/chat/completions"));
    let waiting =
        tokio::spawn(
            async move { client.post(url).bearer_auth(key).json(&chat_body("gpt-4o-mini", "hi")).send().await },
        );
    wait_for_upstream_hit(&up).await;

    let (dir, took) = stop_timed(app).await;
    assert!(took < Duration::from_secs(2), "shutdown took {took:?} with a 300 ms grace period");
    // The client is not left waiting for the upstream: its connection is closed (or it
    // got an error), never the late 200.
    let answer = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("the client is answered or cut at once")
        .unwrap();
    if let Ok(resp) = answer {
        assert_ne!(resp.status(), 200, "a request cut at shutdown must not look complete");
    }

    let (app, r) = only_record_after_restart(dir, &up).await;
    assert_eq!(r["usage_source"], "estimated", "{r}");
    assert_eq!(r["status"], 503, "{r}");
    assert!(r["input_tokens"].as_u64().unwrap() > 0, "its prompt is charged: {r}");
    assert_eq!(r["output_tokens"], 0, "no output reached tollgate: {r}");
    let (_, team) = app.admin(reqwest::Method::GET, "/admin/teams/t", None).await;
    assert_eq!(usd_to_nanos(&team["spent_usd"]), usd_to_nanos(&r["cost_usd"]), "{team}");
}

#[tokio::test]
async fn a_stream_still_running_when_the_grace_period_ends_is_cut_without_done_and_charged_by_estimate() {
    let up = FakeUpstream::start().await;
    up.reply(slow_stream());
    let app = app_with_grace(&up, 300).await;
    let key = app.team_and_key("t").await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = app.chat(&key, &body).await;
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("word1 ") {
        text.push_str(&String::from_utf8_lossy(&events.next().await.unwrap().unwrap()));
    }

    let (dir, took) = stop_timed(app).await;
    assert!(took < Duration::from_secs(2), "shutdown took {took:?} with a 300 ms grace period");
    // The client's stream ends (cut), without [DONE].
    let rest = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(chunk)) = events.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(rest.is_ok(), "the client's stream was not closed");
    assert!(!text.contains("[DONE]"), "a cut stream must not end with [DONE]: {text}");
    assert!(!text.contains("word39"), "the stream was cut mid-way: {text}");

    let (_app, r) = only_record_after_restart(dir, &up).await;
    assert_eq!(r["usage_source"], "estimated", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["stream"], true, "{r}");
    assert!(r["output_tokens"].as_u64().unwrap() > 0, "what was streamed is charged: {r}");
}

#[tokio::test]
async fn with_no_grace_period_a_stream_left_draining_by_its_client_is_cut_at_once() {
    let up = FakeUpstream::start().await;
    up.reply(slow_stream());
    // disconnect_drain_ms stays at its default (60 s): only shutdown ends the drain.
    let app = app_with_grace(&up, 0).await;
    let key = app.team_and_key("t").await;
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = app.chat(&key, &body).await;
    let mut events = resp.bytes_stream();
    let mut text = String::new();
    while !text.contains("word1 ") {
        text.push_str(&String::from_utf8_lossy(&events.next().await.unwrap().unwrap()));
    }
    // The client hangs up: the pump goes on in a tracked task, draining the upstream. It
    // notices at its next hand-over, one upstream event (250 ms) later: give it two.
    drop(events);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (dir, took) = stop_timed(app).await;
    assert!(took < Duration::from_secs(1), "shutdown took {took:?} with no grace period");
    let (_app, r) = only_record_after_restart(dir, &up).await;
    assert_eq!(r["usage_source"], "estimated", "{r}");
    assert!(r["output_tokens"].as_u64().unwrap() > 0, "{r}");
}
