//! The stream side: one small task per SSE connection, over a raw tokio
//! `TcpStream` with a hand-written HTTP/1.1 GET.
//!
//! Kept cheap so one process can take about a million deliveries a second on
//! a small machine next to the server under test: a connection owns no read
//! buffer (it waits for readiness, then reads into its worker thread's
//! buffer), the bytes are scanned in place ([`crate::scan`]), latencies go to
//! the worker thread's histogram under one uncontended lock per read (one
//! clock read per read, too), and counters are per thread.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

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

/// What one worker thread's streams have seen so far.
pub struct WorkerStats {
    pub latency: Mutex<Histogram<u64>>,
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
}

/// How one stream went, once it is over.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub topic: usize,
    pub opened: bool,
    /// The server ended the stream (or it failed) before the bench did.
    pub ended_early: bool,
    pub end_reason: Option<String>,
    pub counts: Counts,
    /// Data lines that were not bench events (server notices).
    pub foreign: u64,
}

struct Local {
    owner: Arc<Streams>,
    stats: Arc<WorkerStats>,
    buf: Box<[u8]>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

impl Streams {
    pub fn new(
        target: Target,
        topics: usize,
        publishers: usize,
        concurrency: usize,
        connect_timeout: Duration,
    ) -> (Arc<Streams>, mpsc::UnboundedReceiver<Opened>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let streams = Arc::new(Streams {
            target,
            topics,
            publishers,
            connect_timeout,
            opening: Semaphore::new(concurrency),
            stopping: AtomicBool::new(false),
            stop_wakers: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
            opened: tx,
        });
        (streams, rx)
    }

    /// Ends every stream's read loop.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let wakers = self.stop_wakers.lock().unwrap_or_else(|e| e.into_inner());
        for w in wakers.iter() {
            w.wake();
        }
    }

    /// Distinct bench events received by all streams so far.
    pub fn delivered(&self) -> u64 {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.iter().map(|w| w.delivered.load(Relaxed)).sum()
    }

    /// All worker threads' latency histograms merged.
    pub fn latency(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for w in workers.iter() {
            let h = w.latency.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }

    /// Runs with this thread's buffer and stats, creating them on first use.
    fn with_local<R>(self: &Arc<Self>, f: impl FnOnce(&mut Local) -> R) -> R {
        LOCAL.with(|cell| {
            let mut slot = cell.borrow_mut();
            if !slot.as_ref().is_some_and(|l| Arc::ptr_eq(&l.owner, self)) {
                let stats = Arc::new(WorkerStats {
                    latency: Mutex::new(new_histogram()),
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

/// Stream number `i`: opens it, reports the result, then reads it until the
/// bench stops (or the server ends it).
pub async fn run(streams: Arc<Streams>, i: usize) -> Outcome {
    let topic = i % streams.topics;
    let mut outcome = Outcome {
        topic,
        ..Outcome::default()
    };
    let opened = {
        let _permit = streams.opening.acquire().await;
        match tokio::time::timeout(streams.connect_timeout, open(&streams, i, topic)).await {
            Ok(r) => r,
            Err(_) => Err("timed out opening".to_owned()),
        }
    };
    let (mut stream, head, body_start, chunked) = match opened {
        Ok(ok) => ok,
        Err(why) => {
            let _ = streams.opened.send((topic, Err(why)));
            return outcome;
        }
    };
    outcome.opened = true;
    streams.open.fetch_add(1, Relaxed);
    let _ = streams.opened.send((topic, Ok(())));

    let mut reader = Reader {
        dechunk: chunked.then(Dechunk::default),
        scanner: Scanner::default(),
        tracker: Tracker::new(topic, streams.topics, streams.publishers),
    };
    let first = streams.with_local(|local| reader.feed(&head[body_start..], local));
    drop(head);
    let end = match first {
        Ok(false) => read_until_stopped(&streams, &mut stream, &mut reader).await,
        Ok(true) => Some("the server ended the stream".to_owned()),
        Err(e) => Some(e),
    };
    if let Some(why) = end {
        streams.open.fetch_sub(1, Relaxed);
        outcome.ended_early = true;
        outcome.end_reason = Some(why);
    }
    outcome.counts = reader.tracker.counts;
    outcome.foreign = reader.scanner.foreign;
    outcome
}

/// Connects, sends the GET and reads the response head. Returns the stream,
/// the bytes read, where the body starts in them, and whether it is chunked.
async fn open(
    streams: &Streams,
    i: usize,
    topic: usize,
) -> Result<(TcpStream, Vec<u8>, usize, bool), String> {
    let t = &streams.target;
    let socket = match t.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = t.source(i) {
        // A run right after another finds many ports in TIME_WAIT; binding
        // one of those is fine for an outgoing connection.
        socket
            .set_reuseaddr(true)
            .map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::new(src, 0))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = socket
        .connect(t.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = t.request(&crate::target::topic_name(topic as u64, streams.topics));
    let mut sent = 0;
    while sent < request.len() {
        stream.writable().await.map_err(|e| format!("write: {e}"))?;
        match stream.try_write(&request.as_bytes()[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }

    let mut head = Vec::with_capacity(1024);
    loop {
        stream.readable().await.map_err(|e| format!("read: {e}"))?;
        match stream.try_read_buf(&mut head) {
            Ok(0) => return Err("closed before the response head".into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
        if let Some(h) = scan::parse_head(&head)? {
            if h.status != 200 {
                return Err(format!("HTTP {}", h.status));
            }
            return Ok((stream, head, h.len, h.chunked));
        }
        if head.len() == head.capacity() {
            head.reserve(head.len());
        }
    }
}

/// Reads until the bench stops (`None`) or the stream ends (`Some(why)`).
///
/// Reads through `AsyncRead::poll_read`, not `readable()` + `try_read`: on a
/// short read tokio then knows the socket is drained and waits for the next
/// readiness event, where `try_read` would need one more `recv` returning
/// EAGAIN per wake-up (measured: a third more CPU per delivery).
async fn read_until_stopped(
    streams: &Arc<Streams>,
    stream: &mut TcpStream,
    reader: &mut Reader,
) -> Option<String> {
    let stop = Arc::new(AtomicWaker::new());
    streams
        .stop_wakers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(stop.clone());
    std::future::poll_fn(|cx| {
        stop.register(cx.waker());
        if streams.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Poll::Ready(None);
        }
        streams.with_local(|local| {
            // Until the socket is drained (or tokio's budget says yield).
            loop {
                let mut buf = ReadBuf::new(&mut local.buf);
                let n = match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
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

/// One stream's decoding and bookkeeping state.
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
        let ended = match dechunk {
            Some(d) => d.feed(bytes, |part| scanner.feed(part, &mut on_event))?,
            None => {
                scanner.feed(bytes, &mut on_event);
                false
            }
        };
        drop(latency);
        if new > 0 {
            stats.delivered.fetch_add(new, Relaxed);
        }
        Ok(ended)
    }
}
