//! Kafka as event source and bus (librdkafka, through `rdkafka`).
//!
//! - **Consuming**: one consumer per process, by assignment (no consumer
//!   group, so every replica reads every record): all partitions of the
//!   configured topics, from the end at start-up. Each partition has its own
//!   ring in the hub (`Hub::ensure_partition_at`, key `<sse topic>#<p>`),
//!   because Kafka orders records per partition only. A record's position is
//!   `(partition, offset + 1)`: `lo` is the offset *after* the record (what
//!   Kafka calls the next offset to read, the committed-offset convention),
//!   so an empty partition is `p-0` and every ring has a position from the
//!   start. Ids are the same on every replica.
//! - **Producing**: `PATCH /events` produces each event to the Kafka topic
//!   mapped to its SSE topic (idempotent producer, `acks=all`) and answers
//!   once the broker acknowledged every event, within `--kafka-timeout`.
//! - **Catch-up**: a resume point older than a ring is read back with a
//!   short-lived consumer owned by the stream ([`catch_up`]).
//! - A periodic metadata fetch tells whether a PATCH would be accepted now
//!   (`/ready`), finds partitions added later (their rings start at offset
//!   0) and measures lag. It asks on a client of its own, never assigned
//!   (a request on the consumer's connection waits behind its fetch
//!   long-poll), about every topic first, and then assigns every new
//!   partition at once: start-up takes one round, however many topics.
//! - **Faults**: when every broker is lost, the consumer is replaced by a
//!   fresh, unassigned one and the producer by a fresh one once Kafka is back,
//!   so no client carries topic ids, producer ids or sequence numbers from
//!   before the outage into a cluster that may have forgotten them (a broker
//!   that lost its topics, or a topic deleted and created again). A partition
//!   whose log restarted below what its ring holds has its ring reset, and
//!   its streams get a gap notice (reason `reset`).
//!
//! Why the consumer is replaced rather than left to reconnect: librdkafka
//! (2.12.1, and its master as of this writing) crashes (SIGSEGV in
//! `rd_kafka_metadata_update_op`) when a Fetch response carries a "current
//! leader" for a topic with an all-zero topic id: the leader-discovery path
//! (KIP-951) then looks the topic up by a name it never set. Tansu answers a
//! Fetch for a topic id it does not know exactly so, which is what every
//! partition of a consumer fetches after the broker lost or re-created the
//! topic. A consumer with no assignment fetches nothing, and a new one learns
//! the topic's new id before it fetches.

mod catch_up;
mod idempotency;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::CatchUpReaders;
use crate::hub::{Bus, BusError, CatchUp, Hub, HubError, NewEvent};
use crate::id::Position;
use crate::idempotency::IdempotencyKey;
use crate::lifecycle::Lifecycle;
use crate::sse;
use idempotency::{Dedup, Tag};

/// How often metadata is fetched (health, new partitions).
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// The backoff librdkafka waits between reconnect attempts grows up to this
/// (its default is 10 s): after an outage, clients find the broker again
/// within about a second.
const RECONNECT_BACKOFF_MAX: &str = "1000";
/// The longest the live consumer's fetch waits for new records (librdkafka's
/// default is 500 ms). Kafka answers a waiting fetch as soon as a record
/// arrives, so there this only sets how often an idle consumer asks; a
/// broker that looks at its log between sleeps of half the remaining wait
/// (Tansu) delivers up to half of it late. The consumer's metadata and
/// offsets requests also queue behind the fetch.
const FETCH_WAIT_MAX: &str = "100";
/// Topics a metadata round asks about at once (librdkafka clients take
/// requests from several threads).
const FETCH_AT_ONCE: usize = 8;
/// Bound on the watch's own requests (at most --kafka-timeout).
const WATCH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a record read back to check a log waits for it.
const RECORD_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Lag is measured every this many metadata rounds.
const LAG_EVERY: u32 = 5;

/// One `--kafka-topics` entry: a Kafka topic and the SSE topic it feeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMap {
    pub kafka: String,
    pub sse: String,
}

