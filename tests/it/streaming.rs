//! SSE pass-through, usage-chunk handling, cut-off and disconnected streams.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

fn stream_body(model: &str, include_usage: Option<bool>) -> Value {
    let mut b = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

fn data_lines(text: &str) -> Vec<String> {
    text.split("\n\n").filter(|e| !e.trim().is_empty()).map(|e| e.trim().to_string()).collect()
}

#[tokio::test]
async fn usage_chunk_is_requested_upstream_and_stripped_for_clients_that_did_not_ask() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_sse(&["Hel", "lo"], Some((20, 0, 2)), true));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;

    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(resp.headers()["x-tollgate-model"], "gpt-4o-mini");
    let text = resp.text().await.unwrap();
    assert_eq!(up.last_body()["stream_options"]["include_usage"], true, "tollgate asks the upstream for usage");
    let events = data_lines(&text);
    assert_eq!(events.last().unwrap(), "data: [DONE]");
    assert!(!text.contains("\"choices\":[]"), "usage chunk must be stripped: {text}");
    assert_eq!(events.len(), 5, "{text}");

    let logs = app.logs().await;
    assert_eq!(logs[0]["usage_source"], "reported");
    assert_eq!(logs[0]["input_tokens"], 20);
    assert_eq!(logs[0]["output_tokens"], 2);
    assert_eq!(logs[0]["stream"], true);

    // A client that asked for usage gets the chunk.
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", Some(true))).await;
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"choices\":[]"), "{text}");
    assert!(text.contains("\"prompt_tokens\":20"));
}

#[tokio::test]
async fn sse_quirks_pass_through_exactly() {
    let up = FakeUpstream::start().await;
    // Comments, CRLF line endings, an event split across chunks, multi-line data.
    let chunks: Vec<&'static [u8]> = vec![
        b": keep-alive\r\n\r\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\r\n\r\nda",
        b"ta: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n",
        b"event: message\ndata: {\"choices\":[{\"index\":0,\n",
        b"data: \"delta\":{\"content\":\"c\"}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n",
        b"data: [DONE]\n\n",
    ];
    let reply = Reply {
        chunks: chunks.iter().map(|c| (Duration::from_millis(5), Bytes::from_static(c))).collect(),
        ..Reply::new(200, "text/event-stream", "")
    };
    up.reply(reply);
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", Some(true))).await;
    let body = resp.bytes().await.unwrap();
    let expected: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&expected));
    let logs = app.logs().await;
    assert_eq!(logs[0]["output_tokens"], 3);
    assert_eq!(logs[0]["usage_source"], "reported");
}

#[tokio::test]
async fn events_are_forwarded_as_they_arrive() {
    let up = FakeUpstream::start().await;
    // The second event comes 1.5 s after the first: the first must reach the client before.
    up.reply(Reply::chat_sse(&["first", "second"], Some((5, 0, 2)), true).with_chunk_delay(Duration::from_millis(300)));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let start = std::time::Instant::now();
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = start.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));
    let rest: Vec<_> = stream.collect().await;
    let total = start.elapsed();
    assert!(rest.iter().all(|r| r.is_ok()));
    assert!(first_at < Duration::from_millis(600), "first event after {first_at:?}");
    assert!(total >= Duration::from_millis(1400), "whole stream after {total:?}");
}

#[tokio::test]
async fn upstream_cut_off_cuts_the_client_and_is_charged_by_estimate() {
    let up = FakeUpstream::start().await;
    // No usage chunk, no [DONE]: the upstream connection breaks mid-stream.
    // Delays make the fake flush its headers and events before it breaks the connection.
    up.reply(Reply::chat_sse(&["Hello", " world"], None, false).with_chunk_delay(Duration::from_millis(30)).broken());
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut errored = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(errored, "the client's stream must end abnormally");
    assert!(!text.contains("[DONE]"));
    assert!(text.contains("world"));
    let logs = app.wait_records(1).await;
    assert_eq!(logs[0]["usage_source"], "estimated");
    // o200k: "Hello" + " world" = 2 tokens; prompt "hi" as a user message = 8.
    assert_eq!(logs[0]["output_tokens"], 2);
    assert_eq!(logs[0]["input_tokens"], 8);
    assert!(usd_to_nanos(&logs[0]["cost_usd"]) > 0);
}

#[tokio::test]
async fn clean_end_without_done_is_a_cut_off_too() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_sse(&["partial"], None, false));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    let mut stream = resp.bytes_stream();
    let mut errored = false;
    while let Some(chunk) = stream.next().await {
        if chunk.is_err() {
            errored = true;
        }
    }
    assert!(errored);
    assert_eq!(app.wait_records(1).await[0]["usage_source"], "estimated");
}

