//! The stream plane: a raw hyper 1.x server (HTTP/1.1 and h2c, told apart
//! per connection by [`sniff`]) that serves only SSE streams.
//!
//! Each accepted connection runs on one tracked task. hyper reads and
//! checks every request and writes every answer but a stream's: an
//! HTTP/1.1 stream is handed over to [`http1::Pump`], which writes it on the
//! socket hyper gives back (hyper's per-connection buffers would otherwise
//! be most of an idle stream's memory); an HTTP/2 stream stays with hyper.
//! Either way the response body reads straight from the hub
//! ([`body::SseBody`]), so an open stream is the connection's task and a
//! few hundred bytes of state.
//!
//! Who may open a stream is checked in [`auth`] (a JWT, when configured);
//! how many connections and streams a client may have, in [`limits`].
//!
//! Architecture invariants: nothing of axum runs on this port; nothing here
//! parses JSON.

pub mod auth;
pub mod body;
pub mod cors;
pub mod http1;
pub mod limits;
pub mod request;
pub mod sniff;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Acquire, Relaxed, Release},
};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client_ip::TrustedProxies;
use crate::error::ApiError;
use crate::hub::{ClientMeta, Hub};
use crate::lifecycle::Lifecycle;
use body::SseBody;
use limits::{Admission, StreamLimits};
use sniff::Protocol;

/// The stream plane's own settings.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_stream_topics: usize,
    /// Origins whose pages may open streams cross-origin.
    pub cors: cors::Cors,
    /// Longest topic name accepted (at most 128).
    pub max_topic_len: usize,
    /// Largest request head; also hyper's HTTP/1.1 buffer cap (at least 8192).
    pub max_header_size: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections being refused (answered 503/429) at once.
    pub max_refusing: usize,
    /// Most streams open at once per client address; 0: no limit.
    pub max_streams_per_ip: usize,
    /// New connections per second per client address; 0: no limit.
    pub max_conn_rate_per_ip: u32,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// Subscribers' authentication; `None`: anyone may subscribe.
    pub auth: Option<Arc<auth::StreamAuth>>,
    /// Mercure subscriptions at `/.well-known/mercure` (`--mercure`).
    pub mercure: Option<Arc<crate::mercure::Mercure>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_stream_topics: 16,
            cors: cors::Cors::default(),
            max_topic_len: crate::topic::MAX_TOPIC_LEN,
            max_header_size: 64 * 1024,
            h2_max_streams: 100,
            max_connections: 25_000,
            max_refusing: limits::MAX_REFUSING,
            max_streams_per_ip: 256,
            max_conn_rate_per_ip: 20,
            trusted_proxies: TrustedProxies::default(),
            auth: None,
            mercure: None,
        }
    }
}

/// A stream (HTTP/1.1: handed over to [`http1::Pump`]) or an answer.
pub type StreamBody = Either<SseBody, Full<Bytes>>;
pub type StreamResponse = Response<StreamBody>;

/// hyper's smallest accepted buffer cap.
const MIN_BUF_SIZE: usize = 8192;

/// hyper's connection builders, one per protocol ([`sniff`] tells which).
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: http2::Builder<StreamSpans>,
}

impl Builders {
    fn new(options: &StreamOptions) -> Self {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // hyper's HTTP/1.1 buffer cap bounds both the request head it will
        // read and the frames it queues for writing (by reference); a
        // smaller cap than its ~400 KiB default bounds what a stalled client
        // can pin.
        h1.timer(TokioTimer::new())
            .header_read_timeout(options.header_read_timeout)
            .max_buf_size(options.max_header_size.max(MIN_BUF_SIZE));
        let mut h2 = http2::Builder::new(StreamSpans);
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(options.h2_max_streams)
            .max_header_list_size(u32::try_from(options.max_header_size).unwrap_or(u32::MAX));
        Builders {
            http1: h1,
            http2: h2,
        }
    }
}