impl TopicMap {
    /// Parses `kafka_topic` (same SSE name) or `kafka_topic=sse_topic`.
    pub fn parse(s: &str) -> Result<TopicMap, String> {
        let s = s.trim();
        let (kafka, sse) = s.split_once('=').unwrap_or((s, s));
        let (kafka, sse) = (kafka.trim(), sse.trim());
        // Kafka's own rule: [A-Za-z0-9._-]{1,249}.
        let kafka_ok = !kafka.is_empty()
            && kafka.len() <= 249
            && kafka
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !kafka_ok {
            return Err(format!("{kafka:?} is not a Kafka topic name"));
        }
        crate::topic::validate(sse, crate::topic::MAX_TOPIC_LEN)
            .map_err(|e| format!("{sse:?}: {e}"))?;
        Ok(TopicMap {
            kafka: kafka.to_owned(),
            sse: sse.to_owned(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topics to stream; each Kafka topic and each SSE topic once.
    pub topics: Vec<TopicMap>,
    /// Extra librdkafka settings (SASL, TLS, …), applied last.
    pub config: Vec<(String, String)>,
    /// The record header that carries the SSE event name.
    pub event_header: String,
    /// Bound on each request a client waits on (PATCH answers 503 past it).
    pub timeout: Duration,
    /// Most catch-up consumers running at once, across all streams.
    pub max_catch_up: usize,
    /// Names this replica's clients (`client.id`).
    pub replica_id: String,
    /// How long, and how many, `Idempotency-Key`s the consumers remember.
    pub idempotency_window: Duration,
    pub idempotency_capacity: usize,
}

/// Per Kafka topic counters.
#[derive(Debug, Default)]
pub struct TopicCounters {
    pub consumed: AtomicU64,
    pub skipped: AtomicU64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct KafkaStats {
    topics: BTreeMap<String, TopicCounters>,
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    pub produce_errors: AtomicU64,
    /// Records dropped as copies of a keyed record already delivered.
    pub duplicates_dropped: AtomicU64,
    /// Partition assignments made (each round assigns every new partition
    /// of every topic at once).
    pub assignments: AtomicU64,
    /// Metadata rounds begun: the watch's, and those of streams on a topic
    /// this replica did not follow yet.
    pub rounds: AtomicU64,
}

impl KafkaStats {
    fn new(topics: &[TopicMap]) -> Self {
        KafkaStats {
            topics: topics
                .iter()
                .map(|t| (t.kafka.clone(), TopicCounters::default()))
                .collect(),
            ..Default::default()
        }
    }

    /// Counters of each Kafka topic streamed.
    pub fn topics(&self) -> impl Iterator<Item = (&String, &TopicCounters)> {
        self.topics.iter()
    }

    /// Consumer lag by (Kafka topic, partition), as last measured.
    pub fn lag(&self) -> BTreeMap<(String, i32), i64> {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Routes librdkafka's own log lines and errors into `tracing`. Its lines
/// repeat on every reconnect attempt, so they are debug-level: the gateway
/// reports Kafka going down and coming back once, itself. A producer's
/// and the consumer's context also note when every broker was lost.
#[derive(Debug, Clone, Default)]
pub(crate) struct Context {
    health: Option<Arc<Health>>,
    /// The client is the producer (see [`lost_every_broker`]).
    producer: bool,
}

/// What a client went through since it was started.
#[derive(Debug, Default)]
struct Health {
    /// Every broker was unreachable at some point: a producer's id, epoch
    /// and sequence numbers, a consumer's topic ids may mean nothing to the
    /// cluster that comes back.
    brokers_lost: AtomicBool,
    /// Wakes the consume loop when every broker is lost.
    lost: tokio::sync::Notify,
    /// A producer's last publish was not acknowledged in time, or failed.
    failing: AtomicBool,
}

/// The producer and what it went through.
#[derive(Clone)]
struct LiveProducer {
    inner: FutureProducer<Context>,
    health: Arc<Health>,
}

/// Resolves when the client of `health` has lost every broker (a permit is
/// kept if nobody waits).
async fn lost(health: &Option<Arc<Health>>) {
    match health {
        Some(h) => h.lost.notified().await,
        None => std::future::pending().await,
    }
}

/// Whether a client error means no broker is reachable.
fn brokers_lost(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
}

/// Whether a client error, with librdkafka's `reason`, tells the producer
/// (or the consumer) that it lost every broker.
///
/// librdkafka (2.12.1, `rd_kafka_broker_set_state`) raises `AllBrokersDown`
/// when its count of brokers down reaches the number of brokers, then asks
/// for a re-bootstrap, which resets that count on the main thread, and only
/// then reads the count again to write "N/M brokers are down". So "1/1" and
/// "0/1" are the same event, the count read before or after the reset: which
/// one a client gets is a race between two threads (a loaded machine
/// tells "0/1" more often).
///
/// The producer counts both: one that is not replaced after an outage keeps
/// the producer id the broker may have forgotten, and a broker that lost its
/// state answers every produce with `UNKNOWN_PRODUCER_ID` while librdkafka
/// bumps the epoch and retries until `--kafka-timeout`, under a `/ready`
/// that says 200. A producer replaced without need costs one metadata round
/// of 503. The consumer ignores "0/…" as before (it was also seen while
/// librdkafka swaps the bootstrap address for the broker's own): an outage
/// it misses this way is seen by the watch (a failed round), which replaces
/// it.
fn lost_every_broker(e: &KafkaError, reason: &str, producer: bool) -> bool {
    brokers_lost(e) && (producer || !reason.starts_with("0/"))
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical => {
                tracing::warn!(facility = fac, line = message, "librdkafka")
            }
            _ => tracing::debug!(facility = fac, line = message, "librdkafka"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(health) = &self.health
            && lost_every_broker(&error, reason, self.producer)
        {
            health.brokers_lost.store(true, Relaxed);
            health.lost.notify_one();
        }
        let transient = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::MessageTimedOut
            )
        );
        if transient {
            tracing::debug!(error = %error, reason, "kafka client error");
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for Context {}

type Cons = StreamConsumer<Context>;
/// The client that asks for metadata and watermarks: never assigned, so
/// its requests never wait behind a fetch long-poll (`fetch.wait.max.ms`)
/// on the broker's connection, and it never fetches (module doc).
type Meta = BaseConsumer<Context>;

pub struct KafkaBus {
    opts: KafkaOptions,
    /// Kafka topic → SSE topic, and back.
    sse_of: HashMap<String, Arc<str>>,
    kafka_of: HashMap<String, String>,
    /// The shared consumer; replaced after an outage (see the module doc),
    /// taken and dropped at shutdown.
    consumer: Mutex<Option<Arc<Cons>>>,
    /// Metadata and watermarks (see [`Meta`]); taken and dropped at
    /// shutdown.
    meta: Mutex<Option<Arc<Meta>>>,
    /// Asks the consume loop to replace the consumer.
    replace_consumer: tokio::sync::Notify,
    /// The producer; replaced after an outage or a failure, taken, flushed
    /// and dropped at shutdown.
    producer: Mutex<Option<LiveProducer>>,
    hub: Weak<Hub>,
    /// Partitions the current consumer is assigned, by Kafka topic (held
    /// across the blocking metadata calls, so one sync runs at a time).
    assigned: tokio::sync::Mutex<HashMap<String, HashSet<i32>>>,
    /// The number (`KafkaStats::rounds`) of the latest round that succeeded;
    /// written and compared under `assigned`.
    round_ok: AtomicU64,
    /// Kafka topics that did not exist at the last metadata fetch.
    missing: Mutex<HashSet<String>>,
    /// The last record delivered, by ring key: its position and a
    /// fingerprint of its content (see `same_log`).
    last_records: Mutex<HashMap<String, (Position, u64)>>,
    catch_ups: CatchUpReaders,
    up: AtomicBool,
    /// Whether Kafka has answered since start-up.
    was_up: AtomicBool,
    stats: Arc<KafkaStats>,
    /// Keyed records seen by this replica's consumers.
    dedup: Dedup,
    tracker: tokio_util::task::TaskTracker,
    me: Weak<KafkaBus>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.opts.brokers)
            .finish()
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable {
        backend: "kafka",
        reason: e.to_string(),
    }
}

/// Errors after which an idempotent producer never succeeds again.
fn fenced(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::InvalidProducerIdMapping
    )
}

/// The hub key of an SSE topic's partition ring.
fn ring_key(sse: &str, partition: i32) -> String {
    format!("{sse}#{partition}")
}

/// A record's content, to tell the same record from a new one at the same
/// offset (a re-created log).
fn fingerprint(event: Option<&str>, data: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (event, data).hash(&mut h);
    h.finish()
}

/// A record's position: its partition, and the offset after it.
fn position(partition: i32, offset: i64) -> Position {
    Position::new(partition as u64, offset as u64 + 1)
}

/// A record as an event: its value as UTF-8 (`None` when it is not; an
/// absent value is empty data) and the event name from `header`, when that
/// is a valid name (else the record is delivered unnamed).
fn decode<'m>(m: &'m BorrowedMessage<'_>, header: &str) -> Option<(Option<&'m str>, &'m str)> {
    let data = match m.payload() {
        None => "",
        Some(bytes) => std::str::from_utf8(bytes).ok()?,
    };
    let event = m.headers().and_then(|headers| {
        let value = headers.iter().filter(|h| h.key == header).last()?.value?;
        let name = std::str::from_utf8(value).ok()?;
        let valid = !name.is_empty() && sse::check_event_name(name).is_ok();
        valid.then_some(name)
    });
    Some((event, data))
}

/// Whether `m` is to be delivered: not a copy of a keyed record already
/// delivered (see [`idempotency`]). `id` is its event id.
fn first_copy(dedup: &Dedup, m: &BorrowedMessage<'_>, id: &str) -> bool {
    let tag = m.headers().and_then(|headers| {
        let value = headers
            .iter()
            .filter(|h| h.key == idempotency::HEADER)
            .last()?
            .value?;
        Tag::parse(value)
    });
    tag.is_none_or(|tag| dedup.first_copy(&tag, id))
}

/// Broker answers that prove a record was not written.
fn rejected(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
    )
}

fn outcome_unknown(e: impl std::fmt::Display) -> BusError {
    BusError::OutcomeUnknown {
        backend: "kafka",
        reason: e.to_string(),
    }
}

impl KafkaBus {
    /// Creates the bus for `hub`. Clients connect lazily and retry, so the
    /// gateway starts, not ready, while Kafka is down.
    pub fn new(
        opts: KafkaOptions,
        hub: &Arc<Hub>,
        tracker: tokio_util::task::TaskTracker,
    ) -> Result<Arc<KafkaBus>, BusError> {
        let consumer = opts.consumer()?;
        let meta = Arc::new(opts.meta()?);
        let producer = opts.producer()?;
        let sse_of = opts
            .topics
            .iter()
            .map(|t| (t.kafka.clone(), Arc::from(t.sse.as_str())))
            .collect();
        let kafka_of = opts
            .topics
            .iter()
            .map(|t| (t.sse.clone(), t.kafka.clone()))
            .collect();
        Ok(Arc::new_cyclic(|me| KafkaBus {
            me: me.clone(),
            catch_ups: CatchUpReaders::new(opts.max_catch_up, tracker.clone()),
            stats: Arc::new(KafkaStats::new(&opts.topics)),
            dedup: Dedup::new(opts.idempotency_window, opts.idempotency_capacity),
            opts,
            sse_of,
            kafka_of,
            consumer: Mutex::new(Some(Arc::new(consumer))),
            meta: Mutex::new(Some(meta)),
            replace_consumer: tokio::sync::Notify::new(),
            producer: Mutex::new(Some(producer)),
            hub: Arc::downgrade(hub),
            assigned: tokio::sync::Mutex::new(HashMap::new()),
            round_ok: AtomicU64::new(0),
            missing: Mutex::new(HashSet::new()),
            last_records: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            was_up: AtomicBool::new(false),
            tracker,
        }))
    }

    pub fn stats(&self) -> &Arc<KafkaStats> {
        &self.stats
    }

    pub fn options(&self) -> &KafkaOptions {
        &self.opts
    }

    /// The producer, replaced first if it hit a fatal error. Fails once
    /// closed.
    fn live_producer(&self) -> Result<LiveProducer, BusError> {
        let mut slot = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let producer = slot
            .as_ref()
            .ok_or_else(|| unavailable("the producer is closed"))?;
        if let Some((code, reason)) = producer.inner.client().fatal_error() {
            tracing::warn!(%code, reason, "kafka producer failed for good; starting a new one");
            let old = slot.replace(self.opts.producer()?);
            retire(old);
        }
        slot.clone()
            .ok_or_else(|| unavailable("the producer is closed"))
    }

    /// Replaces `dead` (unless already replaced) with a fresh producer: an
    /// idempotent producer whose id or epoch the broker no longer accepts
    /// fails every later message, and one that lived through an outage may
    /// wait a long time before the broker accepts it again (see
    /// `producer_ready`).
    fn renew_producer(&self, dead: &LiveProducer, why: &str) {
        let mut slot = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let same = slot
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.health, &dead.health));
        if same {
            tracing::info!(reason = why, "starting a new kafka producer");
            match self.opts.producer() {
                Ok(p) => retire(slot.replace(p)),
                Err(e) => tracing::warn!(error = %e, "cannot start a new kafka producer"),
            }
        }
    }

    /// The Kafka topic and partition of a ring key.
    fn partition_of(&self, ring: &str) -> Option<(String, i32)> {
        let (sse, p) = ring.rsplit_once('#')?;
        Some((self.kafka_of.get(sse)?.clone(), p.parse::<i32>().ok()?))
    }

    fn consumer(&self) -> Option<Arc<Cons>> {
        self.consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs a blocking librdkafka call on the consumer off the runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Cons) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, BusError> {
        let consumer = self
            .consumer()
            .ok_or_else(|| unavailable("the consumer is closed"))?;
        tokio::task::spawn_blocking(move || f(&consumer))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// Runs a blocking librdkafka call on the metadata client off the
    /// runtime.
    async fn meta_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Meta) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, BusError> {
        let meta = self
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| unavailable("the metadata client is closed"))?;
        tokio::task::spawn_blocking(move || f(&meta))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// Starts consuming and the metadata watch; both end when backends
    /// close (`Lifecycle::backends_closing`: after the control plane
    /// answered its last PATCH), and the consumer and producer are closed
    /// then.
    pub fn spawn(self: &Arc<Self>, life: &Lifecycle) {
        life.tracker()
            .spawn(self.clone().consume_loop(life.clone()));
        life.tracker().spawn(self.clone().watch_loop(life.clone()));
    }

    /// Hands every record of the assigned partitions to the hub, in order.
    /// librdkafka reconnects by itself and resumes each partition from its
    /// position, so an outage loses nothing Kafka kept. When every broker is
    /// lost (or the watch asks), the consumer is replaced by an unassigned
    /// one; the watch assigns it again, from where each ring is.
    async fn consume_loop(self: Arc<Self>, life: Lifecycle) {
        'consumers: while let Some(consumer) = self.consumer() {
            let health = consumer.client().context().health.clone();
            loop {
                let msg = tokio::select! {
                    m = consumer.recv() => m,
                    _ = lost(&health) => break,
                    _ = self.replace_consumer.notified() => break,
                    _ = life.backends_closing() => break 'consumers,
                };
                match msg {
                    Ok(m) => self.deliver(&m),
                    // Transport errors come here too while Kafka is down;
                    // the watch reports the outage.
                    Err(e) => tracing::debug!(error = %e, "kafka consumer error"),
                }
            }
            // No record of the old consumer is delivered after this point:
            // the new one starts where the rings are. Stop its fetching
            // first, at once: the watch may hold the assignment for a while.
            let old = consumer.clone();
            let _ = tokio::task::spawn_blocking(move || old.unassign()).await;
            drop(consumer);
            self.new_consumer().await;
        }
        self.close().await;
    }

    /// Replaces the consumer by a fresh one with nothing assigned, unless
    /// it has nothing assigned (a fresh one would not help, and the
    /// outage would replace it again and again).
    async fn new_consumer(&self) {
        let mut assigned = self.assigned.lock().await;
        if assigned.values().all(HashSet::is_empty) {
            return;
        }
        let fresh = match self.opts.consumer() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a new kafka consumer");
                return;
            }
        };
        let old = {
            let mut slot = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_mut() {
                Some(c) => std::mem::replace(c, fresh),
                None => return, // closed
            }
        };
        assigned.clear();
        drop(assigned);
        tracing::info!("kafka consumer replaced; partitions are assigned again once Kafka is back");
        // Stop fetching at once; closing may wait on the broker.
        self.tracker.spawn_blocking(move || {
            let _ = old.unassign();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(old);
        });
    }

    fn deliver(&self, m: &BorrowedMessage<'_>) {
        let (Some(hub), Some(sse)) = (self.hub.upgrade(), self.sse_of.get(m.topic())) else {
            return;
        };
        let counters = self.stats.topics.get(m.topic());
        let Some((event, data)) = decode(m, &self.opts.event_header) else {
            if let Some(c) = counters {
                c.skipped.fetch_add(1, Relaxed);
            }
            return;
        };
        let key = ring_key(sse, m.partition());
        let pos = position(m.partition(), m.offset());
        if !first_copy(&self.dedup, m, &pos.id_in(sse)) {
            self.stats.duplicates_dropped.fetch_add(1, Relaxed);
            return;
        }
        self.last_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (pos, fingerprint(event, data)));
        if !hub.publish_at(&key, pos, event, data) {
            // The consumer is assigned where the ring is, so a record at or
            // below the ring's head means the log restarted under it (the
            // topic was re-created, or the broker lost it): librdkafka went
            // back to the log's start (`auto.offset.reset`). The ring starts
            // again before this record.
            let Some(head) = hub.ring_head(&key) else {
                return;
            };
            if pos > head {
                return;
            }
            let start = Position::new(pos.hi, pos.lo - 1);
            tracing::warn!(topic = %m.topic(), partition = m.partition(), was = head.lo, now = start.lo, "kafka partition log was reset; its streams get a gap notice");
            hub.reset_ring(&key, start);
            hub.publish_at(&key, pos, event, data);
        }
        if let Some(c) = counters {
            c.consumed.fetch_add(1, Relaxed);
        }
    }

    /// Shutdown: stop consuming, flush the producer, close both.
    async fn close(&self) {
        let consumer = self
            .consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let producer = self
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let meta = self.meta.lock().unwrap_or_else(|e| e.into_inner()).take();
        let timeout = self.opts.timeout;
        let closed = tokio::task::spawn_blocking(move || {
            // A watch call still running holds a clone: the last one drops
            // it, on the blocking pool too.
            drop(meta);
            if let Some(consumer) = consumer {
                let _ = consumer.unassign();
                // The watch may still hold it for a moment.
                let deadline = std::time::Instant::now() + timeout;
                while Arc::strong_count(&consumer) > 1 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                drop(consumer);
            }
            let flushed = producer.map(|p| p.inner.flush(timeout));
            flushed.unwrap_or(Ok(()))
        })
        .await;
        match closed {
            Ok(Ok(())) => tracing::info!("kafka consumer and producer closed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "kafka producer did not flush in time"),
            Err(e) => tracing::warn!(error = %e, "closing kafka failed"),
        }
    }

    /// Every second: fetches metadata (readiness, new partitions, lost
    /// topics); every few rounds, the high watermarks (lag, reset logs).
    async fn watch_loop(self: Arc<Self>, life: Lifecycle) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = 0u32;
        // A broker answers metadata in milliseconds: an outage shows on
        // /ready within about two seconds, whatever --kafka-timeout is.
        let probe = self.opts.timeout.min(WATCH_TIMEOUT);
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = life.backends_closing() => return,
            }
            let synced = self.sync_partitions(probe).await;
            // Every broker lost, or a topic gone: a consumer that still
            // fetches would crash librdkafka once the broker answers for a
            // topic it no longer knows (module doc).
            let lost = match &synced {
                Ok(s) => s.gone,
                Err(e) => {
                    tracing::debug!(error = %e, "kafka metadata round failed");
                    true
                }
            };
            if lost && self.holds_assignment().await {
                self.replace_consumer.notify_one();
            }
            let usable = synced.as_ref().is_ok_and(|s| s.usable);
            let ok = usable && self.producer_ready(probe).await;
            self.was_up.fetch_or(ok, Relaxed);
            if self.up.swap(ok, Relaxed) != ok {
                if ok {
                    tracing::info!("kafka is reachable: publishing works again");
                } else {
                    tracing::warn!(
                        "kafka is unreachable or a topic is missing (PATCH and /ready answer 503)"
                    );
                }
            }
            if synced.is_ok() && round.is_multiple_of(LAG_EVERY) {
                self.measure_lag(probe).await;
            }
            round = round.wrapping_add(1);
        }
    }

    async fn holds_assignment(&self) -> bool {
        !self.assigned.lock().await.values().all(HashSet::is_empty)
    }

    /// Whether a PATCH would be accepted now, as far as the producer goes
    /// (the metadata round just found every topic with a leader for each
    /// partition). A producer that lived through an outage, or whose last
    /// publish failed, is replaced first: an idempotent producer carries
    /// its id, epoch and sequence numbers across the outage, and a broker
    /// that lost its state (or a re-created topic) may reject or stall it
    /// for a long time.
    async fn producer_ready(&self, timeout: Duration) -> bool {
        let Ok(producer) = self.live_producer() else {
            return false;
        };
        let h = &producer.health;
        if h.brokers_lost.load(Relaxed) || h.failing.load(Relaxed) {
            self.renew_producer(
                &producer,
                "it lived through an outage or its last publish failed",
            );
        }
        let Ok(producer) = self.live_producer() else {
            return false;
        };
        // A fresh producer connects on first use: this also gets its
        // connection (and producer id) ready for the next PATCH.
        let probe = producer.clone();
        let reached = tokio::task::spawn_blocking(move || {
            probe
                .inner
                .client()
                .fetch_metadata(None, timeout)
                .map(|md| md.orig_broker_id())
        })
        .await;
        matches!(reached, Ok(Ok(_))) && !producer.health.brokers_lost.load(Relaxed)
    }

    /// Assigns the partitions not assigned yet, after creating their rings:
    /// from the end for a topic seen for the first time, from the start for
    /// a partition added to a topic later, and from where its ring is for a
    /// partition this replica follows already (after an outage) — or from
    /// the log's start, the ring reset, when the log restarted below the
    /// ring. Fails when Kafka does not answer within `timeout`.
    async fn sync_partitions(&self, timeout: Duration) -> Result<Synced, BusError> {
        let mut assigned = self.assigned.lock().await;
        self.round(&mut assigned, timeout).await
    }

    /// For a stream on a topic this replica does not follow yet: a
    /// metadata round begun after `asked` (the rounds begun when the stream
    /// asked), its own or one begun meanwhile by another stream or the
    /// watch. Streams that arrive together, as at a replica that has just
    /// started, share a round instead of queueing one each (100 topics: a
    /// round is 200 requests, and queued rounds outlasted --kafka-timeout).
    async fn round_since(&self, asked: u64, timeout: Duration) -> Result<(), BusError> {
        let mut assigned = self.assigned.lock().await;
        if self.round_ok.load(Relaxed) > asked {
            return Ok(());
        }
        self.round(&mut assigned, timeout).await.map(drop)
    }

    /// One round, numbered; rounds run one at a time (under `assigned`).
    async fn round(
        &self,
        assigned: &mut HashMap<String, HashSet<i32>>,
        timeout: Duration,
    ) -> Result<Synced, BusError> {
        let n = self.stats.rounds.fetch_add(1, Relaxed) + 1;
        let synced = self.sync_round(assigned, timeout).await?;
        self.round_ok.store(n, Relaxed);
        Ok(synced)
    }

    async fn sync_round(
        &self,
        assigned: &mut HashMap<String, HashSet<i32>>,
        timeout: Duration,
    ) -> Result<Synced, BusError> {
        let hub = self
            .hub
            .upgrade()
            .ok_or_else(|| unavailable("the hub is gone"))?;
        let mut synced = Synced {
            usable: true,
            gone: false,
        };
        // Everything Kafka is asked first, for every topic, then one
        // assignment: once the consumer has partitions, each request on
        // its connections waits behind its fetch long-poll, so a round
        // that assigned topic by topic took about a second per topic.
        let wanted: Vec<(String, HashSet<i32>)> = self
            .opts
            .topics
            .iter()
            .map(|m| {
                let known = assigned.get(&m.kafka).cloned().unwrap_or_default();
                (m.kafka.clone(), known)
            })
            .collect();
        let found = self
            .meta_blocking(move |c| TopicState::fetch_all(c, &wanted, timeout))
            .await?;
        let mut tpl = TopicPartitionList::new();
        let mut added: Vec<(&TopicMap, Vec<i32>, bool, bool)> = Vec::new();
        for (map, state) in self.opts.topics.iter().zip(found) {
            self.note_missing(&map.kafka, state.partitions.is_empty());
            if state.partitions.is_empty() {
                synced.usable = false;
                // Assigned partitions of a topic that is gone: the consumer
                // must not fetch them (module doc).
                synced.gone |= assigned.get(&map.kafka).is_some_and(|a| !a.is_empty());
                continue;
            }
            synced.usable &= !state.leaderless;
            if state.marks.is_empty() {
                continue;
            }
            // First time this replica sees the topic: no ring of it exists.
            let first = state
                .partitions
                .iter()
                .all(|&p| hub.ring_head(&ring_key(&map.sse, p)).is_none());
            let mut new = Vec::with_capacity(state.marks.len());
            let mut resumed = false;
            for (p, (low, high)) in state.marks {
                let key = ring_key(&map.sse, p);
                let (low, high) = (low.max(0) as u64, high.max(0) as u64);
                // A high watermark below the ring's head: the log restarted —
                // unless the record at the head is still there (Tansu's S3
                // storage reports wrong high watermarks after a restart).
                let restarted = match hub.ring_head(&key) {
                    Some(head) if head.lo > high => !self.same_log(&key, &map.kafka, p, head).await,
                    _ => false,
                };
                let from = match hub.ring_head(&key) {
                    // The log restarted below the ring: start again with it.
                    Some(head) if restarted => {
                        resumed = true;
                        tracing::warn!(topic = %map.kafka, partition = p, was = head.lo, now = high, "kafka partition log was reset; its streams get a gap notice");
                        hub.reset_ring(&key, Position::new(p as u64, low));
                        low
                    }
                    Some(head) => {
                        resumed = true;
                        head.lo
                    }
                    None => {
                        let start = if first { high } else { 0 };
                        let start = Position::new(p as u64, start);
                        // The ring exists before its partition is assigned,
                        // so no record is dropped.
                        match hub.ensure_partition_at(&key, &map.sse, p as u64, start) {
                            Ok(head) => head.lo,
                            // `--max-topics`: tried again next round.
                            Err(e) => {
                                tracing::warn!(topic = %map.kafka, partition = p, error = %e, "cannot follow a kafka partition");
                                continue;
                            }
                        }
                    }
                };
                tpl.add_partition_offset(&map.kafka, p, Offset::Offset(from as i64))
                    .map_err(unavailable)?;
                new.push(p);
            }
            if !new.is_empty() {
                added.push((map, new, resumed, first));
            }
        }
        if added.is_empty() {
            return Ok(synced);
        }
        self.blocking(move |c| c.incremental_assign(&tpl)).await?;
        self.stats.assignments.fetch_add(1, Relaxed);
        for (map, partitions, resumed, first) in added {
            if resumed {
                tracing::info!(topic = %map.kafka, partitions = ?partitions, "following kafka partitions again");
            } else if !first {
                tracing::info!(topic = %map.kafka, partitions = ?partitions, "following new kafka partitions");
            }
            assigned
                .entry(map.kafka.clone())
                .or_default()
                .extend(partitions);
        }
        Ok(synced)
    }

    /// Whether the partition still holds the record at `head` (the ring's
    /// newest): read back, and compared by content with the last record
    /// this replica delivered there, if it did. True when Kafka does not
    /// tell.
    async fn same_log(&self, key: &str, topic: &str, partition: i32, head: Position) -> bool {
        let delivered = self
            .last_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .filter(|(pos, _)| *pos == head);
        match (self.record_at(topic, partition, head).await, delivered) {
            (Some(found), Some((_, print))) => found == print,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The fingerprint of the record at `pos` (the offset before it) read
    /// back from Kafka; `None` when no event is there within a moment (some
    /// brokers, Tansu among them, answer a fetch past the log's end with
    /// nothing rather than an error).
    async fn record_at(&self, topic: &str, partition: i32, pos: Position) -> Option<u64> {
        if pos.lo == 0 {
            return None;
        }
        let (tx, mut rx) = mpsc::channel(2);
        let opts = KafkaOptions {
            timeout: self.opts.timeout.min(RECORD_CHECK_TIMEOUT),
            ..self.opts.clone()
        };
        let sse = self.sse_of.get(topic).map_or("", |s| &**s);
        let reader = catch_up::Reader {
            opts: &opts,
            stats: &self.stats,
            dedup: &self.dedup,
            topic,
            sse,
            partition,
        };
        // One record: the channel holds it, so `run` never waits on it.
        let _ = reader
            .run(Position::new(pos.hi, pos.lo - 1), pos, &tx)
            .await;
        drop(tx);
        let mut found = None;
        while let Some(msg) = rx.recv().await {
            if let CatchUp::Events(events) = msg {
                found = events
                    .iter()
                    .find(|e| e.pos == pos)
                    .map(|e| fingerprint(e.event.as_deref(), &e.data));
            }
        }
        found
    }

    fn note_missing(&self, topic: &str, missing: bool) {
        let mut set = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        if missing && set.insert(topic.to_owned()) {
            tracing::warn!(
                topic,
                "kafka topic does not exist (streams on it get 503 until it does)"
            );
        } else if !missing {
            set.remove(topic);
        }
    }

    /// Lag per partition: the high watermark minus the next offset the
    /// partition's ring expects (records in Kafka not in the hub yet).
    /// Each request waits at most `timeout`, the watch's own bound (not
    /// `--kafka-timeout`): a broker that hangs during it delays the round
    /// that turns `/ready` 503 by no more than a metadata fetch would.
    async fn measure_lag(&self, timeout: Duration) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let mut partitions = Vec::new();
        for (kafka, assigned) in self.assigned.lock().await.iter() {
            let Some(sse) = self.sse_of.get(kafka) else {
                continue;
            };
            for &p in assigned {
                if let Some(head) = hub.ring_head(&ring_key(sse, p)) {
                    partitions.push((kafka.clone(), p, head.lo as i64));
                }
            }
        }
        let lags = self
            .meta_blocking(move |c| {
                let mut lags = BTreeMap::new();
                for (topic, p, next) in partitions {
                    let (_, high) = c.fetch_watermarks(&topic, p, timeout)?;
                    lags.insert((topic, p), (high - next).max(0));
                }
                Ok(lags)
            })
            .await;
        if let Ok(lags) = lags {
            *self.stats.lag.lock().unwrap_or_else(|e| e.into_inner()) = lags;
        }
    }
}

