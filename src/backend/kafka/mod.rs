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
//! - A periodic metadata fetch tells whether Kafka is up, finds partitions
//!   added later (their rings start at offset 0) and measures lag.

mod catch_up;
mod idempotency;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};

use super::{Bus, BusError, CatchUp, NewEvent};
use crate::control::events::{MAX_EVENT_NAME, RESERVED_PREFIX};
use crate::hub::{Hub, HubError};
use crate::id::Position;
use crate::idempotency::IdempotencyKey;
use crate::lifecycle::Lifecycle;
use idempotency::{Dedup, Tag};

/// How often metadata is fetched (health, new partitions).
const WATCH_EVERY: Duration = Duration::from_secs(1);
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
    pub catch_ups_running: AtomicI64,
    /// Records dropped as copies of a keyed record already delivered.
    pub duplicates_dropped: AtomicU64,
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
/// reports Kafka going down and coming back once, itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context;

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

pub struct KafkaBus {
    opts: KafkaOptions,
    /// Kafka topic → SSE topic, and back.
    sse_of: HashMap<String, Arc<str>>,
    kafka_of: HashMap<String, String>,
    /// The shared consumer; taken and dropped at shutdown.
    consumer: Mutex<Option<Arc<Cons>>>,
    /// The producer; taken, flushed and dropped at shutdown.
    producer: Mutex<Option<FutureProducer<Context>>>,
    hub: Weak<Hub>,
    /// Partitions assigned so far, by Kafka topic (held across the blocking
    /// metadata calls, so one sync runs at a time).
    assigned: tokio::sync::Mutex<HashMap<String, HashSet<i32>>>,
    /// Kafka topics that did not exist at the last metadata fetch.
    missing: Mutex<HashSet<String>>,
    catch_ups: Arc<Semaphore>,
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
        let valid = !name.is_empty()
            && name.len() <= MAX_EVENT_NAME
            && !name.contains(['\r', '\n'])
            && !name.starts_with(RESERVED_PREFIX);
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
        let consumer: Cons = opts
            .client_config()
            // librdkafka needs a group id to assign partitions; it never
            // joins the group (no subscribe) and never commits.
            .set("group.id", format!("streamline-{}", opts.replica_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // If a position is no longer in the log (retention, or a broker
            // that lost data), re-read what is there: the hub drops what it
            // already has, by position.
            .set("auto.offset.reset", "earliest")
            .apply(&opts.config)
            .create_with_context(Context)
            .map_err(unavailable)?;
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
            catch_ups: Arc::new(Semaphore::new(opts.max_catch_up.max(1))),
            stats: Arc::new(KafkaStats::new(&opts.topics)),
            dedup: Dedup::new(opts.idempotency_window, opts.idempotency_capacity),
            opts,
            sse_of,
            kafka_of,
            consumer: Mutex::new(Some(Arc::new(consumer))),
            producer: Mutex::new(Some(producer)),
            hub: Arc::downgrade(hub),
            assigned: tokio::sync::Mutex::new(HashMap::new()),
            missing: Mutex::new(HashSet::new()),
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
    fn live_producer(&self) -> Result<FutureProducer<Context>, BusError> {
        let mut slot = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let producer = slot
            .as_ref()
            .ok_or_else(|| unavailable("the producer is closed"))?;
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(%code, reason, "kafka producer failed for good; starting a new one");
            *slot = Some(self.opts.producer()?);
        }
        slot.clone()
            .ok_or_else(|| unavailable("the producer is closed"))
    }

    /// Replaces `dead` (unless already replaced): an idempotent producer
    /// whose id or epoch the broker no longer accepts fails every later
    /// message (seen after a broker restart, once a message timed out
    /// while the broker was down).
    fn renew_producer(&self, dead: &FutureProducer<Context>, code: RDKafkaErrorCode) {
        let mut slot = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        let same = slot
            .as_ref()
            .is_some_and(|p| std::ptr::eq(p.client().native_ptr(), dead.client().native_ptr()));
        if same {
            tracing::info!(%code, "kafka producer was fenced; starting a new one");
            match self.opts.producer() {
                Ok(p) => *slot = Some(p),
                Err(e) => tracing::warn!(error = %e, "cannot start a new kafka producer"),
            }
        }
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

    /// Starts consuming and the metadata watch; both end when `life` stops,
    /// and the consumer and producer are closed then.
    pub fn spawn(self: &Arc<Self>, life: &Lifecycle) {
        life.tracker()
            .spawn(self.clone().consume_loop(life.clone()));
        life.tracker().spawn(self.clone().watch_loop(life.clone()));
    }

    /// Hands every record of the assigned partitions to the hub, in order.
    /// librdkafka reconnects by itself and resumes each partition from its
    /// position, so an outage loses nothing Kafka kept.
    async fn consume_loop(self: Arc<Self>, life: Lifecycle) {
        if let Some(consumer) = self.consumer() {
            loop {
                let msg = tokio::select! {
                    m = consumer.recv() => m,
                    _ = life.stopped() => break,
                };
                match msg {
                    Ok(m) => self.deliver(&m),
                    // Transport errors come here too while Kafka is down;
                    // the watch reports the outage.
                    Err(e) => tracing::debug!(error = %e, "kafka consumer error"),
                }
            }
        }
        self.close().await;
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
        let pos = position(m.partition(), m.offset());
        if !first_copy(&self.dedup, m, &pos.id_in(sse)) {
            self.stats.duplicates_dropped.fetch_add(1, Relaxed);
            return;
        }
        hub.publish_at(&ring_key(sse, m.partition()), pos, event, data);
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
        let timeout = self.opts.timeout;
        let closed = tokio::task::spawn_blocking(move || {
            if let Some(consumer) = consumer {
                let _ = consumer.unassign();
                // The watch may still hold it for a moment.
                let deadline = std::time::Instant::now() + timeout;
                while Arc::strong_count(&consumer) > 1 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                drop(consumer);
            }
            let flushed = producer.map(|p| p.flush(timeout));
            flushed.unwrap_or(Ok(()))
        })
        .await;
        match closed {
            Ok(Ok(())) => tracing::info!("kafka consumer and producer closed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "kafka producer did not flush in time"),
            Err(e) => tracing::warn!(error = %e, "closing kafka failed"),
        }
    }

    /// Every second: fetches metadata (health, new partitions); every few
    /// rounds, the high watermarks (lag).
    async fn watch_loop(self: Arc<Self>, life: Lifecycle) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = life.stopped() => return,
            }
            let ok = self.sync_partitions().await.is_ok();
            self.was_up.fetch_or(ok, Relaxed);
            if self.up.swap(ok, Relaxed) != ok {
                if ok {
                    tracing::info!("kafka is reachable");
                } else {
                    tracing::warn!("kafka is unreachable");
                }
            }
            if ok && round.is_multiple_of(LAG_EVERY) {
                self.measure_lag().await;
            }
            round = round.wrapping_add(1);
        }
    }