/// Serves streams on `listener` until the lifecycle stops.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, options: StreamOptions, life: Lifecycle) {
    let builder = Arc::new(Builders::new(&options));
    let limits = Arc::new(StreamLimits::new(&options));
    let options = Arc::new(options);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = life.stopped() => break,
        };
        // Events are small and latency matters more than packet count;
        // the frames queued by the time a write starts go out in one.
        let _ = stream.set_nodelay(true);
        // `client` and `topics` are known once a stream opens (HTTP/1: at
        // most one per connection); see `record_stream`.
        let span = tracing::info_span!(
            "conn",
            %remote,
            client = tracing::field::Empty,
            topics = tracing::field::Empty,
        );
        match limits.admit(remote.ip()) {
            Admission::Serve(permit) => {
                let task = connection(
                    builder.clone(),
                    stream,
                    remote,
                    Plane {
                        hub: hub.clone(),
                        options: options.clone(),
                        limits: limits.clone(),
                    },
                    life.clone(),
                    permit,
                );
                life.tracker().spawn(task.instrument(span));
            }
            Admission::Refuse(error, permit) => {
                let task = refuse(
                    builder.clone(),
                    stream,
                    error,
                    options.header_read_timeout,
                    permit,
                );
                life.tracker().spawn(task.instrument(span));
            }
            Admission::Drop => {
                tracing::debug!(%remote, "connection dropped: too many being refused");
            }
        }
    }
}

/// What a connection's requests are served from.
#[derive(Clone)]
pub(crate) struct Plane {
    pub(crate) hub: Arc<Hub>,
    pub(crate) options: Arc<StreamOptions>,
    pub(crate) limits: Arc<StreamLimits>,
}

/// Answers a connection over a limit with `error` and closes it: HTTP/1.1
/// after the first response (`Connection: close`), anything else when the
/// deadline passes.
async fn refuse(
    builder: Arc<Builders>,
    stream: TcpStream,
    error: ApiError,
    header_read_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    tracing::debug!(
        status = error.status.as_u16(),
        code = error.code,
        "connection refused"
    );
    let error = ApiError {
        close: true,
        ..error
    };
    let service = service_fn(move |_req| {
        let res = error
            .clone()
            .into_response()
            .map(Either::<SseBody, _>::Right);
        async move { Ok::<_, Infallible>(res) }
    });
    let served = async {
        match sniff::sniff(&stream).await {
            Ok(Protocol::Http1) => {
                let io = TokioIo::new(stream);
                let _ = builder.http1.serve_connection(io, service).await;
            }
            Ok(Protocol::Http2) => {
                let io = TokioIo::new(stream);
                let _ = builder.http2.serve_connection(io, service).await;
            }
            Err(_) => {}
        }
    };
    let deadline = header_read_timeout + Duration::from_secs(1);
    let _ = tokio::time::timeout(deadline, served).await;
}

