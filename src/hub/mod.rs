//! The hub: topics, their retained events, and the connected clients. Both
//! planes share one `Arc<Hub>`; the control plane publishes into it and the
//! stream plane reads from it through [`Subscription`]s.
//!
//! Architecture invariants: an event is encoded once, when it is published;
//! subscribers share its bytes. No lock in the hub is held across an await, and
//! nothing in it grows without a bound: topics (`max_topics`), events per topic
//! (`history_size`, `history_ttl`, and beyond them at most `pinned_bytes` for
//! streams still writing a batch) and clients (`max_clients`) are all capped.

mod bus;
mod client;
mod ring;
mod slow;
mod subscription;
mod wake;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

pub use bus::{Bus, BusError, CatchUp, NewEvent, StoredEvent};
pub use client::{Client, ClientInfo, ClientMeta};
pub use slow::SlowClientPolicy;
pub use subscription::{Chunk, Filter, Subscription};

use crate::id::{Cursor, Position};
use crate::idempotency::{self, IdempotencyKey};
use crate::sse::{self, CloseReason};
use ring::{Bounds, Ring};
use slow::SlowClients;

/// The hub's bounds and behaviour. See `Config` for the defaults.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Events a stream may fall behind before `slow_client_policy` applies
    /// (see [`slow`] for how lag is measured).
    pub max_lag: u64,
    pub slow_client_policy: SlowClientPolicy,
    /// Bytes a ring may keep beyond its history for streams still reading
    /// them (the hard cap on a batch larger than the history).
    pub pinned_bytes: usize,
    pub max_clients: usize,
    pub max_topics: usize,
    pub retry: Duration,
    /// How long an `Idempotency-Key` is remembered (in memory, without a
    /// bus; Redis and Kafka get it in their options).
    pub idempotency_window: Duration,
    /// Most keys remembered at once in memory.
    pub idempotency_capacity: usize,
}

impl HubConfig {
    /// The slow-client rule these settings make.
    fn slow_clients(&self) -> SlowClients {
        SlowClients {
            policy: self.slow_client_policy,
            max_lag: self.max_lag,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            history_size: 1000,
            history_ttl: Duration::from_secs(300),
            max_lag: 500,
            slow_client_policy: SlowClientPolicy::Disconnect,
            pinned_bytes: 8 << 20,
            max_clients: 20_000,
            max_topics: 100_000,
            retry: Duration::from_secs(2),
            idempotency_window: Duration::from_secs(600),
            idempotency_capacity: 100_000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("the gateway already serves {0} streams")]
    TooManyClients(usize),
    #[error("the gateway already holds {0} topics")]
    TooManyTopics(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("topic {0:?} is not followed yet; retry")]
    NotFollowed(String),
}

/// Encodes the events of one topic differently from Streamline's own
/// frames (Mercure: the update's own id, type and retry, and its topics
/// kept beside the bytes for filtering). Runs where the hub would encode:
/// once per event as it enters the ring (`live`), and per stream for
/// history read back from a bus.
pub trait Encoder: Send + Sync + 'static {
    fn encode(&self, pos: Position, event: Option<&str>, data: &str, live: bool) -> sse::Frame;
}

/// Counters for `/metrics`; the per-client ones cover clients that are gone
/// (live clients are summed at scrape time, so delivery stays contention-free).
#[derive(Debug, Default)]
pub struct Totals {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub events_published: AtomicU64,
    pub closed_events_sent: AtomicU64,
    pub closed_bytes_sent: AtomicU64,
    pub slow_disconnected: AtomicU64,
    pub slow_skipped: AtomicU64,
    /// Lag samples taken (see [`Hub::sample_lag`]).
    pub lag_samples: AtomicU64,
    /// Streams the drain closed (reason `shutdown`).
    pub drain_closed: AtomicU64,
}

/// One replica's figures for `GET /stats`: the counters behind `/metrics`,
/// read at one instant so a page can take rates from two of them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HubStats {
    pub clients: usize,
    pub topics: usize,
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub events_published: u64,
    pub events_delivered: u64,
    pub bytes_sent: u64,
    pub slow_disconnected: u64,
    pub slow_skipped: u64,
    pub drain_closed: u64,
    /// The most events any stream is behind its topics' heads.
    pub max_lag: u64,
}

/// [`HubStats`] with when they were read and the shutdown phase, as
/// `GET /stats` and the cluster registry show them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStats {
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// See `Lifecycle::phase`.
    pub phase: &'static str,
    #[serde(flatten)]
    pub hub: HubStats,
}

