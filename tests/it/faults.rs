//! Fault injection (issue 4): the process killed or stopped under load, the database locked
//! under both `on_ledger_error` policies, and upstream faults the other modules do not cover.
//! docs/reliability.md maps every fault to its outcome and to the test here that shows it.
//!
//! Process tests run the real binary as a child process (a `kill -9` must hit a real
//! process); the fake upstream stays in this process. Nothing sleeps to wait for a write:
//! ledger state is polled with a deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::helpers::*;

// ---------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------

/// A config: `extra` top-level keys (they must come before the first table), then the
/// standard test config from `config_text`.
fn config_with(extra: &str, db: &Path, upstream: &str, models: &str) -> String {
    format!("{extra}\n{}", config_text(db.to_str().unwrap(), upstream, models))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `secs`.
async fn poll<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every record in the ledger (all pages of /spend/logs), by request id.
async fn all_records(http: &reqwest::Client, base: &str) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{base}/spend/logs?limit=1000");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let resp = http.get(&url).bearer_auth(MASTER).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let page: Value = resp.json().await.unwrap();
        for r in page["data"].as_array().unwrap() {
            out.insert(r["request_id"].as_str().unwrap().to_string(), r.clone());
        }
        match page["next_before"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => return out,
        }
    }
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string()
}

/// Reads a streamed body to its end: (text, whether it ended with a transport error).
async fn read_stream(resp: reqwest::Response) -> (String, bool) {
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

fn stream_chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 64,
           "messages": [{"role": "user", "content": text}]})
}