async fn connection(
    builder: Arc<Builders>,
    stream: TcpStream,
    remote: SocketAddr,
    plane: Plane,
    life: Lifecycle,
    permit: OwnedSemaphorePermit,
) {
    let options = plane.options.clone();
    // hyper's header timeout starts once it knows the protocol, and HTTP/2
    // has none: a connection that has not completed a request by then
    // (silent, or trickling bytes) is dropped here.
    let request_deadline = Instant::now() + options.header_read_timeout;
    let protocol = tokio::select! {
        sniffed = sniff::sniff(&stream) => match sniffed {
            Ok(protocol) => protocol,
            Err(_) => return,
        },
        _ = tokio::time::sleep_until(request_deadline) => {
            tracing::debug!("no request within the header read timeout; closing");
            return;
        }
        _ = life.stopped() => return,
    };
    // Cancelled when the gateway ends this connection's HTTP/1 stream, and
    // when the drain begins.
    let ended = life.connection_token();
    let io = TokioIo::new(stream);
    let watch = |spoken| Watch {
        life: &life,
        ended: &ended,
        spoken,
        request_deadline,
        write_timeout: options.write_timeout,
    };
    match protocol {
        Protocol::Http1 => {
            let handover = Arc::new(http1::Handover::default());
            let service = {
                let (ended, handover) = (ended.clone(), handover.clone());
                service_fn(move |req: Request<Incoming>| {
                    let first = handover.first_request();
                    let (plane, ended, handover) = (plane.clone(), ended.clone(), handover.clone());
                    async move {
                        let version = req.version();
                        let res = handle(req, remote, &plane, &ended).await;
                        match handover.offer(res, version, first) {
                            Some(res) => Ok::<_, Infallible>(res),
                            // The connection's task takes the socket from
                            // hyper before polling this again.
                            None => std::future::pending().await,
                        }
                    }
                })
            };
            let conn = builder.http1.serve_connection(io, service);
            let served = http1::Served::new(conn, handover.clone());
            let pump = watch(&handover.spoken)
                .drive(served, |s| s.get_mut().graceful_shutdown())
                .await;
            if let Some(Some(pump)) = pump {
                let task = pumped(pump, life.clone(), ended, options.write_timeout, permit);
                life.tracker()
                    .spawn(task.instrument(tracing::Span::current()));
            }
        }
        Protocol::Http2 => {
            // Set once the client has sent a request.
            let spoken = Arc::new(AtomicBool::new(false));
            let service = {
                let (ended, spoken) = (ended.clone(), spoken.clone());
                service_fn(move |req| {
                    spoken.store(true, Relaxed);
                    let (plane, ended) = (plane.clone(), ended.clone());
                    async move { Ok::<_, Infallible>(handle(req, remote, &plane, &ended).await) }
                })
            };
            // Boxed: HTTP/2 connections are few (each carries many streams),
            // and inline its state would grow every HTTP/1 connection's task.
            let conn = Box::pin(builder.http2.serve_connection(io, service));
            watch(&spoken)
                .drive(conn, |c| c.get_mut().as_mut().graceful_shutdown())
                .await;
        }
    }
}

/// An HTTP/1.1 stream after the hand-over, on a task of its own: the
/// connection's task, sized for hyper's connection and the request's
/// futures, ends there (the task is most of an idle stream's memory once
/// hyper's buffers are gone). The same watch as [`Watch::drive`], without
/// what only a request needs.
async fn pumped(
    pump: http1::Pump,
    life: Lifecycle,
    ended: CancellationToken,
    write_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    tokio::pin!(pump);
    // The stream ends itself (drain, kill, expiry, slow) with a notice;
    // once the gateway has ended it, that write is bounded.
    let draining = tokio::select! {
        biased;
        _ = &mut pump => return,
        _ = on_own_wake(ended.cancelled()) => life.is_draining(),
    };
    finish(pump, &life, draining, write_timeout).await;
}

/// Awaits `fut`, polling it only when its own waker fired (and on the first
/// poll), not on every wake-up of the task that awaits it. A stream's task
/// wakes for every event it writes; the token that ends it fires once, and
/// each poll of a `CancellationToken`'s future takes the token's mutex and
/// its `Notify`'s. Costs one small allocation per connection (the flag).
async fn on_own_wake<F: Future>(fut: F) -> F::Output {
    let waker = Arc::new(OwnWaker {
        due: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let own = Waker::from(waker.clone());
    tokio::pin!(fut);
    std::future::poll_fn(|cx| {
        // Registered before the flag is read: a wake after the read finds
        // this task's waker.
        waker.task.register(cx.waker());
        if !waker.due.swap(false, Acquire) {
            return Poll::Pending;
        }
        fut.as_mut().poll(&mut Context::from_waker(&own))
    })
    .await
}

/// The waker [`on_own_wake`] polls its future with: marks it due, then
/// wakes the task.
struct OwnWaker {
    due: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for OwnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Release);
        self.task.wake();
    }
}

