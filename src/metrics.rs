//! Prometheus metrics (`GET /metrics`), in the text exposition format.
//!
//! Hub counters are read at scrape time by a collector rather than updated on
//! the delivery path: a delivery touches only its own client's counters.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::backend::Buses;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;

/// Topics labelled in the per-topic metrics: the ones with the most events
/// published, so the label's cardinality stays bounded whatever
/// `--max-topics` is.
pub const TOP_TOPICS: usize = 20;

/// Upper bounds of `streamline_clients_by_lag`, in events.
const LAG_BUCKETS: [f64; 9] = [0.0, 1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0];

pub struct Metrics {
    registry: Registry,
    /// Latency of `PATCH /events`, in seconds.
    pub patch_latency: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(hub: Arc<Hub>) -> Metrics {
        let mut registry = Registry::with_prefix("streamline");
        let patch_latency = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "patch_latency_seconds",
            "Time to accept a PATCH /events request",
            patch_latency.clone(),
        );
        registry.register_collector(Box::new(HubCollector(hub)));
        Metrics {
            registry,
            patch_latency,
        }
    }

    /// Adds the shutdown phase (`streamline_lifecycle_phase`).
    pub fn register_lifecycle(&mut self, life: Lifecycle) {
        self.registry
            .register_collector(Box::new(PhaseCollector(life)));
    }

    /// Adds the figures of a gateway's buses.
    #[cfg_attr(
        not(any(feature = "kafka", feature = "redis")),
        expect(unused_variables, reason = "no bus in this build")
    )]
    pub(crate) fn register_buses(&mut self, buses: &Buses) {
        #[cfg(feature = "kafka")]
        if let Some(bus) = &buses.kafka {
            self.register_kafka(bus.stats().clone());
        }
        #[cfg(feature = "redis")]
        if let Some(bus) = &buses.redis {
            self.register_redis(bus.stats().clone());
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct HubCollector(Arc<Hub>);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for HubCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let hub = &self.0;
        let t = hub.totals();
        let clients = hub.clients();
        let (mut events, mut bytes) = (
            t.closed_events_sent.load(Relaxed),
            t.closed_bytes_sent.load(Relaxed),
        );
        for c in &clients {
            events += c.events_sent();
            bytes += c.bytes_sent();
        }
        gauge(
            &mut e,
            "clients_connected",
            "Streams open now",
            clients.len() as i64,
        )?;
        gauge(
            &mut e,
            "topics",
            "Topics held now",
            hub.topic_count() as i64,
        )?;
        let opened = t.connections_opened.load(Relaxed);
        counter(&mut e, "connections_opened", "Streams opened", opened)?;
        let closed = t.connections_closed.load(Relaxed);
        counter(&mut e, "connections_closed", "Streams closed", closed)?;
        let published = t.events_published.load(Relaxed);
        counter(
            &mut e,
            "events_published",
            "Events published into the hub",
            published,
        )?;
        counter(
            &mut e,
            "events_delivered",
            "Events written to streams",
            events,
        )?;
        counter(&mut e, "bytes_sent", "Bytes written to streams", bytes)?;
        let slow = t.slow_disconnected.load(Relaxed);
        counter(
            &mut e,
            "slow_clients_disconnected",
            "Streams ended for falling behind",
            slow,
        )?;
        let skipped = t.slow_skipped.load(Relaxed);
        counter(
            &mut e,
            "slow_clients_skipped",
            "Times a stream skipped ahead for falling behind",
            skipped,
        )?;
        let drained = t.drain_closed.load(Relaxed);
        counter(
            &mut e,
            "drain_closed",
            "Streams closed by a drain (reason shutdown)",
            drained,
        )?;
        // The lag distribution as it is now: a histogram's buckets, but
        // gauges (they go down as well as up), so `histogram_quantile`
        // works on them without `rate`.
        let mut by_lag = [0i64; LAG_BUCKETS.len()];
        let (mut streams, mut max_lag) = (0i64, 0u64);
        for c in &clients {
            let Some(behind) = hub.lag_of(c) else {
                continue;
            };
            streams += 1;
            max_lag = max_lag.max(behind);
            for (n, le) in by_lag.iter_mut().zip(LAG_BUCKETS) {
                *n += i64::from(behind as f64 <= le);
            }
        }
        let mut family = e.encode_descriptor(
            "clients_by_lag",
            "Streams at most `le` events behind their topics' heads, now",
            None,
            MetricType::Gauge,
        )?;
        for (n, le) in by_lag.iter().zip(LAG_BUCKETS) {
            let le = le.to_string();
            ConstGauge::new(*n).encode(family.encode_family(&[("le", le.as_str())])?)?;
        }
        ConstGauge::new(streams).encode(family.encode_family(&[("le", "+Inf")])?)?;
        gauge(
            &mut e,
            "client_lag_max",
            "The most events any stream is behind its topics' heads, now",
            max_lag as i64,
        )?;
        let mut topics = hub.topics();
        topics.sort_by_key(|t| std::cmp::Reverse(t.events_published));
        topics.truncate(TOP_TOPICS);
        let mut family = e.encode_descriptor(
            "topic_events_published",
            "Events published, by topic (the 20 topics with the most)",
            None,
            MetricType::Counter,
        )?;
        for t in &topics {
            let labels = [("topic", t.name.as_str())];
            ConstCounter::new(t.events_published).encode(family.encode_family(&labels)?)?;
        }
        let mut family = e.encode_descriptor(
            "topic_subscribers",
            "Streams reading a topic, by topic (the 20 topics with the most events)",
            None,
            MetricType::Gauge,
        )?;
        for t in &topics {
            let labels = [("topic", t.name.as_str())];
            ConstGauge::new(t.subscribers as i64).encode(family.encode_family(&labels)?)?;
        }
        let mut family = e.encode_descriptor(
            "backend_up",
            "1 while the bus (redis or kafka) is reachable, else 0",
            None,
            MetricType::Gauge,
        )?;
        if let Some(bus) = hub.bus() {
            let labels = [("backend", bus.name())];
            ConstGauge::new(i64::from(bus.is_up())).encode(family.encode_family(&labels)?)?;
        }
        let running = hub.bus().map_or(0, |bus| bus.catch_ups_running());
        gauge(
            &mut e,
            "catch_ups_running",
            "History readers (resume beyond memory) running now",
            running,
        )?;
        Ok(())
    }
}

