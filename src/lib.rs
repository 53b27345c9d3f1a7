//! Streamline: a gateway that pushes real-time events to browsers and
//! services over Server-Sent Events.
//!
//! One process, two listeners, one hub:
//!
//! - [`stream`] — the **stream plane**: raw hyper (HTTP/1.1 and h2c) serving
//!   `GET /stream?topic=…` as SSE, and nothing else.
//! - [`control`] — the **control plane**: axum REST API (`PATCH /events`,
//!   `/clients`, `/topics`, `/health`, `/ready`, `/metrics`).
//! - [`hub`] — topics, per-topic rings (history and live buffer in one),
//!   clients, slow-client policy. Both planes share one `Arc<Hub>`.
//! - [`sse`] — the wire format: each event encoded once, shared as `Bytes`.
//! - [`id`] — event ids and resume cursors (`Last-Event-ID`).
//! - [`topic`] — topic-name rules.
//! - [`lifecycle`] — the shutdown token and the drain sequence.
//! - [`config`], [`error`], [`metrics`], [`demo`] — configuration, the JSON
//!   error body, Prometheus metrics, the `--demo` publisher.
//!
//! Embed the whole gateway with [`Gateway`], or just a [`hub::Hub`] and the
//! stream plane ([`stream::serve`]) in your own tokio application; see
//! `examples/embed.rs`.

#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod hub;
pub mod id;
pub mod lifecycle;
pub mod metrics;
pub mod sse;
pub mod stream;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use backend::redis::{RedisBus, RedisOptions, clients::ClusterClients};
pub use config::Config;
use hub::Hub;
use lifecycle::{Lifecycle, Timings};
use tokio_util::task::TaskTracker;

/// A gateway with both listeners bound, ready to [`run`](Gateway::run).
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    hub: Arc<Hub>,
    control: TcpListener,
    stream: TcpListener,
    tracker: TaskTracker,
    redis: Option<Arc<RedisBus>>,
    replica: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backend(#[from] backend::BusError),
    #[error("cannot listen on {addr} ({plane} plane): {source}")]
    Bind {
        plane: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Gateway {
    /// Checks the configuration and binds both listeners (port 0 picks a
    /// free port; see [`control_addr`](Self::control_addr)).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        config.validate()?;
        let bind = |plane, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    plane,
                    addr,
                    source,
                })
        };
        let control = bind("control", config.control_addr).await?;
        let stream = bind("stream", config.stream_addr).await?;
        let hub = Hub::new(config.hub());
        let tracker = TaskTracker::new();
        let replica: Arc<str> = config.replica_id().into();
        let redis = match &config.redis_url {
            Some(url) => {
                let opts = RedisOptions {
                    url: url.clone(),
                    prefix: config.redis_prefix.clone(),
                    stream_maxlen: config.redis_stream_maxlen,
                    timeout: config.redis_timeout,
                    max_catch_up: config.max_catch_up,
                    replica_id: replica.to_string(),
                };
                let bus = RedisBus::new(opts, &hub, tracker.clone())?;
                // A fresh hub has no bus yet.
                let _ = hub.set_bus(bus.clone());
                Some(bus)
            }
            None => None,
        };
        Ok(Gateway {
            hub,
            config,
            control,
            stream,
            tracker,
            redis,
            replica,
        })
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.control
            .local_addr()
            .unwrap_or(self.config.control_addr)
    }

    pub fn stream_addr(&self) -> SocketAddr {
        self.stream.local_addr().unwrap_or(self.config.stream_addr)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serves until `shutdown` is cancelled, then drains and returns (see
    /// [`lifecycle`] for the phases).
    pub async fn run(self, shutdown: CancellationToken) {
        let Gateway {
            config: c,
            hub,
            control,
            stream,
            tracker,
            redis,
            replica,
        } = self;
        let life = Lifecycle::with_tracker(shutdown, tracker.clone());
        tracing::info!(
            control_addr = %control.local_addr().map_or(c.control_addr, |a| a),
            stream_addr = %stream.local_addr().map_or(c.stream_addr, |a| a),
            replica = %replica,
            backend = redis.as_ref().map_or("memory", |_| "redis"),
            "streamline listening"
        );
        let mut metrics = metrics::Metrics::new(hub.clone());
        let cluster = redis.as_ref().map(|bus| {
            bus.spawn(&life);
            metrics.register_redis(bus.stats().clone());
            let cluster = ClusterClients::new(bus, &hub);
            cluster.spawn(&life);
            cluster
        });

        let options = stream::StreamOptions {
            header_read_timeout: c.header_read_timeout,
            write_timeout: c.write_timeout,
            max_stream_topics: c.max_stream_topics,
        };
        tracker.spawn(stream::serve(stream, hub.clone(), options, life.clone()));

        let state = control::ControlState {
            hub: hub.clone(),
            life: life.clone(),
            metrics: Arc::new(metrics),
            cluster,
            replica,
        };
        let router = control::router(state, c.max_body);
        let control_life = life.clone();
        tracker.spawn(async move {
            if let Err(e) = control::serve(control, router, control_life).await {
                tracing::error!(error = %e, "control plane failed");
            }
        });

        tracker.spawn(heartbeats(hub.clone(), c.heartbeat, life.clone()));
        tracker.spawn(sweeps(hub.clone(), life.clone()));
        if c.demo {
            tracker.spawn(demo::run(hub.clone(), life.clone()));
        }

        life.shutdown_requested().await;
        let timings = Timings {
            shutdown_delay: c.shutdown_delay,
            drain_window: c.drain_window,
            write_timeout: c.write_timeout,
            grace_period: c.grace_period,
        };
        lifecycle::shut_down(&life, &hub, timings).await;
    }
}

/// Starts a gateway with `config` and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Gateway::bind(config).await?.run(shutdown).await;
    Ok(())
}

async fn heartbeats(hub: Arc<Hub>, every: std::time::Duration, life: Lifecycle) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => hub.heartbeat(),
            _ = life.stopped() => return,
        }
    }
}

async fn sweeps(hub: Arc<Hub>, life: Lifecycle) {
    let every = std::time::Duration::from_secs(5);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => hub.sweep(),
            _ = life.stopped() => return,
        }
    }
}
