//! Soak (issue 4, "Memory stays flat"): the real `tollgate` binary under mixed traffic for
//! `TOLLGATE_SOAK_SECS` seconds (default 20; CI uses the default, run a few minutes locally
//! with `TOLLGATE_SOAK_SECS=300 cargo test --release --test soak -- --nocapture`).
//!
//! Traffic: non-streamed and streamed chats, embeddings, clients hanging up mid-stream,
//! upstream errors and cut-off streams, and requests refused before forwarding. The child's
//! RSS is sampled every 500 ms and must settle: the mean of the last quarter of the samples may
//! not exceed the peak of the second quarter by more than a few MB (a leak climbs through the
//! whole run; warm-up growth happens in the first quarter). Afterwards the server must still be
//! healthy, every forwarded request must have its ledger record, and SIGTERM must exit 0.

#[path = "it/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use helpers::{chat_body, FakeUpstream, Reply, MASTER};

/// Slack above the second quarter's peak, in MB: allocator arenas and SQLite's page cache grow
/// in steps, a leak grows without end.
const SLACK_MB: f64 = 6.0;

/// The tollgate child process; killed if the test fails before stopping it.
struct Server {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// RSS of `pid` in MB, from /proc.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_server(dir: &std::path::Path, upstream: &str, http: &reqwest::Client) -> Server {
    // The port is picked then released, so another process could take it first: retry.
    for _attempt in 0..5 {
        let port = free_port();
        let config = format!(
            r#"
listen = "127.0.0.1:{port}"
database_url = "sqlite://{db}"
master_key = "{MASTER}"
shutdown_grace_ms = 5000
disconnect_drain_ms = 5000

[[providers]]
name = "up"
kind = "openai"
base_url = "{upstream}"
api_key = "sk-upstream-secret"
connect_timeout_ms = 1000
first_byte_timeout_ms = 5000
idle_timeout_ms = 2000

[[models]]
name = "gpt-4o-mini"
provider = "up"

[[models]]
name = "text-embedding-3-small"
provider = "up"
"#,
            db = dir.join("tollgate.db").display(),
        );
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("tollgate-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start tollgate");
        let mut server = Server { child, base: format!("http://127.0.0.1:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                eprintln!("soak: tollgate exited at start ({status}):\n{}", server.log_tail());
                break;
            }
            if let Ok(r) = http.get(format!("{}/health/ready", server.base)).send().await {
                if r.status().is_success() {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = server.child.kill();
    }
    panic!("tollgate did not start");
}

/// What one request of the mix is and what its client must see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Chat,
    Stream,
    StreamHangUp,
    Embedding,
    UpstreamError,
    UpstreamCut,
    BadJson,
    UnknownModel,
    BadKey,
}

const MIX: [(Kind, u32); 9] = [
    (Kind::Chat, 30),
    (Kind::Stream, 22),
    (Kind::StreamHangUp, 10),
    (Kind::Embedding, 6),
    (Kind::UpstreamError, 8),
    (Kind::UpstreamCut, 6),
    (Kind::BadJson, 6),
    (Kind::UnknownModel, 6),
    (Kind::BadKey, 6),
];

impl Kind {
    fn pick(r: u32) -> Kind {
        let total: u32 = MIX.iter().map(|m| m.1).sum();
        let mut r = r % total;
        for (k, w) in MIX {
            if r < w {
                return k;
            }
            r -= w;
        }
        unreachable!()
    }

    fn forwarded(self) -> bool {
        !matches!(self, Kind::BadJson | Kind::UnknownModel | Kind::BadKey)
    }
}

/// The fake upstream reads the mode from the first message's content.
fn script(request: &Value) -> Reply {
    let mode = request.pointer("/messages/0/content").and_then(Value::as_str).unwrap_or("");
    let words: Vec<String> = (0..30).map(|i| format!("word{i} ")).collect();
    let pieces: Vec<&str> = words.iter().map(String::as_str).collect();
    if request.get("input").is_some() {
        let body = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                          "model": "fake", "usage": {"prompt_tokens": 8, "total_tokens": 8}});
        return Reply::new(200, "application/json", body.to_string());
    }
    match mode {
        "error" => Reply::error(503, "overloaded"),
        "cut" => Reply::chat_sse(&pieces[..10], None, false),
        // Slow enough that a client hanging up after the first bytes leaves mid-stream.
        "slow" => Reply::chat_sse(&pieces, Some((20, 0, 30)), true).with_chunk_delay(Duration::from_millis(10)),
        "stream" => Reply::chat_sse(&pieces, Some((20, 0, 30)), true),
        _ => Reply::chat_json(&"an answer ".repeat(50), Some((12, 0, 100))),
    }
}

