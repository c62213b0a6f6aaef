//! The server: the accept loop, the worker threads ([`workers`]) and graceful shutdown.
//!
//! Layer order, outermost first: the connection limits (first byte and header read
//! timeouts, header size; HTTP/1.1) → the gateway ([`gateway`]: the metered endpoints'
//! handler, or the router for every other request) → each handler. Handlers authenticate
//! before they read a body, and answer every rejection in OpenAI's error envelope.

mod gateway;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Directory, POLL_INTERVAL};
use crate::config::Config;
use crate::ledger::{Backend, Ledger, LedgerError, RedisShared, SharedStore};
use crate::policy::budget::Clock;
use crate::replicas::Replica;
use crate::state::{AppState, Parts};
use crate::upstream::Upstreams;
pub use gateway::app;
use gateway::Gateway;
use workers::WorkerPool;

/// Largest request head (request line and headers) accepted, in bytes.
const MAX_HEADER_BYTES: usize = 64 * 1024;

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
    let upstreams = Upstreams::new(&config, workers)?;
    let stop_polling = CancellationToken::new();
    let replica = match backend.postgres() {
        Some(pg) => {
            let store = match &config.redis_url {
                Some(url) => {
                    SharedStore::Redis(RedisShared::connect(url.expose(), &config.redis_key_prefix, pg.clone())?)
                }
                None => SharedStore::Postgres(pg.clone()),
            };
            Some(Replica::start(store, config.reservation_lease_ms, stop_polling.clone()).await)
        }
        None => None,
    };
    let state = AppState::new(Parts { config: config.clone(), ledger, directory, upstreams, clock, replica });

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
    let gateway = Gateway::new(router.clone(), state.clone());
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
    if let Some(replica) = &state.replica {
        replica.close().await;
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

/// Keeps the directory (keys, teams, budgets) current: on PostgreSQL a change made through
/// any replica or the CLI is pushed (`LISTEN`) and taken at once; the poll of the directory's
/// version stays as the backstop (a lost listening connection, SQLite, which cannot push).
async fn poll_directory(state: AppState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listener = None;
    loop {
        if listener.is_none() {
            if let Some(pg) = state.ledger.backend().postgres() {
                match pg.listen_directory().await {
                    Ok(l) => listener = Some(l),
                    Err(e) => tracing::warn!(error = %e, "could not listen for directory changes; polling"),
                }
            }
        }
        let pushed = async {
            match listener.as_mut() {
                Some(l) => l.try_recv().await.map(|n| n.is_some()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            heard = pushed => {
                if !matches!(heard, Ok(true)) {
                    // The connection dropped (a notification may have been missed): listen
                    // again, and read the version now.
                    listener = None;
                }
            }
            () = stop.cancelled() => return,
        }
        if let Err(e) = state.directory.refresh(state.ledger.backend(), false).await {
            tracing::warn!(error = %e, "could not refresh keys and teams");
        }
    }
}
