//! Hostile clients (issue 4): slowloris on headers and on bodies, thousands of idle
//! connections, oversized headers and bodies, malformed and extreme JSON, and key-prefix
//! oracles. Each test bounds its own time, talks to the server over loopback only, and checks
//! that the server keeps serving other clients meanwhile.
//!
//! Raw TCP is used where an HTTP client library would not misbehave on purpose.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

// ------------------------------------------------------------------------------------------------
// Harness

/// Starts tollgate with extra top-level config keys (they must come before `[[providers]]`,
/// so they are put in front of the harness's config text).
async fn start_with(up: &FakeUpstream, top: &str, models: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let text = format!("{top}\n{}", config_text(db.to_str().unwrap(), &up.url(), models));
    TestApp::start_with_config(dir, &text).await
}

/// Runs `f` with a hard deadline, so a hung server fails the test instead of hanging CI.
async fn bounded<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response: `None` if the connection closed (or was reset) before any byte of one.
/// Bodies are framed by Content-Length, or read to EOF; chunked bodies are de-chunked.
async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) if buf.is_empty() => return None,
            Ok(0) | Err(_) => panic!("connection closed inside a response head: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let mut resp = RawResponse { status, head, body: buf[head_end..].to_vec() };
    let length = resp.header("content-length").and_then(|v| v.parse::<usize>().ok());
    let chunked = resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    loop {
        if length.is_some_and(|n| resp.body.len() >= n) || (chunked && resp.body.ends_with(b"0\r\n\r\n")) {
            break;
        }
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) => break,
            Ok(n) => resp.body.extend_from_slice(&tmp[..n]),
        }
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = &resp.body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + size]);
            rest = &rest[i + 2 + size + 2..];
        }
        resp.body = out;
    }
    Some(resp)
}

