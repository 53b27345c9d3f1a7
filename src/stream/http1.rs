//! HTTP/1.1 streams once their request has been read.
//!
//! hyper reads and checks every HTTP/1.1 request and answers every one that
//! does not open a stream. A stream's response is not given back to hyper:
//! the service hands it over ([`Handover`]), the socket is taken out of the
//! connection ([`http1::Connection::into_parts`]) and [`Pump`] writes the head
//! and the chunked body itself. hyper keeps two 8 KiB buffers for the life of
//! a connection (the one it reads requests into and the one it writes heads
//! into); for a stream that never sends another request they were most of
//! what it held. A pumped stream holds its socket, its subscription and the
//! frames being written (see PERFORMANCE.md).
//!
//! The pump writes the frames that are ready in one write (vectored when
//! there are several buffers): events as the HTTP/1.1 chunks they were
//! framed into once, when published (`sse::Frame::chunk`), so a stream's
//! usual write, one event, is one contiguous buffer and one `send`. It
//! stops polling the subscription while a write is pending:
//! a client that stops reading holds no more than its socket buffers, and
//! the hub's slow-client policy sees it fall behind.
//!
//! Only a connection's first request is handed over: after an earlier
//! response hyper may still hold some of its bytes, and a stream opened on
//! a reused connection stays with hyper.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::{Response, Version};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::StreamResponse;
use super::body::SseBody;
use crate::sse::{self, MAX_SIZE_LINE};

/// Most frames taken from the subscription for one write.
const MAX_BATCH: usize = 32;
/// Bytes a client may send after its stream request (a pipelined request
/// is never answered) before the stream is ended.
const MAX_UNREAD: usize = 64 * 1024;
/// Most slices in one write: the head, a size line, a batch of frames, the
/// chunk's CRLF and the last chunk.
const MAX_SLICES: usize = 2 + MAX_BATCH + 2;
const CRLF: Bytes = Bytes::from_static(b"\r\n");
const LAST_CHUNK: Bytes = Bytes::from_static(b"0\r\n\r\n");

/// What a connection's service shares with the task serving it.
#[derive(Default)]
pub struct Handover {
    /// Set once the client has sent a request.
    pub spoken: AtomicBool,
    stream: Mutex<Option<Stream>>,
}

impl Handover {
    /// Notes that a request arrived; true for the connection's first.
    pub fn first_request(&self) -> bool {
        !self.spoken.swap(true, Relaxed)
    }

    /// Keeps the stream of `res` to be written by a [`Pump`] (and returns
    /// `None`), or returns `res` for hyper to write: anything but a stream,
    /// and a stream that is not the connection's `first` request.
    pub fn offer(
        &self,
        res: StreamResponse,
        version: Version,
        first: bool,
    ) -> Option<StreamResponse> {
        let (parts, body) = res.into_parts();
        match body {
            Either::Left(body) if first => {
                let chunked = version >= Version::HTTP_11;
                let head = encode_head(&parts, chunked);
                *self.lock() = Some(Stream {
                    head,
                    body,
                    chunked,
                });
                None
            }
            body => Some(Response::from_parts(parts, body)),
        }
    }

    fn take(&self) -> Option<Stream> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Stream>> {
        // Only this connection's task touches it, never across an await.
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stream's response, as the service handed it over.
pub struct Stream {
    head: Bytes,
    body: SseBody,
    chunked: bool,
}

/// The response head, written once per stream. The connection closes when
/// the stream ends, and the head says so.
fn encode_head(parts: &http::response::Parts, chunked: bool) -> Bytes {
    let mut head = Vec::with_capacity(256);
    // As hyper answers: in the request's version.
    head.extend_from_slice(if chunked { b"HTTP/1.1 " } else { b"HTTP/1.0 " });
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // An HTTP/1.0 client reads the body until the connection closes.
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n");
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    Bytes::from(head)
}

type Connection<S> = http1::Connection<TokioIo<TcpStream>, S>;

/// A hyper HTTP/1.1 connection until its service hands a stream over; then
/// the socket and the stream. Boxed: hyper's state (and its buffers) go
/// away at the hand-over instead of sitting in the task for its life.
pub struct Served<S: HttpService<Incoming>> {
    conn: Option<Box<Connection<S>>>,
    handover: std::sync::Arc<Handover>,
}

impl<S> Served<S>
where
    S: HttpService<Incoming, ResBody = super::StreamBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(conn: Connection<S>, handover: std::sync::Arc<Handover>) -> Self {
        Served {
            conn: Some(Box::new(conn)),
            handover,
        }
    }

    /// Asks hyper to close after the response in flight.
    pub fn graceful_shutdown(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            Pin::new(&mut **conn).graceful_shutdown();
        }
    }
}

