//! What the stream plane admits, so one client cannot crowd out the others:
//! connections open at once (`--max-connections`, a semaphore taken at
//! accept), new connections per second per client address
//! (`--max-conn-rate-per-ip`) and open streams per client address
//! (`--max-streams-per-ip`).
//!
//! A connection over a limit is still answered — 503 `too_many_connections`
//! or 429 `rate_limited`, with `Retry-After` and `Connection: close` — by a
//! short-lived refusal task. Those tasks are themselves capped
//! ([`MAX_REFUSING`]); past that, surplus connections are closed at once.
//!
//! Behind a trusted proxy every connection comes from the proxy, so the
//! connection rate is charged per stream request to the forwarded client
//! address instead of per connection to the proxy.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StreamOptions;
use crate::client_ip::TrustedProxies;
use crate::error::ApiError;
use crate::limits::rate::retry_after_secs;
use crate::limits::{RateLimiter, StreamCounts, StreamSlot, ip_key};

/// Most connections being refused at once (unless the open-files budget
/// lowers it, see `StreamOptions::max_refusing`).
pub const MAX_REFUSING: usize = 1024;

/// `Retry-After` when the server is full, in seconds.
const FULL_RETRY_AFTER: u64 = 5;
/// `Retry-After` when an address has too many streams open, in seconds.
const STREAMS_RETRY_AFTER: u64 = 5;

/// What to do with a newly accepted connection.
pub enum Admission {
    /// Serve it; the permit is its place among `--max-connections`.
    Serve(OwnedSemaphorePermit),
    /// Answer its first request with this error and close it.
    Refuse(ApiError, OwnedSemaphorePermit),
    /// Close it at once (too many refusals under way).
    Drop,
}

#[derive(Debug)]
pub struct StreamLimits {
    connections: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    max_connections: usize,
    conn_rate: Option<RateLimiter<IpAddr>>,
    streams: Option<Arc<StreamCounts>>,
    proxies: TrustedProxies,
}

impl StreamLimits {
    pub fn new(options: &StreamOptions) -> Self {
        let rate = options.max_conn_rate_per_ip;
        StreamLimits {
            connections: Arc::new(Semaphore::new(options.max_connections)),
            refusing: Arc::new(Semaphore::new(options.max_refusing.max(1))),
            max_connections: options.max_connections,
            conn_rate: RateLimiter::new(rate, rate),
            streams: StreamCounts::new(options.max_streams_per_ip),
            proxies: options.trusted_proxies.clone(),
        }
    }

    /// Decides on a connection accepted from `peer`.
    pub fn admit(&self, peer: IpAddr) -> Admission {
        let refusal = match self.connections.clone().try_acquire_owned() {
            Err(_) => ApiError::unavailable(
                "too_many_connections",
                format!(
                    "the gateway already has {} connections open; retry",
                    self.max_connections
                ),
                FULL_RETRY_AFTER,
            ),
            // A proxy's connections are charged per request (`check_rate`).
            Ok(permit) if self.proxies.trusts(peer) => return Admission::Serve(permit),
            Ok(permit) => match self.rate(peer) {
                Ok(()) => return Admission::Serve(permit),
                Err(e) => e,
            },
        };
        match self.refusing.clone().try_acquire_owned() {
            Ok(permit) => Admission::Refuse(refusal, permit),
            Err(_) => Admission::Drop,
        }
    }

    /// The client's address: `peer`, or what a trusted proxy forwarded.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        self.proxies.client_ip(peer, headers)
    }

    /// For a request forwarded by a trusted proxy: charges the connection
    /// rate to the forwarded client address.
    pub fn check_rate(&self, peer: IpAddr, client: IpAddr) -> Result<(), ApiError> {
        if self.proxies.trusts(peer) && !self.proxies.trusts(client) {
            self.rate(client)?;
        }
        Ok(())
    }

    fn rate(&self, ip: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = &self.conn_rate else {
            return Ok(());
        };
        limiter.check(ip_key(ip)).map_err(|wait| {
            ApiError::too_many_requests(
                "rate_limited",
                "too many new connections from your address; slow down",
                retry_after_secs(wait),
            )
        })
    }

    /// A place for one more stream from `client`.
    pub fn stream_slot(&self, client: IpAddr) -> Result<Option<StreamSlot>, ApiError> {
        let Some(counts) = &self.streams else {
            return Ok(None);
        };
        counts.acquire(client).map(Some).ok_or_else(|| {
            ApiError::too_many_requests(
                "too_many_streams",
                format!(
                    "your address already has {} streams open here; close one first",
                    counts.max()
                ),
                STREAMS_RETRY_AFTER,
            )
        })
    }

    /// Connections open now (served, not being refused).
    pub fn connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }
}
