//! Redis as the bus and shared history for replicas without Kafka: one Redis
//! Stream per topic (`<prefix>:s:<topic>`, entries `e` = event name, `d` =
//! data), appended by `PATCH /events` on any replica and tailed by every
//! replica that has subscribers for the topic. An event's id is its stream
//! entry id, so it is the same on every replica.
//!
//! Connections: one multiplexed, auto-reconnecting connection for commands,
//! and one dedicated connection for the tail's blocking `XREAD` (a blocking
//! command would stall everything queued behind it on a shared connection).

pub mod clients;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{Notify, mpsc};

use super::CatchUpReaders;
use crate::hub::{Bus, BusError, CatchUp, Hub, HubError, NewEvent, StoredEvent};
use crate::id::Position;
use crate::idempotency::IdempotencyKey;
use crate::lifecycle::Lifecycle;

/// How long a followed topic with no subscribers is still tailed, so a
/// client that reconnects finds its history in memory.
const LINGER: Duration = Duration::from_secs(30);
/// How long one blocking read waits before it is issued again.
const BLOCK: Duration = Duration::from_secs(2);
/// Entries per read, for the tail and for catch-up pages.
const PAGE: usize = 500;
/// Reconnect backoff bounds.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// Approximate length cap of each topic's stream (`XADD MAXLEN ~`).
    pub stream_maxlen: usize,
    /// Bound on each command (PATCH answers 503 past it).
    pub timeout: Duration,
    /// Most history readers running at once, across all streams.
    pub max_catch_up: usize,
    /// This replica's name in the cluster-wide client registry.
    pub replica_id: String,
    /// How long an `Idempotency-Key` is kept in Redis (`--idempotency-window`).
    pub idempotency_window: Duration,
}

/// `PATCH /events` with an `Idempotency-Key`, in one script so Redis runs
/// the check, the appends and the record of the key as one step: a
/// request that reached a hung Redis runs once when it resumes, and a
/// retry, before or after, finds the key.
/// KEYS: the key's record, then one stream per event. ARGV: the batch's
/// fingerprint, the window in ms, MAXLEN, then per event: has a name
/// (`1`/`0`), the name, the data. Returns `{1, record}` when it appended,
/// `{0, record}` when the key was there; a record is the fingerprint and
/// the entry ids, space-separated.
const PUBLISH_ONCE: &str = r#"
local done = redis.call('GET', KEYS[1])
if done then return {0, done} end
for i = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is not a stream; nothing was appended')
  end
end
local ids = {}
for i = 2, #KEYS do
  local at = 4 + (i - 2) * 3
  if ARGV[at] == '1' then
    ids[#ids + 1] = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[at + 1], 'd', ARGV[at + 2])
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[at + 2])
  end
end
local record = ARGV[1] .. ' ' .. table.concat(ids, ' ')
redis.call('SET', KEYS[1], record, 'PX', ARGV[2])
return {1, record}
"#;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub reconnects: AtomicU64,
    pub rtt_micros: AtomicU64,
    /// Age of the newest entry at the moment the tail read it, in ms.
    pub read_lag_ms: AtomicU64,
}

pub struct RedisBus {
    opts: RedisOptions,
    client: redis::Client,
    conn: ConnectionManager,
    hub: Weak<Hub>,
    /// Followed topics and the position the tail has read up to.
    tail: Mutex<HashMap<Arc<str>, Position>>,
    tail_changed: Notify,
    catch_ups: CatchUpReaders,
    up: AtomicBool,
    /// Whether Redis has answered since start-up (for the log line).
    was_up: AtomicBool,
    stats: Arc<RedisStats>,
    /// Lets `&self` methods hand an owned handle to the tasks they spawn.
    me: Weak<RedisBus>,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.opts.prefix)
            .finish()
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable {
        backend: "redis",
        reason: e.to_string(),
    }
}

