//! Test harness: a fake OpenAI upstream and a real tollgate on port 0 with a fresh SQLite
//! file, driven over HTTP like a client would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const MASTER: &str = "sk-admin-test-0123";

/// One scripted answer from the fake upstream.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    /// Wait this long before sending headers.
    pub header_delay: Duration,
    /// Body chunks, each sent after its delay.
    pub chunks: Vec<(Duration, Bytes)>,
    /// After the chunks: hang forever (a stalled upstream) instead of ending.
    pub stall: bool,
    /// After the chunks: break the connection instead of ending cleanly.
    pub reset: bool,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            content_type,
            header_delay: Duration::ZERO,
            chunks: vec![(Duration::ZERO, body.into())],
            stall: false,
            reset: false,
            headers: Vec::new(),
        }
    }

    /// A chat.completion JSON body; `usage` = (prompt, cached, completion) or none at all.
    pub fn chat_json(content: &str, usage: Option<(u64, u64, u64)>) -> Reply {
        let mut body = json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        });
        if let Some((p, c, o)) = usage {
            body["usage"] = usage_json(p, c, o);
        }
        Reply::new(200, "application/json", body.to_string())
    }

    /// An SSE chat stream of `pieces`; with `usage`, the usage chunk before `[DONE]`.
    pub fn chat_sse(pieces: &[&str], usage: Option<(u64, u64, u64)>, done: bool) -> Reply {
        let mut events: Vec<String> = Vec::new();
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        events.push(chunk(json!({"role": "assistant", "content": ""}), Value::Null).to_string());
        for p in pieces {
            events.push(chunk(json!({"content": p}), Value::Null).to_string());
        }
        events.push(chunk(json!({}), json!("stop")).to_string());
        if let Some((p, c, o)) = usage {
            events.push(
                json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [], "usage": usage_json(p, c, o)})
                .to_string(),
            );
        }
        let mut chunks: Vec<(Duration, Bytes)> =
            events.into_iter().map(|e| (Duration::ZERO, Bytes::from(format!("data: {e}\n\n")))).collect();
        if done {
            chunks.push((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
        }
        Reply { chunks, ..Reply::new(200, "text/event-stream", "") }
    }

    pub fn error(status: u16, message: &str) -> Reply {
        let body = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
        Reply::new(status, "application/json", body.to_string())
    }

    pub fn with_header_delay(mut self, d: Duration) -> Reply {
        self.header_delay = d;
        self
    }

    pub fn with_chunk_delay(mut self, d: Duration) -> Reply {
        for c in &mut self.chunks {
            c.0 = d;
        }
        self
    }

    pub fn stalled(mut self) -> Reply {
        self.stall = true;
        self
    }

    pub fn broken(mut self) -> Reply {
        self.reset = true;
        self
    }
}

pub fn usage_json(prompt: u64, cached: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

type Script = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// What the fake upstream saw and will answer.
pub struct FakeState {
    script: Mutex<Script>,
    pub bodies: Mutex<Vec<Bytes>>,
    pub auth: Mutex<Vec<String>>,
    pub hits: AtomicUsize,
}

/// An in-process fake of OpenAI's API.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let state = Arc::new(FakeState {
            script: Mutex::new(Arc::new(|_| Reply::chat_json("fake answer", Some((10, 0, 5))))),
            bodies: Mutex::new(Vec::new()),
            auth: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .route("/v1/completions", post(answer))
            .route("/v1/embeddings", post(answer))
            // Like OpenAI, accept bodies of any size tollgate forwards.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream { addr, state }
    }

    /// Answers every request with `script(request body)`.
    pub fn script(&self, script: impl Fn(&Value) -> Reply + Send + Sync + 'static) {
        *self.state.script.lock().unwrap() = Arc::new(script);
    }

    /// Answers every request with a clone of `reply`.
    pub fn reply(&self, reply: Reply) {
        self.script(move |_| reply.clone());
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Value {
        let bodies = self.state.bodies.lock().unwrap();
        serde_json::from_slice(bodies.last().expect("no request reached the upstream")).unwrap()
    }

    pub fn last_raw_body(&self) -> Bytes {
        self.state.bodies.lock().unwrap().last().cloned().expect("no request reached the upstream")
    }
}

async fn answer(State(state): State<Arc<FakeState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        state.auth.lock().unwrap().push(a.to_string());
    }
    state.bodies.lock().unwrap().push(body.clone());
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let script = state.script.lock().unwrap().clone();
    let reply = script(&request);
    if !reply.header_delay.is_zero() {
        tokio::time::sleep(reply.header_delay).await;
    }
    let chunks = reply.chunks.clone();
    let (stall, reset) = (reply.stall, reply.reset);
    let stream = async_stream(chunks, stall, reset);
    let mut response = Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap())
        .header("content-type", reply.content_type);
    for (k, v) in &reply.headers {
        response = response.header(*k, v);
    }
    response.body(Body::from_stream(stream)).unwrap()
}

fn async_stream(
    chunks: Vec<(Duration, Bytes)>,
    stall: bool,
    reset: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold((chunks.into_iter(), false), move |(mut it, finished)| async move {
        if finished {
            return None;
        }
        match it.next() {
            Some((delay, bytes)) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(bytes), (it, false)))
            }
            None if stall => {
                futures::future::pending::<()>().await;
                None
            }
            None if reset => Some((Err(std::io::Error::other("connection reset by fake")), (it, true))),
            None => None,
        }
    })
}

/// A running tollgate.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub clock: tollgate::policy::budget::Clock,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tollgate::server::ServeError>>>,
}