impl<S> Future for Served<S>
where
    S: HttpService<Incoming, ResBody = super::StreamBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The socket and its stream; `None` when hyper finished the connection.
    type Output = Option<Pump>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if Pin::new(&mut **conn).poll(cx).is_ready() {
            this.conn = None;
            return Poll::Ready(None);
        }
        // The service hands over from inside hyper's poll, only for the
        // connection's first request: hyper has written nothing on it yet,
        // so its socket is ours to take.
        match this.handover.take() {
            Some(stream) => {
                let parts = this.conn.take().map(|conn| conn.into_parts());
                Poll::Ready(parts.map(|parts| Pump::new(parts.io.into_inner(), stream)))
            }
            None => Poll::Pending,
        }
    }
}

/// Writes one stream's response to its socket until the stream ends or the
/// client goes away.
pub struct Pump {
    socket: TcpStream,
    body: SseBody,
    chunked: bool,
    out: Outbox,
    /// Bytes read from the body after pre-framed chunks (see
    /// [`Pump::refill`]), written first in the next batch.
    carry: Option<Bytes>,
    /// The body has ended: what is queued (and carried) is the last of it.
    ended: bool,
    /// Bytes the client has sent since its request.
    unread: usize,
}

impl Pump {
    fn new(socket: TcpStream, stream: Stream) -> Self {
        Pump {
            socket,
            body: stream.body,
            chunked: stream.chunked,
            out: Outbox {
                head: stream.head,
                ..Outbox::default()
            },
            carry: None,
            ended: false,
            unread: 0,
        }
    }

    /// True once the client has closed its side (or reset it), or sent more
    /// than [`MAX_UNREAD`] bytes after its request; those are dropped.
    fn peer_gone(&mut self, cx: &mut Context<'_>) -> bool {
        let mut scratch = [0u8; 1024];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.socket).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return true,
                Poll::Ready(Ok(())) => {
                    self.unread += buf.filled().len();
                    if self.unread > MAX_UNREAD {
                        tracing::debug!("client keeps sending on its stream; closing");
                        return true;
                    }
                }
                Poll::Ready(Err(_)) => return true,
                Poll::Pending => return false,
            }
        }
    }

    /// Queues the frames the subscription has ready. Over HTTP/1.1 the
    /// events read in one go go out as the chunks they were framed into
    /// when published (one contiguous buffer each, so a stream's usual
    /// write of one event is one buffer); whatever else comes (notices,
    /// heartbeats, the events of a multi-topic stream) goes out as one
    /// chunk framed here.
    fn refill(&mut self, cx: &mut Context<'_>) {
        debug_assert!(self.out.bufs.is_empty() && self.out.line.is_empty());
        // Something read last time after pre-framed events starts this
        // batch, ahead of anything newer.
        let mut len = 0;
        if let Some(data) = self.carry.take() {
            len = data.len();
            self.out.bufs.push_back(data);
        } else {
            // The events ready now under one read of the ring, then (one at
            // a time) whatever else there is, until the body registers its
            // waker.
            self.body
                .take_ready(MAX_BATCH, self.chunked, &mut self.out.bufs);
        }
        let framed = len == 0 && !self.out.bufs.is_empty();
        while !self.ended && self.out.bufs.len() < MAX_BATCH {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        if framed && self.chunked {
                            // Its chunk's size line would go before the
                            // queued chunks: it waits for the next batch.
                            self.carry = Some(data);
                            break;
                        }
                        len += data.len();
                        self.out.bufs.push_back(data);
                    }
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => {
                    self.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if self.chunked {
            if len > 0 {
                self.out.size_line(len);
                self.out.bufs.push_back(CRLF);
            }
            if self.ended && self.carry.is_none() {
                self.out.bufs.push_back(LAST_CHUNK);
            }
        }
    }
}