/// A Redis call bounded by `--redis-timeout`, its error mapped by `failed`
/// and no answer in time by `late` (`unavailable` where nothing can have
/// been written, `outcome_unknown` where a publish may have run).
pub(crate) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
    failed: impl FnOnce(redis::RedisError) -> BusError,
    late: fn(String) -> BusError,
) -> Result<T, BusError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(late(format!("no answer within {timeout:?}"))),
    }
}

fn outcome_unknown(e: impl std::fmt::Display) -> BusError {
    BusError::OutcomeUnknown {
        backend: "redis",
        reason: e.to_string(),
    }
}

/// What a failed publish command means for its events. Only a connection
/// that was never made (refused) or an error reply to a command that
/// checks everything before writing proves nothing was appended; a
/// timeout or a connection lost with the command in flight may have
/// appended them (a hung Redis runs what it received once it resumes).
fn publish_failure(e: redis::RedisError, checked_first: bool) -> BusError {
    let replied = matches!(e.kind(), redis::ErrorKind::Server(_));
    if e.is_connection_refusal() || (replied && checked_first) {
        unavailable(e)
    } else {
        outcome_unknown(e)
    }
}

/// Parses a stream entry id (`ms-seq`).
fn entry_pos(id: &str) -> Option<Position> {
    id.parse().ok()
}

fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value_ref(v).ok())
}