#[derive(Debug)]
struct PhaseCollector(Lifecycle);

/// The phases `streamline_lifecycle_phase` reports, in order.
const PHASES: [&str; 4] = ["serving", "not_ready", "draining", "stopping"];

impl Collector for PhaseCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let now = self.0.phase();
        let mut family = e.encode_descriptor(
            "lifecycle_phase",
            "1 for the shutdown phase the process is in (serving, not_ready, draining, stopping)",
            None,
            MetricType::Gauge,
        )?;
        for phase in PHASES {
            let labels = [("phase", phase)];
            ConstGauge::new(i64::from(phase == now)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The Redis bus's figures.
#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::backend::redis::RedisStats;

    impl Metrics {
        /// Adds the Redis bus's figures.
        pub fn register_redis(&mut self, stats: Arc<RedisStats>) {
            self.registry
                .register_collector(Box::new(RedisCollector(stats)));
        }
    }

    #[derive(Debug)]
    struct RedisCollector(Arc<RedisStats>);

    impl Collector for RedisCollector {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            let s = &self.0;
            gauge(
                &mut e,
                "redis_rtt_seconds",
                "Round trip of the last Redis PING",
                s.rtt_micros.load(Relaxed) as f64 / 1e6,
            )?;
            gauge(
                &mut e,
                "redis_read_lag_seconds",
                "Age of the newest stream entry when the tail read it",
                s.read_lag_ms.load(Relaxed) as f64 / 1e3,
            )?;
            let reconnects = s.reconnects.load(Relaxed);
            counter(
                &mut e,
                "redis_reconnects",
                "Times the Redis tail reconnected",
                reconnects,
            )?;
            Ok(())
        }
    }
}

/// The Kafka bus's figures.
#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use crate::backend::kafka::KafkaStats;

    impl Metrics {
        /// Adds the Kafka bus's figures.
        pub fn register_kafka(&mut self, stats: Arc<KafkaStats>) {
            self.registry
                .register_collector(Box::new(KafkaCollector(stats)));
        }
    }

    #[derive(Debug)]
    struct KafkaCollector(Arc<KafkaStats>);

    impl Collector for KafkaCollector {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            let s = &self.0;
            let mut family = e.encode_descriptor(
                "kafka_records_consumed",
                "Kafka records handed to the hub, by Kafka topic",
                None,
                MetricType::Counter,
            )?;
            for (topic, c) in s.topics() {
                let labels = [("topic", topic.as_str())];
                ConstCounter::new(c.consumed.load(Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
            let mut family = e.encode_descriptor(
                "kafka_records_skipped",
                "Kafka records not delivered because their value is not UTF-8, by Kafka topic",
                None,
                MetricType::Counter,
            )?;
            for (topic, c) in s.topics() {
                let labels = [("topic", topic.as_str())];
                ConstCounter::new(c.skipped.load(Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
            let mut family = e.encode_descriptor(
            "kafka_consumer_lag",
            "Records in a partition not consumed yet (high watermark - position), by Kafka topic and partition",
            None,
            MetricType::Gauge,
        )?;
            for ((topic, partition), lag) in s.lag() {
                let partition = partition.to_string();
                let labels = [("topic", topic.as_str()), ("partition", partition.as_str())];
                ConstGauge::new(lag).encode(family.encode_family(&labels)?)?;
            }
            let errors = s.produce_errors.load(Relaxed);
            counter(
                &mut e,
                "kafka_produce_errors",
                "Events PATCH /events could not get acknowledged by Kafka",
                errors,
            )?;
            counter(
                &mut e,
                "kafka_duplicates_dropped",
                "Records not delivered: copies of a record with the same Idempotency-Key already delivered",
                s.duplicates_dropped.load(Relaxed),
            )?;
            counter(
                &mut e,
                "kafka_assignments",
                "Times partitions were assigned to the consumer (every new partition of every topic at once)",
                s.assignments.load(Relaxed),
            )?;
            counter(
                &mut e,
                "kafka_metadata_rounds",
                "Metadata rounds run: the watch's, one a second, and those of streams on a topic not followed yet (streams arriving together share one)",
                s.rounds.load(Relaxed),
            )?;
            Ok(())
        }
    }
}