/// Lets `conn`, which the gateway has ended, finish its last writes: until
/// the gateway stops when `draining` (shutdown already gave it that long),
/// else for `write_timeout`. `None` if it did not make it in time.
async fn finish<C: Future>(
    conn: C,
    life: &Lifecycle,
    draining: bool,
    write_timeout: Duration,
) -> Option<C::Output> {
    let give_up = async {
        if draining {
            life.stopped().await;
        } else {
            tokio::time::sleep(write_timeout).await;
        }
    };
    tokio::select! {
        out = conn => Some(out),
        _ = give_up => {
            tracing::debug!("dropping a connection that did not close in time");
            None
        }
    }
}

/// What ends a served connection besides the client: the gateway ending
/// its HTTP/1 stream, the drain, and the request deadline. Polled on every
/// wake-up of the connection's task, so nothing here is shared with other
/// connections.
struct Watch<'a> {
    life: &'a Lifecycle,
    ended: &'a CancellationToken,
    spoken: &'a AtomicBool,
    request_deadline: Instant,
    write_timeout: Duration,
}

impl Watch<'_> {
    /// Serves `conn` until it ends (its output), or until the gateway ends
    /// it: then `graceful` asks hyper to finish the response in flight and
    /// close, and `conn` gets until the deadline (`None` if it misses it).
    async fn drive<C: Future>(
        self,
        conn: C,
        graceful: impl FnOnce(Pin<&mut C>),
    ) -> Option<C::Output> {
        let Watch {
            life,
            ended,
            spoken,
            request_deadline,
            write_timeout,
        } = self;
        let spoken = || spoken.load(Relaxed);
        tokio::pin!(conn);
        // The gateway ends the connection's stream, or the drain begins.
        let ending = async {
            ended.cancelled().await;
            let draining = life.is_draining();
            // A connection that has not sent a request yet is served until
            // the gateway stops, so its request gets the 503 with
            // Retry-After: shutting it down now would close it before hyper
            // read the request.
            if draining && !spoken() {
                life.stopped().await;
            }
            draining
        };
        let silent = async {
            tokio::time::sleep_until(request_deadline).await;
            if spoken() {
                std::future::pending::<()>().await;
            }
        };
        let ending = on_own_wake(ending);
        let draining = tokio::select! {
            out = conn.as_mut() => return Some(out),
            draining = ending => draining,
            _ = silent => {
                tracing::debug!("no request within the header read timeout; closing");
                return None;
            }
        };
        // Finish the response in flight (its body ends with a close
        // notice), then close.
        graceful(conn.as_mut());
        finish(conn, life, draining, write_timeout).await
    }
}

async fn handle(
    req: Request<Incoming>,
    remote: SocketAddr,
    plane: &Plane,
    ended: &CancellationToken,
) -> StreamResponse {
    let options = &*plane.options;
    let result = if let Err(e) = request::check_framing(req.headers()) {
        Err(e)
    } else if request::is_preflight(req.method(), req.uri().path(), req.headers()) {
        options
            .cors
            .preflight(req.headers())
            .map(|r| r.map(Either::Right))
    } else if let Some(mercure) = options
        .mercure
        .as_ref()
        .filter(|_| req.uri().path() == crate::mercure::PATH)
    {
        crate::mercure::subscribe::open(&req, remote, plane, ended, mercure).await
    } else {
        open_stream(&req, remote, plane, ended).await
    };
    let mut res = match result {
        Ok(res) => res,
        Err(e) => {
            tracing::debug!(
                status = e.status.as_u16(),
                code = e.code,
                query = %auth::redact_query(req.uri().query().unwrap_or("")),
                "stream refused"
            );
            e.into_response().map(Either::Right)
        }
    };
    if let Some(origin) = options.cors.allowed(req.headers()) {
        cors::Cors::allow(origin, res.headers_mut());
    }
    res
}