fn stored(entry: &StreamId) -> Option<StoredEvent> {
    Some(StoredEvent {
        pos: entry_pos(&entry.id)?,
        event: field(entry, "e"),
        data: field(entry, "d").unwrap_or_default(),
    })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisBus {
    /// Creates the bus for `hub` (connections are made lazily and retried,
    /// so the gateway starts, not ready, while Redis is down).
    pub fn new(
        opts: RedisOptions,
        hub: &Arc<Hub>,
        tracker: tokio_util::task::TaskTracker,
    ) -> Result<Arc<RedisBus>, BusError> {
        let client = redis::Client::open(opts.url.as_str()).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(opts.timeout))
            .set_connection_timeout(Some(opts.timeout))
            .set_max_delay(BACKOFF_MAX);
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        Ok(Arc::new_cyclic(|me| RedisBus {
            me: me.clone(),
            catch_ups: CatchUpReaders::new(opts.max_catch_up, tracker),
            opts,
            client,
            conn,
            hub: Arc::downgrade(hub),
            tail: Mutex::new(HashMap::new()),
            tail_changed: Notify::new(),
            up: AtomicBool::new(false),
            was_up: AtomicBool::new(false),
            stats: Arc::default(),
        }))
    }

    pub fn stats(&self) -> &Arc<RedisStats> {
        &self.stats
    }

    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// A clone of the command connection (cheap: it is shared).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    fn key(&self, topic: &str) -> String {
        format!("{}:s:{topic}", self.opts.prefix)
    }

    fn topic_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.opts.prefix)?.strip_prefix(":s:")
    }

    /// Starts the tail and the health check; both end when `life` stops.
    pub fn spawn(self: &Arc<Self>, life: &Lifecycle) {
        life.tracker().spawn(self.clone().tail_loop(life.clone()));
        life.tracker().spawn(self.clone().health_loop(life.clone()));
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BusError> {
        let mut conn = self.conn.clone();
        let call = cmd.query_async(&mut conn);
        bounded(self.opts.timeout, call, unavailable, unavailable).await
    }

    /// From `XINFO STREAM`: the newest id ever generated and the newest id
    /// that may have been deleted (`XDEL`, or trimmed). A missing stream
    /// reads as `0-0`s.
    async fn stream_info(&self, topic: &str) -> Result<(Position, Position), BusError> {
        // `XINFO` answers a missing key with an error that only its text
        // tells apart (`ERR no such key`): `EXISTS` in the same transaction
        // says it instead, and any error `XINFO` gives for a stream that
        // exists is a real one.
        let key = self.key(topic);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .ignore_errors()
            .cmd("EXISTS")
            .arg(&key)
            .cmd("XINFO")
            .arg("STREAM")
            .arg(&key);
        let mut conn = self.conn.clone();
        let call = pipe.query_async(&mut conn);
        let (exists, info): (bool, redis::RedisResult<HashMap<String, Value>>) =
            bounded(self.opts.timeout, call, unavailable, unavailable).await?;
        if !exists {
            return Ok((Position::default(), Position::default()));
        }
        let info = info.map_err(unavailable)?;
        let pos = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .and_then(|s| entry_pos(&s))
                .unwrap_or_default()
        };
        let count = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
                .unwrap_or(0)
        };
        // `XADD MAXLEN` trims without moving max-deleted-entry-id (Redis
        // 7.0): when entries were removed, everything before the first one
        // left may be gone too.
        let mut deleted = pos("max-deleted-entry-id");
        if count("entries-added") > count("length") {
            let first = pos("recorded-first-entry-id");
            let before_first = match first.lo {
                0 => Position::new(first.hi.saturating_sub(1), u64::MAX),
                lo => Position::new(first.hi, lo - 1),
            };
            deleted = deleted.max(before_first);
        }
        Ok((pos("last-generated-id"), deleted))
    }

    async fn health_loop(self: Arc<Self>, life: Lifecycle) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = life.stopped() => return,
            }
            let start = std::time::Instant::now();
            let ping = self.run::<String>(&redis::cmd("PING")).await;
            self.stats
                .rtt_micros
                .store(start.elapsed().as_micros() as u64, Relaxed);
            match ping {
                Ok(_) => self.set_up(true, None),
                Err(e) => self.set_up(false, Some(&e)),
            }
        }
    }

    /// Fails, sending nothing, while Redis is known to be lost (it answered
    /// once, and the health check or the tail has since found it gone): a
    /// command sent now would end in a timeout or a dropped connection,
    /// which cannot tell "not run" from "run" (a hung Redis runs it when it
    /// resumes), so the publisher could only be told "unknown". Not before
    /// Redis first answered, so a fresh replica still tries.
    fn refuse_while_lost(&self) -> Result<(), BusError> {
        if self.was_up.load(Relaxed) && !self.up.load(Relaxed) {
            return Err(unavailable(
                "Redis is unreachable (see /ready); nothing was sent",
            ));
        }
        Ok(())
    }

    /// Records whether Redis answers, logging each change once: the health
    /// check and the tail both report, so a transition is logged by whichever
    /// sees it first, never once per retry.
    fn set_up(&self, ok: bool, error: Option<&dyn std::fmt::Display>) {
        if self.up.swap(ok, Relaxed) == ok {
            return;
        }
        if !ok {
            match error {
                Some(e) => tracing::warn!(error = %e, "redis is unreachable"),
                None => tracing::warn!("redis is unreachable"),
            }
        } else if self.was_up.swap(true, Relaxed) {
            tracing::info!("redis is reachable again");
        } else {
            tracing::info!("redis is reachable");
        }
    }

    /// Reads every followed topic's stream with blocking `XREAD`s and hands
    /// the entries to the hub, in order. Reconnects with backoff; resumes
    /// from the last position read, so an outage loses nothing Redis kept.
    async fn tail_loop(self: Arc<Self>, life: Lifecycle) {
        let mut backoff = BACKOFF_MIN;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.opts.timeout))
            .set_response_timeout(None);
        loop {
            let connect = self
                .client
                .get_multiplexed_async_connection_with_config(&config);
            let conn = tokio::select! {
                c = connect => c,
                _ = life.stopped() => return,
            };
            let (err, was_connected) = match conn {
                Ok(conn) => {
                    backoff = BACKOFF_MIN;
                    match self.tail_on(conn, &life).await {
                        Ok(()) => return,
                        Err(e) => (e, true),
                    }
                }
                Err(e) => (e, false),
            };
            self.set_up(false, Some(&err));
            self.stats.reconnects.fetch_add(1, Relaxed);
            // Once per lost connection; each failed attempt to get it back
            // only at debug level (the outage itself is logged once above).
            if was_connected {
                tracing::warn!(error = %err, retry_in = ?backoff, "redis tail lost its connection");
            } else {
                tracing::debug!(error = %err, retry_in = ?backoff, "redis tail cannot reconnect yet");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = life.stopped() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// The tail on one connection; `Ok` when the gateway stops.
    async fn tail_on(
        &self,
        mut conn: MultiplexedConnection,
        life: &Lifecycle,
    ) -> redis::RedisResult<()> {
        let my_id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await?;
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            if last_sweep.elapsed() >= Duration::from_secs(5) {
                self.forget_idle_topics();
                last_sweep = tokio::time::Instant::now();
            }
            let followed: Vec<(Arc<str>, Position)> = {
                let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.iter().map(|(t, p)| (t.clone(), *p)).collect()
            };
            if followed.is_empty() {
                tokio::select! {
                    _ = self.tail_changed.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = life.stopped() => return Ok(()),
                }
            }
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(PAGE)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS");
            for (topic, _) in &followed {
                cmd.arg(self.key(topic));
            }
            for (_, pos) in &followed {
                cmd.arg(pos.to_string());
            }
            let mut read_conn = conn.clone();
            let read = cmd.query_async::<Option<StreamReadReply>>(&mut read_conn);
            tokio::pin!(read);
            let reply = loop {
                tokio::select! {
                    r = &mut read => break r?,
                    // A topic was added: end the blocking read early so the
                    // next one includes it.
                    _ = self.tail_changed.notified() => {
                        let mut unblock = redis::cmd("CLIENT");
                        unblock.arg("UNBLOCK").arg(my_id);
                        let _ = self.run::<i64>(&unblock).await;
                    }
                    _ = life.stopped() => return Ok(()),
                }
            };
            self.set_up(true, None);
            if let Some(reply) = reply {
                self.deliver(reply);
            }
        }
    }

    fn deliver(&self, reply: StreamReadReply) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        for key in reply.keys {
            let Some(topic) = self.topic_of(&key.key) else {
                continue;
            };
            let mut newest = None;
            for entry in &key.ids {
                let Some(ev) = stored(entry) else {
                    tracing::warn!(topic, id = %entry.id, "skipping a stream entry with a malformed id");
                    continue;
                };
                hub.publish_at(topic, ev.pos, ev.event.as_deref(), &ev.data);
                newest = Some(ev.pos);
            }
            if let Some(pos) = newest {
                self.stats
                    .read_lag_ms
                    .store(now_ms().saturating_sub(pos.hi), Relaxed);
                let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = tail.get_mut(topic) {
                    *p = (*p).max(pos);
                }
            }
        }
    }

    fn forget_idle_topics(&self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.retain(|topic, _| !hub.forget_if_idle(topic, LINGER));
    }
}

