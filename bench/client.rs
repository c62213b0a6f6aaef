//! `bench-client`: the two measurements of `bench/run.sh` that wrk cannot make.
//!
//! - `ttfb`: streaming requests one after another on one kept-alive connection; for each, the
//!   time from sending the request to the response headers and to the first body bytes (the
//!   first SSE event). Prints one JSON line of percentiles in microseconds.
//! - `streams`: holds N streaming requests open at once, one connection each, reading every
//!   event to `data: [DONE]`; prints one JSON line with how many opened, how many were open
//!   at the same time at most, how many completed, and the first error seen. `bench/run.sh`
//!   samples the gateway's RSS while this runs.
//!
//! A plain hyper client, one connection per task: nothing is pooled or retried behind the
//! measurement's back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(name = "bench-client", about = "Streaming measurements for tollgate's benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time to first byte of streaming requests, sequentially on one connection.
    Ttfb {
        #[command(flatten)]
        target: Target,
        /// Measured requests.
        #[arg(long, default_value_t = 200)]
        n: usize,
        /// Unmeasured requests first.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Hold N streaming requests open at once.
    Streams {
        #[command(flatten)]
        target: Target,
        /// Concurrent streams.
        #[arg(long, default_value_t = 5000)]
        n: usize,
        /// Streams connecting at once (the rest wait for a slot until a stream's first event).
        #[arg(long, default_value_t = 200)]
        connect_concurrency: usize,
        /// Give up on the whole run after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// host:port of the server (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Bearer token, if the target wants one.
    #[arg(long, env = "BENCH_KEY")]
    key: Option<String>,
    /// File holding the JSON request body.
    #[arg(long)]
    body_file: PathBuf,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match Cli::parse().command {
        Command::Ttfb { target, n, warmup } => ttfb(target, n, warmup).await,
        Command::Streams { target, n, connect_concurrency, timeout_s } => {
            streams(target, n, connect_concurrency, Duration::from_secs(timeout_s)).await
        }
    }
}

struct Prepared {
    target: Target,
    body: Bytes,
}

impl Prepared {
    fn load(target: Target) -> Result<Arc<Prepared>, BoxError> {
        let body = Bytes::from(std::fs::read(&target.body_file)?);
        Ok(Arc::new(Prepared { target, body }))
    }

    fn request(&self) -> Result<Request<Full<Bytes>>, BoxError> {
        let mut builder = Request::post(self.target.path.as_str())
            .header(HOST, self.target.addr.to_string())
            .header(CONTENT_TYPE, "application/json");
        if let Some(key) = self.target.key.as_deref().filter(|k| !k.is_empty()) {
            builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        Ok(builder.body(Full::new(self.body.clone()))?)
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, BoxError> {
        let stream = TcpStream::connect(self.target.addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

async fn ttfb(target: Target, n: usize, warmup: usize) -> Result<(), BoxError> {
    let prepared = Prepared::load(target)?;
    let mut sender = prepared.connect().await?;
    let mut headers_us = Vec::with_capacity(n);
    let mut first_byte_us = Vec::with_capacity(n);
    let mut errors = 0usize;
    let mut first_error: Option<String> = None;
    for i in 0..warmup + n {
        let outcome: Result<(Duration, Duration), BoxError> = async {
            sender.ready().await?;
            let start = Instant::now();
            let response = sender.send_request(prepared.request()?).await?;
            let headers = start.elapsed();
            let status = response.status();
            let mut body = response.into_body();
            let mut first = None;
            let mut seen = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if first.is_none() && !data.is_empty() {
                        first = Some(start.elapsed());
                    }
                    seen.extend_from_slice(&data);
                }
            }
            if !status.is_success() {
                return Err(format!("status {status}: {}", String::from_utf8_lossy(&seen)).into());
            }
            if !ends_with_done(&seen) {
                return Err("the stream ended without data: [DONE]".into());
            }
            Ok((headers, first.ok_or("empty body")?))
        }
        .await;
        match outcome {
            Ok((headers, first)) if i >= warmup => {
                headers_us.push(headers.as_secs_f64() * 1e6);
                first_byte_us.push(first.as_secs_f64() * 1e6);
            }
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                // The connection may be unusable now: start a fresh one.
                sender = prepared.connect().await?;
            }
        }
    }
    let h = Percentiles::of(&mut headers_us);
    let f = Percentiles::of(&mut first_byte_us);
    println!(
        "{{\"n\":{},\"errors\":{},\"headers_p50_us\":{:.1},\"headers_p99_us\":{:.1},\"first_byte_p50_us\":{:.1},\
         \"first_byte_p90_us\":{:.1},\"first_byte_p99_us\":{:.1},\"first_byte_min_us\":{:.1},\"first_error\":{}}}",
        first_byte_us.len(),
        errors,
        h.p50,
        h.p99,
        f.p50,
        f.p90,
        f.p99,
        f.min,
        json_string(first_error.as_deref()),
    );
    Ok(())
}

struct Percentiles {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

impl Percentiles {
    fn of(values: &mut [f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles { min: f64::NAN, p50: f64::NAN, p90: f64::NAN, p99: f64::NAN };
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize];
        Percentiles { min: values[0], p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }
}

#[derive(Default)]
struct StreamStats {
    opened: AtomicUsize,
    open_now: AtomicUsize,
    max_open: AtomicUsize,
    completed: AtomicUsize,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    all_open_after: Mutex<Option<Duration>>,
}

async fn streams(target: Target, n: usize, connect_concurrency: usize, timeout: Duration) -> Result<(), BoxError> {
    let prepared = Prepared::load(target)?;
    let stats = Arc::new(StreamStats::default());
    let slots = Arc::new(Semaphore::new(connect_concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (prepared, stats, slots) = (prepared.clone(), stats.clone(), slots.clone());
        tasks.spawn(async move {
            let mut slot = Some(slots.acquire_owned().await.expect("semaphore open"));
            let mut counted_open = false;
            let outcome = one_stream(&prepared, || {
                // First event in: this stream is open; let the next one connect.
                slot.take();
                counted_open = true;
                let opened = stats.opened.fetch_add(1, Ordering::Relaxed) + 1;
                let now = stats.open_now.fetch_add(1, Ordering::Relaxed) + 1;
                stats.max_open.fetch_max(now, Ordering::Relaxed);
                if opened == n {
                    *stats.all_open_after.lock().expect("not poisoned") = Some(start.elapsed());
                }
            })
            .await;
            if counted_open {
                stats.open_now.fetch_sub(1, Ordering::Relaxed);
            }
            match outcome {
                Ok(()) => {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.first_error.lock().expect("not poisoned").get_or_insert_with(|| e.to_string());
                }
            }
        });
    }
    let finished = tokio::time::timeout(timeout, async { while tasks.join_next().await.is_some() {} }).await.is_ok();
    if !finished {
        tasks.abort_all();
    }
    let all_open = *stats.all_open_after.lock().expect("not poisoned");
    let first_error = stats.first_error.lock().expect("not poisoned").clone();
    println!(
        "{{\"n\":{},\"opened\":{},\"max_open\":{},\"completed\":{},\"errors\":{},\"timed_out\":{},\
         \"all_open_s\":{},\"total_s\":{:.2},\"first_error\":{}}}",
        n,
        stats.opened.load(Ordering::Relaxed),
        stats.max_open.load(Ordering::Relaxed),
        stats.completed.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        !finished,
        all_open.map_or("null".to_string(), |d| format!("{:.2}", d.as_secs_f64())),
        start.elapsed().as_secs_f64(),
        json_string(first_error.as_deref()),
    );
    Ok(())
}

/// One streaming request on its own connection, read to the end; `on_open` runs at the
/// first body bytes.
async fn one_stream(prepared: &Prepared, mut on_open: impl FnMut()) -> Result<(), BoxError> {
    let mut sender = prepared.connect().await?;
    let response = sender.send_request(prepared.request()?).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut opened = false;
    // Only the tail matters for the [DONE] check; errors keep the head for the message.
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if !opened && !data.is_empty() && status.is_success() {
                opened = true;
                on_open();
            }
            tail.extend_from_slice(&data);
            if status.is_success() && tail.len() > 4096 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    if !status.is_success() {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&tail[..tail.len().min(300)])).into());
    }
    if !ends_with_done(&tail) {
        return Err("the stream ended without data: [DONE]".into());
    }
    Ok(())
}

fn ends_with_done(body: &[u8]) -> bool {
    let trimmed = body.trim_ascii_end();
    trimmed.ends_with(b"data: [DONE]") || trimmed.ends_with(b"data:[DONE]")
}

fn json_string(s: Option<&str>) -> String {
    match s {
        None => "null".into(),
        Some(s) => {
            let escaped: String = s
                .chars()
                .flat_map(|c| match c {
                    '"' => vec!['\\', '"'],
                    '\\' => vec!['\\', '\\'],
                    c if (c as u32) < 0x20 => vec![' '],
                    c => vec![c],
                })
                .collect();
            format!("\"{escaped}\"")
        }
    }
}