/// What Kafka says of one configured topic, asked off the runtime.
struct TopicState {
    /// Empty when the topic does not exist.
    partitions: Vec<i32>,
    /// A partition has no leader.
    leaderless: bool,
    /// The (low, high) watermarks of each partition not assigned yet.
    marks: Vec<(i32, (i64, i64))>,
}

impl TopicState {
    /// Asks about every topic of `wanted` (with the partitions already
    /// known of each), in order, [`FETCH_AT_ONCE`] topics at a time: a round
    /// is a metadata request per topic (and a watermark request per new
    /// partition), and one by one they took a second for 100 topics on a
    /// busy broker, while streams at a fresh replica waited for the round.
    fn fetch_all(
        c: &Meta,
        wanted: &[(String, HashSet<i32>)],
        timeout: Duration,
    ) -> Result<Vec<TopicState>, KafkaError> {
        let per_thread = wanted.len().div_ceil(FETCH_AT_ONCE).max(1);
        std::thread::scope(|s| {
            let parts: Vec<_> = wanted
                .chunks(per_thread)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(topic, known)| TopicState::fetch(c, topic, known, timeout))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut found = Vec::with_capacity(wanted.len());
            for part in parts {
                // A panic goes on as it would have on this thread.
                found.extend(
                    part.join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
                );
            }
            Ok(found)
        })
    }

    fn fetch(
        c: &Meta,
        topic: &str,
        known: &HashSet<i32>,
        timeout: Duration,
    ) -> Result<TopicState, KafkaError> {
        let md = c.fetch_metadata(Some(topic), timeout)?;
        let found = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none());
        let partitions: Vec<i32> = found
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let leaderless = found.is_some_and(|t| t.partitions().iter().any(|p| p.leader() < 0));
        let mut marks = Vec::new();
        for &p in partitions.iter().filter(|p| !known.contains(p)) {
            marks.push((p, c.fetch_watermarks(topic, p, timeout)?));
        }
        Ok(TopicState {
            partitions,
            leaderless,
            marks,
        })
    }
}

