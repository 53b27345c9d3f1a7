//! The stream plane: a raw hyper 1.x server (HTTP/1.1 and h2c, detected per
//! connection by hyper-util's auto builder) that serves only SSE streams.
//!
//! Each accepted connection runs on one tracked task. A stream's response
//! body reads straight from the hub ([`body::SseBody`]), so an open stream is
//! the connection's task and a few hundred bytes of state.
//!
//! Architecture invariants: nothing of axum runs on this port; nothing here
//! parses JSON.

pub mod body;
pub mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::ApiError;
use crate::hub::{ClientMeta, Hub};
use crate::lifecycle::Lifecycle;
use body::SseBody;

/// The stream plane's own settings.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_stream_topics: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_stream_topics: 16,
        }
    }
}

pub type StreamResponse = Response<Either<SseBody, Full<Bytes>>>;

/// hyper's write buffer holds queued frames by reference; a smaller cap than
/// its ~400 KiB default bounds what a stalled client can pin.
const MAX_BUF_SIZE: usize = 64 * 1024;

/// Serves streams on `listener` until the lifecycle stops.
pub async fn serve(listener: TcpListener, hub: Arc<Hub>, options: StreamOptions, life: Lifecycle) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_BUF_SIZE);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
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
        // hyper already coalesces queued frames into one write.
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("conn", %remote);
        let task = connection(
            builder.clone(),
            stream,
            remote,
            hub.clone(),
            options.clone(),
            life.clone(),
        );
        life.tracker().spawn(task.instrument(span));
    }
}

async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    remote: SocketAddr,
    hub: Arc<Hub>,
    options: Arc<StreamOptions>,
    life: Lifecycle,
) {
    // Cancelled when the gateway ends this connection's HTTP/1 stream.
    let ended = CancellationToken::new();
    let service = {
        let ended = ended.clone();
        let options = options.clone();
        service_fn(move |req| {
            let (hub, options, ended) = (hub.clone(), options.clone(), ended.clone());
            async move { Ok::<_, Infallible>(handle(req, remote, &hub, &options, &ended).await) }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let draining = tokio::select! {
        _ = conn.as_mut() => return,
        _ = ended.cancelled() => false,
        _ = life.draining() => true,
    };
    // Finish the response in flight (its body ends with a close notice),
    // then close; a client that stopped reading is dropped after the timeout.
    conn.as_mut().graceful_shutdown();
    let give_up = async {
        if draining {
            life.stopped().await;
        }
        tokio::time::sleep(options.write_timeout).await;
    };
    tokio::select! {
        _ = conn => {},
        _ = give_up => tracing::debug!("dropping a connection that did not close in time"),
    }
}

async fn handle(
    req: Request<Incoming>,
    remote: SocketAddr,
    hub: &Arc<Hub>,
    options: &StreamOptions,
    ended: &CancellationToken,
) -> StreamResponse {
    match open_stream(&req, remote, hub, options, ended).await {
        Ok(res) => res,
        Err(e) => {
            tracing::debug!(status = e.status.as_u16(), code = e.code, "stream refused");
            e.into_response().map(Either::Right)
        }
    }
}

async fn open_stream(
    req: &Request<Incoming>,
    remote: SocketAddr,
    hub: &Arc<Hub>,
    options: &StreamOptions,
    ended: &CancellationToken,
) -> Result<StreamResponse, ApiError> {
    let uri = req.uri();
    let parsed = request::parse(
        req.method(),
        uri.path(),
        uri.query(),
        req.headers(),
        options.max_stream_topics,
    )?;
    if !hub.accepting() {
        return Err(ApiError::unavailable(
            "shutting_down",
            "this replica is shutting down; retry (another replica will serve you)",
            1,
        ));
    }
    hub.prepare(&parsed.topics).await?;
    let http1 = req.version() < http::Version::HTTP_2;
    let meta = ClientMeta {
        remote_addr: remote,
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect()),
        protocol: if http1 { "HTTP/1.1" } else { "HTTP/2" },
        connection: http1.then(|| ended.clone()),
    };
    let sub = hub.subscribe(&parsed.topics, parsed.resume.as_ref(), meta)?;
    tracing::debug!(client = %sub.client().id(), topics = ?parsed.topics, "stream opened");
    let mut res = Response::new(Either::Left(SseBody::new(sub)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}
