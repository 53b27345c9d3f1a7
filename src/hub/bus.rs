//! The hub's bus interface: what the hub needs from a bus shared by
//! several replicas (Redis, Kafka: the implementations live in
//! `src/backend/`, which depends on this module, never the reverse), the
//! types that cross it, and the side of the hub that only buses call.
//!
//! A [`Bus`] plugged into the hub (`Hub::set_bus`) changes three things:
//! - `Hub::publish_batch` hands events to the bus and answers once the bus
//!   has them; they reach this replica's streams the same way as every
//!   other replica's, through the bus ([`Hub::publish_at`]), so all replicas
//!   give an event the same id;
//! - a topic's ring starts at the newest position the bus has when the topic
//!   is first followed ([`Hub::ensure_topic_at`]; Kafka: one ring per
//!   partition, [`Hub::ensure_partition_at`]), and positions (ids) come from
//!   the bus;
//! - a resume point older than the ring is read back from the bus
//!   ([`Bus::catch_up`]) and handed over to the ring with no gap or duplicate.
//!
//! Architecture invariant: a bus never blocks the hub. The methods of the
//! `impl Hub` below are synchronous and take no lock across an await; a bus
//! calls them from its own tasks, and history reaches a stream over a
//! bounded channel. The hub awaits a bus only without holding a lock.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::ring::Ring;
use super::{Hub, HubError};
use crate::id::Position;
use crate::idempotency::IdempotencyKey;

/// An event to publish (checked: valid topic, event name without CR/LF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub topic: String,
    pub event: Option<String>,
    /// The payload as it goes on the wire.
    pub data: String,
}

/// An event read back from a bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub pos: Position,
    pub event: Option<String>,
    pub data: String,
}

/// One message from a catch-up reader.
#[derive(Debug)]
pub enum CatchUp {
    /// The next events, oldest first.
    Events(Vec<StoredEvent>),
    /// Events after the resume point were deleted from the bus too; the
    /// stream goes on from what its ring retains.
    Gap,
    /// Events after the resume point up to and including this position were
    /// deleted from the bus; the events sent next are the oldest it still
    /// has, so the stream gets a gap notice and then all of them.
    Trimmed(Position),
    /// The bus cannot be read now; the client should retry later.
    Failed(String),
    /// The resume point lies beyond the end of the bus's log: the log
    /// started again since the client saw it (see [`Bus::probe`]).
    Reset,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("{backend} is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// The bus has no source for a topic (Kafka: no Kafka topic is mapped
    /// to it); the detail names it. A client error, not an outage.
    #[error("{0}")]
    NoSuchTopic(String),
    /// A publish whose request may have reached the bus (a timeout or a
    /// lost connection after it was sent, or a batch written in part): the
    /// events may or may not be published. `Unavailable` is kept for
    /// failures where nothing was written.
    #[error("{backend}: {reason}")]
    OutcomeUnknown {
        backend: &'static str,
        reason: String,
    },
    /// An `Idempotency-Key` already used with a different batch.
    #[error("{0}")]
    KeyReused(String),
}

impl BusError {
    /// The answer to a retry whose key was first used for another batch.
    pub fn key_reused(key: &str) -> BusError {
        BusError::KeyReused(format!(
            "Idempotency-Key {key:?} was already used with a different batch; \
             use a new key for new events"
        ))
    }
}

/// An event source and bus shared by several replicas (Redis, Kafka).
pub trait Bus: Send + Sync + 'static {
    /// A short name for logs and `/ready` (`redis`, `kafka`).
    fn name(&self) -> &'static str;

    /// Makes `events` durable, all or nothing; returns their ids in order.
    fn publish<'a>(
        &'a self,
        events: &'a [NewEvent],
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>>;

    /// Like [`publish`](Bus::publish), but at most once per `key` within
    /// the bus's idempotency window, across replicas: a key published
    /// before answers with that publish's ids and publishes nothing (a
    /// different batch under the same key: [`BusError::KeyReused`]). A bus
    /// that cannot keep that promise refuses, publishing nothing (the
    /// default).
    fn publish_once<'a>(
        &'a self,
        events: &'a [NewEvent],
        key: &'a IdempotencyKey,
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        let _ = (events, key);
        Box::pin(async move {
            Err(BusError::Unavailable {
                backend: self.name(),
                reason: "this bus does not support Idempotency-Key".into(),
            })
        })
    }

    /// Starts following `topic` if this replica does not yet: creates the
    /// hub's topic at the newest position the bus has for it
    /// (`Hub::ensure_topic_at`), then delivers every later event with
    /// `Hub::publish_at`, in order.
    /// Fails with the hub's own error when the hub refuses the topic
    /// (`--max-topics`).
    fn follow<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), HubError>>;

    /// Reads the ring keyed `ring` (a topic's name, or a partition's key,
    /// see `Hub::ensure_partition_at`) after `after` up to and including
    /// `until`, on a reader owned by one stream: it ends when done or when
    /// the receiver is dropped.
    fn catch_up(&self, ring: &str, after: Position, until: Position) -> mpsc::Receiver<CatchUp>;

    /// For a resume point beyond the newest position of the ring keyed
    /// `ring`: checks whether it also lies beyond the end of the bus's log
    /// (which then started again since the client saw it). The receiver
    /// gets [`CatchUp::Reset`] if so, and closes otherwise or when the bus
    /// cannot tell. `None`: the bus cannot restart a log (the point is
    /// just one this replica has not reached yet).
    fn probe(&self, _ring: &str, _pos: Position) -> Option<mpsc::Receiver<CatchUp>> {
        None
    }

    /// Whether the bus answers now and would accept a publish.
    fn is_up(&self) -> bool;

    /// History readers ([`Bus::catch_up`]) running now, for `/metrics`.
    fn catch_ups_running(&self) -> i64 {
        0
    }
}