    /// Assigns the partitions not assigned yet, after creating their rings:
    /// from the end for a topic seen for the first time, from the start for
    /// a partition added to a topic later. Fails when Kafka does not answer.
    async fn sync_partitions(&self) -> Result<(), BusError> {
        let hub = self
            .hub
            .upgrade()
            .ok_or_else(|| unavailable("the hub is gone"))?;
        let mut assigned = self.assigned.lock().await;
        for map in &self.opts.topics {
            let topic = map.kafka.clone();
            let timeout = self.opts.timeout;
            let md = self
                .blocking(move |c| c.fetch_metadata(Some(&topic), timeout))
                .await?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.name() == map.kafka && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            self.note_missing(&map.kafka, partitions.is_empty());
            let known = assigned.get(&map.kafka);
            let first = known.is_none();
            let new: Vec<i32> = partitions
                .into_iter()
                .filter(|p| known.is_none_or(|k| !k.contains(p)))
                .collect();
            if new.is_empty() {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            let mut added = Vec::with_capacity(new.len());
            for p in new {
                let start = if first {
                    let topic = map.kafka.clone();
                    let timeout = self.opts.timeout;
                    self.blocking(move |c| c.fetch_watermarks(&topic, p, timeout))
                        .await?
                        .1
                } else {
                    0
                };
                let key = ring_key(&map.sse, p);
                let start = Position::new(p as u64, start.max(0) as u64);
                // The ring exists before its partition is assigned, so no
                // record is dropped; if it exists already (an earlier round
                // that did not finish), it goes on from where it is.
                match hub.ensure_partition_at(&key, &map.sse, p as u64, start) {
                    Ok(head) => {
                        tpl.add_partition_offset(&map.kafka, p, Offset::Offset(head.lo as i64))
                            .map_err(unavailable)?;
                        added.push(p);
                    }
                    // `--max-topics`: tried again next round.
                    Err(e) => {
                        tracing::warn!(topic = %map.kafka, partition = p, error = %e, "cannot follow a kafka partition")
                    }
                }
            }
            if added.is_empty() {
                continue;
            }
            self.blocking(move |c| c.incremental_assign(&tpl)).await?;
            if !first {
                tracing::info!(topic = %map.kafka, partitions = ?added, "following new kafka partitions");
            }
            assigned.entry(map.kafka.clone()).or_default().extend(added);
        }
        Ok(())
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
    async fn measure_lag(&self) {
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
        let timeout = self.opts.timeout;
        let lags = self
            .blocking(move |c| {
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
        if self.was_up.load(Relaxed) && !self.up.load(Relaxed) {
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
            match producer.send_result(record) {
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
                        self.renew_producer(&producer, code);
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
    fn producer(&self) -> Result<FutureProducer<Context>, BusError> {
        let timeout_ms = self.timeout.as_millis().max(1).to_string();
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            // A message not acknowledged in time fails rather than being
            // retried after PATCH has answered 503.
            .set("message.timeout.ms", &timeout_ms)
            .apply(&self.config)
            .create_with_context(Context)
            .map_err(unavailable)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("streamline-{}", self.replica_id))
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
            match tokio::time::timeout(self.opts.timeout, self.sync_partitions()).await {
                Ok(synced) => synced?,
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
        let (tx, rx) = mpsc::channel(2);
        let Some(bus) = self.me.upgrade() else {
            return rx;
        };
        let target = ring.rsplit_once('#').and_then(|(sse, p)| {
            Some((
                self.kafka_of.get(sse)?.clone(),
                sse.to_owned(),
                p.parse::<i32>().ok()?,
            ))
        });
        self.tracker.spawn(async move {
            let Some((topic, sse, partition)) = target else {
                let _ = tx
                    .send(CatchUp::Failed("not a Kafka partition".into()))
                    .await;
                return;
            };
            let _permit = tokio::select! {
                p = bus.catch_ups.clone().acquire_owned() => p,
                _ = tx.closed() => return,
            };
            bus.stats.catch_ups_running.fetch_add(1, Relaxed);
            let reader = catch_up::Reader {
                opts: &bus.opts,
                stats: &bus.stats,
                dedup: &bus.dedup,
                topic: &topic,
                sse: &sse,
                partition,
            };
            let last = reader.run(after, until, &tx).await;
            bus.stats.catch_ups_running.fetch_sub(1, Relaxed);
            if let Some(last) = last {
                let _ = tx.send(last).await;
            }
        });
        rx
    }

    fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    fn catch_ups_running(&self) -> i64 {
        self.stats.catch_ups_running.load(Relaxed)
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

    #[test]
    fn positions_are_the_offset_after_the_record() {
        assert_eq!(position(0, 0), Position::new(0, 1));
        assert_eq!(position(3, 41), Position::new(3, 42));
        assert_eq!(ring_key("t", 2), "t#2");
    }
}
