//! The cluster-wide client registry. Each replica keeps a hash of its
//! connected clients in Redis (`<prefix>:clients:<replica>`), refreshed on a
//! timer with a TTL so a crashed replica's clients disappear on their own,
//! and a sorted set of live replicas (`<prefix>:replicas`, scored by the last
//! refresh). `DELETE /clients/{id}` on any replica finds the owner there and
//! tells it on its channel `<prefix>:kick:<replica>`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;

use super::{BACKOFF_MAX, BACKOFF_MIN, RedisBus, bounded, now_ms, unavailable};
use crate::hub::BusError;
use crate::hub::{Client, Hub};
use crate::lifecycle::Lifecycle;
use crate::sse::CloseReason;

/// How often a replica refreshes its entries.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long entries outlive the last refresh.
pub const TTL: Duration = Duration::from_secs(15);
/// Most entries written in one pipeline. A refresh once wrote every new
/// client in one: after 16,000 streams opened, the pipeline and its encoded
/// request made a ~15 MiB transient that the allocator kept, ~1 KiB more per
/// idle stream in every later RSS sample (PERFORMANCE.md).
const BATCH: usize = 256;

pub struct ClusterClients {
    conn: ConnectionManager,
    client: redis::Client,
    prefix: String,
    replica: String,
    timeout: Duration,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for ClusterClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClients")
            .field("replica", &self.replica)
            .finish()
    }
}

impl ClusterClients {
    pub fn new(redis: &RedisBus, hub: &Arc<Hub>) -> Arc<ClusterClients> {
        let opts = redis.options();
        Arc::new(ClusterClients {
            conn: redis.connection(),
            client: redis.client().clone(),
            prefix: opts.prefix.clone(),
            replica: opts.replica_id.clone(),
            timeout: opts.timeout,
            hub: hub.clone(),
        })
    }

    fn hash(&self, replica: &str) -> String {
        format!("{}:clients:{replica}", self.prefix)
    }

    fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }

    fn stats_key(&self, replica: &str) -> String {
        format!("{}:stats:{replica}", self.prefix)
    }

    fn kick_channel(&self, replica: &str) -> String {
        format!("{}:kick:{replica}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(&self, q: impl QueryAsync<T>) -> Result<T, BusError> {
        let mut conn = self.conn.clone();
        bounded(self.timeout, q.query(&mut conn), unavailable, unavailable).await
    }

    /// Starts the refresh and kick listener; on stop, deregisters.
    pub fn spawn(self: &Arc<Self>, life: &Lifecycle) {
        life.tracker()
            .spawn(self.clone().refresh_loop(life.clone()));
        life.tracker().spawn(self.clone().kick_loop(life.clone()));
    }

    async fn refresh_loop(self: Arc<Self>, life: Lifecycle) {
        let mut synced: HashSet<Arc<str>> = HashSet::new();
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = life.stopped() => break,
            }
            match self.refresh(&synced, life.phase()).await {
                Ok(now) => synced = now,
                Err(e) => tracing::warn!(error = %e, "cannot refresh the cluster client registry"),
            }
        }
        let mut pipe = redis::pipe();
        pipe.del(self.hash(&self.replica))
            .del(self.stats_key(&self.replica))
            .zrem(self.replicas(), &self.replica);
        match self.run::<()>(pipe).await {
            Ok(()) => {
                tracing::info!(replica = %self.replica, "deregistered from the cluster client registry")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot deregister clients; they expire on their own")
            }
        }
    }

    /// Writes what changed since `synced`, and this replica's stats;
    /// rewrites everything when the hash no longer matches (e.g. Redis
    /// restarted empty).
    async fn refresh(
        &self,
        synced: &HashSet<Arc<str>>,
        phase: &'static str,
    ) -> Result<HashSet<Arc<str>>, BusError> {
        let clients = self.hub.clients();
        let now: HashSet<Arc<str>> = clients.iter().map(|c| c.id().clone()).collect();
        let hash = self.hash(&self.replica);
        let stats = serde_json::to_string(&self.hub.replica_stats(phase)).unwrap_or_default();
        let fresh: Vec<&Arc<Client>> = clients
            .iter()
            .filter(|c| !synced.contains(c.id()))
            .collect();
        self.write_entries(&hash, &fresh).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(self.stats_key(&self.replica))
            .arg(stats)
            .arg("PX")
            .arg(TTL.as_millis() as u64)
            .ignore();
        let gone: Vec<&str> = synced.difference(&now).map(|id| &**id).collect();
        if !gone.is_empty() {
            pipe.hdel(&hash, gone).ignore();
        }
        pipe.pexpire(&hash, TTL.as_millis() as i64).ignore();
        pipe.zadd(self.replicas(), &self.replica, now_ms()).ignore();
        pipe.zrembyscore(
            self.replicas(),
            "-inf",
            now_ms().saturating_sub(TTL.as_millis() as u64),
        )
        .ignore();
        pipe.hlen(&hash);
        let (len,): (usize,) = self.run(pipe).await?;
        if len == now.len() {
            return Ok(now);
        }
        // Out of step: rewrite the whole hash.
        self.run::<()>(redis::cmd("DEL").arg(&hash).clone()).await?;
        let all: Vec<&Arc<Client>> = clients.iter().collect();
        self.write_entries(&hash, &all).await?;
        Ok(now)
    }

    /// Writes the entries of `clients` into `hash`, [`BATCH`] per pipeline,
    /// each renewing the hash's TTL (so a replica that dies halfway leaves
    /// nothing behind for good). On an error, the next refresh writes them
    /// again.
    async fn write_entries(&self, hash: &str, clients: &[&Arc<Client>]) -> Result<(), BusError> {
        for batch in clients.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for c in batch {
                pipe.hset(hash, &**c.id(), entry(c)).ignore();
            }
            pipe.pexpire(hash, TTL.as_millis() as i64).ignore();
            self.run::<()>(pipe).await?;
        }
        Ok(())
    }

    async fn kick_loop(self: Arc<Self>, life: Lifecycle) {
        let channel = self.kick_channel(&self.replica);
        let mut backoff = BACKOFF_MIN;
        loop {
            let listen = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(id) = msg.get_payload::<String>()
                        && self.hub.close_client(&id, CloseReason::Kicked)
                    {
                        tracing::info!(client = %id, "stream ended by an operator on another replica");
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                r = listen => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, retry_in = ?backoff, "kick listener lost redis");
                    }
                }
                _ = life.stopped() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {},
                _ = life.stopped() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Replicas that refreshed within the TTL.
    async fn live_replicas(&self) -> Result<Vec<String>, BusError> {
        let since = now_ms().saturating_sub(TTL.as_millis() as u64);
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.replicas())
            .arg(since)
            .arg("+inf")
            .arg("BYSCORE");
        self.run(cmd).await
    }

    /// Every replica's clients.
    pub async fn list(&self) -> Result<Vec<ClusterClient>, BusError> {
        let mut out = Vec::new();
        for replica in self.live_replicas().await? {
            let mut cmd = redis::cmd("HVALS");
            cmd.arg(self.hash(&replica));
            let entries: Vec<String> = self.run(cmd).await?;
            out.extend(
                entries
                    .iter()
                    .filter_map(|e| ClusterClient::parse(e, &replica)),
            );
        }
        Ok(out)
    }

    /// Every live replica's stats but this one's, as written at its last
    /// refresh (at most [`REFRESH`] old), each with a `replica` field.
    pub async fn other_stats(&self) -> Result<Vec<serde_json::Value>, BusError> {
        let others: Vec<String> = self
            .live_replicas()
            .await?
            .into_iter()
            .filter(|r| *r != self.replica)
            .collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for replica in &others {
            cmd.arg(self.stats_key(replica));
        }
        let entries: Vec<Option<String>> = self.run(cmd).await?;
        let mut out = Vec::new();
        for (replica, entry) in others.into_iter().zip(entries) {
            if let Some(Ok(serde_json::Value::Object(mut obj))) =
                entry.map(|e| serde_json::from_str(&e))
            {
                obj.insert("replica".into(), replica.into());
                out.push(serde_json::Value::Object(obj));
            }
        }
        Ok(out)
    }

    /// Tells the replica that holds `id` to end it; false when no live
    /// replica lists it.
    pub async fn kick(&self, id: &str) -> Result<bool, BusError> {
        for replica in self.live_replicas().await? {
            let mut cmd = redis::cmd("HEXISTS");
            cmd.arg(self.hash(&replica)).arg(id);
            if self.run::<bool>(cmd).await? {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(self.kick_channel(&replica)).arg(id);
                self.run::<i64>(cmd).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }
}

/// A client's registry entry: what identifies it. Counters are left out:
/// written once, they would only go stale (ask the replica for live ones).
fn entry(c: &crate::hub::Client) -> String {
    let mut info = serde_json::to_value(c.info()).unwrap_or_default();
    if let Some(obj) = info.as_object_mut() {
        obj.remove("events_sent");
        obj.remove("bytes_sent");
    }
    info.to_string()
}

/// A stream as the cluster registry lists it.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    /// The replica that holds it.
    pub replica: String,
    /// Its topics (`GET /clients?topic=` filters on them).
    pub topics: Vec<Arc<str>>,
    /// The entry as its replica wrote it (a `ClientInfo`, kept whole so the
    /// fields of a replica of another version pass through), `replica`
    /// added: what `GET /clients?scope=cluster` shows.
    entry: serde_json::Map<String, serde_json::Value>,
}

impl ClusterClient {
    /// `None` for an entry that is not a JSON object (it is skipped).
    fn parse(entry: &str, replica: &str) -> Option<ClusterClient> {
        let serde_json::Value::Object(mut entry) = serde_json::from_str(entry).ok()? else {
            return None;
        };
        let topics = entry
            .get("topics")
            .and_then(|t| t.as_array())
            .map(|a| a.iter().filter_map(|t| t.as_str()).map(Arc::from).collect())
            .unwrap_or_default();
        entry.insert("replica".into(), replica.into());
        Some(ClusterClient {
            replica: replica.into(),
            topics,
            entry,
        })
    }
}

impl serde::Serialize for ClusterClient {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.entry.serialize(s)
    }
}

/// Commands and pipelines, run the same way.
trait QueryAsync<T> {
    fn query(
        self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = redis::RedisResult<T>> + Send;
}

impl<T: redis::FromRedisValue + Send> QueryAsync<T> for redis::Cmd {
    async fn query(self, conn: &mut ConnectionManager) -> redis::RedisResult<T> {
        self.query_async(conn).await
    }
}

impl<T: redis::FromRedisValue + Send> QueryAsync<T> for redis::Pipeline {
    async fn query(self, conn: &mut ConnectionManager) -> redis::RedisResult<T> {
        self.query_async(conn).await
    }
}
