//! Keeping a request's work alive past its client, and stopping it at shutdown's cut.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::{TaskTracker, TaskTrackerToken};

/// A request's forwarding (or a stream's pump), polled by the handler (or the response
/// body) itself while the client stays, and finished by a task the server tracks if it is
/// dropped first (the client hung up; shutdown's grace period ran out). Until then a tracker
/// token stands in for that task, so shutdown waits for the work either way.
///
/// It replaces a task spawned for every request and awaited by the handler: the spawn, a
/// second task polled, and the wake-up of the handler when it finished. Boxed, so handing
/// it to a task moves a pointer, not the few kilobytes of the forwarding state machine (and
/// a boxed future stays where it is, pinned, when it changes hands).
pub(super) struct Detachable<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    run: Option<std::pin::Pin<Box<F>>>,
    tracker: TaskTracker,
    _token: TaskTrackerToken,
}

/// The forwarding panicked (its state is dropped, not run on).
pub(super) struct Panicked;

impl<F: Future + Send + 'static> Detachable<F>
where
    F::Output: Send + 'static,
{
    pub(super) fn new(tracker: &TaskTracker, run: F) -> Self {
        Detachable { run: Some(Box::pin(run)), tracker: tracker.clone(), _token: tracker.token() }
    }
}

impl<F: Future + Send + 'static> Future for Detachable<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        // Polled again after it finished: never (hyper drops a finished handler; the relay
        // forgets a finished pump).
        let Some(run) = self.run.as_mut() else { return Poll::Ready(Err(Panicked)) };
        // A panic is the handler's 500, as a panicking task's was, not a dropped connection.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                self.run = None;
                Poll::Ready(Ok(output))
            }
            Err(_) => {
                self.run = None;
                Poll::Ready(Err(Panicked))
            }
        }
    }
}

impl<F: Future + Send + 'static> Drop for Detachable<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(run) = self.run.take() else { return };
        // Outside a runtime (a worker's runtime being torn down drops its tasks with none
        // current) there is nowhere to run it; the journal entry then marks the request
        // interrupted at the next start, as for a process that died.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(run);
        }
    }
}

/// `fut`, unless shutdown's grace period ends first (`None`: `fut` is dropped, and with it
/// the upstream request it was waiting on). `cut` is the worker's token, taken once per
/// request or stream (`AppState::cut_token`).
pub(super) async fn unless_cut<F: Future>(cut: &CancellationToken, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = cut.cancelled() => None,
    }
}
