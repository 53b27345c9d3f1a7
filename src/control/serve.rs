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
/// connection to finish its request in flight and close (one that has not
/// had a request yet answers its first, see [`Conn::serve`]), and waits for
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
        let conn = Conn {
            router: router.clone(),
            builder: builder.clone(),
            life: life.clone(),
            body_timeout: options.body_read_timeout,
        };
        connections.spawn(conn.serve(stream, remote, permit));
    }
    // Connections the kernel completed before the listener closes carry a
    // request already sent (a proxy connects to send one at once): closing
    // the listener would reset them, and the proxy answer 502, the outcome
    // unknown. They are served like the others; the kernel is asked
    // directly, as the reactor may not have seen them yet.
    if let Ok(pending) = listener.into_std() {
        while let Ok((stream, remote)) = pending.accept() {
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream));
            let (Ok(stream), Ok(permit)) = (stream, slots.clone().try_acquire_owned()) else {
                continue;
            };
            let conn = Conn {
                router: router.clone(),
                builder: builder.clone(),
                life: life.clone(),
                body_timeout: options.body_read_timeout,
            };
            connections.spawn(conn.serve(stream, remote, permit));
        }
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What a control connection needs, cloned per connection.
struct Conn {
    router: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
    life: Lifecycle,
    body_timeout: Duration,
}

impl Conn {
    /// Serves one connection. When the lifecycle stops, a connection that
    /// answered a request is closed once idle (`graceful_shutdown`); one
    /// that has not answered any yet gets its first request answered (with
    /// `Connection: close`), within `--control-header-read-timeout`: it
    /// was opened to send that request, and may have sent it already.
    async fn serve(
        self,
        stream: tokio::net::TcpStream,
        remote: std::net::SocketAddr,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        let Conn {
            router,
            builder,
            life,
            body_timeout,
        } = self;
        // Shared by the connection's requests: a `Lifecycle` clone takes
        // and releases a lock per token it holds, both control threads
        // contending for them, where an `Arc` clone is one atomic add.
        let conn_life = Arc::new(life.clone());
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asked_here = asked.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            asked_here.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut req =
                req.map(|body| axum::body::Body::new(BodyDeadline::new(body, body_timeout)));
            // What `into_make_service_with_connect_info` would add: the
            // peer feeds `--publish-rate` and `--trusted-proxy`.
            req.extensions_mut().insert(ConnectInfo(remote));
            let (router, life) = (router.clone(), Arc::clone(&conn_life));
            async move {
                let mut res = router
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|never| match never {});
                // From the shutdown request on, close after answering,
                // so a proxy's kept-alive connections to this replica
                // are gone before its listener closes. Otherwise a
                // proxy may send a PATCH on an idle connection just as
                // the replica closes it, and must answer 502 without
                // knowing whether it was published.
                if life.shutting_down() {
                    res.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(res)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = life.stopped() => {}
        }
        // hyper counts a connection whose first request has not been
        // parsed yet as idle, and would close it under that request.
        if asked.load(std::sync::atomic::Ordering::Relaxed) {
            conn.as_mut().graceful_shutdown();
        }
        let _ = conn.await;
    }
}

/// A request body that fails with [`BodyTimedOut`] once its deadline (set
/// when the head was read) passes: unlike an idle timeout, a client that
/// trickles bytes cannot hold its request (and its connection) open for
/// longer than that.
///
/// The timer is armed only when the body has to be waited for: most bodies
/// arrive with their head, and a timer per request is a timer-wheel insert
/// and removal on the `PATCH` path. Once armed, it is checked before the
/// body on every poll, as the deadline it enforces is the one of the head.
pub struct BodyDeadline<B> {
    body: B,
    until: tokio::time::Instant,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    done: bool,
}

impl<B> BodyDeadline<B> {
    pub fn new(body: B, timeout: Duration) -> Self {
        BodyDeadline {
            body,
            until: tokio::time::Instant::now() + timeout,
            deadline: None,
            timeout,
            done: false,
        }
    }

    fn timed_out(&mut self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        self.done = true;
        Poll::Ready(Some(Err(Box::new(BodyTimedOut(self.timeout)))))
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
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return this.timed_out();
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if this.deadline.is_none() {
                    let mut deadline = Box::pin(tokio::time::sleep_until(this.until));
                    let passed = deadline.as_mut().poll(cx).is_ready();
                    this.deadline = Some(deadline);
                    if passed {
                        return this.timed_out();
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The caps of both planes, fitted to the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBudget {
    pub stream: usize,
    pub stream_refusals: usize,
    pub control: usize,
}

/// Descriptors kept for everything that is not a client connection
/// (listeners, Redis and Kafka connections, files), at most an eighth of
/// the limit.
const RESERVE: u64 = 256;

impl SocketBudget {
    /// The budget: the open-files `limit` must hold both planes' caps, the
    /// stream plane's refusals and a reserve, or a flood of one plane makes
    /// `accept` fail on the other with EMFILE. When they do not fit, the
    /// control plane and the refusals keep at most an eighth each of what
    /// is left after the reserve and the stream plane gets the rest (a
    /// warning says so); `None` when everything fits as configured.
    pub fn fit(self, limit: u64) -> Option<SocketBudget> {
        let reserve = RESERVE.min(limit / 8);
        let avail = limit.saturating_sub(reserve);
        let wanted = self.stream as u64 + self.stream_refusals as u64 + self.control as u64;
        if wanted <= avail {
            return None;
        }
        let eighth = usize::try_from(avail / 8).unwrap_or(usize::MAX).max(1);
        let control = self.control.min(eighth);
        let stream_refusals = self.stream_refusals.min(eighth);
        let rest = avail.saturating_sub((control + stream_refusals) as u64);
        let stream = self
            .stream
            .min(usize::try_from(rest).unwrap_or(usize::MAX))
            .max(1);
        let fitted = SocketBudget {
            stream,
            stream_refusals,
            control,
        };
        tracing::warn!(
            open_files = limit,
            reserve,
            max_connections = self.stream,
            control_max_connections = self.control,
            lowered_to = ?fitted,
            "the open-files limit cannot hold --max-connections + --control-max-connections \
             + refusals + a reserve; lowered (raise the limit: ulimit -n, LimitNOFILE)"
        );
        Some(fitted)
    }
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
    fn the_caps_are_lowered_to_fit_the_limit() {
        let wanted = SocketBudget {
            stream: 25_000,
            stream_refusals: 1024,
            control: 1024,
        };
        assert_eq!(wanted.fit(100_000), None);
        // 20,000 (this machine's hard limit): the stream plane gives way.
        assert_eq!(
            wanted.fit(20_000),
            Some(SocketBudget {
                stream: 20_000 - 256 - 2048,
                ..wanted
            })
        );
        // 1,024 (a common default): every part keeps a share.
        let small = wanted.fit(1024).unwrap();
        assert_eq!((small.control, small.stream_refusals), (112, 112));
        assert_eq!(small.stream, 1024 - 128 - 224);
        let tiny = wanted.fit(8).unwrap();
        assert!(tiny.stream >= 1 && tiny.control >= 1 && tiny.stream_refusals >= 1);
    }

    #[test]
    fn reads_the_open_files_limit() {
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
