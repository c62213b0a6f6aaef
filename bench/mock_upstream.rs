//! `mock-upstream`: a fast fake of OpenAI's `POST /v1/chat/completions`, the upstream that
//! `bench/run.sh` puts behind tollgate, behind a bare nginx hop, and in front of the load
//! generator directly.
//!
//! It answers a `chat.completion` JSON object with `usage`, or, when the body asks for
//! `"stream": true`, an SSE stream: `--chunks` content chunks (the first also carries the
//! role), a finish chunk, the usage chunk (`choices: []`) when `stream_options.include_usage`
//! is true, and `data: [DONE]`. Everything is built from a cheap substring look at the body,
//! never a full JSON parse: the mock must cost as little as possible, since its cost lands in
//! every target's numbers alike.
//!
//! A stream goes out as providers send theirs: one event per HTTP chunk, each written on its
//! own (the body yields between events, so the connection flushes each before the next);
//! `--one-write` sends the whole stream in one write instead. `--latency-ms` delays the
//! response headers; `--chunk-interval-ms` spaces the events (slow streams: the first goes out
//! with the headers, each later one after the interval). Prompt tokens are reported as body
//! bytes / 4, completion tokens as one per content chunk.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpSocket;

#[derive(Parser, Debug)]
#[command(name = "mock-upstream", about = "A fast fake OpenAI chat-completions upstream for benchmarks")]
struct Args {
    /// Port to listen on (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on. Benchmarks stay on loopback.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Delay before the response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between SSE events, in milliseconds (0: each event written as soon as the
    /// last one was).
    #[arg(long, default_value_t = 0)]
    chunk_interval_ms: u64,
    /// Write a whole stream at once, not one event per write.
    #[arg(long)]
    one_write: bool,
    /// Number of content chunks in a streamed answer (also the completion token count).
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

type Body = BoxBody<Bytes, Infallible>;

struct Mock {
    latency: Duration,
    interval: Duration,
    one_write: bool,
    chunks: usize,
    next_id: AtomicU64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    runtime.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad address: {e}")))?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog: thousands of streams may connect in a burst.
    let listener = socket.listen(8192)?;
    let mock = Arc::new(Mock {
        latency: Duration::from_millis(args.latency_ms),
        interval: Duration::from_millis(args.chunk_interval_ms),
        one_write: args.one_write,
        chunks: args.chunks.max(1),
        next_id: AtomicU64::new(1),
    });
    println!("mock-upstream listening on http://{}", listener.local_addr()?);

    let mut builder = http1::Builder::new();
    builder.keep_alive(true).timer(TokioTimer::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors: say so and back off rather than spin.
                eprintln!("mock-upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mock = mock.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let mock = mock.clone();
                async move { Ok::<_, Infallible>(mock.handle(req).await) }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

impl Mock {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::POST || !req.uri().path().ends_with("/chat/completions") {
            return error(StatusCode::NOT_FOUND, "mock-upstream serves POST /v1/chat/completions only");
        }
        let body = match req.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return error(StatusCode::BAD_REQUEST, "could not read the request body"),
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return error(StatusCode::BAD_REQUEST, "the request body is not UTF-8");
        };
        let stream = text.contains("\"stream\":true") || text.contains("\"stream\": true");
        let include_usage = text.contains("\"include_usage\":true") || text.contains("\"include_usage\": true");
        let model = model_of(text);
        let prompt_tokens = (body.len() as u64 / 4).max(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);

        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if !stream {
            return respond(
                "application/json",
                Full::new(Bytes::from(self.completion(id, created, model, prompt_tokens))).boxed(),
            );
        }
        let frames = self.sse_frames(id, created, model, prompt_tokens, include_usage);
        if self.one_write {
            return respond("text/event-stream", Full::new(Bytes::from(frames.concat())).boxed());
        }
        let interval = self.interval;
        let frames = futures::stream::unfold((frames.into_iter(), true), move |(mut frames, first)| async move {
            let frame = frames.next()?;
            if !first {
                if interval.is_zero() {
                    // Pending once: hyper writes what it holds before it asks for more.
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(interval).await;
                }
            }
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(frame))), (frames, false)))
        });
        respond("text/event-stream", StreamBody::new(frames).boxed())
    }

    fn completion(&self, id: u64, created: u64, model: &str, prompt_tokens: u64) -> String {
        let completion_tokens = self.chunks as u64;
        let content = " lorem".repeat(self.chunks);
        format!(
            concat!(
                r#"{{"id":"chatcmpl-mock{id}","object":"chat.completion","created":{created},"model":"{model}","#,
                r#""choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"#,
                r#""logprobs":null,"finish_reason":"stop"}}],"usage":{usage},"service_tier":"default","#,
                r#""system_fingerprint":"fp_mock"}}"#
            ),
            id = id,
            created = created,
            model = model,
            content = content,
            usage = usage(prompt_tokens, completion_tokens),
        )
    }

    /// One event per string: the role chunk, the content chunks, the finish chunk, the usage
    /// chunk (when asked for) and `[DONE]`.
    fn sse_frames(&self, id: u64, created: u64, model: &str, prompt_tokens: u64, include_usage: bool) -> Vec<String> {
        let usage_null = if include_usage { r#","usage":null"# } else { "" };
        let chunk = |delta: &str, finish: &str| {
            format!(
                concat!(
                    r#"data: {{"id":"chatcmpl-mock{id}","object":"chat.completion.chunk","created":{created},"#,
                    r#""model":"{model}","service_tier":"default","system_fingerprint":"fp_mock","#,
                    r#""choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]{usage_null}}}"#,
                    "\n\n"
                ),
                id = id,
                created = created,
                model = model,
                delta = delta,
                finish = finish,
                usage_null = usage_null,
            )
        };
        let mut frames = Vec::with_capacity(self.chunks + 4);
        frames.push(chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null"));
        for _ in 0..self.chunks {
            frames.push(chunk(r#"{"content":" lorem"}"#, "null"));
        }
        frames.push(chunk("{}", r#""stop""#));
        if include_usage {
            frames.push(format!(
                concat!(
                    r#"data: {{"id":"chatcmpl-mock{id}","object":"chat.completion.chunk","created":{created},"#,
                    r#""model":"{model}","service_tier":"default","system_fingerprint":"fp_mock","choices":[],"#,
                    r#""usage":{usage}}}"#,
                    "\n\n"
                ),
                id = id,
                created = created,
                model = model,
                usage = usage(prompt_tokens, self.chunks as u64),
            ));
        }
        frames.push("data: [DONE]\n\n".to_string());
        frames
    }
}

fn usage(prompt: u64, completion: u64) -> String {
    format!(
        concat!(
            r#"{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{t},"#,
            r#""prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"#,
            r#""completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"#,
            r#""accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#
        ),
        p = prompt,
        c = completion,
        t = prompt + completion,
    )
}

/// The request's `"model"` value by a substring look, or a stand-in. Only names made of
/// plain characters are echoed, so the answer stays valid JSON whatever the body holds.
fn model_of(text: &str) -> &str {
    for key in ["\"model\":\"", "\"model\": \""] {
        if let Some(start) = text.find(key).map(|i| i + key.len()) {
            if let Some(len) = text[start..].find('"') {
                let name = &text[start..start + len];
                if name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b)) {
                    return name;
                }
            }
        }
    }
    "gpt-4o-mini"
}

fn respond(content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body =
        format!(r#"{{"error":{{"message":"{message}","type":"invalid_request_error","param":null,"code":null}}}}"#);
    let mut response = respond("application/json", Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}
