//! The only outbound HTTP. One `reqwest::Client` per provider (its connect timeout is the
//! provider's), the first-byte timeout around the wait for response headers, and the idle
//! timeout applied to every gap inside the body.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::config::{Config, Provider, ProviderKind};
use crate::error::ApiError;

/// A response body as a stream of chunks.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>;

/// Why reading an upstream body stopped early.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream was silent for longer than idle_timeout_ms")]
    Idle,
    #[error("the upstream connection failed mid-body: {0}")]
    Broken(String),
}

/// An upstream's answer: status and headers, body still to read.
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyStream,
    /// Longest silence allowed inside the body.
    pub idle_timeout: Duration,
}

/// Why an upstream call failed before any response headers arrived.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("no response headers within first_byte_timeout_ms")]
    Timeout,
    #[error("upstream request failed: {0}")]
    Other(String),
}

impl SendError {
    /// The client-facing error when no fallback succeeds.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            SendError::Timeout => ApiError::UpstreamTimeout,
            SendError::Connect(_) | SendError::Other(_) => {
                ApiError::Upstream { status: None, message: "The upstream could not be reached.".into() }
            }
        }
    }
}

/// HTTP clients for every provider.
pub struct Upstreams {
    clients: HashMap<String, Client>,
}

/// One provider's client, with what every request to it repeats prepared once: the URL of
/// each endpoint (parsing a URL per request cost ~3% of the gateway's CPU) and the
/// `Authorization` header.
///
/// Each server worker thread has its own connection pool (`http[worker]`): a pooled
/// connection is driven by a task on the runtime that opened it, so a request only ever
/// uses connections its own thread drives, and a response never hops between threads.
struct Client {
    http: Vec<reqwest::Client>,
    urls: HashMap<&'static str, reqwest::Url>,
    authorization: Option<reqwest::header::HeaderValue>,
}

impl Upstreams {
    /// Clients for `workers` server worker threads (at least one).
    pub fn new(config: &Config, workers: usize) -> Result<Upstreams, reqwest::Error> {
        let mut clients = HashMap::new();
        for p in config.providers.iter().filter(|p| p.kind == ProviderKind::Openai) {
            let http = (0..workers.max(1))
                .map(|_| {
                    reqwest::Client::builder()
                        .connect_timeout(Duration::from_millis(p.connect_timeout_ms))
                        .pool_idle_timeout(Duration::from_secs(90))
                        .pool_max_idle_per_host(1024)
                        .tcp_nodelay(true)
                        // No automatic redirects: a redirect from an API is a misconfiguration.
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let urls = crate::request::Endpoint::ALL
                .iter()
                .filter_map(|e| {
                    let path = e.upstream_path();
                    reqwest::Url::parse(&format!("{}{path}", p.base_url)).ok().map(|url| (path, url))
                })
                .collect();
            let authorization = p.api_key.as_ref().and_then(|key| {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
                value.set_sensitive(true);
                Some(value)
            });
            clients.insert(p.name.clone(), Client { http, urls, authorization });
        }
        Ok(Upstreams { clients })
    }

    /// POSTs `body` to `provider`'s `path` (e.g. `/chat/completions`) and waits for headers.
    pub async fn send(&self, provider: &Arc<Provider>, path: &str, body: Bytes) -> Result<UpstreamResponse, SendError> {
        let idle_timeout = Duration::from_millis(provider.idle_timeout_ms);
        if provider.kind == ProviderKind::Mock {
            return crate::mock::respond(path, body, idle_timeout).await;
        }
        let client = self.clients.get(&provider.name).ok_or_else(|| SendError::Other("no client".into()))?;
        let http = &client.http[crate::server::worker_index() % client.http.len()];
        let mut request = match client.urls.get(path) {
            Some(url) => http.post(url.clone()),
            None => http.post(format!("{}{}", provider.base_url, path)),
        }
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "application/json, text/event-stream")
        .body(body);
        if let Some(authorization) = &client.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let first_byte = Duration::from_millis(provider.first_byte_timeout_ms);
        let mut response = match tokio::time::timeout(first_byte, request.send()).await {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(e)) if e.is_connect() => {
                // reqwest reports a connect timeout as a connect error with is_timeout().
                if e.is_timeout() {
                    return Err(SendError::Timeout);
                }
                return Err(SendError::Connect(without_url(&e)));
            }
            Ok(Err(e)) if e.is_timeout() => return Err(SendError::Timeout),
            Ok(Err(e)) => return Err(SendError::Other(without_url(&e))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let body = response.bytes_stream().map(|r| r.map_err(|e| BodyError::Broken(without_url(&e))));
        Ok(UpstreamResponse { status, headers, body: Box::pin(body), idle_timeout })
    }
}

/// A reqwest error's text without the URL (which could carry credentials in userinfo).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<upstream>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl UpstreamResponse {
    /// The next body chunk, or `None` at the end; a gap longer than the idle timeout is an error.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
            Err(_) => Some(Err(BodyError::Idle)),
            Ok(item) => item,
        }
    }

    /// Reads the whole body, at most `limit` bytes.
    pub async fn read_all(&mut self, limit: usize) -> Result<Bytes, ReadError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = self.next_chunk().await {
            let chunk = chunk.map_err(ReadError::Body)?;
            if buf.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    pub fn content_type(&self) -> &str {
        self.headers.get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// Why a whole-body read failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Body(BodyError),
    #[error("the upstream response exceeded max_response_bytes")]
    TooLarge,
}