/// Sends one request of `kind`; returns an error text if the client saw the wrong thing.
async fn one(http: &reqwest::Client, base: &str, key: &str, kind: Kind, n: usize) -> Result<(), String> {
    let url = format!("{base}/v1/chat/completions");
    let text = format!("request {n}: {}", "lorem ipsum ".repeat(n % 40));
    let post = |key: &str, body: Value| http.post(&url).bearer_auth(key).json(&body).send();
    let stream_body = |mode: &str| json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": mode}, {"role": "user", "content": text}]});
    let expect = |status: u16, want: u16, what: &str| {
        if status == want {
            Ok(())
        } else {
            Err(format!("{kind:?}: {what} status {status}, expected {want}"))
        }
    };
    // The whole source chain: "error sending request" alone does not say what happened.
    let err = |e: reqwest::Error| {
        let mut text = format!("{kind:?}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        if kind == Kind::UpstreamCut && text.contains("before message completed") {
            // Seen when the product lets hyper drop the response head of a stream it cuts off
            // (the body's error arrives in the same write pass as the data before it).
            text.push_str(" [a cut-off stream reached the client as no response at all]");
        }
        text
    };
    match kind {
        Kind::Chat => {
            let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "json"}, {"role": "user", "content": text}]});
            let r = post(key, body).await.map_err(err)?;
            expect(r.status().as_u16(), 200, "chat")?;
            let v: Value = r.json().await.map_err(err)?;
            if v["usage"]["completion_tokens"] != 100 {
                return Err(format!("chat: unexpected body {v}"));
            }
            Ok(())
        }
        Kind::Stream | Kind::UpstreamCut => {
            let mode = if kind == Kind::Stream { "stream" } else { "cut" };
            let r = post(key, stream_body(mode)).await.map_err(err)?;
            expect(r.status().as_u16(), 200, "stream")?;
            // A cut-off upstream cuts the client's stream too: the body may end in an error.
            let body = r.bytes().await;
            match (kind, body) {
                (Kind::Stream, Ok(b)) if b.ends_with(b"data: [DONE]\n\n") => Ok(()),
                (Kind::Stream, other) => Err(format!("stream: no [DONE] at the end: {other:?}")),
                (_, Ok(b)) if memchr_done(&b) => Err("cut stream: [DONE] was sent".into()),
                _ => Ok(()),
            }
        }
        Kind::StreamHangUp => {
            let r = post(key, stream_body("slow")).await.map_err(err)?;
            expect(r.status().as_u16(), 200, "stream")?;
            let mut s = r.bytes_stream();
            let _first = s.next().await;
            drop(s); // hang up mid-stream
            Ok(())
        }
        Kind::Embedding => {
            let r = http
                .post(format!("{base}/v1/embeddings"))
                .bearer_auth(key)
                .json(&json!({"model": "text-embedding-3-small", "input": text}))
                .send()
                .await
                .map_err(err)?;
            expect(r.status().as_u16(), 200, "embedding")
        }
        Kind::UpstreamError => {
            let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "error"}]});
            expect(post(key, body).await.map_err(err)?.status().as_u16(), 502, "upstream 503")
        }
        Kind::BadJson => {
            let r = http
                .post(&url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(format!("{{\"model\": \"gpt-4o-mini\", \"messages\": [{}", "[".repeat(n % 300)))
                .send()
                .await
                .map_err(err)?;
            expect(r.status().as_u16(), 400, "bad JSON")
        }
        Kind::UnknownModel => {
            expect(post(key, chat_body("gpt-9", "x")).await.map_err(err)?.status().as_u16(), 404, "unknown model")
        }
        Kind::BadKey => {
            let wrong = format!("tg-{:0>40}", n);
            expect(post(&wrong, chat_body("gpt-4o-mini", "x")).await.map_err(err)?.status().as_u16(), 401, "bad key")
        }
    }
}

fn memchr_done(b: &[u8]) -> bool {
    b.windows(12).any(|w| w == b"data: [DONE]")
}

