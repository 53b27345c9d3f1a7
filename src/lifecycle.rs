//! Start-up and shutdown: the one shutdown token and the phases it sets off.
//!
//! The process owns one [`CancellationToken`]; SIGTERM or SIGINT cancels it.
//! From that moment, following Kubernetes' pod termination:
//! 1. **not ready** — `/ready` answers 503 at once; everything else is served
//!    as before for `--shutdown-delay`, while load balancers take the pod out.
//! 2. **draining** — new streams get 503 with `Retry-After`; HTTP connections
//!    are told to close when idle; open streams are ended, spread evenly over
//!    `--drain-window`, each with a `streamline.close` notice and a `retry:` hint.
//! 3. **stopping** — listeners close, in-flight control requests finish,
//!    then backends flush and close (a PATCH still being answered needs its
//!    bus), tracked tasks are awaited.
//!
//! Everything is bounded by `--grace-period` from the signal: past it the
//! gateway stops waiting and returns. A second signal exits at once.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::sse::CloseReason;

/// The shutdown token and the phase signals derived from it, shared by
/// every long-lived task.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    shutdown: CancellationToken,
    drain: CancellationToken,
    stop: CancellationToken,
    /// Cancelled once the control plane has answered its last request
    /// (or the grace period ran out): backends close then.
    close_backends: CancellationToken,
    tracker: TaskTracker,
    /// The tasks that answer requests (the control plane), waited for
    /// before backends close.
    requests: TaskTracker,
}

impl Lifecycle {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self::with_tracker(shutdown, TaskTracker::new())
    }

    /// A lifecycle whose tasks join an existing tracker.
    pub fn with_tracker(shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        Lifecycle {
            shutdown,
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            close_backends: CancellationToken::new(),
            tracker,
            requests: TaskTracker::new(),
        }
    }

    /// True once a shutdown was requested (readiness is off from then on).
    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await
    }

    /// Phase 2: refuse new streams, close connections once idle.
    pub fn begin_drain(&self) {
        self.drain.cancel();
    }

    pub async fn draining(&self) {
        self.drain.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// A token of one connection's own, cancelled when the drain begins or
    /// when cancelled itself. A connection's task waits on this and not on
    /// the drain: the drain's token is shared by every connection, and each
    /// poll of it takes its locks, on every wake-up of every stream.
    pub fn connection_token(&self) -> CancellationToken {
        self.drain.child_token()
    }

    /// Phase 3: stop listening.
    pub fn stop(&self) {
        self.drain.cancel();
        self.stop.cancel();
    }

    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// The token phase 3 cancels, for tasks that know no `Lifecycle` (the
    /// hub's timers, `Hub::maintain`).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once backends are to close: after phase 3 began and the
    /// control plane answered its requests in flight (see [`shut_down`]).
    /// A backend's clients live until then, so no PATCH being answered
    /// finds its bus closed.
    pub async fn backends_closing(&self) {
        self.close_backends.cancelled().await
    }

    /// The phase of the shutdown sequence this process is in, as the logs
    /// and `/metrics` name it: `serving`, `not_ready`, `draining` or
    /// `stopping`.
    pub fn phase(&self) -> &'static str {
        if self.is_stopped() {
            "stopping"
        } else if self.is_draining() {
            "draining"
        } else if self.shutting_down() {
            "not_ready"
        } else {
            "serving"
        }
    }

    /// Tracks the gateway's tasks, so shutdown can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Tracks the tasks that answer requests (the control plane, also in
    /// [`Lifecycle::tracker`]): backends close once they are done.
    pub fn requests(&self) -> &TaskTracker {
        &self.requests
    }
}

/// The timings of the shutdown sequence.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub shutdown_delay: Duration,
    pub drain_window: Duration,
    pub write_timeout: Duration,
    pub grace_period: Duration,
}

/// Runs phases 1 to 3 once the shutdown token has fired, then waits for the
/// tracked tasks, never past the grace period.
pub async fn shut_down(life: &Lifecycle, hub: &Arc<Hub>, t: Timings) {
    let start = Instant::now();
    // Keep a little of the grace period for closing backends and exiting.
    let deadline = start + t.grace_period.saturating_sub(Duration::from_millis(500));
    tracing::info!(phase = "not_ready", delay = ?t.shutdown_delay, "shutdown requested; readiness is off");
    tokio::time::sleep_until((start + t.shutdown_delay).min(deadline)).await;

    let streams = hub.client_count();
    tracing::info!(phase = "draining", streams, window = ?t.drain_window, "refusing new streams; closing open ones");
    hub.stop_accepting();
    life.begin_drain();
    let window_end = (Instant::now() + t.drain_window).min(deadline);
    close_spread(hub, window_end).await;
    wait_for_no_clients(hub, (Instant::now() + t.write_timeout).min(deadline)).await;

    tracing::info!(
        phase = "stopping",
        remaining = hub.client_count(),
        drained = hub.totals().drain_closed.load(Relaxed),
        "closing listeners"
    );
    life.stop();
    // Requests in flight finish with their backends still open.
    life.requests.close();
    let _ = tokio::time::timeout_at(deadline, life.requests.wait()).await;
    life.close_backends.cancel();
    life.tracker.close();
    if tokio::time::timeout_at(deadline, life.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = life.tracker.len(),
            "grace period is over; exiting with tasks still running"
        );
    }
    tracing::info!(phase = "stopped", elapsed = ?start.elapsed(), "shutdown complete");
}

/// Ends every open stream, spread evenly until `end`, so that clients do not
/// all reconnect to the other replicas at the same moment.
async fn close_spread(hub: &Hub, end: Instant) {
    let clients = hub.clients();
    let start = Instant::now();
    let window = end.saturating_duration_since(start);
    let n = clients.len().max(1) as u32;
    for (i, client) in clients.iter().enumerate() {
        let due = start + window * i as u32 / n;
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        if client.close(CloseReason::Shutdown) {
            hub.totals().drain_closed.fetch_add(1, Relaxed);
        }
    }
}

async fn wait_for_no_clients(hub: &Hub, until: Instant) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while hub.client_count() > 0 && Instant::now() < until {
        tick.tick().await;
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process at once
/// on the second.
pub fn spawn_signal_handler(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutting down; send it again to exit at once"
        );
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}