/// Reads until the peer closes the connection; returns when, and the bytes received.
async fn wait_closed<R: AsyncRead + Unpin>(r: &mut R, started: Instant) -> (Duration, Vec<u8>) {
    let mut got = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        match r.read(&mut tmp).await {
            Ok(0) | Err(_) => return (started.elapsed(), got),
            Ok(n) => got.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Asserts OpenAI's error envelope and returns it.
fn envelope(v: &Value) -> &Value {
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not OpenAI's envelope: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "not OpenAI's envelope: {v}");
    e
}

/// A normal chat request, timed.
async fn timed_chat(app: &TestApp, key: &str) -> Duration {
    timed_chat_with(&app.http, app, key).await
}

/// A normal chat request through `http`, timed.
async fn timed_chat_with(http: &reqwest::Client, app: &TestApp, key: &str) -> Duration {
    let t = Instant::now();
    let resp = http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat_body("gpt-4o-mini", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a well-behaved client must be served");
    resp.bytes().await.unwrap();
    t.elapsed()
}

/// The (soft, hard) limits on open files of this process.
fn open_files_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let from_proc = limits.lines().find(|l| l.starts_with("Max open files")).and_then(|l| {
        let mut f = l.split_whitespace().skip(3);
        let soft = f.next()?.parse().ok()?;
        let hard = f.next().and_then(|h| h.parse().ok()).unwrap_or(soft);
        Some((soft, hard))
    });
    from_proc
        .or_else(|| {
            let out = std::process::Command::new("sh").args(["-c", "ulimit -n"]).output().ok()?;
            let soft = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            Some((soft, soft))
        })
        .unwrap_or((1024, 1024))
}

/// At least `wanted` open files if the hard limit allows, raising the soft limit without libc
/// (util-linux `prlimit` on this process); returns the soft limit in force.
fn raise_open_files(wanted: u64) -> u64 {
    let (soft, hard) = open_files_limits();
    if soft >= wanted || hard <= soft {
        return soft;
    }
    let target = wanted.min(hard);
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={target}:{hard}")]).status();
    open_files_limits().0
}

// ------------------------------------------------------------------------------------------------
// Slowloris

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_at_the_header_timeout_while_others_are_served() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "header_read_timeout_ms = 1000", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    timed_chat(&app, &key).await; // warm up (tokenizers, pools) before timing anything

    // 20 clients, each trickling a request head one byte every 200 ms: sending it whole would
    // take them over a minute.
    let addr = app.addr;
    let mut slow = Vec::new();
    for i in 0..20 {
        slow.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let started = Instant::now();
            let head = format!("GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: {}\r\n\r\n", "a".repeat(300));
            let writer = tokio::spawn(async move {
                let mut sent = 0usize;
                for b in head.bytes() {
                    if wr.write_all(&[b]).await.is_err() {
                        break;
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                sent
            });
            let (closed_after, got) = wait_closed(&mut rd, started).await;
            writer.abort();
            (closed_after, got)
        }));
    }

    // Meanwhile a well-behaved client is served promptly, again and again.
    let mut latencies = Vec::new();
    for _ in 0..10 {
        latencies.push(timed_chat(&app, &key).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let worst = *latencies.last().unwrap();
    eprintln!("slowloris: normal chat latencies {latencies:?}");
    assert!(worst < Duration::from_secs(1), "a normal client waited {worst:?} during a slowloris attack");

    for h in slow {
        let (closed_after, got) = bounded(10, "a slowloris connection is closed", h).await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(
            closed_after >= Duration::from_millis(800) && closed_after < Duration::from_secs(4),
            "slowloris connection closed after {closed_after:?}, expected about header_read_timeout_ms = 1000"
        );
        // Closed without serving the request (a 408 is allowed; a 200 would mean it got through).
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "slowloris got an answer: {text}");
    }
    assert_eq!(up.hits(), 11);
}

/// A request whose head is complete but whose body trickles in, one byte every 100 ms.
async fn trickle_body(app: &TestApp, key: &str, chunked: bool) -> (Duration, Option<RawResponse>, usize) {
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", "a body that takes far too long to arrive")).unwrap();
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let framing =
        if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {}", body.len()) };
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        for b in body {
            let piece = if chunked { format!("1\r\n{}\r\n", b as char).into_bytes() } else { vec![b] };
            if wr.write_all(&piece).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });
    let resp = read_response(&mut rd).await;
    let elapsed = started.elapsed();
    writer.abort();
    let sent = writer.await.unwrap_or(0);
    (elapsed, resp, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_is_answered_408_in_the_error_envelope() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "body_read_timeout_ms = 1000", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    timed_chat(&app, &key).await;

    for chunked in [false, true] {
        let (elapsed, resp, _) = bounded(10, "slow body", trickle_body(&app, &key, chunked)).await;
        let resp = resp.expect("a 408 answer, not a silently closed connection");
        assert_eq!(resp.status, 408, "chunked={chunked}: {resp:?}");
        let v = resp.json();
        let e = envelope(&v);
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert_eq!(e["code"], "request_timeout", "{v}");
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
            "chunked={chunked}: 408 after {elapsed:?}, expected about body_read_timeout_ms = 1000"
        );
        // Others are still served.
        assert!(timed_chat(&app, &key).await < Duration::from_secs(1));
    }
    assert_eq!(up.hits(), 3, "a body that never arrived is never forwarded");
    assert_eq!(app.wait_records(3).await.len(), 3, "refused requests are not in the ledger");
}