impl Bus for RedisBus {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish<'a>(
        &'a self,
        events: &'a [NewEvent],
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            self.refuse_while_lost()?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for ev in events {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(self.key(&ev.topic))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.opts.stream_maxlen)
                    .arg("*");
                if let Some(name) = &ev.event {
                    cmd.arg("e").arg(name);
                }
                cmd.arg("d").arg(&ev.data);
            }
            let mut conn = self.conn.clone();
            let call = pipe.query_async(&mut conn);
            // An error inside EXEC leaves the other appends in place.
            let failed = |e| publish_failure(e, false);
            let ids: Vec<String> =
                bounded(self.opts.timeout, call, failed, outcome_unknown).await?;
            Ok(events
                .iter()
                .zip(ids)
                .map(|(ev, id)| format!("{}:{id}", ev.topic))
                .collect())
        })
    }

    fn publish_once<'a>(
        &'a self,
        events: &'a [NewEvent],
        key: &'a IdempotencyKey,
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            self.refuse_while_lost()?;
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(PUBLISH_ONCE)
                .arg(events.len() + 1)
                .arg(format!("{}:idem:{}", self.opts.prefix, key.key));
            for ev in events {
                cmd.arg(self.key(&ev.topic));
            }
            cmd.arg(&key.fingerprint)
                .arg(self.opts.idempotency_window.as_millis().max(1) as u64)
                .arg(self.opts.stream_maxlen);
            for ev in events {
                match &ev.event {
                    Some(name) => cmd.arg("1").arg(name),
                    None => cmd.arg("0").arg(""),
                };
                cmd.arg(&ev.data);
            }
            let mut conn = self.conn.clone();
            let call = cmd.query_async(&mut conn);
            let failed = |e| publish_failure(e, true);
            let (appended, record): (i64, String) =
                bounded(self.opts.timeout, call, failed, outcome_unknown).await?;
            let mut parts = record.split(' ');
            let fingerprint = parts.next().unwrap_or_default();
            let entry_ids: Vec<&str> = parts.collect();
            if fingerprint != key.fingerprint || entry_ids.len() != events.len() {
                return Err(BusError::key_reused(&key.key));
            }
            if appended == 0 {
                tracing::debug!(key = %key.key, "a retried publish answered from Redis");
            }
            Ok(events
                .iter()
                .zip(entry_ids)
                .map(|(ev, id)| format!("{}:{id}", ev.topic))
                .collect())
        })
    }

    fn follow<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            if self
                .tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(topic)
            {
                return Ok(());
            }
            let (last, _) = self.stream_info(topic).await?;
            let hub = self
                .hub
                .upgrade()
                .ok_or_else(|| unavailable("the hub is gone"))?;
            {
                let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.contains_key(topic) {
                    return Ok(());
                }
                // The topic exists in the hub before the tail can read it,
                // so nothing the tail reads is dropped.
                let head = hub.ensure_topic_at(topic, last)?;
                tail.insert(topic.into(), head);
            }
            self.tail_changed.notify_one();
            Ok(())
        })
    }

    fn catch_up(&self, topic: &str, after: Position, until: Position) -> mpsc::Receiver<CatchUp> {
        let Some(bus) = self.me.upgrade() else {
            return mpsc::channel(1).1; // closed: the bus is going away
        };
        let key = self.key(topic);
        let topic = topic.to_owned();
        self.catch_ups
            .spawn(move |tx| async move { bus.read_history(&key, &topic, after, until, &tx).await })
    }

    fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    fn catch_ups_running(&self) -> i64 {
        self.catch_ups.running()
    }
}