/// The bus-facing side of the hub: called only by buses, from their own
/// tasks; all synchronous.
impl Hub {
    /// Creates `name` starting after `start` unless it exists;
    /// returns the position its ring has reached.
    pub fn ensure_topic_at(&self, name: &str, start: Position) -> Result<Position, HubError> {
        Ok(self.create_topic(name, || start)?.head().1)
    }

    /// For a bus whose topics have partitions (Kafka): creates the ring of
    /// `name`'s partition `part`, keyed `key`, starting after `start` (whose
    /// `hi` is `part`), unless it exists; returns the position its ring has
    /// reached. Streams opened from then on read it with the topic's other
    /// partitions; a cursor carries one entry per partition.
    pub fn ensure_partition_at(
        &self,
        key: &str,
        name: &str,
        part: u64,
        start: Position,
    ) -> Result<Position, HubError> {
        let ring = self.create_ring(key, || {
            Ring::partition(key.into(), name.into(), part, start)
        })?;
        let mut partitions = self.partitions.write().unwrap_or_else(|e| e.into_inner());
        let rings = partitions.entry(ring.name().clone()).or_default();
        if !rings.iter().any(|r| Arc::ptr_eq(r, &ring)) {
            rings.push(ring.clone());
            rings.sort_by_key(|r| r.part());
        }
        Ok(ring.head().1)
    }

    /// The log behind the ring keyed `ring` started again (a
    /// Kafka topic re-created, or a broker that lost it), so its positions
    /// restart below the ring's: the ring forgets its events and starts
    /// again after `start`; its streams get a gap notice (reason `reset`)
    /// and go on with the new log. False when there is no such ring.
    pub fn reset_ring(&self, ring: &str, start: Position) -> bool {
        match self.get_topic(ring) {
            Some(t) => {
                t.reset(start);
                true
            }
            None => false,
        }
    }

    /// The newest position of the ring keyed `ring`, if it exists.
    pub fn ring_head(&self, ring: &str) -> Option<Position> {
        Some(self.get_topic(ring)?.head().1)
    }

    /// Appends an event the bus delivered, at the bus's position,
    /// to the ring keyed `ring` (a topic's name, or a partition's key; the
    /// id carries the topic's name). Ignored (false) when the ring does not
    /// exist or already has that position.
    pub fn publish_at(&self, ring: &str, pos: Position, event: Option<&str>, data: &str) -> bool {
        let Some(t) = self.get_topic(ring) else {
            return false;
        };
        let appended = self
            .append(&t, |head| {
                (pos > head).then(|| (pos, self.encode(t.name(), pos, event, data)))
            })
            .is_some();
        if appended {
            t.notify();
        }
        appended
    }

    /// Forgets a followed topic nobody has wanted for `linger`;
    /// true when it was forgotten (the bus then stops following it).
    pub fn forget_if_idle(&self, name: &str, linger: Duration) -> bool {
        // A topic with its own encoder (Mercure's) is followed for good: its
        // subscribers resume by ids only a replica that saw them knows.
        if self.encoder_for(name).is_some() {
            return false;
        }
        let now = self.now_ms();
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let idle = topics.get(name).is_none_or(|t| {
            t.subscriber_count() == 0
                && now.saturating_sub(t.touched_ms()) >= linger.as_millis() as u64
        });
        if idle && let Some(t) = topics.remove(name) {
            drop(topics);
            if t.part().is_some() {
                let mut partitions = self.partitions.write().unwrap_or_else(|e| e.into_inner());
                if let Some(rings) = partitions.get_mut(t.name()) {
                    rings.retain(|r| !Arc::ptr_eq(r, &t));
                    if rings.is_empty() {
                        partitions.remove(t.name());
                    }
                }
            }
        }
        idle
    }
}
