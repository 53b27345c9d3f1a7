//! The stream side: one small task per client, over a raw tokio `TcpStream`
//! with a hand-written HTTP/1.1 GET, behaving as a browser's `EventSource`
//! does: when its stream ends (the server ends it, or the connection fails)
//! it waits the `retry:` delay and reconnects with `Last-Event-ID`; an answer
//! other than `200 text/event-stream` to a reconnect is fatal (a browser
//! gives up for good) and ends the client.
//!
//! Kept cheap so one process can take about a million deliveries a second on
//! a small machine next to the server under test: a connection owns no read
//! buffer (it waits for readiness, then reads into its worker thread's
//! buffer), the bytes are scanned in place ([`crate::scan`]), latencies go to
//! the worker thread's histogram under one uncontended lock per read (one
//! clock read per read, too), and counters are per thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::payload::unix_micros;
use crate::scan::{self, Dechunk, Scanner};
use crate::target::Target;
use crate::tracker::{Counts, Tracker};

/// Largest latency recorded (longer ones count as this), in microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Bytes read from a socket at once.
const READ_BUF: usize = 64 * 1024;
/// Most reconnects whose times are kept for the per-drain figures (32 MiB).
const MAX_RECONNECT_TIMES: usize = 4 << 20;

/// What one worker thread's streams have seen so far.
pub struct WorkerStats {
    pub latency: Mutex<Histogram<u64>>,
    /// Time without a stream: from a stream's end to the next stream's
    /// response head, µs.
    pub gaps: Mutex<Histogram<u64>>,
    /// Distinct bench events received.
    pub delivered: AtomicU64,
}

/// A stream's topic and how opening it went (Err: why it failed).
pub type Opened = (usize, Result<(), String>);

/// Shared by every stream task.
pub struct Streams {
    target: Target,
    topics: usize,
    publishers: usize,
    connect_timeout: Duration,
    /// The reconnection delay until the server sends `retry:`.
    default_retry: Duration,
    opening: Semaphore,
    /// Set (and every stream woken) when the bench is done. A flag and a
    /// waker per stream rather than a shared `Notify`: a stream checks it on
    /// every wake-up, and that must not touch a lock all streams share.
    stopping: AtomicBool,
    stop_wakers: Mutex<Vec<Arc<AtomicWaker>>>,
    /// Streams open right now.
    pub open: AtomicUsize,
    workers: Mutex<Vec<Arc<WorkerStats>>>,
    opened: mpsc::UnboundedSender<Opened>,
    /// The run's clock: reconnect times and churn marks are offsets from it.
    pub epoch: Instant,
    /// Each reconnect attempt: when the stream it replaces ended, and when
    /// it was made, in ms since `epoch`.
    reconnect_times: Mutex<Vec<(u32, u32)>>,
    /// Why streams ended, and why reconnects failed, by reason.
    ends: Mutex<HashMap<String, u64>>,
    reconnect_failures: Mutex<HashMap<String, u64>>,
}

/// How one client went, once it is over.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub topic: usize,
    pub opened: bool,
    /// Times its stream ended before the bench did.
    pub ends: u64,
    /// Reconnects attempted.
    pub reconnects: u64,
    /// Why a reconnect was answered so that a browser would give up.
    pub fatal: Option<String>,
    pub counts: Counts,
    /// Data lines that were not bench events (server notices).
    pub foreign: u64,
    /// What it received, for the final count of lost events.
    pub tracker: Tracker,
}

struct Local {
    owner: Arc<Streams>,
    stats: Arc<WorkerStats>,
    buf: Box<[u8]>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Why a connection attempt failed: a network error (an `EventSource`
/// retries) or an answer a browser treats as final.
enum OpenError {
    Network(String),
    Fatal(String),
}

impl OpenError {
    fn into_string(self) -> String {
        match self {
            OpenError::Network(s) | OpenError::Fatal(s) => s,
        }
    }
}

/// An open stream: the socket, the bytes read with the head, where the body
/// starts in them, and whether it is chunked.
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    body_start: usize,
    chunked: bool,
}

impl Streams {
    pub fn new(
        target: Target,
        topics: usize,
        publishers: usize,
        concurrency: usize,
        connect_timeout: Duration,
        default_retry: Duration,
    ) -> (Arc<Streams>, mpsc::UnboundedReceiver<Opened>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Streams {
            target,
            topics,
            publishers,
            connect_timeout,
            default_retry,
            opening: Semaphore::new(concurrency),
            stopping: AtomicBool::new(false),
            stop_wakers: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
            opened: tx,
            epoch: Instant::now(),
            reconnect_times: Mutex::new(Vec::new()),
            ends: Mutex::new(HashMap::new()),
            reconnect_failures: Mutex::new(HashMap::new()),
        });
        (streams, rx)
    }