impl RedisBus {
    /// Sends pages of `(after, until]`; returns a final message, if any.
    async fn read_history(
        &self,
        key: &str,
        topic: &str,
        after: Position,
        until: Position,
        tx: &mpsc::Sender<CatchUp>,
    ) -> Option<CatchUp> {
        let (_, deleted) = match self.stream_info(topic).await {
            Ok(info) => info,
            Err(e) => return Some(CatchUp::Failed(e.to_string())),
        };
        let mut cur = after;
        if deleted > after {
            // Trimmed past the resume point: say so, then send what is left.
            if tx.send(CatchUp::Trimmed(deleted)).await.is_err() {
                return None;
            }
            cur = deleted;
        }
        while cur < until {
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(key)
                .arg(format!("({cur}"))
                .arg(until.to_string())
                .arg("COUNT")
                .arg(PAGE);
            let page: StreamRangeReply = match self.run(&cmd).await {
                Ok(p) => p,
                Err(e) => return Some(CatchUp::Failed(e.to_string())),
            };
            let events: Vec<StoredEvent> = page.ids.iter().filter_map(stored).collect();
            let Some(last) = events.last() else { break };
            cur = last.pos;
            if tx.send(CatchUp::Events(events)).await.is_err() {
                return None; // the client left
            }
        }
        None
    }
}
