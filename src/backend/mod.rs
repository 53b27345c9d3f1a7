//! Backends: the buses the hub can be plugged into (`crate::hub::Bus`),
//! where events come from and where they are made durable. Redis
//! ([`redis`]) and Kafka ([`kafka`], one ring per partition).
//!
//! With no backend the hub is the whole story (the embedded in-memory
//! default). The hub owns the interface (`src/hub/bus.rs`: the trait, the
//! types that cross it, and the hub methods a bus may call); backends
//! depend on the hub, never the reverse.
//!
//! Architecture invariant: a backend never blocks the hub: it talks to the
//! hub only through the hub's synchronous bus-facing methods (from its own
//! tasks) and bounded channels.

pub mod kafka;
pub mod redis;