/// One row of `GET /topics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicInfo {
    pub name: String,
    pub subscribers: usize,
    pub events_published: u64,
    pub last_event_id: Option<String>,
}

pub struct Hub {
    config: HubConfig,
    /// Distinguishes this run's positions from an earlier run's.
    epoch: u64,
    /// Hub-wide event sequence: the `lo` part of every position.
    seq: AtomicU64,
    /// Every ring, by key (a topic's name, or `<name>#<partition>`).
    topics: RwLock<HashMap<Arc<str>, Arc<Ring>>>,
    /// Topics split into partition rings: name → rings by partition.
    partitions: RwLock<HashMap<Arc<str>, Vec<Arc<Ring>>>>,
    clients: Mutex<HashMap<Arc<str>, Arc<Client>>>,
    next_client: AtomicU64,
    client_tag: u32,
    heartbeat: AtomicU64,
    accepting: AtomicBool,
    /// Whether a resume from another replica or run was logged already.
    told_unknown_origin: AtomicBool,
    totals: Totals,
    /// The bus events come from, when there is one (else positions are local).
    bus: OnceLock<Arc<dyn Bus>>,
    /// Keys of in-memory publishes (a bus keeps its own).
    idempotency: idempotency::Table<idempotency::Answer>,
    /// One topic whose events another protocol encodes (Mercure).
    encoder: OnceLock<(Arc<str>, Arc<dyn Encoder>)>,
    started: Instant,
    /// Coalesced wake-ups of publishes (off unless [`Hub::coalesce_wakes`]).
    wakes: Arc<wake::Wakes>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("epoch", &self.epoch).finish()
    }
}

/// A run epoch: the Unix time in milliseconds, times 1000, plus a random
/// number below 1000. Without a bus it is all that tells one replica's ids
/// from another's, and replicas started together often share the
/// millisecond: the random part makes a collision (which would resume a
/// client from another replica's positions, silently) a 1-in-1000 chance
/// even then. Hubs of one process never share one.
fn new_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let random =
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), ms)
            % 1000;
    let candidate = ms.saturating_mul(1000).saturating_add(random);
    let last = LAST
        .fetch_update(Relaxed, Relaxed, |last| Some(candidate.max(last + 1)))
        .unwrap_or_else(|last| last);
    candidate.max(last + 1)
}