// ------------------------------------------------------------------------------------------------
// Idle connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_starve_others_and_are_closed_by_the_header_timeout() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "header_read_timeout_ms = 1000", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    timed_chat(&app, &key).await;

    // Each connection costs this process two descriptors (client and server side).
    let wanted = 2000u64;
    let limit = raise_open_files(2 * wanted + 512);
    let count = wanted.min(limit.saturating_sub(256) / 2) as usize;
    if (count as u64) < wanted {
        eprintln!("idle connections: open-files limit is {limit}; opening {count} instead of {wanted}");
    }
    assert!(count >= 100, "open-files limit {limit} is too low to test idle connections");

    // Most send nothing at all; a few stop after a little: part of an HTTP/2 preface, the whole
    // preface (an h2c client that never goes on), part of a request line, or one complete
    // keep-alive request and then silence.
    let kinds: [(&str, &[u8]); 5] = [
        ("nothing", b""),
        ("part of an h2 preface", b"PRI * HTTP/2.0\r\n"),
        ("an h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("part of a request line", b"GET /health/li"),
        ("one keep-alive request", b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    let few = (count / 40).max(5);
    let opened_at = Instant::now();
    let mut conns = Vec::with_capacity(count);
    bounded(30, "opening idle connections", async {
        for i in 0..count {
            let kind = if i < count - 4 * few { 0 } else { 1 + (i - (count - 4 * few)) / few };
            let mut c = TcpStream::connect(app.addr).await.expect("connect");
            c.write_all(kinds[kind].1).await.unwrap();
            conns.push((kind, c));
        }
    })
    .await;
    let opening = opened_at.elapsed();
    eprintln!("idle connections: opened {count} in {opening:?}");

    // A well-behaved client is still served quickly.
    let latency = bounded(10, "a normal request among idle connections", timed_chat(&app, &key)).await;
    eprintln!("idle connections: normal chat latency {latency:?}");
    assert!(latency < Duration::from_secs(1), "a normal request took {latency:?} among {count} idle connections");

    // Every idle connection is closed by the server within the header timeout (plus slack).
    let waits: Vec<_> = conns
        .into_iter()
        .map(|(kind, mut c)| {
            tokio::spawn(async move {
                let closed =
                    tokio::time::timeout(Duration::from_secs(6), wait_closed(&mut c, Instant::now())).await.is_ok();
                (kind, closed)
            })
        })
        .collect();
    let mut closed = [0usize; 5];
    let mut opened = [0usize; 5];
    for w in waits {
        let (kind, ok) = w.await.unwrap();
        opened[kind] += 1;
        closed[kind] += usize::from(ok);
    }
    let total = opened_at.elapsed();
    let report: Vec<String> = (0..5).map(|k| format!("{}: {}/{}", kinds[k].0, closed[k], opened[k])).collect();
    eprintln!("idle connections closed by the server after {total:?}: {}", report.join(", "));
    assert_eq!(closed, opened, "idle connections must be closed by header_read_timeout_ms ({})", report.join(", "));
    // A new connection is served at once. (Not the pooled one of the first request: it sat
    // idle as long as the others, so the header timeout closes it too, and a request sent
    // on it just then loses the usual keep-alive race, which is not what this checks.)
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    assert!(timed_chat_with(&fresh, &app, &key).await < Duration::from_secs(1));
}

// ------------------------------------------------------------------------------------------------
// Oversized heads and bodies

/// Sends `head` (ignoring write errors: the server may hang up first) and reads the answer.
async fn send_head(app: &TestApp, head: Vec<u8>) -> Option<RawResponse> {
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&head).await;
        wr
    });
    let resp = read_response(&mut rd).await;
    writer.abort();
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_others_still_served() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let request = |extra: String| {
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{extra}\r\n").into_bytes()
    };
    // A normal-sized head is answered.
    let ok = bounded(10, "normal head", send_head(&app, request(String::new()))).await.expect("answer");
    assert_eq!(ok.status, 200, "{ok:?}");
    // So is a big but plausible one (a fat cookie or tracing header).
    let big = format!("Cookie: {}\r\n", "c".repeat(16 * 1024));
    let ok = bounded(10, "16 KB header", send_head(&app, request(big))).await.expect("answer");
    assert_eq!(ok.status, 200, "a 16 KB header must still be served: {}", ok.head);

    let cases = [
        ("one 200 KB header", format!("X-Big: {}\r\n", "a".repeat(200 * 1024))),
        ("one 1 MB header", format!("X-Big: {}\r\n", "a".repeat(1024 * 1024))),
        ("200 KB over 25 headers", (0..25).map(|i| format!("X-Big-{i}: {}\r\n", "b".repeat(8 * 1024))).collect()),
        ("500 small headers", (0..500).map(|i| format!("X-Many-{i}: v\r\n")).collect()),
    ];
    for (what, extra) in cases {
        let started = Instant::now();
        let resp = bounded(10, what, send_head(&app, request(extra))).await;
        match &resp {
            None => {}
            Some(r) => assert!(
                r.status == 431 || r.status == 400,
                "{what}: expected 431 or a closed connection, got {}",
                r.head
            ),
        }
        eprintln!("oversized headers: {what} -> {:?} in {:?}", resp.as_ref().map(|r| r.status), started.elapsed());
        assert!(timed_chat(&app, &key).await < Duration::from_secs(1), "{what}: others are still served");
    }
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413_without_reading_it_all() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "max_body_bytes = 65536", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;

    // Declared too big: answered at once, before a single body byte is sent.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10u64 << 30
    );
    let started = Instant::now();
    let resp = bounded(5, "declared 10 GiB body", send_head(&app, head.into_bytes())).await.expect("an answer");
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_eq!(envelope(&resp.json())["code"], "request_too_large");
    assert!(started.elapsed() < Duration::from_secs(2), "413 took {:?}", started.elapsed());

    // Undeclared (chunked), streamed slowly: refused once past the limit, long before the end.
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let total: usize = 4 << 20;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent_w = sent.clone();
    let writer = tokio::spawn(async move {
        let piece = vec![b' '; 8192];
        while sent_w.load(std::sync::atomic::Ordering::SeqCst) < total {
            let frame = [format!("{:x}\r\n", piece.len()).as_bytes(), &piece, b"\r\n"].concat();
            if wr.write_all(&frame).await.is_err() {
                break;
            }
            sent_w.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let resp = bounded(20, "chunked body over the limit", read_response(&mut rd)).await.expect("an answer");
    let sent_then = sent.load(std::sync::atomic::Ordering::SeqCst);
    writer.abort();
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_eq!(envelope(&resp.json())["code"], "request_too_large");
    assert!(sent_then < total / 2, "413 came only after {sent_then} of {total} bytes were sent");

    // Without a key, nothing is buffered at all: 401 before the body.
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{{", 1u64 << 30);
    let resp = bounded(5, "anonymous huge body", send_head(&app, head.into_bytes())).await.expect("an answer");
    assert_eq!(resp.status, 401, "{resp:?}");

    assert!(timed_chat(&app, &key).await < Duration::from_secs(1));
    assert_eq!(up.hits(), 1);
}

// ------------------------------------------------------------------------------------------------
// Hostile JSON

/// Sends raw bytes as a chat body; returns (status, body JSON).
async fn raw_chat(app: &TestApp, key: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let v: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

#[tokio::test]
async fn hostile_json_gets_a_clear_400_and_never_reaches_the_upstream() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let msgs = r#"[{"role":"user","content":"x"}]"#;
    // (case, body, expected `param`, or None for invalid_json)
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "nesting past the parser's depth limit inside a message",
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":{}"x"{}}}]}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            None,
        ),
        (
            "nesting past the limit in objects",
            format!(
                r#"{{"model":"gpt-4o","messages":{msgs},"metadata":{}1{}}}"#,
                r#"{"a":"#.repeat(50_000),
                "}".repeat(50_000)
            ),
            None,
        ),
        (
            "a lone surrogate escape",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\ud800"}]}"#.to_string(),
            None,
        ),
        ("1e400 as max_tokens", format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":1e400}}"#), None),
        ("1e400 as temperature", format!(r#"{{"model":"gpt-4o","messages":{msgs},"temperature":1e400}}"#), None),
        ("-1e400 as n", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":-1e400}}"#), None),
        ("NaN", format!(r#"{{"model":"gpt-4o","messages":{msgs},"temperature":NaN}}"#), None),
        ("Infinity", format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":Infinity}}"#), None),
        ("-Infinity", format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":-Infinity}}"#), None),
        ("trailing garbage", format!(r#"{{"model":"gpt-4o","messages":{msgs}}}xyz"#), None),
        ("two objects", format!(r#"{{"model":"gpt-4o","messages":{msgs}}}{{"model":"gpt-4o-mini"}}"#), None),
        ("a NUL byte outside a string", format!("{{\"model\":\"gpt-4o\",\u{0}\"messages\":{msgs}}}"), None),
        (
            "max_tokens as a string",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":"100"}}"#),
            Some("max_tokens"),
        ),
        (
            "max_tokens = u64::MAX",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":18446744073709551615}}"#),
            Some("max_tokens"),
        ),
        (
            "max_tokens = 2^64",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":18446744073709551616}}"#),
            Some("max_tokens"),
        ),
        (
            "max_tokens = 1e300",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":1e300}}"#),
            Some("max_tokens"),
        ),
        (
            "max_tokens = 100.0",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":100.0}}"#),
            Some("max_tokens"),
        ),
        ("max_tokens = -1", format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":-1}}"#), Some("max_tokens")),
        (
            "max_tokens = true",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":true}}"#),
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens = u64::MAX",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_completion_tokens":18446744073709551615}}"#),
            Some("max_completion_tokens"),
        ),
        (
            "max_completion_tokens negative",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_completion_tokens":-7}}"#),
            Some("max_completion_tokens"),
        ),
        ("n = 0", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":0}}"#), Some("n")),
        ("n = -1", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":-1}}"#), Some("n")),
        ("n = 1.5", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":1.5}}"#), Some("n")),
        ("n = \"2\"", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":"2"}}"#), Some("n")),
        ("n = 129", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":129}}"#), Some("n")),
        ("n = u64::MAX", format!(r#"{{"model":"gpt-4o","messages":{msgs},"n":18446744073709551615}}"#), Some("n")),
        (
            "duplicate stream",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"stream":false,"stream":true}}"#),
            Some("stream"),
        ),
        (
            "duplicate max_tokens",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"max_tokens":1,"max_tokens":100000}}"#),
            Some("max_tokens"),
        ),
        ("duplicate messages", format!(r#"{{"model":"gpt-4o","messages":{msgs},"messages":[]}}"#), Some("messages")),
        // The same key spelled with an escape: a parser that compares raw key text would see two
        // different keys, and bill one model while the upstream serves the other.
        (
            "duplicate model via an escaped key",
            format!(r#"{{"model":"gpt-4o-mini","mod\u0065l":"gpt-4o","messages":{msgs}}}"#),
            Some("model"),
        ),
        (
            "duplicate stream via an escaped key",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"stream":false,"str\u0065am":true}}"#),
            Some("stream"),
        ),
        ("model as an object", format!(r#"{{"model":{{"name":"gpt-4o"}},"messages":{msgs}}}"#), Some("model")),
        (
            "stream_options as a string",
            format!(r#"{{"model":"gpt-4o","messages":{msgs},"stream":true,"stream_options":"x"}}"#),
            Some("stream_options"),
        ),
        ("messages empty", r#"{"model":"gpt-4o","messages":[]}"#.to_string(), Some("messages")),
    ];
    for (what, body, param) in cases {
        let (status, v) = bounded(20, what, raw_chat(&app, &key, body.into_bytes())).await;
        let e = envelope(&v);
        assert_eq!(status, 400, "{what}: {v}");
        match param {
            None => assert_eq!(e["code"], "invalid_json", "{what}: {v}"),
            Some(p) => assert_eq!(e["param"], p, "{what}: {v}"),
        }
        assert_eq!(e["type"], "invalid_request_error", "{what}: {v}");
    }
    // Invalid UTF-8 inside a message (errors.rs covers it inside `model`).
    for bytes in [&b"\xc3\x28"[..], b"\xff", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"] {
        let body = [&br#"{"model":"gpt-4o","messages":[{"role":"user","content":"caf"#[..], bytes, br#""}]}"#].concat();
        let (status, v) = raw_chat(&app, &key, body).await;
        assert_eq!((status, envelope(&v)["code"].as_str()), (400, Some("invalid_json")), "{bytes:?}: {v}");
    }
    assert_eq!(up.hits(), 0, "nothing invalid reaches the upstream");
    assert!(app.logs().await.is_empty(), "refused requests are not in the ledger");
    // The server is still well.
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "still there?")).await.status(), 200);
}

#[tokio::test]
async fn nesting_within_the_parser_limit_is_never_a_500() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    // Deep but parseable structures where the token counter walks: message content, tool
    // schemas, tool-call arguments, names. None of these may crash the counter or the server.
    let deep_array = |d: usize| format!("{}\"x\"{}", "[".repeat(d), "]".repeat(d));
    let deep_object =
        |d: usize| format!("{}\"x\"{}", r#"{"type":"object","properties":{"p":"#.repeat(d), "}}".repeat(d));
    let bodies = [
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":{}}}]}}"#, deep_array(120)),
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"text","text":{}}}]}}]}}"#,
            deep_array(110)
        ),
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"x"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{}}}}}]}}"#,
            deep_object(60)
        ),
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"x","name":{}}}]}}"#, deep_array(120)),
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":{},"content":"x"}}]}}"#, deep_array(120)),
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"assistant","tool_calls":[{{"id":"c","type":"function","function":{{"name":"f","arguments":{}}}}}]}}]}}"#,
            deep_array(110)
        ),
    ];
    for body in bodies {
        let short: String = body.chars().take(120).collect();
        let (status, v) = bounded(20, &short, raw_chat(&app, &key, body.into_bytes())).await;
        assert!(status == 200 || (400..500).contains(&status), "{short}…: {status} {v}");
        if status != 200 {
            envelope(&v);
        }
    }
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "still there?")).await.status(), 200);
}