/// What a metadata round found.
struct Synced {
    /// Every topic exists and each of its partitions has a leader.
    usable: bool,
    /// A topic whose partitions the consumer is assigned is gone.
    gone: bool,
}

/// Drops a replaced producer off the runtime: dropping purges what it still
/// holds (those PATCHes were answered 503 already) and joins its threads.
fn retire(old: Option<LiveProducer>) {
    if let Some(old) = old {
        std::thread::spawn(move || drop(old));
    }
}

impl KafkaBus {
    /// Produces `events` (tagged with `key`, see [`idempotency`]) and
    /// waits for every acknowledgement; returns their positions. Fails
    /// with `Unavailable` only when no record can have been written, else
    /// `OutcomeUnknown`.
    async fn produce(
        &self,
        events: &[NewEvent],
        key: Option<&IdempotencyKey>,
    ) -> Result<Vec<Position>, BusError> {
        let mut targets = Vec::with_capacity(events.len());
        for (i, ev) in events.iter().enumerate() {
            let Some(kafka) = self.kafka_of.get(&ev.topic) else {
                let at = if events.len() > 1 {
                    format!("[{i}].topic")
                } else {
                    "topic".into()
                };
                return Err(BusError::NoSuchTopic(format!(
                    "{at}: no Kafka topic is mapped to {:?} (see --kafka-topics)",
                    ev.topic
                )));
            };
            targets.push(kafka.as_str());
        }
        // While Kafka is known to be down (it answered once, and the
        // metadata watch has since lost it), send nothing: a record queued
        // now would end in a timeout, which cannot tell "not written" from
        // "written", so the publisher could only be told "unknown".
        if self.was_up.load(Relaxed) && !Bus::is_up(self) {
            return Err(unavailable(
                "Kafka is unreachable (see /ready); nothing was sent",
            ));
        }
        let producer = self.live_producer()?;
        let header = self.opts.event_header.as_str();
        let mut deliveries = Vec::with_capacity(events.len());
        for (i, (ev, kafka)) in events.iter().zip(&targets).enumerate() {
            let mut record = FutureRecord::<str, str>::to(kafka).payload(&ev.data);
            let mut headers = None;
            if let Some(name) = &ev.event {
                headers = Some(OwnedHeaders::new().insert(Header {
                    key: header,
                    value: Some(name.as_bytes()),
                }));
            }
            if let Some(key) = key {
                let tag = Tag::encode(i, events.len(), key);
                headers = Some(headers.unwrap_or_default().insert(Header {
                    key: idempotency::HEADER,
                    value: Some(tag.as_bytes()),
                }));
                // Same partition as any earlier attempt: "first" is then
                // the same on every replica.
                record = record.key(key.key.as_str());
            }
            if let Some(headers) = headers {
                record = record.headers(headers);
            }
            match producer.inner.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    let n = events.len() - deliveries.len();
                    self.stats.produce_errors.fetch_add(n as u64, Relaxed);
                    // Records queued before this one may be sent anyway.
                    return Err(if deliveries.is_empty() {
                        unavailable(e)
                    } else {
                        outcome_unknown(format!(
                            "{e} after {} of {} events were queued",
                            deliveries.len(),
                            events.len()
                        ))
                    });
                }
            }
        }
        let all = futures_util::future::join_all(deliveries);
        let Ok(results) = tokio::time::timeout(self.opts.timeout, all).await else {
            // Until the watch has replaced it, `/ready` says 503.
            producer.health.failing.store(true, Relaxed);
            self.stats
                .produce_errors
                .fetch_add(events.len() as u64, Relaxed);
            // A record not acknowledged may still be written (an
            // acknowledgement lost, or a broker that resumes).
            return Err(outcome_unknown(format!(
                "no acknowledgement within {:?}",
                self.opts.timeout
            )));
        };
        let mut acked = Vec::with_capacity(events.len());
        let (mut failure, mut all_rejected) = (None, true);
        for result in results {
            match result {
                Ok(Ok(d)) => acked.push(position(d.partition, d.offset)),
                Ok(Err((e, _))) => {
                    self.stats.produce_errors.fetch_add(1, Relaxed);
                    let code = e.rdkafka_error_code();
                    if let Some(code) = code.filter(|c| fenced(*c)) {
                        self.renew_producer(&producer, &format!("the broker fenced it ({code})"));
                    }
                    all_rejected &= code.is_some_and(rejected);
                    failure = Some(e.to_string());
                }
                Err(_) => {
                    self.stats.produce_errors.fetch_add(1, Relaxed);
                    all_rejected = false;
                    failure = Some("the producer was closed".into());
                }
            }
        }
        producer.health.failing.store(failure.is_some(), Relaxed);
        match failure {
            None => Ok(acked),
            Some(reason) if all_rejected && acked.is_empty() => Err(unavailable(reason)),
            Some(reason) => Err(outcome_unknown(format!(
                "{reason} ({} of {} events acknowledged)",
                acked.len(),
                events.len()
            ))),
        }
    }

    /// Waits, at most `--kafka-timeout`, until this replica's consumer has
    /// delivered (or dropped) the records at `acked`.
    async fn consumed(&self, events: &[NewEvent], acked: &[Position]) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let passed = || {
            events.iter().zip(acked).all(|(ev, pos)| {
                // A ring this replica does not hold (`--max-topics`) is
                // not consumed here: nothing to wait for.
                hub.ring_head(&ring_key(&ev.topic, pos.hi as i32))
                    .is_none_or(|head| head >= *pos)
            })
        };
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        while !passed() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl KafkaOptions {
    fn consumer(&self) -> Result<Cons, BusError> {
        self.consumer_config()
            .create_with_context(Context {
                health: Some(Arc::new(Health::default())),
                producer: false,
            })
            .map_err(unavailable)
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        // librdkafka needs a group id to assign partitions; it never
        // joins the group (no subscribe) and never commits.
        c.set("group.id", format!("streamline-{}", self.replica_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // If a position is no longer in the log (retention, or a log
            // that restarted), read what is there: the hub drops what it
            // already has, by position, or resets the ring (`deliver`).
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX)
            .apply(&self.config);
        c
    }

    fn meta(&self) -> Result<Meta, BusError> {
        self.client_config()
            .set("client.id", format!("streamline-{}-meta", self.replica_id))
            .apply(&self.config)
            .create_with_context(Context::default())
            .map_err(unavailable)
    }

    fn producer(&self) -> Result<LiveProducer, BusError> {
        let timeout_ms = self.timeout.as_millis().max(1).to_string();
        let health = Arc::new(Health::default());
        let inner = self
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            // A message not acknowledged in time fails rather than being
            // retried after PATCH has answered 503.
            .set("message.timeout.ms", &timeout_ms)
            .apply(&self.config)
            .create_with_context(Context {
                health: Some(health.clone()),
                producer: true,
            })
            .map_err(unavailable)?;
        Ok(LiveProducer { inner, health })
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("streamline-{}", self.replica_id))
            .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX)
            // librdkafka's lines go to `Context::log` at their own level.
            .set_log_level(RDKafkaLogLevel::Info);
        c
    }
}

