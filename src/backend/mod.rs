//! Backends: where events come from and where they are made durable.
//!
//! With no backend the hub is the whole story (the embedded in-memory
//! default). A [`Bus`] plugged into the hub changes three things:
//! - `PATCH /events` hands events to the bus and answers once the bus has
//!   them; they reach this replica's clients the same way as every other
//!   replica's, through the bus, so all replicas give an event the same id;
//! - a topic's ring starts at the newest position the bus has when the topic
//!   is first followed, and positions (ids) come from the bus (Kafka: one
//!   ring per partition, see [`kafka`]);
//! - a resume point older than the ring is read back from the bus
//!   ([`Bus::catch_up`]) and handed over to the ring with no gap or duplicate.
//!
//! Architecture invariant: a backend never blocks the hub: it talks to the
//! hub only through `Hub::publish_at` (from its own tasks) and bounded
//! channels.

pub mod kafka;
pub mod redis;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::hub::HubError;
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