/// A minimal upstream without axum's 2 MB default body limit (the harness's `FakeUpstream`
/// has it, and would answer a big prompt 413 itself); returns its `/v1` URL and the size of
/// every body it received.
async fn roomy_upstream() -> (String, std::sync::Arc<std::sync::Mutex<Vec<usize>>>) {
    use axum::extract::{DefaultBodyLimit, State};
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    async fn answer(State(seen): State<Arc<Mutex<Vec<usize>>>>, body: axum::body::Bytes) -> axum::Json<Value> {
        seen.lock().unwrap().push(body.len());
        axum::Json(serde_json::json!({
            "id": "chatcmpl-big", "object": "chat.completion", "created": 1, "model": "big",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": usage_json(2_000_000, 0, 1),
        }))
    }
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(answer))
        .layer(DefaultBodyLimit::disable())
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

#[tokio::test]
async fn a_prompt_just_under_the_body_limit_is_served() {
    let (url, seen) = roomy_upstream().await;
    // A model whose context fits the whole prompt, so the size alone decides.
    let models = r#"
[[models]]
name = "big-context"
provider = "up"
input_per_mtok = 0.15
output_per_mtok = 0.60
context_window = 100000000
max_output_tokens = 16384
"#;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let text = config_text(db.to_str().unwrap(), &url, models);
    let app = TestApp::start_with_config(dir, &text).await;
    let key = app.team_and_key("t").await;
    let limit = 8 * 1024 * 1024;
    let overhead = serde_json::to_vec(&chat_body("big-context", "")).unwrap().len();
    let prompt: String =
        "lorem ipsum dolor sit amet ".repeat(limit / 27).chars().take(limit - overhead - 100 * 1024).collect();
    let body = chat_body("big-context", &prompt);
    let size = serde_json::to_vec(&body).unwrap().len();
    assert!(size > (79 * limit) / 80 && size <= limit, "body is {size} bytes");
    let started = Instant::now();
    let resp = bounded(60, "a 7.9 MiB prompt", app.chat(&key, &body)).await;
    let status = resp.status().as_u16();
    assert_eq!(status, 200, "{size}-byte body: {}", resp.text().await.unwrap());
    eprintln!("7.9 MiB prompt served in {:?}", started.elapsed());
    assert_eq!(*seen.lock().unwrap(), vec![size], "forwarded whole, once");
    let records = app.wait_records(1).await;
    assert_eq!(records[0]["input_tokens"], 2_000_000, "{:?}", records[0]);

    // One byte over the limit is refused without reaching the upstream.
    let over = chat_body("big-context", &"y".repeat(limit - overhead + 1));
    let resp = bounded(60, "a body one byte over", app.chat(&key, &over)).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

// ------------------------------------------------------------------------------------------------
// Key lookup

/// The parts of a response an attacker can see, minus what legitimately differs per request.
async fn observable(resp: reqwest::Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "x-tollgate-request-id" | "date"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    headers.sort();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

/// A wrong key that shares everything but its last character with the real one is refused with
/// exactly the same bytes as a key that shares nothing: the answer is no oracle for prefixes.
///
/// Timing is not measured here, by design: `auth::Directory::authenticate` hashes the presented
/// secret (SHA-256) and looks the digest up in a hash map, so the work done never depends on how
/// many leading characters of a guess are right (see src/auth.rs). A timing test on a shared
/// CI machine would be noise.
#[tokio::test]
async fn a_wrong_key_with_a_valid_prefix_is_refused_exactly_like_a_random_one() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let flip = |c: char| if c == 'a' { 'b' } else { 'a' };
    let mut last_wrong: String = key[..key.len() - 1].to_string();
    last_wrong.push(flip(key.chars().last().unwrap()));
    let mut first_wrong = key[..3].to_string();
    first_wrong.push(flip(key.chars().nth(3).unwrap()));
    first_wrong.push_str(&key[4..]);
    let shorter = key[..key.len() - 1].to_string();
    let longer = format!("{key}0");
    let random = format!("tg-{}", "Z".repeat(key.len() - 3));
    let garbage = "x".to_string();

    for (method, path, body) in [
        (reqwest::Method::POST, "/v1/chat/completions", Some(chat_body("gpt-4o-mini", "x"))),
        (reqwest::Method::GET, "/v1/models", None),
        (reqwest::Method::GET, "/spend/logs", None),
    ] {
        let send = |k: String| {
            let mut req = app.http.request(method.clone(), app.url(path)).bearer_auth(k);
            if let Some(b) = &body {
                req = req.json(b);
            }
            req.send()
        };
        let reference = observable(send(random.clone()).await.unwrap()).await;
        assert_eq!(reference.0, 401, "{path}");
        envelope(&serde_json::from_slice(&reference.2).unwrap());
        for wrong in [&last_wrong, &first_wrong, &shorter, &longer, &garbage] {
            let got = observable(send(wrong.clone()).await.unwrap()).await;
            assert_eq!(got, reference, "{path}: the answer to {wrong:?} differs from a random key's");
            assert!(!String::from_utf8_lossy(&got.2).contains(&key[..7]), "the answer echoes a key prefix");
        }
        // And the real key works, so the comparison above was not vacuous.
        let ok = send(key.clone()).await.unwrap();
        assert!(ok.status().is_success(), "{path}: {}", ok.status());
    }
    assert_eq!(up.hits(), 1);
}

// ------------------------------------------------------------------------------------------------
// One edge: the admin and spend routes get the proxy's limits and envelope

/// Sends `head` and then a body that never completes (one byte of its declared length).
async fn head_then_stall(app: &TestApp, head: String) -> (Duration, Option<RawResponse>) {
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    wr.write_all(b"{").await.unwrap();
    let started = Instant::now();
    let resp = read_response(&mut rd).await;
    drop(wr);
    (started.elapsed(), resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_body_that_never_completes_is_refused_401_unread_or_408_with_the_master_key() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "body_read_timeout_ms = 1000", DEFAULT_MODELS).await;
    let head = |auth: &str| {
        format!("POST /admin/teams HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    };
    // Without the master key: answered at once, without waiting for the body.
    let (elapsed, resp) = bounded(10, "anonymous stalled body", head_then_stall(&app, head(""))).await;
    let resp = resp.expect("a 401, not a connection held open");
    assert_eq!(resp.status, 401, "{resp:?}");
    envelope(&resp.json());
    assert!(elapsed < Duration::from_millis(900), "401 after {elapsed:?}: the body was waited for");
    // With it: the body read timeout, in the envelope.
    let master = format!("Authorization: Bearer {MASTER}\r\n");
    let (elapsed, resp) = bounded(10, "stalled admin body", head_then_stall(&app, head(&master))).await;
    let resp = resp.expect("a 408, not a connection held open");
    assert_eq!(resp.status, 408, "{resp:?}");
    assert_eq!(envelope(&resp.json())["code"], "request_timeout");
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3), "408 after {elapsed:?}");
}

#[tokio::test]
async fn admin_and_spend_rejections_are_in_the_envelope() {
    let up = FakeUpstream::start().await;
    let app = start_with(&up, "max_body_bytes = 65536", DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let check = |what: &'static str, status: u16| {
        move |resp: RawResponse| {
            assert_eq!(resp.status, status, "{what}: {resp:?}");
            envelope(&resp.json());
            assert!(resp.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{what}: {resp:?}");
        }
    };
    // A body over max_body_bytes.
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(100_000));
    let head = format!(
        "POST /admin/teams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{big}",
        big.len()
    );
    check("oversized admin body", 413)(send_head(&app, head.into_bytes()).await.expect("an answer"));
    // A query parameter given twice; a path that is not UTF-8 once decoded.
    let get = |path: &str, bearer: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    check("duplicate query", 400)(send_head(&app, get("/admin/keys?team=a&team=b", MASTER)).await.expect("an answer"));
    check("bad path", 400)(send_head(&app, get("/admin/teams/%FF", MASTER)).await.expect("an answer"));
    check("bad spend query", 400)(send_head(&app, get("/spend?team=a&team=b", &key)).await.expect("an answer"));
    // A cursor that no page ever handed out.
    let resp = send_head(&app, get("/spend/logs?before=garbage", &key)).await.expect("an answer");
    check("bad cursor", 400)(resp);
    // A real cursor still pages.
    let resp = send_head(&app, get("/spend/logs?before=req_000000000000ffffffffffffffff", &key)).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
}