trait Apply {
    fn apply(&mut self, extra: &[(String, String)]) -> &mut Self;
}

impl Apply for ClientConfig {
    fn apply(&mut self, extra: &[(String, String)]) -> &mut Self {
        for (k, v) in extra {
            self.set(k, v);
        }
        self
    }
}

impl Bus for KafkaBus {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publish<'a>(
        &'a self,
        events: &'a [NewEvent],
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            let acked = self.produce(events, None).await?;
            Ok(events
                .iter()
                .zip(acked)
                .map(|(ev, pos)| pos.id_in(&ev.topic))
                .collect())
        })
    }

    fn publish_once<'a>(
        &'a self,
        events: &'a [NewEvent],
        key: &'a IdempotencyKey,
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            if let Some(ids) = self.dedup.answer(key)? {
                tracing::debug!(key = %key.key, "a retried publish answered from what was consumed");
                return Ok(ids);
            }
            let acked = self.produce(events, Some(key)).await?;
            // A first attempt whose outcome was unknown may be in the log
            // before these records: once the consumer has passed them, the
            // table names the copies subscribers got.
            self.consumed(events, &acked).await;
            Ok(events
                .iter()
                .zip(acked)
                .enumerate()
                .map(|(i, (ev, pos))| {
                    self.dedup
                        .first_id(key, i)
                        .unwrap_or_else(|| pos.id_in(&ev.topic))
                })
                .collect())
        })
    }

    fn follow<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            let Some(kafka) = self.kafka_of.get(topic) else {
                let mut known: Vec<&str> = self.kafka_of.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err(BusError::NoSuchTopic(format!(
                    "topic: {topic:?} is not streamed from Kafka (streamed: {})",
                    known.join(", ")
                ))
                .into());
            };
            // Bounded: a stream waits at most --kafka-timeout to learn.
            let timeout = self.opts.timeout;
            let asked = self.stats.rounds.load(Relaxed);
            match tokio::time::timeout(timeout, self.round_since(asked, timeout)).await {
                Ok(round) => round?,
                Err(_) => return Err(unavailable("Kafka did not answer in time").into()),
            }
            let missing = self
                .missing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(kafka);
            if missing {
                return Err(unavailable(format!("Kafka topic {kafka:?} does not exist")).into());
            }
            Ok(())
        })
    }

    fn catch_up(&self, ring: &str, after: Position, until: Position) -> mpsc::Receiver<CatchUp> {
        let Some(bus) = self.me.upgrade() else {
            return mpsc::channel(1).1; // closed: the bus is going away
        };
        let target = ring.rsplit_once('#').and_then(|(sse, p)| {
            Some((
                self.kafka_of.get(sse)?.clone(),
                sse.to_owned(),
                p.parse::<i32>().ok()?,
            ))
        });
        let Some((topic, sse, partition)) = target else {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(CatchUp::Failed("not a Kafka partition".into()));
            return rx;
        };
        self.catch_ups.spawn(move |tx| async move {
            let reader = catch_up::Reader {
                opts: &bus.opts,
                stats: &bus.stats,
                dedup: &bus.dedup,
                topic: &topic,
                sse: &sse,
                partition,
            };
            reader.run(after, until, &tx).await
        })
    }

    /// A resume point beyond the partition's high watermark was never in
    /// its current log: the log started again since (the topic re-created,
    /// or the broker lost it).
    fn probe(&self, ring: &str, pos: Position) -> Option<mpsc::Receiver<CatchUp>> {
        let (tx, rx) = mpsc::channel(1);
        let bus = self.me.upgrade()?;
        let (topic, partition) = self.partition_of(ring)?;
        self.tracker.spawn(async move {
            let Some(_permit) = bus.catch_ups.permit(&tx).await else {
                return;
            };
            let timeout = bus.opts.timeout;
            let topic_name = topic.clone();
            let high = bus
                .meta_blocking(move |c| c.fetch_watermarks(&topic, partition, timeout))
                .await;
            // Beyond the high watermark, and no record there (the
            // watermark alone is not trusted, see `sync_partitions`). When
            // Kafka cannot tell, the stream waits for the ring, as for any
            // point this replica has not reached.
            if let Ok((_, high)) = high
                && pos.lo as i64 > high
                && bus.record_at(&topic_name, partition, pos).await.is_none()
            {
                let _ = tx.send(CatchUp::Reset).await;
            }
        });
        Some(rx)
    }

    /// The last metadata round found every topic usable and the producer
    /// able to publish, and since then the producer has not lost every
    /// broker nor failed a publish (`/ready` turns 503 at once then).
    fn is_up(&self) -> bool {
        let producer_ok = self
            .producer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| {
                !p.health.brokers_lost.load(Relaxed) && !p.health.failing.load(Relaxed)
            });
        producer_ok && self.up.load(Relaxed)
    }

    fn catch_ups_running(&self) -> i64 {
        self.catch_ups.running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_maps_parse() {
        let t = TopicMap::parse("orders").unwrap();
        assert_eq!((t.kafka.as_str(), t.sse.as_str()), ("orders", "orders"));
        let t = TopicMap::parse(" orders = shop ").unwrap();
        assert_eq!((t.kafka.as_str(), t.sse.as_str()), ("orders", "shop"));
        for bad in ["", "=x", "a b", "a=", "a=b c", "a=b=c", "a:b"] {
            assert!(TopicMap::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// librdkafka tells the same outage as "1/1" or "0/1" brokers down,
    /// by a race (see `lost_every_broker`): the producer counts both.
    #[test]
    fn a_producer_counts_every_all_brokers_down() {
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        for reason in ["1/1 brokers are down", "0/1 brokers are down"] {
            assert!(lost_every_broker(&down, reason, true), "{reason}");
        }
        assert!(lost_every_broker(&down, "1/1 brokers are down", false));
        assert!(!lost_every_broker(&down, "0/1 brokers are down", false));
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!lost_every_broker(&transport, "1/1 brokers are down", true));
    }

    fn options(config: &[(&str, &str)]) -> KafkaOptions {
        KafkaOptions {
            brokers: "127.0.0.1:9092".into(),
            topics: Vec::new(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            event_header: "event".into(),
            timeout: Duration::from_secs(5),
            max_catch_up: 1,
            replica_id: "r".into(),
            idempotency_window: Duration::from_secs(60),
            idempotency_capacity: 1,
        }
    }

    /// The live consumer waits 100 ms for records, not librdkafka's 500;
    /// `--kafka-config` still has the last word.
    #[test]
    fn the_consumer_waits_briefly_for_records_unless_told_otherwise() {
        let wait = |o: &KafkaOptions| {
            o.consumer_config()
                .get("fetch.wait.max.ms")
                .map(str::to_owned)
        };
        assert_eq!(wait(&options(&[])).as_deref(), Some(FETCH_WAIT_MAX));
        let told = options(&[("fetch.wait.max.ms", "500")]);
        assert_eq!(wait(&told).as_deref(), Some("500"));
    }

    #[test]
    fn positions_are_the_offset_after_the_record() {
        assert_eq!(position(0, 0), Position::new(0, 1));
        assert_eq!(position(3, 41), Position::new(3, 42));
        assert_eq!(ring_key("t", 2), "t#2");
    }
}