#[tokio::test]
async fn client_that_disconnects_mid_stream_is_still_charged_from_upstream_usage() {
    let up = FakeUpstream::start().await;
    up.reply(
        Reply::chat_sse(&["a", "b", "c", "d", "e", "f"], Some((40, 0, 6)), true)
            .with_chunk_delay(Duration::from_millis(100)),
    );
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    let mut stream = resp.bytes_stream();
    let _ = stream.next().await.unwrap().unwrap();
    drop(stream); // the client hangs up after the first event
    let logs = app.wait_records(1).await;
    // tollgate kept reading the upstream and recorded its reported usage.
    assert_eq!(logs[0]["usage_source"], "reported");
    assert_eq!(logs[0]["input_tokens"], 40);
    assert_eq!(logs[0]["output_tokens"], 6);
    assert_eq!(usd_to_nanos(&logs[0]["cost_usd"]), nanos(40, 0, 6, MINI.0, MINI.1, MINI.2));
}

#[tokio::test]
async fn stalled_stream_hits_the_idle_timeout_and_is_recorded() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_sse(&["a"], None, false).stalled());
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let start = std::time::Instant::now();
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    let chunks: Vec<_> = resp.bytes_stream().collect().await;
    assert!(chunks.iter().any(|c| c.is_err()), "stream must be cut");
    // idle_timeout_ms = 1000 in the test config.
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(app.wait_records(1).await[0]["usage_source"], "estimated");
}

#[tokio::test]
async fn stream_that_is_not_sse_is_a_502() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::new(200, "text/html", "<html>oops</html>"));
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_upstream_response");
    assert_eq!(app.logs().await[0]["status"], 502);
}

#[tokio::test]
async fn stream_labelled_sse_whose_body_is_not_sse_is_a_502_and_recorded() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let not_sse: [&[&'static str]; 4] = [
        &[r#"{"id":"chatcmpl-x","object":"chat.completion","choices":[]}"#],
        &["<html>oops</html>"],
        // Undecided after the first chunk, decided by the second.
        &["da", "ta_x: 1\n\n"],
        // Ends before anything at all.
        &[],
    ];
    for (i, chunks) in not_sse.iter().enumerate() {
        let sent = chunks.iter().map(|c| (Duration::from_millis(10), Bytes::from_static(c.as_bytes()))).collect();
        up.reply(Reply { chunks: sent, ..Reply::new(200, "text/event-stream", "") });
        let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
        assert_eq!(resp.status(), 502, "{chunks:?}");
        assert_eq!(resp.headers()["x-tollgate-model"], "gpt-4o-mini");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_upstream_response", "{v}");
        let logs = app.wait_records(i + 1).await;
        assert_eq!(logs[0]["status"], 502, "{:?}", logs[0]);
        assert_eq!(logs[0]["cost_usd"], 0.0, "{:?}", logs[0]);
    }

    // SSE that starts with a comment, a blank line or a field split across chunks is SSE.
    let events = [
        vec![": keep-alive\n\n".to_string()],
        vec!["\n".to_string()],
        vec!["\u{feff}da".to_string(), "ta".to_string()],
    ];
    for start in events {
        let mut reply = Reply::chat_sse(&["Hel", "lo"], Some((20, 0, 2)), true);
        let first = std::mem::take(&mut reply.chunks[0].1);
        let mut chunks: Vec<(Duration, Bytes)> =
            start.iter().map(|c| (Duration::ZERO, Bytes::from(c.clone()))).collect();
        let joined = start.concat();
        // The rest of the first event after the split-off start of its field name.
        let rest = if joined.ends_with("data") { first.slice(4..) } else { first };
        chunks.push((Duration::ZERO, rest));
        reply.chunks.splice(0..1, chunks);
        up.reply(reply);
        let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
        assert_eq!(resp.status(), 200, "{start:?}");
        let text = resp.text().await.unwrap();
        assert!(text.starts_with(&joined), "{start:?}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{start:?}: {text}");
    }
}

#[tokio::test]
async fn a_stream_is_answered_when_its_first_event_arrives_not_later() {
    let up = FakeUpstream::start().await;
    // The first event at once, the next after a second.
    let mut reply = Reply::chat_sse(&["a", "b"], Some((20, 0, 2)), true);
    reply.chunks[1].0 = Duration::from_millis(1000);
    up.reply(reply);
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let started = std::time::Instant::now();
    let resp = app.chat(&key, &stream_body("gpt-4o-mini", None)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert!(started.elapsed() < Duration::from_millis(800), "headers and first event took {:?}", started.elapsed());
}
