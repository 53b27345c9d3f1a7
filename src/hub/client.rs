//! A connected stream as the rest of the gateway sees it: identity for
//! `/clients`, counters, per-ring cursors, and the switch that ends it.
//!
//! The stream's own task is the only writer of its cursors and counters, so
//! those are plain loads and stores; other threads only read them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::sse::CloseReason;

/// What the stream plane knows about a request when it subscribes.
#[derive(Debug, Clone)]
pub struct ClientMeta {
    pub remote_addr: SocketAddr,
    pub user_agent: Option<String>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Cancelled to close the client's HTTP/1 connection when the stream is
    /// ended by the gateway (an HTTP/2 connection carries other streams).
    pub connection: Option<CancellationToken>,
    /// The client's address: the TCP peer's, or behind a trusted proxy the
    /// one it forwarded (`--trusted-proxy`).
    pub client_ip: IpAddr,
    /// When the stream's token expires: the stream then ends with
    /// `token_expired` (checked on each heartbeat tick).
    pub expires_at: Option<SystemTime>,
}

pub struct Client {
    id: Arc<str>,
    topics: Box<[Arc<str>]>,
    meta: ClientMeta,
    connected_at: SystemTime,
    /// Per ring: the ordinal of the last event read.
    cursors: Box<[AtomicU64]>,
    /// Per ring: the head ordinal when the stream joined. Resumed history
    /// up to there is backlog, not lag (see [`Client::lag_base`]).
    joined_at: Box<[AtomicU64]>,
    events_sent: AtomicU64,
    bytes_sent: AtomicU64,
    /// One more than the heartbeat tick at which the stream last wrote an
    /// event (0: none yet). A stream that wrote one since the previous tick
    /// is not idle: that tick's heartbeat neither wakes it nor has it write
    /// a comment.
    evented: AtomicU64,
    close: AtomicU8,
    waker: AtomicWaker,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("id", &self.id).finish()
    }
}

const OPEN: u8 = 0;

fn encode_reason(r: CloseReason) -> u8 {
    match r {
        CloseReason::Shutdown => 1,
        CloseReason::Slow => 2,
        CloseReason::Kicked => 3,
        CloseReason::Unavailable => 4,
        CloseReason::TokenExpired => 5,
    }
}

fn decode_reason(v: u8) -> Option<CloseReason> {
    match v {
        1 => Some(CloseReason::Shutdown),
        2 => Some(CloseReason::Slow),
        3 => Some(CloseReason::Kicked),
        4 => Some(CloseReason::Unavailable),
        5 => Some(CloseReason::TokenExpired),
        _ => None,
    }
}

/// A client as `/clients` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    pub id: Arc<str>,
    pub remote_addr: String,
    /// The client's address (see [`ClientMeta::client_ip`]).
    pub client_ip: String,
    pub topics: Box<[Arc<str>]>,
    /// RFC 3339, milliseconds.
    pub connected_at: String,
    pub events_sent: u64,
    pub bytes_sent: u64,
    pub user_agent: Option<String>,
    pub protocol: &'static str,
    /// Events published to its topics that it has not written yet (see
    /// `Hub::lag_of`); only the replica that holds the stream knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

impl Client {
    /// A snapshot for `/clients` and the cluster registry.
    pub fn info(&self) -> ClientInfo {
        ClientInfo {
            id: self.id.clone(),
            remote_addr: self.meta.remote_addr.to_string(),
            client_ip: self.meta.client_ip.to_string(),
            topics: self.topics.clone(),
            connected_at: humantime::format_rfc3339_millis(self.connected_at).to_string(),
            events_sent: self.events_sent(),
            bytes_sent: self.bytes_sent(),
            user_agent: self.meta.user_agent.clone(),
            protocol: self.meta.protocol,
            lag: None,
        }
    }

    /// A client of `topics`, reading `rings` rings (one per topic, or per
    /// partition of a partitioned topic); cursors are per ring.
    pub(super) fn new(
        id: Arc<str>,
        topics: Box<[Arc<str>]>,
        rings: usize,
        meta: ClientMeta,
    ) -> Self {
        let cursors = (0..rings).map(|_| AtomicU64::new(0)).collect();
        let joined_at = (0..rings).map(|_| AtomicU64::new(0)).collect();
        Client {
            id,
            topics,
            meta,
            connected_at: SystemTime::now(),
            cursors,
            joined_at,
            events_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            evented: AtomicU64::new(0),
            close: AtomicU8::new(OPEN),
            waker: AtomicWaker::new(),
        }
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn topics(&self) -> &[Arc<str>] {
        &self.topics
    }

    pub fn meta(&self) -> &ClientMeta {
        &self.meta
    }

    pub fn connected_at(&self) -> SystemTime {
        self.connected_at
    }

    pub fn events_sent(&self) -> u64 {
        self.events_sent.load(Relaxed)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Relaxed)
    }

    /// How many rings it reads (cursors it has).
    pub(super) fn ring_count(&self) -> usize {
        self.cursors.len()
    }

    pub(super) fn cursor(&self, index: usize) -> u64 {
        self.cursors[index].load(Relaxed)
    }

    pub(super) fn set_cursor(&self, index: usize, ordinal: u64) {
        self.cursors[index].store(ordinal, Relaxed);
    }

    pub(super) fn joined_at(&self, index: usize) -> u64 {
        self.joined_at[index].load(Relaxed)
    }

    pub(super) fn set_joined_at(&self, index: usize, ordinal: u64) {
        self.joined_at[index].store(ordinal, Relaxed);
    }

    /// The ordinal a topic's lag is measured from: the cursor, or where the
    /// stream joined while it still reads older history. Only events
    /// published since it joined count towards `max_lag`, so a resume from
    /// deep in the history is not judged slow (and, under `disconnect`,
    /// closed again on every reconnect) before it could read anything.
    pub(super) fn lag_base(&self, index: usize) -> u64 {
        self.cursor(index).max(self.joined_at[index].load(Relaxed))
    }

    /// Counts a write. Only the stream's own task calls this.
    pub(super) fn count(&self, events: u64, bytes: usize) {
        self.events_sent
            .store(self.events_sent.load(Relaxed) + events, Relaxed);
        self.bytes_sent
            .store(self.bytes_sent.load(Relaxed) + bytes as u64, Relaxed);
    }

    /// Marks the stream as not idle during heartbeat tick `tick` (see
    /// `evented`). Only the stream's own task calls this.
    pub(super) fn evented_at(&self, tick: u64) {
        self.evented.store(tick + 1, Relaxed);
    }

    /// Whether the stream wrote no event since tick `tick - 1`: heartbeat
    /// tick `tick` is for it.
    pub(super) fn idle_at(&self, tick: u64) -> bool {
        self.evented.load(Relaxed) < tick
    }

    /// Asks the stream to end with `reason`. The first reason wins; returns
    /// false when the stream was already closing.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self
            .close
            .compare_exchange(OPEN, encode_reason(reason), Relaxed, Relaxed)
            .is_ok();
        if first {
            self.waker.wake();
            if let Some(conn) = &self.meta.connection {
                conn.cancel();
            }
        }
        first
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        decode_reason(self.close.load(Relaxed))
    }

    pub(super) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub(super) fn wake(&self) {
        self.waker.wake();
    }
}