/// Every settled ledger record, paging through `/spend/logs`.
async fn ledger(http: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{base}/spend/logs?limit=1000");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let v: Value = http.get(url).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
        out.extend(v["data"].as_array().unwrap().iter().cloned());
        match v["next_before"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => return out,
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn max(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(f64::MIN, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_memory_settles_under_mixed_traffic() {
    let secs: u64 = std::env::var("TOLLGATE_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let up = FakeUpstream::start().await;
    up.script(script);
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let server = start_server(dir.path(), &up.url(), &http).await;
    let base = server.base.clone();
    let pid = server.pid();

    let (status, v) = {
        let r = http
            .post(format!("{base}/admin/teams"))
            .bearer_auth(MASTER)
            .json(&json!({"name": "soak"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(status, 201, "{v}");
    let r = http
        .post(format!("{base}/admin/keys"))
        .bearer_auth(MASTER)
        .json(&json!({"team": "soak", "name": "soak"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key = r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();

    // The server loads its tokenizers in the background after start (about 100 MB and a few
    // seconds in a debug build): wait for the idle RSS to settle so the series measures traffic.
    let idle_since = Instant::now();
    let mut last = rss_mb(pid).unwrap();
    let mut steady = 0;
    while steady < 4 && idle_since.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_mb(pid).unwrap();
        steady = if (now - last).abs() < 0.5 { steady + 1 } else { 0 };
        last = now;
    }
    eprintln!("soak: rss_mb idle={last:.1} after {:?}", idle_since.elapsed());

    // RSS sampler.
    let samples = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (samples.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                if let Some(mb) = rss_mb(pid) {
                    samples.lock().unwrap().push(mb);
                }
            }
        })
    };

    // Workers.
    let sent = Arc::new(AtomicUsize::new(0));
    let forwarded = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..8u32 {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        let (sent, forwarded, failures) = (sent.clone(), forwarded.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9u32.wrapping_mul(w + 1);
            while Instant::now() < until {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let kind = Kind::pick(seed);
                let n = sent.fetch_add(1, Ordering::SeqCst);
                if kind.forwarded() {
                    forwarded.fetch_add(1, Ordering::SeqCst);
                }
                if let Err(e) = one(&http, &base, &key, kind, n).await {
                    failures.lock().unwrap().push(e);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    // A last stretch of idleness: disconnected streams drain and settle, memory should fall back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();

    let samples = samples.lock().unwrap().clone();
    let sent = sent.load(Ordering::SeqCst);
    let forwarded = forwarded.load(Ordering::SeqCst);
    let q = samples.len() / 4;
    let (start, peak, end) = (samples[0], max(&samples), *samples.last().unwrap());
    eprintln!(
        "soak: rss_mb start={start:.1} peak={peak:.1} end={end:.1} samples={} q2_max={:.1} q4_mean={:.1} secs={secs} requests={sent} forwarded={forwarded} upstream_hits={}",
        samples.len(),
        max(&samples[q..2 * q]),
        mean(&samples[3 * q..]),
        up.hits(),
    );
    eprintln!("soak: series {:?}", samples.iter().map(|s| (s * 10.0).round() / 10.0).collect::<Vec<_>>());
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests went wrong, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(sent > 100, "only {sent} requests in {secs} s");

    // Memory settles.
    assert!(samples.len() >= 8, "too few RSS samples: {}", samples.len());
    let (q2_max, q4_mean) = (max(&samples[q..2 * q]), mean(&samples[3 * q..]));
    assert!(
        q4_mean <= q2_max + SLACK_MB,
        "RSS keeps climbing: last-quarter mean {q4_mean:.1} MB > second-quarter peak {q2_max:.1} MB + {SLACK_MB} MB"
    );

    // Still healthy, still serving.
    let r = http.get(format!("{base}/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("gpt-4o-mini", "json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", server.log_tail());

    // Every forwarded request has its ledger record, settled.
    let hits = up.hits();
    assert_eq!(hits, forwarded + 1, "the upstream saw exactly the forwarded requests");
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = ledger(&http, &base).await;
        let settled = records.iter().filter(|r| r["usage_source"] != "pending").count();
        if records.len() >= hits && settled == records.len() {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "ledger: {} records ({settled} settled) for {hits} forwarded requests",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(records.len(), hits, "one ledger record per forwarded request");
    let mut ids: Vec<&str> = records.iter().map(|r| r["request_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), hits, "request ids are unique");

    // SIGTERM drains and exits 0.
    let mut server = server;
    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tollgate did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}:\n{}", server.log_tail());
}