impl Hub {
    pub fn new(config: HubConfig) -> Arc<Hub> {
        let epoch = new_epoch();
        let idempotency =
            idempotency::Table::new(config.idempotency_window, config.idempotency_capacity);
        Arc::new(Hub {
            config,
            epoch,
            seq: AtomicU64::new(0),
            topics: RwLock::new(HashMap::new()),
            partitions: RwLock::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
            client_tag: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                epoch,
            ) as u32,
            heartbeat: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            told_unknown_origin: AtomicBool::new(false),
            totals: Totals::default(),
            bus: OnceLock::new(),
            idempotency,
            encoder: OnceLock::new(),
            started: Instant::now(),
            wakes: Arc::default(),
        })
    }

    /// From now on, [`publish_batch`](Self::publish_batch) (in memory)
    /// wakes a topic's streams after the publishing task's runtime worker
    /// has run the tasks ready at the time, once for all the batches
    /// published meanwhile, rather than before it returns (see
    /// [`wake`]). For a publisher on a runtime of its own, such as the
    /// control plane: its wake-ups cross to the streams' runtime.
    pub fn coalesce_wakes(&self) {
        self.wakes.enable();
    }

    /// Plugs in the bus. Call before serving; a hub takes one bus for life.
    pub fn set_bus(&self, bus: Arc<dyn Bus>) -> Result<(), Arc<dyn Bus>> {
        self.bus.set(bus)
    }

    pub fn bus(&self) -> Option<&Arc<dyn Bus>> {
        self.bus.get()
    }

    /// Has `encoder` encode topic `topic`'s events. Call before serving; a
    /// hub takes one for life (false if it has one).
    pub fn set_encoder(&self, topic: &str, encoder: Arc<dyn Encoder>) -> bool {
        self.encoder.set((topic.into(), encoder)).is_ok()
    }

    /// The encoder of topic `name`, if it has its own.
    pub fn encoder_for(&self, name: &str) -> Option<&Arc<dyn Encoder>> {
        self.encoder
            .get()
            .filter(|(topic, _)| **topic == *name)
            .map(|(_, e)| e)
    }

    /// The frame of an event of topic `name` at `pos`.
    fn encode(&self, name: &str, pos: Position, event: Option<&str>, data: &str) -> sse::Frame {
        match self.encoder_for(name) {
            Some(e) => e.encode(pos, event, data, true),
            None => sse::encode_event(&pos.id_in(name), event, data),
        }
    }

    /// Milliseconds since the hub started (a monotonic clock for topics).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            history: self.config.history_size.max(1),
            ttl: self.config.history_ttl,
            pinned_bytes: self.config.pinned_bytes,
        }
    }

    /// The `hi` part of this run's positions.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A client resumed from an id this run did not mint, with no bus: it
    /// came from another replica or an earlier run. Logged once per run, as
    /// a warning: after a restart that is expected, but clients that keep
    /// landing on other replicas mean replicas were scaled without a bus.
    pub(crate) fn note_unknown_origin(&self) {
        if !self.told_unknown_origin.swap(true, Relaxed) {
            tracing::warn!(
                "a client resumed with an event id from another replica or an earlier run; \
                 without a shared bus (--redis-url or --kafka-brokers) replicas share no \
                 events, so it missed what was published meanwhile (told once per run)"
            );
        }
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    fn get_topic(&self, name: &str) -> Option<Arc<Ring>> {
        self.read_topics().get(name).cloned()
    }

    /// The topic, created starting after `start` if it does not exist.
    fn create_topic(
        &self,
        name: &str,
        start: impl FnOnce() -> Position,
    ) -> Result<Arc<Ring>, HubError> {
        self.create_ring(name, || Ring::new(name.into(), start()))
    }

    /// The ring keyed `key`, made by `make` if it does not exist.
    fn create_ring(&self, key: &str, make: impl FnOnce() -> Ring) -> Result<Arc<Ring>, HubError> {
        if let Some(t) = self.get_topic(key) {
            return Ok(t);
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(key) {
            return Ok(t.clone());
        }
        if topics.len() >= self.config.max_topics {
            return Err(HubError::TooManyTopics(topics.len()));
        }
        let topic = Arc::new(make());
        topic.touch(self.now_ms());
        topics.insert(topic.key().clone(), topic.clone());
        Ok(topic)
    }

    /// A topic with local positions, created on first use.
    fn topic_or_create(&self, name: &str) -> Result<Arc<Ring>, HubError> {
        self.create_topic(name, || Position::new(self.epoch, self.seq.load(Relaxed)))
    }

    /// The rings of topic `name` that exist now: its partitions' in
    /// partition order, else its only ring, else none.
    fn rings(&self, name: &str) -> Vec<Arc<Ring>> {
        let partitions = self.partitions.read().unwrap_or_else(|e| e.into_inner());
        match partitions.get(name) {
            Some(rings) => rings.clone(),
            None => self.get_topic(name).into_iter().collect(),
        }
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Ring>>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates every named topic that does not exist yet, so that a batch
    /// can be checked before any of it is published.
    pub fn ensure_topics<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), HubError> {
        for name in names {
            self.topic_or_create(name)?;
        }
        Ok(())
    }

    // Publishing has three ways in, one per kind of caller:
    //
    // - `publish_batch` (and `publish_batch_once`): how the planes publish.
    //   A checked batch, all or nothing; through the bus when there is one
    //   (so every replica gives an event the same id), else in memory.
    // - `publish`: how an application embedding a hub without a bus
    //   publishes from its own code: one event, synchronously, with no
    //   `NewEvent` to build and nothing to await.
    // - `publish_at`: not a publish but a bus's delivery, on every replica,
    //   of what `publish_batch` sent it: the event at the bus's position.
    //
    // The first two share `publish_local`; all three append with `append`.

    /// Publishes one event in memory and returns its id (`topic:hi-lo`),
    /// for an application embedding a hub without a bus (with a bus, events
    /// must go through it: use [`publish_batch`](Self::publish_batch)). The
    /// caller has validated the topic name and that `event` has no line
    /// break.
    pub fn publish(
        &self,
        topic: &str,
        event: Option<&str>,
        data: &str,
    ) -> Result<String, HubError> {
        let (id, t) = self.publish_quietly(topic, event, data)?;
        t.notify();
        Ok(id)
    }

    /// [`publish`](Self::publish) without waking the topic's streams.
    fn publish_quietly(
        &self,
        topic: &str,
        event: Option<&str>,
        data: &str,
    ) -> Result<(String, Arc<Ring>), HubError> {
        let t = self.topic_or_create(topic)?;
        let mut id = String::new();
        let appended = self.append(&t, |_| {
            let pos = Position::new(self.epoch, self.seq.fetch_add(1, Relaxed) + 1);
            id = pos.id_in(topic);
            Some((pos, self.encode(topic, pos, event, data)))
        });
        debug_assert!(appended.is_some(), "a local publish always appends");
        Ok((id, t))
    }

    /// Publishes a checked batch, all or nothing: through the bus when there
    /// is one (the events then arrive via `publish_at`), else in memory.
    pub async fn publish_batch(&self, events: &[NewEvent]) -> Result<Vec<String>, HubError> {
        if let Some(bus) = self.bus() {
            return Ok(bus.publish(events).await?);
        }
        self.publish_local(events)
    }

    /// [`publish_batch`](Self::publish_batch) at most once per `key` within
    /// the idempotency window: a key seen before answers with its first
    /// ids and publishes nothing (through the bus, on every replica; in
    /// memory, on this one). A different batch under a known key is
    /// refused with [`BusError::KeyReused`].
    pub async fn publish_batch_once(
        &self,
        events: &[NewEvent],
        key: &IdempotencyKey,
    ) -> Result<Vec<String>, HubError> {
        if let Some(bus) = self.bus() {
            return Ok(bus.publish_once(events, key).await?);
        }
        // Held while publishing, so a concurrent retry waits for the first
        // answer instead of publishing too (all synchronous: no await).
        let mut table = self.idempotency.lock();
        if let Some(done) = table.get(&key.key) {
            if done.fingerprint != key.fingerprint {
                return Err(BusError::key_reused(&key.key).into());
            }
            return Ok(done.ids.clone());
        }
        let ids = self.publish_local(events)?;
        table.get_or_insert_with(&key.key, || idempotency::Answer {
            fingerprint: key.fingerprint.clone(),
            ids: ids.clone(),
        });
        Ok(ids)
    }

    /// Publishes a checked batch in memory: every topic is created first
    /// (or nothing is published), and each topic's streams are woken once,
    /// after the whole batch (or later, coalesced: [`Hub::coalesce_wakes`]).
    fn publish_local(&self, events: &[NewEvent]) -> Result<Vec<String>, HubError> {
        self.ensure_topics(events.iter().map(|e| e.topic.as_str()))?;
        let mut ids = Vec::with_capacity(events.len());
        let mut touched: Vec<Arc<Ring>> = Vec::new();
        let mut failed = None;
        for e in events {
            match self.publish_quietly(&e.topic, e.event.as_deref(), &e.data) {
                Ok((id, t)) => {
                    ids.push(id);
                    if !touched.iter().any(|x| Arc::ptr_eq(x, &t)) {
                        touched.push(t);
                    }
                }
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        for t in touched {
            self.wakes.wake(t);
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(ids),
        }
    }

    fn append(
        &self,
        t: &Ring,
        make: impl FnOnce(Position) -> Option<(Position, sse::Frame)>,
    ) -> Option<Position> {
        let (_, pos) = {
            // Held (shared) so a sweep cannot forget the topic mid-publish.
            let _topics = self.read_topics();
            t.push(make, &self.bounds())?
        };
        self.totals.events_published.fetch_add(1, Relaxed);
        // Lag is judged by the sampler (`sample_lag`), not here: a burst is
        // never lag before its readers had an interval to write it. The
        // caller wakes the topic's streams.
        Some(pos)
    }

    /// Gets `topics` ready for a stream: with a bus, follows those this
    /// replica does not follow yet. Call before [`subscribe`](Self::subscribe).
    pub async fn prepare(&self, topics: &[String]) -> Result<(), HubError> {
        let Some(bus) = self.bus() else {
            return Ok(());
        };
        for name in topics {
            let rings = self.rings(name);
            if rings.is_empty() {
                bus.follow(name).await?;
            }
            for t in rings {
                t.touch(self.now_ms());
            }
        }
        Ok(())
    }

    /// Keys of the rings held now (topic names, or `<name>#<partition>`).
    pub fn topic_names(&self) -> Vec<Arc<str>> {
        self.read_topics().keys().cloned().collect()
    }

    /// Opens a stream on `topics` (validated, without duplicates), resuming
    /// after `resume` when given.
    pub fn subscribe(
        self: &Arc<Self>,
        topics: &[String],
        resume: Option<&Cursor>,
        meta: ClientMeta,
    ) -> Result<Subscription, HubError> {
        Subscription::open(self.clone(), topics, resume, meta, None)
    }

    /// [`subscribe`](Self::subscribe) for a stream that writes only the
    /// events `filter` admits (and no gap notices: its protocol has its
    /// own way of telling a client it missed events).
    pub fn subscribe_filtered(
        self: &Arc<Self>,
        topics: &[String],
        resume: Option<&Cursor>,
        meta: ClientMeta,
        filter: Arc<dyn Filter>,
    ) -> Result<Subscription, HubError> {
        Subscription::open(self.clone(), topics, resume, meta, Some(filter))
    }

    fn register_client(&self, client: Arc<Client>) -> Result<(), HubError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= self.config.max_clients {
            return Err(HubError::TooManyClients(clients.len()));
        }
        clients.insert(client.id().clone(), client);
        self.totals.connections_opened.fetch_add(1, Relaxed);
        Ok(())
    }

    fn deregister_client(&self, client: &Client) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(client.id());
        let t = &self.totals;
        t.connections_closed.fetch_add(1, Relaxed);
        t.closed_events_sent
            .fetch_add(client.events_sent(), Relaxed);
        t.closed_bytes_sent.fetch_add(client.bytes_sent(), Relaxed);
    }

    /// `<process tag>-<n>`: the random tag keeps ids unique across replicas.
    fn new_client_id(&self) -> Arc<str> {
        let n = self.next_client.fetch_add(1, Relaxed);
        format!("{:08x}-{n}", self.client_tag).into()
    }

    /// How many events `client` is behind its topics' heads, summed over
    /// its rings: the events published that it has not written yet (history
    /// it resumed from included; none while it reads history from a bus).
    /// `None` when its rings cannot be matched to its cursors (a partition
    /// was added since it subscribed). This is the lag shown to operators,
    /// not the one the slow-client rule judges (see [`slow`]).
    pub fn lag_of(&self, client: &Client) -> Option<u64> {
        let rings: Vec<Arc<Ring>> = client.topics().iter().flat_map(|t| self.rings(t)).collect();
        if rings.len() != client.ring_count() {
            return None;
        }
        let behind = rings
            .iter()
            .enumerate()
            .map(|(i, ring)| slow::events_behind(ring.head().0, client.cursor(i)));
        Some(behind.fold(0u64, u64::saturating_add))
    }

    /// `/clients`' view of a client: [`Client::info`] and its lag.
    pub fn client_info(&self, client: &Client) -> ClientInfo {
        ClientInfo {
            lag: self.lag_of(client),
            ..client.info()
        }
    }

    /// This replica's counters now.
    pub fn stats(&self) -> HubStats {
        let t = &self.totals;
        let clients = self.clients();
        let (mut delivered, mut bytes, mut max_lag) = (
            t.closed_events_sent.load(Relaxed),
            t.closed_bytes_sent.load(Relaxed),
            0,
        );
        for c in &clients {
            delivered += c.events_sent();
            bytes += c.bytes_sent();
            max_lag = max_lag.max(self.lag_of(c).unwrap_or(0));
        }
        HubStats {
            clients: clients.len(),
            topics: self.topic_count(),
            connections_opened: t.connections_opened.load(Relaxed),
            connections_closed: t.connections_closed.load(Relaxed),
            events_published: t.events_published.load(Relaxed),
            events_delivered: delivered,
            bytes_sent: bytes,
            slow_disconnected: t.slow_disconnected.load(Relaxed),
            slow_skipped: t.slow_skipped.load(Relaxed),
            drain_closed: t.drain_closed.load(Relaxed),
            max_lag,
        }
    }

    /// [`stats`](Self::stats), stamped with the time and `phase`.
    pub fn replica_stats(&self, phase: &'static str) -> ReplicaStats {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        ReplicaStats {
            at,
            phase,
            hub: self.stats(),
        }
    }

    /// Every connected client, in no particular order.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.values().cloned().collect()
    }

    pub fn client_count(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn client(&self, id: &str) -> Option<Arc<Client>> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.get(id).cloned()
    }

    /// Ends a client's stream; false when no such client is connected.
    pub fn close_client(&self, id: &str, reason: CloseReason) -> bool {
        match self.client(id) {
            Some(c) => {
                c.close(reason);
                true
            }
            None => false,
        }
    }

    /// Per-topic counters, sorted by name. A topic with partition rings is
    /// one row: events summed, and as its last event id the cursor over its
    /// partitions' newest events.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut topics: Vec<Arc<Ring>> = self.read_topics().values().cloned().collect();
        topics.sort_by(|a, b| (a.name(), a.part()).cmp(&(b.name(), b.part())));
        let mut out: Vec<TopicInfo> = Vec::new();
        let mut last = Cursor::new();
        for t in &topics {
            let (published, newest) = t.stats();
            match out.last_mut() {
                Some(row) if t.part().is_some() && row.name == **t.name() => {
                    row.subscribers = row.subscribers.max(t.subscriber_count());
                    row.events_published += published;
                }
                _ => {
                    out.push(TopicInfo {
                        name: t.name().to_string(),
                        subscribers: t.subscriber_count(),
                        events_published: published,
                        last_event_id: None,
                    });
                    last = Cursor::new();
                }
            }
            if let Some(pos) = newest {
                last.push(t.name(), pos);
            }
            if let Some(row) = out.last_mut()
                && newest.is_some()
            {
                row.last_event_id = Some(last.to_string());
            }
        }
        out
    }

    pub fn topic_count(&self) -> usize {
        self.read_topics().len()
    }

    /// Runs the hub's timers until `stop` is cancelled (the gateway passes
    /// its lifecycle's `stop_token`): a heartbeat every `heartbeat`, the lag
    /// sample every [`slow::LAG_SAMPLE`], and the sweep that expires history
    /// and forgets idle topics. Whoever serves streams from this hub spawns
    /// it once.
    pub async fn maintain(self: Arc<Self>, heartbeat: Duration, stop: CancellationToken) {
        const SWEEP_EVERY: Duration = Duration::from_secs(5);
        let start = tokio::time::Instant::now();
        let mut beat = tokio::time::interval_at(start + heartbeat, heartbeat);
        let mut sweep = tokio::time::interval_at(start + SWEEP_EVERY, SWEEP_EVERY);
        let mut lag = tokio::time::interval_at(start + slow::LAG_SAMPLE, slow::LAG_SAMPLE);
        lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = beat.tick() => self.heartbeat(),
                _ = lag.tick() => self.sample_lag(),
                _ = sweep.tick() => self.sweep(),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Asks every idle stream to write a heartbeat comment. Only those are
    /// woken (and those whose token expires, which check it on each tick):
    /// a stream that wrote an event since the previous tick skips this
    /// one's comment, and at 1 event/s per stream waking them all was one
    /// more wake-up per stream per tick, all at once, for nothing.
    pub fn heartbeat(&self) {
        let tick = self.heartbeat.fetch_add(1, Relaxed) + 1;
        // Woken outside the lock, which every stream's open and close takes.
        let due: Vec<Arc<Client>> = {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients
                .values()
                .filter(|c| c.idle_at(tick) || c.meta().expires_at.is_some())
                .cloned()
                .collect()
        };
        for client in due {
            client.wake();
        }
    }

    fn heartbeat_tick(&self) -> u64 {
        self.heartbeat.load(Relaxed)
    }

    /// Takes a lag sample of every ring ([`Ring::sample`]) and, under
    /// `disconnect`, ends the streams the slow-client rule finds behind (one
    /// that stopped reading is never polled, so it cannot notice its own
    /// lag). See [`slow`].
    pub fn sample_lag(&self) {
        let rule = self.config.slow_clients();
        let rings: Vec<Arc<Ring>> = self.read_topics().values().cloned().collect();
        for ring in rings {
            for client in ring.sample(&rule) {
                slow::disconnect(&client, &self.totals);
            }
        }
        self.totals.lag_samples.fetch_add(1, Relaxed);
    }

    /// Evicts expired events and forgets local topics that are empty and
    /// unused (a bus forgets its topics itself, via `forget_if_idle`).
    pub fn sweep(&self) {
        let bounds = self.bounds();
        let local = self.bus().is_none();
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        topics.retain(|_, t| !(t.sweep(&bounds) && local));
    }

    /// Whether new streams are accepted (false once draining).
    pub fn accepting(&self) -> bool {
        self.accepting.load(Relaxed)
    }

    pub fn stop_accepting(&self) {
        self.accepting.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests;
