//! Backends: the buses the hub can be plugged into (`crate::hub::Bus`),
//! where events come from and where they are made durable. Redis
//! (`redis`, feature `redis`) and Kafka (`kafka`, feature `kafka`, one
//! ring per partition); both features are on by default, and a build
//! without one has no trace of it but its flags, which [`Config::build`]
//! refuses.
//!
//! With no backend the hub is the whole story (the embedded in-memory
//! default). The hub owns the interface (`src/hub/bus.rs`: the trait, the
//! types that cross it, and the hub methods a bus may call); backends
//! depend on the hub, never the reverse.
//!
//! Architecture invariant: a backend never blocks the hub: it talks to the
//! hub only through the hub's synchronous bus-facing methods (from its own
//! tasks) and bounded channels.

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(any(feature = "kafka", feature = "redis"))]
mod catch_up;

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::hub::{Bus, BusError, Hub};
use crate::lifecycle::Lifecycle;
#[cfg(any(feature = "kafka", feature = "redis"))]
pub(crate) use catch_up::CatchUpReaders;

#[cfg(doc)]
use crate::config::Config;

/// The buses the configuration asks for ([`Config::build`]): one field per
/// bus this build has.
#[derive(Debug, Default)]
pub struct BusOptions {
    /// With `--redis-url`.
    #[cfg(feature = "redis")]
    pub redis: Option<redis::RedisOptions>,
    /// With `--kafka-brokers`.
    #[cfg(feature = "kafka")]
    pub kafka: Option<kafka::KafkaOptions>,
}

/// A gateway's buses, as configured.
#[derive(Debug, Default)]
pub(crate) struct Buses {
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<Arc<redis::RedisBus>>,
    #[cfg(feature = "kafka")]
    pub(crate) kafka: Option<Arc<kafka::KafkaBus>>,
}

// A build with neither bus has nothing to create or start.
#[cfg_attr(
    not(any(feature = "kafka", feature = "redis")),
    expect(unused_variables, reason = "no bus in this build")
)]
impl Buses {
    /// Creates the buses `options` ask for and plugs `hub` into one: Kafka
    /// when configured (Redis then keeps only the cluster-wide client
    /// registry), else Redis, else none.
    pub(crate) fn new(
        options: BusOptions,
        hub: &Arc<Hub>,
        tracker: &TaskTracker,
    ) -> Result<Buses, BusError> {
        let buses = Buses {
            #[cfg(feature = "redis")]
            redis: options
                .redis
                .map(|o| redis::RedisBus::new(o, hub, tracker.clone()))
                .transpose()?,
            #[cfg(feature = "kafka")]
            kafka: options
                .kafka
                .map(|o| kafka::KafkaBus::new(o, hub, tracker.clone()))
                .transpose()?,
        };
        if let Some(bus) = buses.shared() {
            // A fresh hub has no bus yet.
            let _ = hub.set_bus(bus);
        }
        Ok(buses)
    }

    /// The bus the hub is plugged into.
    fn shared(&self) -> Option<Arc<dyn Bus>> {
        #[cfg(feature = "kafka")]
        if let Some(bus) = &self.kafka {
            return Some(bus.clone());
        }
        #[cfg(feature = "redis")]
        if let Some(bus) = &self.redis {
            return Some(bus.clone());
        }
        None
    }

    /// Starts the buses' tasks; they end when `life` stops.
    pub(crate) fn spawn(&self, life: &Lifecycle) {
        #[cfg(feature = "kafka")]
        if let Some(bus) = &self.kafka {
            bus.spawn(life);
        }
        #[cfg(feature = "redis")]
        if let Some(bus) = &self.redis {
            // With Kafka as the bus, Redis's tail follows nothing.
            bus.spawn(life);
        }
    }

    /// The cluster-wide client registry, started (with Redis).
    #[cfg(feature = "redis")]
    pub(crate) fn cluster(
        &self,
        hub: &Arc<Hub>,
        life: &Lifecycle,
    ) -> Option<Arc<redis::clients::ClusterClients>> {
        let cluster = redis::clients::ClusterClients::new(self.redis.as_ref()?, hub);
        cluster.spawn(life);
        Some(cluster)
    }
}
