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

mod mock;
mod pool;
mod response;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, Method, Request, Uri};
use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use futures::StreamExt;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

use pool::{Pool, PoolError};
pub use response::{BodyError, BodyStream, Joined, ReadError, SendError, UpstreamResponse};

use crate::config::{Config, Provider, ProviderKind};

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
    providers: HashMap<String, Arc<Provider>>,
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
            let target = crate::config::parse_upstream_uri(&p.base_url).ok_or_else(bad_url)?;
            // One TLS configuration per provider; each worker's pool holds a handle to it.
            let connector = connector(Duration::from_millis(p.connect_timeout_ms))?;
            let pools = (0..workers.max(1)).map(|_| Arc::new(Pool::new(connector.clone(), target.clone()))).collect();
            let mut uris = HashMap::new();
            for e in crate::policy::request::Endpoint::ALL {
                let path = e.upstream_path();
                let absolute =
                    crate::config::parse_upstream_uri(&format!("{}{path}", p.base_url)).ok_or_else(bad_url)?;
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
        let providers = config.providers.iter().map(|p| (p.name.clone(), p.clone())).collect();
        Ok(Upstreams { providers, clients })
    }

    /// POSTs `body` to the provider named `provider`'s `path` (e.g. `/chat/completions`) and
    /// waits for headers.
    pub async fn send(&self, provider: &str, path: &str, body: Bytes) -> Result<UpstreamResponse, SendError> {
        let provider = self.providers.get(provider).ok_or_else(|| SendError::Other("no such provider".into()))?;
        let idle_timeout = Duration::from_millis(provider.idle_timeout_ms);
        if provider.kind == ProviderKind::Mock {
            return mock::respond(path, body, idle_timeout).await;
        }
        let client = self.clients.get(&provider.name).ok_or_else(|| SendError::Other("no client".into()))?;
        let (origin, absolute) =
            client.uris.get(path).ok_or_else(|| SendError::Other(format!("no upstream path {path}")))?;
        let pool = &client.pools[thread_slot() % client.pools.len()];
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

/// This thread's pool slot, taken on its first upstream call: the server's worker threads
/// are the only callers, so each takes a pool of its own and a request only ever uses
/// connections its own thread drives.
fn thread_slot() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    SLOT.with(|slot| *slot)
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
