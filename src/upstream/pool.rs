//! Keep-alive connections to one provider, for one server worker thread.
//!
//! hyper's connection API under a pool of its own, in place of hyper-util's general-purpose
//! client: a worker's pool is only ever used by that worker, so it needs no connection
//! keys, no waiters and no task per request to return a connection once its response has
//! been read (the general client spawned one for every request). An HTTP/1 connection goes
//! back to the pool the moment its response body has been read to the end, or dropped: if
//! the rest of the response has not arrived by then, hyper closes the connection, and a
//! closed one is never checked out. An HTTP/2 connection, when TLS negotiates it, is shared
//! by every request on the worker.
//!
//! A request that could not be written on a reused connection (the upstream closed it
//! while it sat idle) is sent again on another one, as hyper-util's client does; one that
//! was written is never sent twice.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use futures::{FutureExt, Stream};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

type Body = Full<Bytes>;

/// A connection idle longer than this is closed instead of reused (hyper-util's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1 connections kept per pool; more are closed as their responses end.
const MAX_IDLE: usize = 1024;

/// The connections one worker keeps to one provider.
pub(super) struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where to connect: the provider's base URL.
    target: Uri,
    /// The `Host` header of every HTTP/1 request.
    host: HeaderValue,
    /// Idle HTTP/1 connections, most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, when the provider negotiated HTTP/2.
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum PoolError {
    /// No connection could be opened.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before response headers arrived.
    Request(hyper::Error),
}

impl Pool {
    /// A pool connecting to `target` (an absolute `http(s)://` URI) through `connector`.
    pub(super) fn new(connector: HttpsConnector<HttpConnector>, target: Uri) -> Pool {
        let host = target.host().unwrap_or_default();
        let host = match target.port_u16() {
            Some(port) if Some(port) != default_port(&target) => format!("{host}:{port}"),
            _ => host.to_string(),
        };
        let host = HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Pool { connector, target, host, idle: Mutex::new(Vec::new()), h2: Mutex::new(None) }
    }

