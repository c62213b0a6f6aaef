//! The worker threads that serve connections, nginx-style: the accept loop hands each
//! connection to one of them, and it serves it from first byte to close.
//!
//! Nothing outside `server` reaches in here: a request's code never asks which worker it
//! runs on (per-thread resources — upstream pools, metric shards, the shutdown cut — pick
//! their slot by thread themselves).

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::gateway::Gateway;

type Handover = (std::net::TcpStream, hyper_util::server::graceful::Watcher);

/// The threads that serve connections, nginx-style: each runs a single-threaded runtime
/// and serves the connections handed to it from first byte to close, forwarding upstream
/// on connections from its own pool. A request's tasks, sockets and timers never leave
/// its thread, so serving it wakes no other thread (a work-stealing runtime spent about a
/// fifth of the gateway's CPU on cross-thread wake-ups and context switches).
pub(super) struct WorkerPool {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Handover>>,
    next: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WorkerPool {
    pub(super) fn start(
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
                runtime.block_on(serve_handed_over(rx, gateway, builder, header_timeout, stop));
            })?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(WorkerPool { senders, next: Default::default(), stop, threads })
    }

    /// Gives an accepted connection to the next worker, round robin (skipping a worker
    /// whose thread has ended, so its share of connections is not dropped).
    pub(super) fn hand_over(
        &self,
        stream: TcpStream,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> std::io::Result<()> {
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
    pub(super) async fn stop(self) {
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
/// would have found too, so looking less often pays (docs/benchmarks.md, decision table). A
/// task's poll is a few microseconds, so a socket that becomes ready while the worker is busy
/// waits at most a few hundred more.
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