/// The record of `id` once it has settled (not `pending`).
async fn settled_record(app: &TestApp, id: &str) -> Value {
    poll(10, &format!("settled record {id}"), || async {
        app.logs().await.into_iter().find(|r| r["request_id"] == id && r["usage_source"] != "pending")
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The binary as a child process
// ---------------------------------------------------------------------------------------

/// A `tollgate serve` child process.
struct Proc {
    child: tokio::process::Child,
    addr: SocketAddr,
    http: reqwest::Client,
    log: PathBuf,
    // Held so the child's stdout stays open.
    _stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Proc {
    /// Starts `tollgate --config <dir>/tollgate.toml serve` with `config` and waits until ready.
    async fn start(dir: &Path, config: &str, run: u32) -> Proc {
        let config_path = dir.join("tollgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join(format!("tollgate-{run}.log"));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env_remove("TOLLGATE_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tollgate");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tollgate printed nothing within 20 s")
            .unwrap()
            .unwrap_or_else(|| {
                panic!("tollgate exited at start: {}", std::fs::read_to_string(&log).unwrap_or_default())
            });
        let addr: SocketAddr = line
            .strip_prefix("tollgate listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let p = Proc { child, addr, http, log, _stdout: lines };
        let url = p.url("/health/ready");
        poll(20, "tollgate ready", || async {
            match p.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        })
        .await;
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("child still running")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(MASTER);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Creates team `team` with `budget` fields and a key in it; returns the key's secret.
    async fn team_and_key(&self, team: &str, budget: Value) -> String {
        let mut body = json!({"name": team});
        body.as_object_mut().unwrap().extend(budget.as_object().unwrap().clone());
        let (s, v) = self.admin(reqwest::Method::POST, "/admin/teams", Some(body)).await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = self.admin(reqwest::Method::POST, "/admin/keys", Some(json!({"team": team, "name": "k"}))).await;
        assert_eq!(s, 201, "{v}");
        v["key"].as_str().unwrap().to_string()
    }

    /// Sends `sig` (e.g. "TERM") to the child.
    fn signal(&self, sig: &str) {
        let status =
            std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }
}

// ---------------------------------------------------------------------------------------
// Process faults
// ---------------------------------------------------------------------------------------

/// What the load generator saw.
#[derive(Default)]
struct Seen {
    /// Responses delivered in full: non-stream body read, or a stream that saw `[DONE]`.
    delivered: Vec<String>,
    /// Streams whose headers (and so whose request id) arrived but that did not finish.
    cut: Vec<String>,
    /// Any status other than 200 while the server was up (a bug).
    unexpected: Vec<String>,
}

/// The fake upstream for the load: `k0…` non-stream (reported usage), `k1…` stream with a
/// usage chunk, `k2…` stream without one (estimated). Streams take ~200 ms, so many are in
/// flight at any moment.
fn script_mixed_load(up: &FakeUpstream) {
    up.script(|req| {
        let text = req["messages"][0]["content"].as_str().unwrap_or("");
        let pieces = ["one", " two", " three", " four", " five", " six", " seven", " eight"];
        if text.starts_with("k0") {
            Reply::chat_json("a whole answer", Some((12, 0, 7))).with_header_delay(Duration::from_millis(30))
        } else if text.starts_with("k1") {
            Reply::chat_sse(&pieces, Some((12, 0, 8)), true).with_chunk_delay(Duration::from_millis(20))
        } else {
            Reply::chat_sse(&pieces, None, true).with_chunk_delay(Duration::from_millis(20))
        }
    });
}

async fn load_client(http: reqwest::Client, url: String, key: String, worker: usize, seen: Arc<Mutex<Seen>>) {
    for i in 0.. {
        let kind = (worker + i) % 3;
        let mut body = stream_chat(&format!("k{kind} worker {worker} request {i}"));
        body["stream"] = json!(kind != 0);
        let Ok(resp) = http.post(&url).bearer_auth(&key).json(&body).send().await else {
            return; // the server is gone
        };
        let id = request_id(&resp);
        if resp.status() != 200 {
            seen.lock().unwrap().unexpected.push(format!("{id}: {}", resp.status()));
            return;
        }
        if kind == 0 {
            match resp.bytes().await {
                Ok(b) => {
                    let v: Value = serde_json::from_slice(&b).expect("a delivered body is whole JSON");
                    assert_eq!(v["choices"][0]["message"]["content"], "a whole answer");
                    seen.lock().unwrap().delivered.push(id);
                }
                Err(_) => return,
            }
        } else {
            let (text, errored) = read_stream(resp).await;
            let mut s = seen.lock().unwrap();
            if !errored && text.contains("data: [DONE]") {
                s.delivered.push(id);
            } else {
                s.cut.push(id);
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_load_loses_no_delivered_response_and_budgets_agree() {
    let up = FakeUpstream::start().await;
    script_mixed_load(&up);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config = config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS);

    let first = Proc::start(dir.path(), &config, 1).await;
    // A budget, so every request holds a reservation while in flight.
    let key = first.team_and_key("load", json!({"limit_usd": 1000.0, "period": "total"})).await;

    // Warm up (tokenizers load lazily; a debug build takes a while): one request of each kind.
    let url = first.url("/v1/chat/completions");
    for kind in 0..3 {
        let t = Instant::now();
        let mut body = stream_chat(&format!("k{kind} warm-up"));
        body["stream"] = json!(kind != 0);
        let resp = first.http.post(&url).bearer_auth(&key).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await.unwrap();
        eprintln!("warm-up k{kind}: {:?}", t.elapsed());
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..32)
        .map(|w| {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
            tokio::spawn(load_client(http, url.clone(), key.clone(), w, seen.clone()))
        })
        .collect();
    // Drive load, then kill -9 in the middle of it (this sleep paces the load; it does not
    // wait for any write).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut first = first;
    first.child.kill().await.unwrap(); // SIGKILL
    for c in clients {
        tokio::time::timeout(Duration::from_secs(20), c).await.expect("clients end once the server is gone").unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.unexpected.is_empty(), "non-200 answers under load: {:?}", seen.unexpected);
    assert!(seen.delivered.len() > 20, "too little load to mean anything: {}", seen.delivered.len());

    // Restart on the same database.
    let second = Proc::start(dir.path(), &config, 2).await;
    assert!(second.log_text().contains("marked interrupted"), "restart logs the interrupted requests");
    let records = all_records(&second.http, &second.base()).await;
    let by_source = |s: &str| records.values().filter(|r| r["usage_source"] == s).count();
    eprintln!(
        "kill -9: {} delivered, {} streams cut; ledger: {} records ({} reported, {} estimated, {} interrupted)",
        seen.delivered.len(),
        seen.cut.len(),
        records.len(),
        by_source("reported"),
        by_source("estimated"),
        by_source("interrupted")
    );

    // 1. Every response delivered in full is in the ledger, settled, as served.
    for id in &seen.delivered {
        let r = records.get(id).unwrap_or_else(|| panic!("delivered response {id} is missing from the ledger"));
        let source = r["usage_source"].as_str().unwrap();
        assert!(source == "reported" || source == "estimated", "{id}: {r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    // 2. Nothing is left pending: requests in flight at the kill are `interrupted` (charged
    //    their prompt) or were settled before it.
    assert_eq!(by_source("pending"), 0, "pending rows survive a restart");
    assert!(by_source("interrupted") > 0, "with ~32 requests in flight at the kill, some must be marked interrupted");
    for r in records.values().filter(|r| r["usage_source"] == "interrupted") {
        assert!(usd_to_nanos(&r["cost_usd"]) > 0, "an interrupted request is charged its prompt: {r}");
    }
    // 3. Streams cut by the kill, whose headers (and so id) reached the client, were
    //    forwarded, so they were journaled first: every one is in the ledger.
    let missing: Vec<&String> = seen.cut.iter().filter(|id| !records.contains_key(*id)).collect();
    assert!(missing.is_empty(), "kill -9: forwarded stream(s) not in the ledger: {missing:?}");
    // 4. Budgets and spend agree with the ledger, to the nano-dollar.
    let ledger_total: i64 = records.values().map(|r| usd_to_nanos(&r["cost_usd"])).sum();
    let (s, team) = second.admin(reqwest::Method::GET, "/admin/teams/load", None).await;
    assert_eq!(s, 200, "{team}");
    assert_eq!(usd_to_nanos(&team["spent_usd"]), ledger_total, "team spend vs ledger: {team}");
    assert_eq!(usd_to_nanos(&team["reserved_usd"]), 0, "nothing is reserved after a restart: {team}");
    let spend: Value =
        second.http.get(second.url("/spend?team=load")).bearer_auth(MASTER).send().await.unwrap().json().await.unwrap();
    assert_eq!(usd_to_nanos(&spend["total"]["cost_usd"]), ledger_total, "{spend}");
    assert_eq!(spend["total"]["requests"], records.len(), "{spend}");

    // The restarted server serves, and its budget accounting continues from the ledger.
    let resp = second
        .http
        .post(second.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("gpt-4o-mini", "k0 after"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_drains_the_stream_flushes_and_exits_0() {
    let up = FakeUpstream::start().await;
    let pieces = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"];
    // ~12 events 150 ms apart: the stream runs ~1.8 s.
    up.reply(Reply::chat_sse(&pieces, Some((9, 0, 10)), true).with_chunk_delay(Duration::from_millis(150)));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config = config_text(db.to_str().unwrap(), &up.url(), DEFAULT_MODELS);
    let mut p = Proc::start(dir.path(), &config, 1).await;
    let key = p.team_and_key("t", json!({})).await;

    let resp =
        p.http.post(p.url("/v1/chat/completions")).bearer_auth(&key).json(&stream_chat("slow")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("assistant"));

    let signalled = Instant::now();
    p.signal("TERM");
    // New connections are refused at once (within 1 s), while the stream is still running.
    let refused_after = poll(5, "connections refused after SIGTERM", || async {
        match tokio::net::TcpStream::connect(p.addr).await {
            Err(_) => Some(signalled.elapsed()),
            Ok(_) => None,
        }
    })
    .await;
    assert!(refused_after < Duration::from_secs(1), "still accepting {refused_after:?} after SIGTERM");

    // The in-flight stream finishes, [DONE] included.
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the draining stream is not cut")));
    }
    assert!(text.contains("p9"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(signalled.elapsed() > Duration::from_millis(1000), "the stream was still running when SIGTERM came");

    let status =
        tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await.expect("exits after draining").unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}\n{}", p.log_text());
    assert!(p.log_text().contains("ledger flushed"), "{}", p.log_text());

    // After a restart the drained request's record is there, settled from the upstream's usage.
    let p2 = Proc::start(dir.path(), &config, 2).await;
    let records = all_records(&p2.http, &p2.base()).await;
    let r = records.get(&id).unwrap_or_else(|| panic!("drained stream {id} not in the ledger"));
    assert_eq!(r["usage_source"], "reported", "{r}");
    assert_eq!(r["output_tokens"], 10, "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert!(!p2.log_text().contains("marked interrupted"), "a graceful stop leaves nothing in flight");
}

/// A request is forwarded only once its journal entry is durable: if the process dies
/// mid-request, the request the upstream served (and bills) is in the ledger after the
/// restart, `interrupted` and charged its prompt. Made harder by holding the database's
/// write lock (from another process) the whole time: the entry is only in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_request_is_never_silently_dropped_by_kill_9() {
    let up = FakeUpstream::start().await;
    up.reply(
        Reply::chat_sse(&["a", "b", "c", "d"], Some((5, 0, 4)), true).with_chunk_delay(Duration::from_millis(500)),
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config =
        config_with("sqlite_busy_timeout_ms = 100\nledger_ack_timeout_ms = 1000", &db, &up.url(), DEFAULT_MODELS);
    let mut p = Proc::start(dir.path(), &config, 1).await;
    let key = p.team_and_key("t", json!({"limit_usd": 10.0, "period": "total"})).await;

    let lock = DbLock::take(&db).await;
    let resp =
        p.http.post(p.url("/v1/chat/completions")).bearer_auth(&key).json(&stream_chat("x")).send().await.unwrap();
    let status = resp.status().as_u16();
    let id = request_id(&resp);
    if status == 200 {
        let mut body = resp.bytes_stream();
        body.next().await.unwrap().unwrap(); // the upstream is answering
    }
    p.child.kill().await.unwrap();
    lock.release().await;

    let p2 = Proc::start(dir.path(), &config, 2).await;
    let records = all_records(&p2.http, &p2.base()).await;
    assert_eq!(status, 200, "a locked database does not stop a journaled request");
    assert_eq!(up.hits(), 1);
    let r = records.get(&id).unwrap_or_else(|| panic!("forwarded request {id} left no record after kill -9"));
    assert_eq!(r["usage_source"], "interrupted", "{r}");
    assert!(usd_to_nanos(&r["cost_usd"]) > 0, "charged its prompt: {r}");
}

/// Product bug (reported): the SIGTERM handler is installed only when the accept loop first
/// polls it, after `tollgate listening on …` is printed and after the database is opened. A
/// SIGTERM in that window kills the process by the signal's default action (no exit 0).
#[tokio::test]
async fn sigterm_during_start_up_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, format!("listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://{}\"\n", db.display()))
        .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.starts_with("tollgate listening on"), "{line}");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM at start-up: {status:?}");
}

// ---------------------------------------------------------------------------------------
// Database faults
// ---------------------------------------------------------------------------------------

/// Another process's write lock on the ledger file: `BEGIN EXCLUSIVE` (in WAL mode this
/// blocks every other writer; readers, and so /spend/logs, keep working).
struct DbLock(sqlx::SqliteConnection);

impl DbLock {
    async fn take(db: &Path) -> DbLock {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await.unwrap();
        sqlx::query("PRAGMA busy_timeout = 0").execute(&mut conn).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.unwrap();
        DbLock(conn)
    }

    async fn release(mut self) {
        use sqlx::Connection;
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
        self.0.close().await.unwrap();
    }
}

const LOCK_KEYS: &str = "sqlite_busy_timeout_ms = 100\nledger_ack_timeout_ms = 500";

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    (status, v["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn locked_database_keeps_serving_from_the_journal_and_every_record_lands_after() {
    // The default policy (`reject`): records are durable once journaled, so a locked database
    // refuses nothing; it only delays the records' way into the database.
    let up = FakeUpstream::start().await;
    up.script(|req| {
        if req["stream"] == true {
            Reply::chat_sse(&["x", "y"], Some((7, 0, 2)), true)
        } else {
            Reply::chat_json("answer", Some((10, 0, 5)))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let text = config_with(&format!("on_ledger_error = \"reject\"\n{LOCK_KEYS}"), &db, &up.url(), DEFAULT_MODELS);
    let app = Arc::new(TestApp::start_with_config(dir, &text).await);
    let key = app.team_and_key("t").await;

    let lock = DbLock::take(&db).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let resp = if i % 2 == 0 {
            app.chat(&key, &chat_body("gpt-4o-mini", "q")).await
        } else {
            app.chat(&key, &stream_chat("s")).await
        };
        assert_eq!(resp.status(), 200, "served while the database is locked");
        ids.push(request_id(&resp));
        if i % 2 == 0 {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "answer");
        } else {
            let (text, errored) = read_stream(resp).await;
            assert!(!errored && text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
    }
    // Not in the database yet (the lock really holds the writer off), and readiness says so.
    poll(10, "readiness reports the failing database", || async {
        (app.http.get(app.url("/health/ready")).send().await.unwrap().status() == 503).then_some(())
    })
    .await;
    let logs = app.logs().await;
    assert!(ids.iter().all(|id| !logs.iter().any(|r| r["request_id"] == *id)), "records written through the lock?");

    lock.release().await;
    for id in &ids {
        let r = settled_record(&app, id).await;
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["usage_source"], "reported", "{r}");
    }
    assert_eq!(app.logs().await.len(), 6);
    assert_eq!(app.http.get(app.url("/health/ready")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_served_while_the_database_is_locked_survive_kill_9() {
    // What used to live only in memory during a database outage is in the journal: killed
    // with the database still locked, the next start replays every record.
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("answer", Some((10, 0, 5))));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let config = config_with(LOCK_KEYS, &db, &up.url(), DEFAULT_MODELS);
    let mut p = Proc::start(dir.path(), &config, 1).await;
    let key = p.team_and_key("t", json!({"limit_usd": 10.0, "period": "total"})).await;
    let lock = DbLock::take(&db).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let resp = p
            .http
            .post(p.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat_body("gpt-4o-mini", "q"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(request_id(&resp));
        resp.bytes().await.unwrap();
    }
    p.child.kill().await.unwrap();
    lock.release().await;

    let p2 = Proc::start(dir.path(), &config, 2).await;
    let records = all_records(&p2.http, &p2.base()).await;
    for id in &ids {
        let r = records.get(id).unwrap_or_else(|| panic!("record of {id} lost by kill -9 during the outage"));
        assert_eq!(r["usage_source"], "reported", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["output_tokens"], 5, "{r}");
    }
    assert_eq!(records.len(), ids.len());
    assert!(p2.log_text().contains("replayed"), "the start says it replayed the journal: {}", p2.log_text());
    // Budgets agree with the replayed ledger.
    let (_, team) = p2.admin(reqwest::Method::GET, "/admin/teams/t", None).await;
    let total: f64 = records.values().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((team["spent_usd"].as_f64().unwrap() - total).abs() < 1e-9, "{team} vs {total}");
}

/// A journal that cannot get a new segment, as on a full disk: every segment name from
/// `first` on is taken by a link to `/dev/full`, so starting a segment fails (the journal
/// never writes over an existing file, and `/dev/full` can be neither allocated nor mapped).
/// With `journal_segment_bytes = 1`, every append needs a new segment.
struct FullDisk {
    dir: PathBuf,
    first: u64,
}

/// Starts an app under `policy` whose journal can be filled with [`FullDisk`]; returns it
/// with its journal folder.
async fn app_with_fillable_journal(up: &FakeUpstream, policy: &str) -> (TestApp, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let journal = dir.path().join("journal");
    let extra = format!(
        "on_ledger_error = \"{policy}\"\njournal_segment_bytes = 1\njournal_dir = {:?}",
        journal.display().to_string()
    );
    let text = config_with(&extra, &db, &up.url(), DEFAULT_MODELS);
    (TestApp::start_with_config(dir, &text).await, journal)
}

impl FullDisk {
    /// Takes the names after the highest segment now in `dir`.
    fn fill(dir: &Path) -> FullDisk {
        let highest = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let disk = FullDisk { dir: dir.to_path_buf(), first: highest + 1 };
        for n in disk.first..disk.first + 500 {
            std::os::unix::fs::symlink("/dev/full", disk.name(n)).unwrap();
        }
        disk
    }

    fn name(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:012}.log"))
    }

    fn free(self) {
        for n in self.first..self.first + 500 {
            let _ = std::fs::remove_file(self.name(n));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_journal_disk_under_reject_refuses_before_forwarding_then_recovers() {
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("answer", Some((10, 0, 5))));
    let (app, journal) = app_with_fillable_journal(&up, "reject").await;
    let key = app.team_and_key("t").await;
    let body = chat_body("gpt-4o-mini", "hello");
    assert_eq!(app.chat(&key, &body).await.status(), 200);

    let disk = FullDisk::fill(&journal);
    let hits = up.hits();
    let resp = app.chat(&key, &body).await;
    let refused = request_id(&resp);
    assert_eq!(error_code(resp).await, (503, "ledger_unavailable".into()));
    assert_eq!(up.hits(), hits, "a request whose journal entry is not durable is not forwarded");
    assert_eq!(app.http.get(app.url("/health/ready")).send().await.unwrap().status(), 503);

    disk.free();
    let resp = app.chat(&key, &body).await;
    assert_eq!(resp.status(), 200, "served again once the disk has room");
    let served = request_id(&resp);
    assert_eq!(settled_record(&app, &served).await["status"], 200);
    assert!(!app.logs().await.iter().any(|r| r["request_id"] == refused.as_str()), "a refused request is not recorded");
    assert_eq!(app.http.get(app.url("/health/ready")).send().await.unwrap().status(), 200);
    // The refused request's withdrawn journal entry is not a record written.
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let written = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_ledger_records_written "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(written, "tollgate_ledger_records_written 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_of_a_request_answered_503_for_an_unwritable_journal_says_503() {
    // SPEC §5: a record's `status` is the HTTP status the client received. The disk fills
    // while the upstream thinks: the journal entry is durable, the final record is not.
    let up = FakeUpstream::start().await;
    up.reply(Reply::chat_json("answer", Some((10, 0, 5))).with_header_delay(Duration::from_millis(800)));
    let (app, journal) = app_with_fillable_journal(&up, "reject").await;
    let app = Arc::new(app);
    let key = app.team_and_key("t").await;
    let request = {
        let (app, key) = (app.clone(), key.clone());
        tokio::spawn(async move { app.chat(&key, &chat_body("gpt-4o-mini", "x")).await })
    };
    poll(10, "request forwarded", || async { (up.hits() == 1).then_some(()) }).await;
    let disk = FullDisk::fill(&journal);
    let resp = request.await.unwrap();
    let id = request_id(&resp);
    assert_eq!(error_code(resp).await, (503, "ledger_unavailable".into()));
    disk.free();
    // The record (status 200) and its correction (503) land in that order, possibly in two
    // batches: wait for the correction, which must arrive within the deadline.
    poll(10, "the record's status corrected to 503", || async {
        app.logs().await.into_iter().find(|x| x["request_id"] == id.as_str() && x["status"] == 503).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_journal_disk_under_serve_keeps_serving_and_records_still_land() {
    let up = FakeUpstream::start().await;
    up.script(|req| {
        if req["stream"] == true {
            Reply::chat_sse(&["x", "y"], Some((7, 0, 2)), true)
        } else {
            Reply::chat_json("answer", Some((10, 0, 5)))
        }
    });
    let (app, journal) = app_with_fillable_journal(&up, "serve").await;
    let key = app.team_and_key("t").await;
    let disk = FullDisk::fill(&journal);
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "q")).await;
    assert_eq!(resp.status(), 200, "served with the journal unwritable (serve)");
    let a = request_id(&resp);
    let resp = app.chat(&key, &stream_chat("s")).await;
    assert_eq!(resp.status(), 200);
    let b = request_id(&resp);
    let (text, errored) = read_stream(resp).await;
    assert!(!errored && text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Held in memory only, but the database is fine: both land.
    for id in [&a, &b] {
        assert_eq!(settled_record(&app, id).await["status"], 200);
    }
    disk.free();
}

/// Once the queue is full, new requests are refused at admission (they claim their record's
/// queue place up front), and an admitted request never waits for a place: it once hung for
/// as long as the database was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_ledger_queue_refuses_new_requests_and_never_hangs_admitted_ones() {
    // A queue of 4 records and a locked database, policy `serve`: requests are served until
    // the queue is full, then refused with 503. None may wait past the ack timeout.
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let extra = format!("on_ledger_error = \"serve\"\nledger_queue_capacity = 4\n{LOCK_KEYS}");
    let text = config_with(&extra, &db, &up.url(), DEFAULT_MODELS);
    let app = TestApp::start_with_config(dir, &text).await;
    let key = app.team_and_key("t").await;
    let lock = DbLock::take(&db).await;

    let mut served = Vec::new();
    let mut refused = 0;
    for i in 0..8 {
        eprintln!("full queue: request {i}, {} served, {refused} refused so far", served.len());
        let started = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(3), app.chat(&key, &chat_body("gpt-4o-mini", "x")))
            .await
            .expect("a request hung on the full ledger queue (longer than 3 s; ack timeout is 0.5 s)");
        assert!(started.elapsed() < Duration::from_secs(2));
        let id = request_id(&resp);
        match resp.status().as_u16() {
            200 => served.push(id),
            503 => {
                assert_eq!(error_code(resp).await.1, "ledger_unavailable");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused > 0, "a full queue must refuse new requests");
    assert!(!served.is_empty());
    lock.release().await;
    for id in &served {
        assert_eq!(settled_record(&app, id).await["status"], 200);
    }
}

#[tokio::test]
async fn database_unreachable_at_start_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    // The database's folder cannot be created: a regular file is in the way.
    std::fs::write(dir.path().join("blocker"), "not a folder").unwrap();
    let db = dir.path().join("blocker").join("data").join("tollgate.db");
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, format!("listen = \"127.0.0.1:0\"\ndatabase_url = \"sqlite://{}\"\n", db.display()))
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .output(),
    )
    .await
    .expect("a start-up failure does not hang")
    .unwrap();
    assert!(!out.status.success(), "started without its database");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("ledger") || stderr.to_lowercase().contains("database"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// Upstream faults not covered by streaming.rs / errors.rs / routing.rs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_reset_mid_body_of_a_non_stream_answer_is_502_and_recorded() {
    let up = FakeUpstream::start().await;
    let partial = r#"{"id":"chatcmpl-fake","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hel"#;
    up.reply(
        Reply {
            chunks: vec![(Duration::from_millis(20), Bytes::from_static(partial.as_bytes()))],
            ..Reply::new(200, "application/json", "")
        }
        .broken(),
    );
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    let id = request_id(&resp);
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    // A 200 whose body is cut off mid-JSON is a body that is not JSON (SPEC §4).
    assert_eq!(v["error"]["code"], "invalid_upstream_response", "{v}");
    assert!(!v.to_string().contains("Hel\""), "no partial body leaks: {v}");
    let r = settled_record(&app, &id).await;
    assert_eq!(r["status"], 502, "{r}");
    assert_eq!(usd_to_nanos(&r["cost_usd"]), 0, "a failed request without reported usage costs 0: {r}");
}

fn sse_content_event(content: &str) -> String {
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

#[tokio::test]
async fn malformed_sse_cuts_the_client_stream_and_is_charged_by_estimate() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;

    // (a) An event whose data is not UTF-8; (b) a line that never ends, past the 16 MiB
    // event bound. Both come after a good event and before any [DONE].
    let good = Bytes::from(sse_content_event("Hello"));
    let invalid: Vec<(Duration, Bytes)> = vec![
        (Duration::from_millis(10), good.clone()),
        (Duration::from_millis(10), Bytes::from_static(b"data: {\"choices\":[\xff\xfe]}\n\n")),
        (Duration::ZERO, Bytes::from(sse_content_event(" never relayed"))),
        (Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")),
    ];
    let mut endless = vec![(Duration::from_millis(10), good.clone()), (Duration::ZERO, Bytes::from_static(b"data: "))];
    let mib = Bytes::from(vec![b'x'; 1024 * 1024]);
    endless.extend((0..17).map(|_| (Duration::ZERO, mib.clone())));
    endless.push((Duration::ZERO, Bytes::from_static(b"\n\ndata: [DONE]\n\n")));

    for (name, chunks) in [("invalid utf-8", invalid), ("endless line", endless)] {
        up.reply(Reply { chunks, ..Reply::new(200, "text/event-stream", "") });
        let resp = app.chat(&key, &stream_chat("hi")).await;
        assert_eq!(resp.status(), 200, "{name}");
        let id = request_id(&resp);
        let (text, errored) = read_stream(resp).await;
        assert!(errored, "{name}: the client's stream must end abnormally");
        assert!(text.contains("Hello"), "{name}: the good event was relayed");
        assert!(
            !text.contains("[DONE]") && !text.contains("never relayed"),
            "{name}: nothing after the fault: {}",
            &text[..text.len().min(300)]
        );
        assert!(text.len() < 64 * 1024, "{name}: the oversized event was not relayed ({} bytes)", text.len());
        let r = settled_record(&app, &id).await;
        assert_eq!(r["usage_source"], "estimated", "{name}: {r}");
        assert_eq!(r["output_tokens"], 1, "{name}: \"Hello\" is one token: {r}");
        assert_eq!(r["input_tokens"], 8, "{name}: {r}");
        assert_eq!(r["status"], 200, "{name}: {r}");
        assert!(usd_to_nanos(&r["cost_usd"]) > 0, "{name}: {r}");
    }
}

#[tokio::test]
async fn enormous_non_stream_answer_is_502_without_buffering_it() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let text = config_with("max_response_bytes = 65536", &db, &up.url(), DEFAULT_MODELS);
    let app = TestApp::start_with_config(dir, &text).await;
    let key = app.team_and_key("t").await;

    // Just under the limit is fine...
    up.reply(Reply::chat_json(&"y".repeat(60_000), Some((10, 0, 5))));
    assert_eq!(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await.status(), 200);
    // ...1 MiB of valid JSON past it is refused.
    up.reply(Reply::chat_json(&"y".repeat(1024 * 1024), Some((10, 0, 5))));
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    let id = request_id(&resp);
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    let r = settled_record(&app, &id).await;
    assert_eq!(r["status"], 502, "{r}");
}

#[tokio::test]
async fn upstream_429_without_fallback_is_502_with_its_retry_after_and_401_is_502_too() {
    let up = FakeUpstream::start().await;
    let mut reply = Reply::error(429, "Rate limit reached for requests");
    reply.headers.push(("retry-after", "7".into()));
    up.reply(reply);
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    let id = request_id(&resp);
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("7"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert_eq!(v["error"]["code"], "429", "{v}");
    assert_eq!(up.hits(), 1, "no fallback configured: one attempt");
    let r = settled_record(&app, &id).await;
    assert_eq!(r["status"], 502, "{r}");
    assert_eq!(usd_to_nanos(&r["cost_usd"]), 0, "{r}");

    // The upstream refusing tollgate's own credentials is a gateway fault, not the client's
    // key: 502, never 401/403.
    for upstream_status in [401u16, 403] {
        up.reply(Reply::error(upstream_status, "Incorrect API key provided"));
        let (status, code) = error_code(app.chat(&key, &chat_body("gpt-4o-mini", "x")).await).await;
        assert_eq!((status, code), (502, upstream_status.to_string()));
    }
}

#[tokio::test]
async fn upstream_body_that_stalls_before_it_ends_is_504_and_recorded() {
    let up = FakeUpstream::start().await;
    let partial = r#"{"id":"chatcmpl-fake","object":"chat.completion","choices":["#;
    up.reply(
        Reply {
            chunks: vec![(Duration::from_millis(10), Bytes::from_static(partial.as_bytes()))],
            ..Reply::new(200, "application/json", "")
        }
        .stalled(),
    );
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;
    let started = Instant::now();
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "x")).await;
    let id = request_id(&resp);
    assert_eq!(error_code(resp).await, (504, "upstream_timeout".into()));
    // idle_timeout_ms = 1000 in the test config.
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    let r = settled_record(&app, &id).await;
    assert_eq!(r["status"], 504, "{r}");
    assert_eq!(usd_to_nanos(&r["cost_usd"]), 0, "{r}");
}

#[tokio::test]
async fn nonsense_from_the_upstream_is_never_trusted_as_usage_or_passed_as_an_answer() {
    let up = FakeUpstream::start().await;
    let app = TestApp::start(&up, DEFAULT_MODELS).await;
    let key = app.team_and_key("t").await;

    // Usage with negative, non-integer and absurd numbers: the answer passes through
    // unchanged; the record is estimated with the tokenizer, never negative or huge.
    let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": -5, "completion_tokens": "many", "total_tokens": 1e300}})
    .to_string();
    up.reply(Reply::new(200, "application/json", body.clone()));
    let resp = app.chat(&key, &chat_body("gpt-4o-mini", "hi")).await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert_eq!(resp.text().await.unwrap(), body, "passed through unchanged");
    let r = settled_record(&app, &id).await;
    assert_eq!(r["usage_source"], "estimated", "{r}");
    assert_eq!((r["input_tokens"].as_i64(), r["output_tokens"].as_i64()), (Some(8), Some(1)), "{r}");

    // JSON that is not an object, and an SSE content type for a non-stream request.
    for (ct, text) in
        [("application/json", "[1,2,3]"), ("application/json", "null"), ("text/event-stream", "data: {}\n\n")]
    {
        up.reply(Reply::new(200, ct, text));
        let resp = app.chat(&key, &chat_body("gpt-4o-mini", "hi")).await;
        let id = request_id(&resp);
        assert_eq!(error_code(resp).await, (502, "invalid_upstream_response".into()), "{ct} {text}");
        assert_eq!(settled_record(&app, &id).await["status"], 502);
    }
}

/// SPEC §8: a replica killed with `kill -9` while a stream holds its reservation. Another
/// replica finds the budget held, then released within `reservation_lease_ms` (and a sweep),
/// charged only the prompt the upstream certainly billed; the killed replica's restart puts
/// the request in the ledger as `interrupted` at that charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_frees_its_reservations_within_the_lease() {
    replica_killed_mid_stream(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_frees_its_reservations_within_the_lease_through_redis() {
    replica_killed_mid_stream(true).await;
}

async fn replica_killed_mid_stream(redis: bool) {
    let test = "a_replica_killed_mid_stream_frees_its_reservations_within_the_lease";
    let Some((url, services)) = crate::postgres::services(test, redis).await else { return };
    let up = FakeUpstream::start().await;
    up.reply(
        Reply::chat_sse(&["a", "b", "c", "d"], Some((5, 0, 4)), true).with_chunk_delay(Duration::from_millis(500)),
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unused.db");
    let journal = dir.path().join("journal");
    let journal_line = format!("journal_dir = {:?}", journal.display().to_string());
    let extra = format!("reservation_lease_ms = 3000\n{services}\n{journal_line}");
    let config =
        config_with(&extra, &db, &up.url(), DEFAULT_MODELS).replace(&format!("sqlite://{}", db.display()), &url);
    let mut p = Proc::start(dir.path(), &config, 1).await;
    let probe = p.team_and_key("probe", json!({})).await;
    let dry = p
        .http
        .post(p.url("/v1/chat/completions"))
        .bearer_auth(&probe)
        .header("x-tollgate-dry-run", "true")
        .json(&stream_chat("x"))
        .send()
        .await
        .unwrap();
    let dry: Value = dry.json().await.unwrap();
    let (worst, floor) = (usd_to_nanos(&dry["max_cost_usd"]), usd_to_nanos(&dry["estimated_cost_usd"]));
    assert!(floor > 0 && floor < worst, "{dry}");
    // Room for one request's worst case, not two.
    let key = p.team_and_key("t", json!({"limit_usd": (worst + worst / 2) as f64 / 1e9, "period": "total"})).await;
    let other = TestApp::start_with_config(tempfile::tempdir().unwrap(), &config.replace(&journal_line, "")).await;

    let resp =
        p.http.post(p.url("/v1/chat/completions")).bearer_auth(&key).json(&stream_chat("x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap(); // the upstream is answering: the reservation is held
    p.child.kill().await.unwrap();
    let killed = Instant::now();
    assert_eq!(other.chat(&key, &stream_chat("x")).await.status(), 429, "the dead replica's hold still counts");
    let team = poll(10, "the dead replica's reservation released", || async {
        let (_, team) = other.admin(reqwest::Method::GET, "/admin/teams/t", None).await;
        (team["reserved_usd"] == 0.0).then_some(team)
    })
    .await;
    let released = killed.elapsed();
    // The lease ends at most 3 s after the kill (renewed every second, one second short of
    // the lease), and at least one second after it; a sweep runs every second.
    assert!(released > Duration::from_millis(900), "released {released:?} after the kill, before its lease ran out");
    assert!(released < Duration::from_millis(4000), "released {released:?} after the kill (lease 3 s)");
    assert_eq!(usd_to_nanos(&team["spent_usd"]), floor, "charged its prompt, not its reservation: {team}");
    let r = other.chat(&key, &stream_chat("x")).await;
    assert_eq!(r.status(), 200, "the budget is free again");
    let _ = r.bytes().await;

    // The killed replica restarts on its journal: the request is in the ledger, interrupted.
    let p2 = Proc::start(dir.path(), &config, 2).await;
    let records = all_records(&p2.http, &p2.base()).await;
    let r = records.get(&id).unwrap_or_else(|| panic!("the killed replica's request {id} left no record"));
    assert_eq!(r["usage_source"], "interrupted", "{r}");
    assert_eq!(usd_to_nanos(&r["cost_usd"]), floor, "{r}");
    other.stop().await;
}