/// Names the stream on its span (the connection's for HTTP/1, the HTTP/2
/// stream's own, see [`StreamSpans`]): every later line about it, to its
/// close, carries its client id and topics. Once per stream, nothing per
/// event.
pub(crate) fn record_stream(client: &str, topics: &dyn std::fmt::Debug) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("client", tracing::field::display(client));
        span.record("topics", tracing::field::debug(topics));
    }
}

/// hyper's executor for a connection's HTTP/2 streams: each in a span of its
/// own, a child of the connection's (which names the remote address), for
/// [`record_stream`] to name.
#[derive(Clone, Copy)]
struct StreamSpans;

impl<F> hyper::rt::Executor<F> for StreamSpans
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let span = tracing::info_span!(
            "stream",
            client = tracing::field::Empty,
            topics = tracing::field::Empty,
        );
        tokio::spawn(fut.instrument(span));
    }
}

async fn open_stream(
    req: &Request<Incoming>,
    remote: SocketAddr,
    plane: &Plane,
    ended: &CancellationToken,
) -> Result<StreamResponse, ApiError> {
    let (hub, options) = (&plane.hub, &*plane.options);
    let uri = req.uri();
    let limits = request::ParseLimits {
        max_topics: options.max_stream_topics,
        max_topic_len: options.max_topic_len,
    };
    let parsed = request::parse_with(req.method(), uri.path(), uri.query(), req.headers(), limits)?;
    // A topic another protocol encodes (Mercure's, with private updates)
    // is read only through that protocol's filter.
    if let Some(t) = parsed.topics.iter().find(|t| hub.encoder_for(t).is_some()) {
        return Err(ApiError::topic_not_allowed(
            t,
            "streaming (it is reserved for Mercure)",
        ));
    }
    check_accepting(hub, req)?;
    let client_ip = plane.limits.client_ip(remote.ip(), req.headers());
    plane.limits.check_rate(remote.ip(), client_ip)?;
    let expires_at = match &options.auth {
        Some(auth) => auth.authorize(req.headers(), uri.query(), &parsed.topics)?,
        None => None,
    };
    let slot = plane.limits.stream_slot(client_ip)?;
    hub.prepare(&parsed.topics).await?;
    let meta = client_meta(req, remote, ended, client_ip, expires_at);
    let sub = hub.subscribe(&parsed.topics, parsed.resume.as_ref(), meta)?;
    record_stream(sub.client().id(), &parsed.topics);
    tracing::debug!(
        %client_ip,
        query = %auth::redact_query(uri.query().unwrap_or("")),
        "stream opened"
    );
    Ok(sse_response(sub, slot))
}

/// The 200 answer that carries a stream: unbuffered, never cached.
pub(crate) fn sse_response(
    sub: crate::hub::Subscription,
    slot: Option<crate::limits::StreamSlot>,
) -> StreamResponse {
    let mut res = Response::new(Either::Left(SseBody::new(sub).holding(slot)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// 503 `shutting_down` once the hub no longer takes streams (draining).
pub(crate) fn check_accepting(hub: &Hub, req: &Request<Incoming>) -> Result<(), ApiError> {
    if hub.accepting() {
        return Ok(());
    }
    Err(ApiError {
        // An HTTP/1 client should reconnect elsewhere, not reuse this.
        close: req.version() < http::Version::HTTP_2,
        ..ApiError::unavailable(
            "shutting_down",
            "this replica is shutting down; retry (another replica will serve you)",
            1,
        )
    })
}

/// What `/clients` shows of a stream opened by `req`.
pub(crate) fn client_meta(
    req: &Request<Incoming>,
    remote: SocketAddr,
    ended: &CancellationToken,
    client_ip: std::net::IpAddr,
    expires_at: Option<std::time::SystemTime>,
) -> ClientMeta {
    let http1 = req.version() < http::Version::HTTP_2;
    ClientMeta {
        remote_addr: remote,
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
        protocol: if http1 { "HTTP/1.1" } else { "HTTP/2" },
        connection: http1.then(|| ended.clone()),
        client_ip,
        expires_at,
    }
}