impl Future for Pump {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.peer_gone(cx) {
            return Poll::Ready(());
        }
        if !this.out.head.is_empty() && this.out.bufs.is_empty() && !this.ended {
            // The preamble is waiting: one write with the head.
            this.refill(cx);
        }
        loop {
            if !this.out.is_empty() {
                match ready!(this.out.poll_write(&mut this.socket, cx)) {
                    Ok(()) => continue,
                    Err(_) => return Poll::Ready(()),
                }
            }
            if this.ended && this.carry.is_none() {
                let _ = ready!(Pin::new(&mut this.socket).poll_shutdown(cx));
                return Poll::Ready(());
            }
            this.refill(cx);
            if this.out.is_empty() && !this.ended {
                return Poll::Pending;
            }
        }
    }
}

/// Bytes queued for the socket, written in this order: the response head
/// (until written), a chunk-size line, then shared buffers (frames, chunk
/// ends).
#[derive(Default)]
struct Outbox {
    head: Bytes,
    size_line: [u8; MAX_SIZE_LINE],
    /// The unwritten part of `size_line`.
    line: std::ops::Range<usize>,
    bufs: std::collections::VecDeque<Bytes>,
    /// How much of the front buffer is written.
    front: usize,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.line.is_empty() && self.bufs.is_empty()
    }

    /// Starts a chunk of `len` bytes: the frames just queued, once the
    /// last chunk is written.
    fn size_line(&mut self, len: usize) {
        debug_assert!(self.line.is_empty());
        self.line = 0..sse::size_line(len, &mut self.size_line).len();
    }

    /// Writes as much as the socket takes in one write: vectored when
    /// there is more than one buffer.
    fn poll_write(
        &mut self,
        socket: &mut (impl AsyncWrite + Unpin),
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        if !self.head.is_empty() {
            slices[n] = IoSlice::new(&self.head);
            n += 1;
        }
        if !self.line.is_empty() {
            slices[n] = IoSlice::new(&self.size_line[self.line.clone()]);
            n += 1;
        }
        for (i, buf) in self.bufs.iter().enumerate() {
            if n == slices.len() {
                break;
            }
            let from = if i == 0 { self.front } else { 0 };
            slices[n] = IoSlice::new(&buf[from..]);
            n += 1;
        }
        // One buffer (a stream's usual write: one pre-framed event) goes
        // out with `write`, which spares the kernel the iovec.
        let mut written = if n == 1 {
            ready!(Pin::new(&mut *socket).poll_write(cx, &slices[0]))?
        } else {
            ready!(Pin::new(&mut *socket).poll_write_vectored(cx, &slices[..n]))?
        };
        if written == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        let head = written.min(self.head.len());
        self.head.advance(head);
        written -= head;
        let line = written.min(self.line.len());
        self.line.start += line;
        written -= line;
        while written > 0 {
            let Some(front) = self.bufs.front() else {
                break;
            };
            let left = front.len() - self.front;
            if written < left {
                self.front += written;
                break;
            }
            written -= left;
            self.front = 0;
            self.bufs.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes everything queued in `out` through a pipe that takes at most
    /// `room` bytes at a time (and one buffer per write), reading the other
    /// end as it goes.
    async fn drain(out: &mut Outbox, room: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let (mut tx, mut rx) = tokio::io::duplex(room);
        let mut got = Vec::new();
        while !out.is_empty() {
            std::future::poll_fn(|cx| out.poll_write(&mut tx, cx))
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            let n = rx.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        drop(tx);
        rx.read_to_end(&mut got).await.unwrap();
        got
    }

    proptest::proptest! {
        #[test]
        fn partial_writes_lose_and_repeat_nothing(
            head in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            frames in proptest::collection::vec(
                proptest::collection::vec(proptest::num::u8::ANY, 1..50), 1..MAX_BATCH),
            room in 1usize..20,
        ) {
            let mut out = Outbox { head: Bytes::from(head.clone()), ..Outbox::default() };
            let len = frames.iter().map(Vec::len).sum();
            out.size_line(len);
            for f in &frames {
                out.bufs.push_back(Bytes::from(f.clone()));
            }
            out.bufs.push_back(CRLF);
            let mut want = head;
            want.extend_from_slice(format!("{len:X}\r\n").as_bytes());
            want.extend(frames.concat());
            want.extend_from_slice(b"\r\n");
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(drain(&mut out, room));
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// The chunks of a chunked body, checked strictly: each size line, the
    /// CRLF after each chunk, the last chunk, then nothing.
    fn chunks_of(mut body: &[u8]) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let hex = std::str::from_utf8(&body[..eol]).unwrap();
            assert!(
                hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "size line {hex:?}"
            );
            let len = usize::from_str_radix(hex, 16).unwrap();
            body = &body[eol + 2..];
            if len == 0 {
                assert_eq!(body, b"\r\n", "nothing after the last chunk");
                return chunks;
            }
            chunks.push(body[..len].to_vec());
            assert_eq!(&body[len..len + 2], b"\r\n", "a chunk ends with CRLF");
            body = &body[len + 2..];
        }
    }

    /// Polls `pump` once.
    async fn once(pump: &mut Pump) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *pump).poll(cx))).await
    }

    /// Events read in one go go out as the chunks framed at publish; a
    /// notice read right after them goes in a chunk of its own after them,
    /// then the last chunk: the body is the SSE stream, in order.
    #[tokio::test]
    async fn pre_framed_events_then_a_notice_make_one_valid_chunked_body() {
        use crate::hub::{ClientMeta, Hub, HubConfig};
        use tokio::io::AsyncReadExt;

        let hub = Hub::new(HubConfig::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Expired already: the stream ends at the first heartbeat tick, with
        // a notice that `poll_frame` returns right after the ready events.
        let meta = ClientMeta {
            remote_addr: "127.0.0.1:4000".parse().unwrap(),
            user_agent: None,
            protocol: "HTTP/1.1",
            connection: None,
            client_ip: "127.0.0.1".parse().unwrap(),
            expires_at: Some(SystemTime::now()),
        };
        let sub = hub.subscribe(&["a".into()], None, meta).unwrap();
        let mut pump = Pump::new(
            server,
            Stream {
                head: Bytes::from_static(b"HEAD\r\n\r\n"),
                body: SseBody::new(sub),
                chunked: true,
            },
        );
        assert!(
            once(&mut pump).await.is_pending(),
            "the preamble, then nothing"
        );
        let one = hub.publish("a", None, "one").unwrap();
        let two = hub.publish("a", Some("e"), "two").unwrap();
        hub.heartbeat();
        assert!(
            once(&mut pump).await.is_ready(),
            "the events, the notice, the end"
        );

        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        let body = wire.strip_prefix(b"HEAD\r\n\r\n".as_slice()).unwrap();
        let chunks = chunks_of(body);
        let text: Vec<String> = chunks
            .iter()
            .map(|c| String::from_utf8(c.clone()).unwrap())
            .collect();
        assert_eq!(text.len(), 4, "{text:?}");
        assert!(text[0].starts_with("retry: "), "{text:?}");
        assert_eq!(text[1], format!("id: {one}\ndata: one\n\n"));
        assert_eq!(text[2], format!("id: {two}\nevent: e\ndata: two\n\n"));
        assert!(text[3].contains("event: streamline.close\n"), "{text:?}");
        assert!(text[3].contains("token_expired"), "{text:?}");
    }

    #[test]
    fn heads_say_how_the_body_ends() {
        let res = Response::builder()
            .header("content-type", "text/event-stream")
            .body(())
            .unwrap();
        let (parts, ()) = res.into_parts();
        let chunked = String::from_utf8(encode_head(&parts, true).to_vec()).unwrap();
        assert!(chunked.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"));
        assert!(chunked.contains("\r\ntransfer-encoding: chunked\r\n"));
        assert!(chunked.contains("\r\nconnection: close\r\n"));
        assert!(chunked.contains("\r\ndate: "));
        assert!(chunked.ends_with("\r\n\r\n"));
        let closed = String::from_utf8(encode_head(&parts, false).to_vec()).unwrap();
        assert!(closed.starts_with("HTTP/1.0 200 OK\r\n"));
        assert!(closed.contains("\r\nconnection: close\r\n"));
        assert!(!closed.contains("transfer-encoding"));
    }
}
