//! The only outbound HTTP: hyper's connection API under a pool of tollgate's own
//! ([`pool`]), over rustls for `https://` providers (HTTP/1.1, or HTTP/2 when the provider
//! offers it), with the provider's connect timeout, the first-byte timeout around the wait
//! for response headers, and the idle timeout applied to every gap inside the body.
//!
//! hyper is called directly rather than through reqwest or hyper-util's pooled client:
//! reqwest re-parsed every request's URL and ran each request through redirect and retry
//! layers tollgate does not use, and hyper-util's client spawned a task per request to
//! return its connection to a pool shared by key (docs/benchmarks.md). What tollgate needs
//! is here: keep-alive connections per worker thread, TLS with Mozilla's roots, timeouts,
//! and error text that never carries the URL. Proxy environment variables (`HTTPS_PROXY`)
//! are not read.

mod pool;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use futures::{Stream, StreamExt};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

use pool::{Pool, PoolError};

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

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("provider {provider:?}: base_url {url:?} is not a valid URL")]
    BadUrl { provider: String, url: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// HTTP clients for every provider.
pub struct Upstreams {
    clients: HashMap<String, Client>,
}

/// One provider's client, with what every request to it repeats prepared once: the URIs
/// of each endpoint (the path alone for HTTP/1, the whole URI for HTTP/2) and the
/// `Authorization` header.
///
/// Each server worker thread has its own connection pool (`pools[worker]`): a pooled
/// connection is driven by a task on the runtime that opened it, so a request only ever
/// uses connections its own thread drives, and a response never hops between threads.
struct Client {
    pools: Vec<Arc<Pool>>,
    uris: HashMap<&'static str, (Uri, Uri)>,
    authorization: Option<HeaderValue>,
}

impl Upstreams {
    /// Clients for `workers` server worker threads (at least one).
    pub fn new(config: &Config, workers: usize) -> Result<Upstreams, ClientError> {
        let mut clients = HashMap::new();
        for p in config.providers.iter().filter(|p| p.kind == ProviderKind::Openai) {
            let bad_url = || ClientError::BadUrl { provider: p.name.clone(), url: p.base_url.clone() };
            let target = parse_upstream_uri(&p.base_url).ok_or_else(bad_url)?;
            // One TLS configuration per provider; each worker's pool holds a handle to it.
            let connector = connector(Duration::from_millis(p.connect_timeout_ms))?;
            let pools = (0..workers.max(1)).map(|_| Arc::new(Pool::new(connector.clone(), target.clone()))).collect();
            let mut uris = HashMap::new();
            for e in crate::request::Endpoint::ALL {
                let path = e.upstream_path();
                let absolute = parse_upstream_uri(&format!("{}{path}", p.base_url)).ok_or_else(bad_url)?;
                let origin =
                    absolute.path_and_query().map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
                uris.insert(path, (origin, absolute));
            }
            let authorization = p.api_key.as_ref().and_then(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
                value.set_sensitive(true);
                Some(value)
            });
            clients.insert(p.name.clone(), Client { pools, uris, authorization });
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
        let (origin, absolute) =
            client.uris.get(path).ok_or_else(|| SendError::Other(format!("no upstream path {path}")))?;
        let pool = &client.pools[crate::server::worker_index() % client.pools.len()];
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        let headers = request.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
        if let Some(authorization) = &client.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        let first_byte = Duration::from_millis(provider.first_byte_timeout_ms);
        let response = match tokio::time::timeout(first_byte, pool.send(request, origin, absolute)).await {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(PoolError::Connect(e))) => {
                // The connector reports its connect timeout as a connect error.
                if caused_by_timeout(&*e) {
                    return Err(SendError::Timeout);
                }
                return Err(SendError::Connect(describe(&*e)));
            }
            Ok(Err(PoolError::Request(e))) => return Err(SendError::Other(describe(&e))),
            Ok(Ok(r)) => r,
        };
        let (parts, pooled) = response.into_parts();
        let body = pooled.map(|r| r.map_err(|e| BodyError::Broken(describe(&e))));
        Ok(UpstreamResponse { status: parts.status, headers: parts.headers, body: Box::pin(body), idle_timeout })
    }
}

/// The connector for one provider's pools: TCP with the provider's connect timeout, then
/// TLS for `https://`, offering HTTP/2 and HTTP/1.1.
fn connector(connect_timeout: Duration) -> Result<hyper_rustls::HttpsConnector<HttpConnector>, ClientError> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_nodelay(true);
    // The TLS wrapper below decides the scheme.
    tcp.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp))
}

/// The URI of an upstream endpoint: an absolute `http(s)://` URL with a host.
pub fn parse_upstream_uri(url: &str) -> Option<Uri> {
    let uri: Uri = url.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    // `Uri` takes `host:port` with a port that is not a number (and then reports none).
    let host_port = uri.authority().map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""));
    let after_host = host_port.rfind(']').map_or(host_port, |i| &host_port[i + 1..]);
    let port_ok = after_host.rfind(':').is_none_or(|i| after_host[i + 1..].parse::<u16>().is_ok());
    (scheme_ok && host_ok && port_ok).then_some(uri)
}

/// Whether a connect error was the connect timeout.
fn caused_by_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = s.source();
    }
    false
}

/// An error and its causes on one line. hyper's errors carry no URL, so no credential a
/// base URL might hold can leak into logs or answers through them.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
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
        let mut body = Joined::new(None);
        while let Some(chunk) = self.next_chunk().await {
            let chunk = chunk.map_err(ReadError::Body)?;
            if body.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge);
            }
            body.push(chunk);
        }
        Ok(body.into_bytes())
    }

    pub fn content_type(&self) -> &str {
        self.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// A body read chunk by chunk, joined. A small body usually arrives as one chunk: that
/// chunk is the body, uncopied; a second chunk starts a buffer of the expected size (twice
/// what has arrived, when the size is not known).
pub(crate) struct Joined {
    first: Option<Bytes>,
    rest: bytes::BytesMut,
    len: usize,
    expected: Option<usize>,
}

impl Joined {
    pub(crate) fn new(expected: Option<usize>) -> Joined {
        Joined { first: None, rest: bytes::BytesMut::new(), len: 0, expected }
    }

    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    self.rest.reserve(self.expected.unwrap_or(2 * self.len).max(self.len));
                    self.rest.extend_from_slice(&earlier);
                }
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn response(chunks: &[&'static str]) -> UpstreamResponse {
        let chunks: Vec<Result<Bytes, BodyError>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c.as_bytes()))).collect();
        UpstreamResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Box::pin(futures::stream::iter(chunks)),
            idle_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn read_all_joins_chunks_and_keeps_the_limit() {
        assert_eq!(response(&[]).read_all(10).await.unwrap(), "");
        assert_eq!(response(&["abc"]).read_all(10).await.unwrap(), "abc");
        assert_eq!(response(&["ab", "", "cd", "e"]).read_all(10).await.unwrap(), "abcde");
        assert_eq!(response(&["", "xy"]).read_all(10).await.unwrap(), "xy");
        assert_eq!(response(&["abcde", "fghij"]).read_all(10).await.unwrap(), "abcdefghij");
        assert!(matches!(response(&["abcde", "fghijk"]).read_all(10).await, Err(ReadError::TooLarge)));
        assert!(matches!(response(&["abcdefghijk"]).read_all(10).await, Err(ReadError::TooLarge)));
    }
}