    /// Sends `request` on a pooled connection, or a new one, and waits for the response
    /// headers. `origin` is the request's path (HTTP/1 sends it with a `Host` header) and
    /// `absolute` its full URI (HTTP/2 sends scheme and authority as pseudo-headers).
    pub(super) async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
        origin: &Uri,
        absolute: &Uri,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let (sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: the connect and handshake state (~6 KB) would otherwise sit inline
                // in every request's future, though most requests reuse a connection.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender {
                Sender::H1(mut sender) => {
                    *request.uri_mut() = origin.clone();
                    request.headers_mut().insert(header::HOST, self.host.clone());
                    if let Err(e) = sender.ready().await {
                        if reused {
                            continue;
                        }
                        return Err(PoolError::Request(e));
                    }
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let back = Some((self.clone(), sender));
                            return Ok(response.map(|body| PooledBody { body, back }));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => request = unsent,
                            _ => return Err(PoolError::Request(e.into_error())),
                        },
                    }
                }
                Sender::H2(mut sender) => {
                    *request.uri_mut() = absolute.clone();
                    request.headers_mut().remove(header::HOST);
                    let sent = match sender.ready().await {
                        Ok(()) => sender.try_send_request(request).await,
                        Err(_) if reused => {
                            self.forget_h2();
                            continue;
                        }
                        Err(e) => return Err(PoolError::Request(e)),
                    };
                    match sent {
                        Ok(response) => return Ok(response.map(|body| PooledBody { body, back: None })),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => {
                                self.forget_h2();
                                request = unsent;
                            }
                            _ => return Err(PoolError::Request(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// A connection that is open and not too long idle: the shared HTTP/2 one, else the
    /// most recently used idle HTTP/1 one.
    fn checkout(&self) -> Option<Sender> {
        if let Some(h2) = lock(&self.h2).as_ref().filter(|h2| !h2.is_closed()) {
            return Some(Sender::H2(h2.clone()));
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && now.duration_since(conn.since) < IDLE_TIMEOUT {
                return Some(Sender::H1(conn.sender));
            }
        }
        None
    }

    /// Returns an HTTP/1 connection whose response body has been read to the end or
    /// dropped (hyper closes it if the response had not all arrived: see [`PooledBody`]).
    fn put(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        // The least recently used connection is the one to expire: checked here, one per
        // return, so a pool shrinks after a burst without a timer of its own.
        if idle.first().is_some_and(|c| c.sender.is_closed() || now.duration_since(c.since) >= IDLE_TIMEOUT) {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    /// Stops sharing the HTTP/2 connection after a request found it unusable: the next
    /// request opens another. (Requests still running on it finish there.)
    fn forget_h2(&self) {
        *lock(&self.h2) = None;
    }

    /// Opens a connection (TLS for `https://`, HTTP/2 when the provider offers it) and
    /// starts the task that drives it on this worker.
    async fn connect(&self) -> Result<Sender, PoolError> {
        let io = tower::ServiceExt::oneshot(self.connector.clone(), self.target.clone())
            .await
            .map_err(PoolError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(PoolError::Request)?;
            tokio::spawn(conn.map(log_closed));
            *lock(&self.h2) = Some(sender.clone());
            return Ok(Sender::H2(sender));
        }
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(PoolError::Request)?;
        // Not an `async move` block around `conn.await`: that holds the connection twice
        // (once captured, once awaited; rust-lang/rust#62958), ~1.7 KB more per connection.
        tokio::spawn(conn.map(log_closed));
        Ok(Sender::H1(sender))
    }

    /// Idle HTTP/1 connections held (for tests).
    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// How a connection's task ends.
fn log_closed(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "upstream connection closed");
    }
}

/// A response body that gives its HTTP/1 connection back to the pool once read to the end,
/// or when dropped.
pub(super) struct PooledBody {
    body: Incoming,
    back: Option<(Arc<Pool>, http1::SendRequest<Body>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.put(sender);
        }
    }
}

/// A body dropped before its end (the proxy stops reading a stream at `[DONE]`) still gives
/// its connection back: hyper then reads what is left of the response if it has arrived and
/// keeps the connection, or closes it — and a closed connection is never checked out.
impl Drop for PooledBody {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Stream for PooledBody {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    // The last chunk of a body of known length: the connection can take
                    // the next request now, not one poll later.
                    if this.body.is_end_stream() {
                        this.give_back();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Some(Err(e)) => {
                    this.back = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.give_back();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    }
}

/// A pool's lock is only ever taken by its own worker thread, briefly, and never across
/// an await; a panic while it was held leaves nothing half-changed.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// How the test upstream ends each exchange.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepAlive,
        /// Answers with `Connection: close` and closes.
        SayClose,
        /// Closes without saying so, after the answer: the client learns only from the socket.
        Hang,
        /// Sends half of the body and then nothing more, keeping the connection open.
        Half,
    }

    /// An HTTP/1.1 upstream on an ephemeral port answering every request with a fixed JSON
    /// body; counts the connections it accepted and the requests it answered.
    async fn upstream(then: Then, body: &'static str) -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (conns.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: headers, then Content-Length bytes.
                        let mut chunk = [0u8; 4096];
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        assert!(head.starts_with("post /v1/chat/completions http/1.1\r\n"), "{head}");
                        assert!(head.contains(&format!("\r\nhost: {}\r\n", addr)), "{head}");
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + len {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + len);
                        r.fetch_add(1, Ordering::SeqCst);
                        let close = if then == Then::SayClose { "connection: close\r\n" } else { "" };
                        let sent = if then == Then::Half { &body[..body.len() / 2] } else { body };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{close}\r\n{sent}",
                            body.len()
                        );
                        if then == Then::Half {
                            let _ = socket.write_all(answer.as_bytes()).await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        if socket.write_all(answer.as_bytes()).await.is_err() || then != Then::KeepAlive {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/v1").parse().unwrap(), conns, requests)
    }

    fn pool(target: &Uri) -> Arc<Pool> {
        Arc::new(Pool::new(super::super::connector(Duration::from_secs(5)).unwrap(), target.clone()))
    }

    fn request() -> Request<Body> {
        let mut r = Request::new(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")));
        *r.method_mut() = axum::http::Method::POST;
        r
    }

    /// Sends a chat/completions request through `pool` to the upstream at `target`.
    async fn send(pool: &Arc<Pool>, target: &Uri) -> Result<Response<PooledBody>, PoolError> {
        let absolute: Uri = format!("{target}/chat/completions").parse().unwrap();
        pool.send(request(), &Uri::from_static("/v1/chat/completions"), &absolute).await
    }

    async fn exchange(pool: &Arc<Pool>, target: &Uri) -> Result<String, PoolError> {
        let mut body = send(pool, target).await?.into_body();
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        Ok(text)
    }

    #[tokio::test]
    async fn requests_in_a_row_share_one_connection_and_it_waits_in_the_pool_between_them() {
        let (target, conns, requests) = upstream(Then::KeepAlive, "{\"ok\":1}").await;
        let pool = pool(&target);
        for _ in 0..5 {
            assert_eq!(exchange(&pool, &target).await.unwrap(), "{\"ok\":1}");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!((conns.load(Ordering::SeqCst), requests.load(Ordering::SeqCst)), (1, 5));
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_of_them_are_pooled_after() {
        let (target, conns, _) = upstream(Then::KeepAlive, "{}").await;
        let pool = pool(&target);
        let answers = futures::future::join_all((0..4).map(|_| exchange(&pool, &target))).await;
        assert!(answers.iter().all(|a| a.as_deref().ok() == Some("{}")));
        assert_eq!((conns.load(Ordering::SeqCst), pool.idle_count()), (4, 4));
        // The next ones reuse them.
        for _ in 0..4 {
            exchange(&pool, &target).await.unwrap();
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_after_it_all_arrived_leaves_its_connection_reusable() {
        let (target, conns, _) = upstream(Then::KeepAlive, "{\"long\":\"answer\"}").await;
        let pool = pool(&target);
        drop(send(&pool, &target).await.unwrap());
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(exchange(&pool, &target).await.unwrap(), "{\"long\":\"answer\"}");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_the_rest_arrived_takes_its_connection_with_it() {
        let (target, conns, requests) = upstream(Then::Half, "{\"long\":\"answer\"}").await;
        let pool = pool(&target);
        drop(send(&pool, &target).await.unwrap());
        // The next request does not wait on it: it goes out on a new connection (and gets
        // half an answer too, which is all this upstream sends).
        let sent = tokio::time::timeout(Duration::from_secs(5), send(&pool, &target)).await;
        assert!(matches!(sent, Ok(Ok(_))));
        assert_eq!((conns.load(Ordering::SeqCst), requests.load(Ordering::SeqCst)), (2, 2));
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_reused() {
        for then in [Then::SayClose, Then::Hang] {
            let (target, conns, requests) = upstream(then, "{}").await;
            let pool = pool(&target);
            for _ in 0..3 {
                assert_eq!(exchange(&pool, &target).await.unwrap(), "{}");
                // Let the connection task see the close.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!((conns.load(Ordering::SeqCst), requests.load(Ordering::SeqCst)), (3, 3));
        }
    }

    #[tokio::test]
    async fn a_request_on_a_connection_closed_while_idle_goes_out_on_a_new_one() {
        // The upstream closes right after answering, and the request after it is sent at
        // once: it may find the closed connection still pooled (the retry path) or not.
        let (target, conns, requests) = upstream(Then::Hang, "{}").await;
        let pool = pool(&target);
        for _ in 0..20 {
            assert_eq!(exchange(&pool, &target).await.unwrap(), "{}");
        }
        assert_eq!((conns.load(Ordering::SeqCst), requests.load(Ordering::SeqCst)), (20, 20));
    }

    #[tokio::test]
    async fn no_upstream_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target: Uri = format!("http://{}/v1", listener.local_addr().unwrap()).parse().unwrap();
        drop(listener);
        let pool = pool(&target);
        assert!(matches!(exchange(&pool, &target).await, Err(PoolError::Connect(_))));
    }

    #[test]
    fn the_host_header_leaves_out_the_default_port() {
        let host = |url: &str| pool(&url.parse().unwrap()).host.to_str().unwrap().to_string();
        assert_eq!(host("http://up.example/v1"), "up.example");
        assert_eq!(host("http://up.example:80/v1"), "up.example");
        assert_eq!(host("https://up.example:443"), "up.example");
        assert_eq!(host("https://up.example:8443/v1"), "up.example:8443");
        assert_eq!(host("http://[::1]:9000/v1"), "[::1]:9000");
    }
}
