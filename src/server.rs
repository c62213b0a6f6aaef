//! The server: shared state, the router, the accept loop and graceful shutdown.
//!
//! Layer order, outermost first: the connection limits (first byte and header read
//! timeouts, header size; HTTP/1.1) → the metered endpoints' handler, or the router for
//! every other request → each handler. Handlers authenticate and parse themselves so every
//! rejection, including an oversized body, is answered in OpenAI's error envelope.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::auth::{Directory, POLL_INTERVAL};
use crate::budget::{BudgetBook, Clock, RateLimiter};
use crate::config::Config;
use crate::error::ApiError;
use crate::ledger::{Backend, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Cheap-to-clone handles shared by every request.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Arc<Config>,
    pub ledger: Ledger,
    pub directory: Directory,
    pub budgets: BudgetBook,
    pub rates: RateLimiter,
    pub upstreams: Upstreams,
    pub metrics: Metrics,
    pub clock: Clock,
    /// Forwarding and stream tasks; shutdown waits for them.
    pub tracker: TaskTracker,
    /// Cancelled when shutdown's grace period runs out: forwarding and stream pumps stop
    /// reading their upstreams, settle and record what they have, and answer a 503 or cut
    /// their stream off (see `api::proxy`); connections close once answered, and the rest
    /// when the workers stop. Workers wait on child tokens of their own (`cut_token`).
    pub cut: CancellationToken,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("http client: {0}")]
    Http(#[from] crate::upstream::ClientError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The router, with every route of SPEC §4, §3, §6 and §7.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    // SDKs configured with a base URL without `/v1` call these paths directly. Routes,
    // not a nested router: nesting rebuilds every request's URI to strip the prefix.
    for prefix in ["/v1", ""] {
        router = router
            .route(&format!("{prefix}/chat/completions"), post(api::proxy::chat_completions))
            .route(&format!("{prefix}/completions"), post(api::proxy::completions))
            .route(&format!("{prefix}/embeddings"), post(api::proxy::embeddings))
            .route(&format!("{prefix}/models"), get(api::proxy::list_models));
    }
    router
        .merge(api::admin::router())
        .merge(api::spend::router())
        .merge(api::health::router())
        .fallback(|| async { ApiError::NotFound("Unknown path. tollgate serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /admin, /spend and /health.".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// Each connection's service: a request to a metered endpoint (`POST` to chat/completions,
/// completions or embeddings, with or without `/v1`) goes straight to its handler; every
/// other request goes through the router, which has the same routes. The direct path skips
/// the router's per-request work (a boxed route service cloned, its futures, extensions),
/// several percent of the CPU a proxied request costs.
#[derive(Clone)]
struct Gateway {
    router: Router,
    state: AppState,
}

type Answer = Pin<Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Gateway {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Answer;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Answer {
        let req = req.map(axum::body::Body::new);
        match api::proxy::metered_endpoint(req.method(), req.uri().path()) {
            Some(endpoint) => {
                let state = self.state.clone();
                Box::pin(async move { Ok(api::proxy::proxy(state, endpoint, req).await) })
            }
            None => Box::pin(tower::ServiceExt::oneshot(self.router.clone(), req)),
        }
    }
}

/// Longest shutdown waits, once the grace period is over and in-flight requests are cut,
/// for them to settle (estimating usage from the text they saw takes milliseconds).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Called with the bound address once the server is ready to serve.
pub type OnReady = Box<dyn FnOnce(std::net::SocketAddr) + Send>;

/// Options a test or the CLI sets beyond the config.
#[derive(Default)]
pub struct RunOptions {
    /// The clock budgets read (tests pin it).
    pub clock: Clock,
    pub on_ready: Option<OnReady>,
}

/// Opens the ledger and serves on `listener` until `shutdown` resolves, then drains:
/// stops accepting, lets in-flight requests finish for up to `shutdown_grace_ms`, cuts
/// those still running (their connections closed, their upstream requests dropped, each
/// settled and recorded on what it had), flushes the ledger and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: RunOptions,
) -> Result<(), ServeError> {
    let RunOptions { clock, on_ready } = options;
    let config = Arc::new(config);
    let backend =
        Backend::connect_with(&config.database_url, Duration::from_millis(config.sqlite_busy_timeout_ms)).await?;
    let (journal, (replayed, torn, interrupted)) =
        crate::ledger::recover(&backend, &config.journal_dir, config.journal_segment_bytes).await?;
    if replayed > 0 || torn > 0 {
        tracing::info!(replayed, torn, "records left in the journal by the last run are in the ledger");
    }
    if interrupted > 0 {
        tracing::warn!(interrupted, "requests in flight when the server last stopped are marked interrupted");
    }
    let ledger_tasks = TaskTracker::new();
    let ledger_stop = CancellationToken::new();
    let ledger = Ledger::start(
        backend.clone(),
        journal,
        config.ledger_queue_capacity,
        Duration::from_millis(config.ledger_ack_timeout_ms),
        &ledger_tasks,
        ledger_stop.clone(),
    );
    let directory = Directory::default();
    directory.refresh(&backend, true).await?;
    let workers = config.workers;
    let state = AppState(Arc::new(Inner {
        config: config.clone(),
        ledger,
        directory,
        budgets: BudgetBook::default(),
        rates: RateLimiter::default(),
        upstreams: Upstreams::new(&config, workers)?,
        metrics: Metrics::default(),
        clock,
        tracker: TaskTracker::new(),
        cut: CancellationToken::new(),
    }));

    let stop_polling = CancellationToken::new();
    let poller = tokio::spawn(poll_directory(state.clone(), stop_polling.clone()));

    let router = app(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1.1 only: what OpenAI's SDKs speak. Headers must fit in 64 KiB (larger: 431),
    // and arrive within header_read_timeout_ms, on a new connection as between requests.
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let gateway = Gateway { router: router.clone(), state: state.clone() };
    let pool = WorkerPool::start(workers, gateway, builder, header_timeout)?;
    tokio::pin!(shutdown);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, workers, "tollgate listening");
    if let Some(ready) = on_ready {
        ready(addr);
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if let Err(e) = pool.hand_over(stream, graceful.watcher()) {
                    tracing::warn!(error = %e, "could not hand a connection to a worker");
                }
            }
            () = &mut shutdown => break,
        }
    }
    // Stop accepting at once: the listener closes here.
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    // The grace period covers the connections still open and the forwarding that clients
    // which hung up left behind (tracked tasks, e.g. a stream drained for its usage).
    state.tracker.close();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let mut connections = std::pin::pin!(graceful.shutdown());
    let mut closed = false;
    let drained = tokio::time::timeout(grace, async {
        (&mut connections).await;
        closed = true;
        state.tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("grace period over; cutting the requests still in flight");
        // Every request still in flight stops waiting on its upstream, settles on what it
        // has and journals its record (no I/O: milliseconds), and answers a 503 or ends its
        // stream cut off; its connection then closes. The bound is a backstop, not a wait:
        // a request not settled by then keeps its journal entry, which the next start marks
        // interrupted, and the connections still open (a client that reads nothing) close
        // when the workers stop.
        state.cut.cancel();
        let settled = tokio::time::timeout(SETTLE_TIMEOUT, async {
            if !closed {
                connections.await;
            }
            state.tracker.wait().await;
        })
        .await;
        if settled.is_err() {
            tracing::error!("some requests were not settled in time; the next start marks them interrupted");
        }
    }
    stop_polling.cancel();
    let _ = poller.await;
    drop(router);
    drop(state);
    ledger_stop.cancel();
    ledger_tasks.close();
    ledger_tasks.wait().await;
    backend.close().await;
    // Last: database connections opened by a request live on its worker's runtime.
    pool.stop().await;
    tracing::info!("ledger flushed; bye");
    Ok(())
}

async fn poll_directory(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = state.directory.refresh(state.ledger.backend(), false).await {
                    tracing::warn!(error = %e, "could not refresh keys and teams");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

thread_local! {
    /// The index of the server worker this thread is, 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The server worker running the current task (0 outside the workers).
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// Marks this thread as server worker `index`.
pub(crate) fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

thread_local! {
    /// On a server worker, its own child of `AppState::cut`.
    static WORKER_CUT: std::cell::RefCell<Option<Arc<CancellationToken>>> = const { std::cell::RefCell::new(None) };
}

/// Shutdown's cut (`AppState::cut`) as the current thread should wait on it: on a server
/// worker, a child token of the worker's own. A token's waiters sit behind a lock of its
/// own, and every request waits on the cut: on one token shared by all workers, that lock
/// would bounce between cores on every request.
pub(crate) fn cut_token(state: &AppState) -> Arc<CancellationToken> {
    WORKER_CUT.with(|cut| cut.borrow().clone()).unwrap_or_else(|| Arc::new(state.cut.clone()))
}

type Handover = (std::net::TcpStream, hyper_util::server::graceful::Watcher);

/// The threads that serve connections, nginx-style: each runs a single-threaded runtime
/// and serves the connections handed to it from first byte to close, forwarding upstream
/// on connections from its own pool. A request's tasks, sockets and timers never leave
/// its thread, so serving it wakes no other thread (a work-stealing runtime spent about a
/// fifth of the gateway's CPU on cross-thread wake-ups and context switches).
struct WorkerPool {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Handover>>,
    next: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerPool {
    fn start(
        workers: usize,
        gateway: Gateway,
        builder: Arc<http1::Builder>,
        header_timeout: Duration,
    ) -> std::io::Result<WorkerPool> {
        let stop = CancellationToken::new();
        let (mut senders, mut threads) = (Vec::new(), Vec::new());
        for index in 0..workers {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let runtime =
                tokio::runtime::Builder::new_current_thread().event_interval(EVENT_INTERVAL).enable_all().build()?;
            let (gateway, builder, stop) = (gateway.clone(), builder.clone(), stop.clone());
            let thread = std::thread::Builder::new().name(format!("tollgate-worker-{index}")).spawn(move || {
                set_worker_index(index);
                runtime.block_on(serve_handed_over(rx, gateway, builder, header_timeout, stop));
            })?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(WorkerPool { senders, next: Default::default(), stop, threads })
    }

    /// Gives an accepted connection to the next worker, round robin (skipping a worker
    /// whose thread has ended, so its share of connections is not dropped).
    fn hand_over(&self, stream: TcpStream, watcher: hyper_util::server::graceful::Watcher) -> std::io::Result<()> {
        let mut conn = (stream.into_std()?, watcher);
        let first = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..self.senders.len() {
            match self.senders[(first + i) % self.senders.len()].send(conn) {
                Ok(()) => return Ok(()),
                Err(returned) => conn = returned.0,
            }
        }
        Err(std::io::Error::other("every worker has stopped"))
    }

    /// Stops every worker (their connections are closed) and waits for the threads.
    async fn stop(self) {
        self.stop.cancel();
        drop(self.senders);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Tasks a worker polls between two looks at its sockets and timers while it has tasks
/// ready (tokio's default is 61; a worker with nothing ready waits on its sockets at once).
/// Under load each look is a non-blocking `epoll_wait` that often finds only what the next
/// would have found too. `bench/ab.sh` at c=64, four runs against 61: non-streamed
/// requests/s +3.3%, +2.4%, −0.8% and +2.3%, streamed +4.1% and +1.5%, CPU a request −2.6%
/// in the last; p99 lower or equal in each. 7 and 17 were worse than 61, 255 and 1,023 no
/// better than 127; c=1 and the first streamed byte are unchanged (the queue is empty
/// there). A task's poll is a few microseconds, so a socket that becomes ready while the
/// worker is busy waits at most a few hundred more.
const EVENT_INTERVAL: u32 = 127;

/// How far ahead a worker always has a timer set (see [`keep_a_timer_near`]).
const TIMER_HORIZON: Duration = Duration::from_millis(500);

/// Keeps a timer due within [`TIMER_HORIZON`] on this worker's runtime, at the cost of two
/// wake-ups a second.
///
/// tokio's timer wakes its own I/O driver (an `eventfd` write, then an extra `epoll_wait`)
/// whenever a timer is set that is due before the earliest one known when the thread last
/// went to sleep. A request sets several (hyper's header timeout, the body, first-byte and
/// idle timeouts), so on a quiet worker — with no other timer pending — nearly every
/// request paid two extra system calls. With a timer always due sooner than any of those
/// timeouts, setting them never wakes the driver.
async fn keep_a_timer_near(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TIMER_HORIZON / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A worker's loop: serves each connection handed over on its own task until `stop`.
async fn serve_handed_over(
    mut handed: tokio::sync::mpsc::UnboundedReceiver<Handover>,
    gateway: Gateway,
    builder: Arc<http1::Builder>,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(keep_a_timer_near(stop.clone()));
    let cut = Arc::new(gateway.state.cut.child_token());
    WORKER_CUT.with(|worker| *worker.borrow_mut() = Some(cut));
    loop {
        let (stream, watcher) = tokio::select! {
            next = handed.recv() => match next {
                Some(conn) => conn,
                // No more connections: keep serving those open until told to stop.
                None => return stop.cancelled().await,
            },
            () = stop.cancelled() => return,
        };
        let Ok(stream) = TcpStream::from_std(stream) else { continue };
        let service = gateway.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            // hyper's header timer starts with the first byte: a connection that
            // sends nothing at all is closed after the same timeout.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
        });
    }
}
