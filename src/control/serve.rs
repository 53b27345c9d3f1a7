//! Serving the control plane: a hyper HTTP/1.1 accept loop with its own
//! bounds, so that slow or idle clients cannot starve it (or the stream
//! plane) of sockets.
//!
//! - At most `--control-max-connections` connections at once: a slot is
//!   taken *before* `accept`, so past the cap new connections wait in the
//!   kernel's listen backlog (costing no file descriptor here) until one
//!   closes.
//! - A request's head must arrive within `--control-header-read-timeout`
//!   (hyper's timer; it also ends idle keep-alive connections), its body
//!   within `--control-body-read-timeout` of the head ([`BodyDeadline`]),
//!   else the request gets 408 and the connection is closed.
//! - An accept error (EMFILE when the process is out of descriptors) backs
//!   off instead of spinning.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::lifecycle::Lifecycle;

/// The control plane's own bounds (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct ControlOptions {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Back-off after a failed accept, doubled up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until the lifecycle stops; then asks every
/// connection to finish its request in flight and close, and waits for
/// them (the caller bounds the wait by the grace period).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ControlOptions,
    life: Lifecycle,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let builder = Arc::new(builder);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // A flood fills the cap again and again: logged once a minute at most.
    let mut full_logged: Option<tokio::time::Instant> = None;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let now = tokio::time::Instant::now();
                if full_logged.is_none_or(|at| now - at >= Duration::from_secs(60)) {
                    tracing::warn!(
                        max = options.max_connections,
                        "the control plane has --control-max-connections open; \
                         new connections wait in the backlog"
                    );
                    full_logged = Some(now);
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = life.stopped() => break,
                }
            }
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    conn
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the failed connection stays
                    // in the backlog; retrying at once would spin.
                    tracing::warn!(error = %e, retry_in = ?backoff, "control plane: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = life.stopped() => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = life.stopped() => break,
        };
        let _ = stream.set_nodelay(true);
        let (router, builder, life) = (router.clone(), builder.clone(), life.clone());
        let body_timeout = options.body_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let mut req =
                    req.map(|body| axum::body::Body::new(BodyDeadline::new(body, body_timeout)));
                // What `into_make_service_with_connect_info` would add: the
                // peer feeds `--publish-rate` and `--trusted-proxy`.
                req.extensions_mut().insert(ConnectInfo(remote));
                let router = router.clone();
                async move {
                    let res = router.oneshot(req).await;
                    Ok::<_, Infallible>(res.unwrap_or_else(|never| match never {}))
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = life.stopped() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// A request body that fails with [`BodyTimedOut`] once its deadline (set
/// when the head was read) passes: unlike an idle timeout, a client that
/// trickles bytes cannot hold its request (and its connection) open for
/// longer than that.
pub struct BodyDeadline<B> {
    body: B,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    done: bool,
}

impl<B> BodyDeadline<B> {
    pub fn new(body: B, timeout: Duration) -> Self {
        BodyDeadline {
            body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            done: false,
        }
    }
}

/// The error a [`BodyDeadline`] body fails with.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body did not arrive within {0:?} (--control-body-read-timeout); the connection is closed"
)]
pub struct BodyTimedOut(pub Duration);

impl<B> Body for BodyDeadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.done && this.deadline.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.body)
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket budget: the open-files limit must hold both planes' caps,
/// the stream plane's refusals and a reserve (Redis/Kafka connections,
/// listeners, files), or a flood of one plane makes `accept` fail on the
/// other with EMFILE. Returns the stream plane's cap, lowered (with a
/// warning) to fit `limit` when needed; `None` when it is fine as it is.
pub fn fit_stream_cap(
    limit: u64,
    stream_cap: usize,
    stream_refusals: usize,
    control_cap: usize,
) -> Option<usize> {
    /// Descriptors kept for everything that is not a client connection.
    const RESERVE: u64 = 256;
    let needed = stream_cap as u64 + stream_refusals as u64 + control_cap as u64 + RESERVE;
    if needed <= limit {
        return None;
    }
    let room = limit.saturating_sub(stream_refusals as u64 + control_cap as u64 + RESERVE);
    let lowered = usize::try_from(room).unwrap_or(usize::MAX).max(1);
    tracing::warn!(
        open_files = limit,
        max_connections = stream_cap,
        lowered_to = lowered,
        control_max_connections = control_cap,
        refusals = stream_refusals,
        reserve = RESERVE,
        "the open-files limit cannot hold --max-connections + --control-max-connections \
         + refusals + a reserve; lowering --max-connections (raise the limit: ulimit -n, LimitNOFILE)"
    );
    Some(lowered)
}

/// This process's soft limit on open files, from `/proc/self/limits`
/// (Linux); `None` where that cannot be read, or when unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_cap_is_lowered_to_fit_the_limit() {
        assert_eq!(fit_stream_cap(100_000, 25_000, 1024, 1024), None);
        assert_eq!(
            fit_stream_cap(4096, 25_000, 1024, 1024),
            Some(4096 - 1024 - 1024 - 256)
        );
        assert_eq!(fit_stream_cap(100, 25_000, 1024, 1024), Some(1));
    }

    #[test]
    fn reads_the_open_files_limit() {
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