/// A config for tests: `models` is TOML text for `[[models]]` / `[routing]` pointing at `up`.
pub fn config_text(db: &str, upstream: &str, models: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
database_url = "sqlite://{db}"
master_key = "{MASTER}"
shutdown_grace_ms = 5000

[[providers]]
name = "up"
kind = "openai"
base_url = "{upstream}"
api_key = "sk-upstream-secret-999"
connect_timeout_ms = 500
first_byte_timeout_ms = 2000
idle_timeout_ms = 1000

{models}
"#
    )
}

/// The default model set: gpt-4o and gpt-4o-mini on the fake, embeddings, a downgrade.
pub const DEFAULT_MODELS: &str = r#"
[[models]]
name = "gpt-4o"
provider = "up"

[[models]]
name = "gpt-4o-mini"
provider = "up"

[[models]]
name = "text-embedding-3-small"
provider = "up"

[routing]
downgrade = { "gpt-4o" = "gpt-4o-mini" }
"#;

impl TestApp {
    pub async fn start(upstream: &FakeUpstream, models: &str) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        TestApp::start_in(dir, upstream, models).await
    }

    /// Starts on an existing data dir (a restart keeps the ledger).
    pub async fn start_in(dir: tempfile::TempDir, upstream: &FakeUpstream, models: &str) -> TestApp {
        let db = dir.path().join("tollgate.db");
        let text = config_text(db.to_str().unwrap(), &upstream.url(), models);
        TestApp::start_with_config(dir, &text).await
    }

    pub async fn start_with_config(dir: tempfile::TempDir, text: &str) -> TestApp {
        let app = Self::start_unready(dir, text).await;
        app.wait_ready().await;
        app
    }

    /// Starts a server without waiting for it to be ready (only for it to answer).
    pub async fn start_unready(dir: tempfile::TempDir, text: &str) -> TestApp {
        // Every server owns its journal folder: keep it in this app's data dir (a shared
        // default would make a second replica refuse to start).
        let text = if text.contains("journal_dir") {
            text.to_string()
        } else {
            format!("journal_dir = {:?}\n{text}", dir.path().join("journal").display().to_string())
        };
        let config = tollgate::Config::from_toml(&text, |_| None).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let clock = tollgate::policy::budget::Clock::default();
        let options = tollgate::RunOptions { clock: clock.clone(), ..Default::default() };
        let task = tokio::spawn(tollgate::run(
            config,
            listener,
            async move {
                let _ = rx.await;
            },
            options,
        ));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let app = TestApp { addr, http, dir, clock, shutdown: Some(tx), task: Some(task) };
        app.wait_live().await;
        app
    }

    async fn wait_live(&self) {
        for _ in 0..500 {
            if self.http.get(self.url("/health/live")).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("tollgate did not start");
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.http.get(self.url("/health/ready")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("tollgate did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server gracefully and returns its data dir (for a restart).
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(MASTER);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let value = resp.json().await.unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn create_team(&self, name: &str, extra: Value) {
        let mut body = json!({"name": name});
        if let Value::Object(m) = extra {
            body.as_object_mut().unwrap().extend(m);
        }
        let (status, v) = self.admin(reqwest::Method::POST, "/admin/teams", Some(body)).await;
        assert_eq!(status, 201, "{v}");
    }

    /// Creates a key; returns (id, secret).
    pub async fn create_key(&self, team: &str, extra: Value) -> (String, String) {
        let mut body = json!({"team": team, "name": "test"});
        if let Value::Object(m) = extra {
            body.as_object_mut().unwrap().extend(m);
        }
        let (status, v) = self.admin(reqwest::Method::POST, "/admin/keys", Some(body)).await;
        assert_eq!(status, 201, "{v}");
        (v["id"].as_str().unwrap().to_string(), v["key"].as_str().unwrap().to_string())
    }

    /// A team with no budget and one key in it; returns the key's secret.
    pub async fn team_and_key(&self, team: &str) -> String {
        self.create_team(team, json!({})).await;
        self.create_key(team, json!({})).await.1
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(key).json(body).send().await.unwrap()
    }

    /// A dry run of `body` (`x-tollgate-dry-run: true`): what tollgate would do, as JSON.
    pub async fn dry_run(&self, key: &str, body: &Value) -> Value {
        let r = self
            .http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-tollgate-dry-run", "true")
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn chat(&self, key: &str, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions", key, body).await
    }

    pub async fn logs(&self) -> Vec<Value> {
        let resp = self.http.get(self.url("/spend/logs?limit=1000")).bearer_auth(MASTER).send().await.unwrap();
        let v: Value = resp.json().await.unwrap();
        v["data"].as_array().unwrap().clone()
    }

    /// Waits (with a deadline) until the ledger holds `n` settled records (in-flight
    /// requests are journaled as `pending` until they settle).
    pub async fn wait_records(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs().await;
            if logs.len() >= n && logs.iter().all(|r| r["usage_source"] != "pending") {
                return logs;
            }
            assert!(tokio::time::Instant::now() < deadline, "ledger has {} records, expected {n}", logs.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A simple chat body.
pub fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Cost in nano-dollars of usage at prices in nano-dollars per 1M tokens, rounded up once.
pub fn nanos(prompt: u64, cached: u64, completion: u64, input: u64, cached_price: u64, output: u64) -> i64 {
    let micro = (prompt - cached) as u128 * input as u128
        + cached as u128 * cached_price as u128
        + completion as u128 * output as u128;
    micro.div_ceil(1_000_000) as i64
}

/// A JSON number of USD back to nano-dollars.
pub fn usd_to_nanos(v: &Value) -> i64 {
    (v.as_f64().unwrap() * 1e9).round() as i64
}

pub const GPT4O: (u64, u64, u64) = (2_500_000_000, 1_250_000_000, 10_000_000_000);
pub const MINI: (u64, u64, u64) = (150_000_000, 75_000_000, 600_000_000);