    /// Ends every stream's read loop (and every wait to reconnect).
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let wakers = self.stop_wakers.lock().unwrap_or_else(|e| e.into_inner());
        for w in wakers.iter() {
            w.wake();
        }
    }

    fn stopped(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Distinct bench events received by all streams so far.
    pub fn delivered(&self) -> u64 {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.iter().map(|w| w.delivered.load(Relaxed)).sum()
    }

    /// All worker threads' latency histograms merged.
    pub fn latency(&self) -> Histogram<u64> {
        self.merged(|w| &w.latency)
    }

    /// All worker threads' histograms of time without a stream merged.
    pub fn gaps(&self) -> Histogram<u64> {
        self.merged(|w| &w.gaps)
    }

    fn merged(&self, which: impl Fn(&WorkerStats) -> &Mutex<Histogram<u64>>) -> Histogram<u64> {
        let mut all = new_histogram();
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for w in workers.iter() {
            let h = which(w).lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }

    /// Reconnect attempts (stream ended, attempt made), ms since `epoch`,
    /// sorted.
    pub fn reconnect_times(&self) -> Vec<(u32, u32)> {
        let mut v = self
            .reconnect_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.sort_unstable();
        v
    }

    /// Why streams ended, by reason.
    pub fn ends(&self) -> HashMap<String, u64> {
        self.ends.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why reconnects failed (network errors), by reason.
    pub fn reconnect_failures(&self) -> HashMap<String, u64> {
        self.reconnect_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(map: &Mutex<HashMap<String, u64>>, why: String) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(why)
            .or_default() += 1;
    }

    fn note_reconnect(&self, ended: Instant) {
        let ms = |t: Instant| {
            t.saturating_duration_since(self.epoch)
                .as_millis()
                .min(u32::MAX as u128) as u32
        };
        let now = ms(Instant::now());
        let mut times = self
            .reconnect_times
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if times.len() < MAX_RECONNECT_TIMES {
            times.push((ms(ended), now));
        }
    }

    /// Runs with this thread's buffer and stats, creating them on first use.
    fn with_local<R>(self: &Arc<Self>, f: impl FnOnce(&mut Local) -> R) -> R {
        LOCAL.with(|cell| {
            let mut slot = cell.borrow_mut();
            if !slot.as_ref().is_some_and(|l| Arc::ptr_eq(&l.owner, self)) {
                let stats = Arc::new(WorkerStats {
                    latency: Mutex::new(new_histogram()),
                    gaps: Mutex::new(new_histogram()),
                    delivered: AtomicU64::new(0),
                });
                self.workers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(stats.clone());
                *slot = Some(Local {
                    owner: self.clone(),
                    stats,
                    buf: vec![0; READ_BUF].into_boxed_slice(),
                });
            }
            f(slot.as_mut().expect("set above"))
        })
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Client number `i`: opens its stream, reports the result, then reads
/// (and reconnects) until the bench stops or a reconnect is refused.
pub async fn run(streams: Arc<Streams>, i: usize) -> Outcome {
    let topic = i % streams.topics;
    let mut outcome = Outcome {
        topic,
        opened: false,
        ends: 0,
        reconnects: 0,
        fatal: None,
        counts: Counts::default(),
        foreign: 0,
        tracker: Tracker::new(topic, streams.topics, streams.publishers),
    };
    let opened = {
        let _permit = streams.opening.acquire().await;
        match tokio::time::timeout(streams.connect_timeout, open(&streams, i, topic, None)).await {
            Ok(r) => r.map_err(OpenError::into_string),
            Err(_) => Err("timed out opening".to_owned()),
        }
    };
    let mut conn = match opened {
        Ok(conn) => conn,
        Err(why) => {
            let _ = streams.opened.send((topic, Err(why)));
            return outcome;
        }
    };
    outcome.opened = true;
    streams.open.fetch_add(1, Relaxed);
    let _ = streams.opened.send((topic, Ok(())));

    let stop = Arc::new(AtomicWaker::new());
    streams
        .stop_wakers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(stop.clone());
    let mut reader = Reader {
        dechunk: None,
        scanner: Scanner::default(),
        tracker: std::mem::replace(&mut outcome.tracker, Tracker::new(0, 1, 1)),
    };
    'client: loop {
        let Some(why) = read_stream(&streams, &stop, conn, &mut reader).await else {
            break;
        };
        streams.open.fetch_sub(1, Relaxed);
        outcome.ends += 1;
        Streams::count(&streams.ends, why);
        let lost_at = Instant::now();
        conn = loop {
            let delay = reader
                .scanner
                .retry_ms
                .map_or(streams.default_retry, Duration::from_millis);
            if unless_stopped(&streams, &stop, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                break 'client;
            }
            outcome.reconnects += 1;
            streams.note_reconnect(lost_at);
            let attempt = tokio::time::timeout(
                streams.connect_timeout,
                open(&streams, i, topic, Some(&reader.scanner.last_id)),
            );
            match unless_stopped(&streams, &stop, attempt).await {
                None => break 'client,
                Some(Ok(Ok(conn))) => {
                    let gap = lost_at.elapsed().as_micros() as u64;
                    streams.with_local(|local| {
                        let mut gaps = local.stats.gaps.lock().unwrap_or_else(|e| e.into_inner());
                        gaps.saturating_record(gap);
                    });
                    streams.open.fetch_add(1, Relaxed);
                    break conn;
                }
                Some(Ok(Err(OpenError::Fatal(why)))) => {
                    outcome.fatal = Some(why);
                    break 'client;
                }
                Some(Ok(Err(OpenError::Network(why)))) => {
                    Streams::count(&streams.reconnect_failures, why);
                }
                Some(Err(_)) => {
                    Streams::count(&streams.reconnect_failures, "timed out".to_owned());
                }
            }
        };
    }
    outcome.counts = reader.tracker.counts;
    outcome.foreign = reader.scanner.foreign;
    outcome.tracker = reader.tracker;
    outcome
}

/// Runs `fut` unless the bench stops first (`None`).
async fn unless_stopped<F: Future>(
    streams: &Streams,
    stop: &AtomicWaker,
    fut: F,
) -> Option<F::Output> {
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        stop.register(cx.waker());
        if streams.stopped() {
            return Poll::Ready(None);
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Connects stream `i` to its endpoint, from its source address (if any)
/// and `port` (else one the kernel picks).
async fn connect(streams: &Streams, i: usize, port: Option<u16>) -> std::io::Result<TcpStream> {
    let t = streams.target.endpoint(i);
    let socket = match t.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| context(e, "socket"))?;
    if let Some(src) = streams.target.source(i) {
        // A run right after another finds many ports in TIME_WAIT; binding
        // one of those is fine for an outgoing connection.
        socket
            .set_reuseaddr(true)
            .map_err(|e| context(e, "socket"))?;
        let bound = match port {
            Some(p) => socket
                .bind(SocketAddr::new(src, p))
                .or_else(|_| socket.bind(SocketAddr::new(src, 0))),
            None => socket.bind(SocketAddr::new(src, 0)),
        };
        bound.map_err(|e| context(e, &format!("bind {src}")))?;
    }
    socket
        .connect(t.addr)
        .await
        .map_err(|e| context(e, "connect"))
}

/// `e`, its message prefixed with what failed; its kind kept.
fn context(e: std::io::Error, what: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Connects, sends the GET and reads the response head: the stream's first
/// connection (`last_id` `None`), or a reconnect (with `Last-Event-ID` when
/// its last id is not empty).
async fn open(
    streams: &Streams,
    i: usize,
    topic: usize,
    last_id: Option<&[u8]>,
) -> Result<Conn, OpenError> {
    let net = OpenError::Network;
    let t = streams.target.endpoint(i);
    // A first connection takes a port of its own (see `source_port`); a
    // reconnect, whose old port may be in TIME_WAIT, or a port taken by
    // something else, falls back to the kernel's choice.
    let own_port = last_id.is_none().then(|| streams.target.source_port(i));
    let last_id = last_id.unwrap_or_default();
    let stream = match connect(streams, i, own_port).await {
        Err(e) if own_port.is_some() && e.kind() == ErrorKind::AddrNotAvailable => {
            connect(streams, i, None).await
        }
        r => r,
    }
    .map_err(|e| net(e.to_string()))?;
    let request = t.request(
        &crate::target::topic_name(topic as u64, streams.topics),
        last_id,
    );
    let mut sent = 0;
    while sent < request.len() {
        stream
            .writable()
            .await
            .map_err(|e| net(format!("write: {e}")))?;
        match stream.try_write(&request[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(net(format!("write: {e}"))),
        }
    }

    let mut head = Vec::with_capacity(1024);
    loop {
        stream
            .readable()
            .await
            .map_err(|e| net(format!("read: {e}")))?;
        match stream.try_read_buf(&mut head) {
            Ok(0) => return Err(net("closed before the response head".into())),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(net(format!("read: {e}"))),
        }
        if let Some(h) = scan::parse_head(&head).map_err(net)? {
            if h.status != 200 {
                return Err(OpenError::Fatal(format!("HTTP {}", h.status)));
            }
            if !h.event_stream {
                return Err(OpenError::Fatal(
                    "HTTP 200 that is not text/event-stream".into(),
                ));
            }
            return Ok(Conn {
                stream,
                head,
                body_start: h.len,
                chunked: h.chunked,
            });
        }
        if head.len() == head.capacity() {
            head.reserve(head.len());
        }
    }
}

/// Reads one stream until the bench stops (`None`) or the stream ends
/// (`Some(why)`).
///
/// Reads through `AsyncRead::poll_read`, not `readable()` + `try_read`: on a
/// short read tokio then knows the socket is drained and waits for the next
/// readiness event, where `try_read` would need one more `recv` returning
/// EAGAIN per wake-up (measured: a third more CPU per delivery).
async fn read_stream(
    streams: &Arc<Streams>,
    stop: &AtomicWaker,
    conn: Conn,
    reader: &mut Reader,
) -> Option<String> {
    let Conn {
        mut stream,
        head,
        body_start,
        chunked,
    } = conn;
    reader.dechunk = chunked.then(Dechunk::default);
    reader.scanner.reconnected();
    let first = streams.with_local(|local| reader.feed(&head[body_start..], local));
    drop(head);
    match first {
        Ok(false) => {}
        Ok(true) => return Some("the server ended the stream".to_owned()),
        Err(e) => return Some(e),
    }
    std::future::poll_fn(|cx| {
        stop.register(cx.waker());
        if streams.stopped() {
            return Poll::Ready(None);
        }
        streams.with_local(|local| {
            // Until the socket is drained (or tokio's budget says yield).
            loop {
                let mut buf = ReadBuf::new(&mut local.buf);
                let n = match Pin::new(&mut stream).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(format!("read: {e}"))),
                    Poll::Ready(Ok(())) => buf.filled().len(),
                };
                if n == 0 {
                    return Poll::Ready(Some("the server closed the connection".to_owned()));
                }
                match reader.feed_with(&local.buf[..n], &local.stats) {
                    Ok(false) => {}
                    Ok(true) => return Poll::Ready(Some("the server ended the stream".to_owned())),
                    Err(e) => return Poll::Ready(Some(e)),
                }
            }
        })
    })
    .await
}

/// One client's decoding and bookkeeping state.
struct Reader {
    dechunk: Option<Dechunk>,
    scanner: Scanner,
    tracker: Tracker,
}

impl Reader {
    fn feed(&mut self, bytes: &[u8], local: &mut Local) -> Result<bool, String> {
        let stats = local.stats.clone();
        self.feed_with(bytes, &stats)
    }

    /// Feeds body bytes just read; true once the body has ended.
    fn feed_with(&mut self, bytes: &[u8], stats: &WorkerStats) -> Result<bool, String> {
        if bytes.is_empty() {
            return Ok(false);
        }
        let now = unix_micros();
        let mut latency = stats.latency.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = 0;
        let Reader {
            dechunk,
            scanner,
            tracker,
        } = self;
        let mut on_event = |seq: u64, sent: u64| {
            if tracker.record(seq) {
                latency.saturating_record(now.saturating_sub(sent));
                new += 1;
            }
        };
        let mut bad = None;
        let ended = match dechunk {
            Some(d) => d.feed(bytes, |part| {
                if bad.is_none()
                    && let Err(e) = scanner.feed(part, &mut on_event)
                {
                    bad = Some(e);
                }
            })?,
            None => {
                scanner.feed(bytes, &mut on_event)?;
                false
            }
        };
        drop(latency);
        if new > 0 {
            stats.delivered.fetch_add(new, Relaxed);
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(ended),
        }
    }
}
