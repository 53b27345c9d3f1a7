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
//!   clients, slow-client policy, and the `Bus` interface a backend
//!   implements. Both planes share one `Arc<Hub>`.
//! - [`sse`] — the wire format: each event encoded once, shared as `Bytes`.
//! - [`id`] — event ids and resume cursors (`Last-Event-ID`).
//! - [`idempotency`] — the `Idempotency-Key` of `PATCH /events`: safe
//!   retries of a publish whose outcome is unknown.
//! - [`topic`] — topic-name rules.
//! - [`backend`] — the buses (`hub::Bus`) that make events durable and
//!   shared between replicas (Redis, or Kafka as source and bus; features
//!   `redis` and `kafka`, on by default); without one the hub is all there
//!   is.
//! - [`lifecycle`] — the shutdown token and the drain sequence.
//! - [`auth`] — who may subscribe and publish: JWT verification shared by
//!   both planes, and the configured secrets.
//! - [`limits`] — per-client bounds (token-bucket rate limits, streams per
//!   address); [`client_ip`] — the client's address, through trusted
//!   proxies.
//! - [`mercure`] — the Mercure protocol beside Streamline's own: its
//!   subscriptions on the stream plane, publishing on the control plane,
//!   its updates carried by one hub topic.
//! - [`config`], [`error`], [`metrics`], [`demo`] — configuration, the JSON
//!   error body, Prometheus metrics, the `--demo` publisher.
//!
//! Embed the whole gateway with [`Gateway`], or just a [`hub::Hub`] and the
//! stream plane ([`stream::serve`]) in your own tokio application; see
//! `examples/embed.rs`.

pub mod auth;
pub mod backend;
pub mod client_ip;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod hub;
pub mod id;
pub mod idempotency;
pub mod lifecycle;
pub mod limits;
pub mod mercure;
pub mod metrics;
pub mod sse;
pub mod stream;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use backend::Buses;
pub use config::Config;
use hub::Hub;
use lifecycle::Lifecycle;
use tokio_util::task::TaskTracker;

/// A gateway with both listeners bound, ready to [`run`](Gateway::run).
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    hub: Arc<Hub>,
    control: TcpListener,
    stream: TcpListener,
    tracker: TaskTracker,
    buses: Buses,
    replica: Arc<str>,
    credentials: auth::Credentials,
    mercure: Option<Arc<mercure::Mercure>>,
    stream_options: stream::StreamOptions,
    control_options: control::serve::ControlOptions,
    timings: lifecycle::Timings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backend(#[from] hub::BusError),
    #[error("cannot listen on {addr} ({plane} plane): {source}")]
    Bind {
        plane: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Connections the kernel completes and queues for a listener before it
/// accepts them (the kernel caps it at `net.core.somaxconn`, 4096 by
/// default). tokio's `TcpListener::bind` asks for 128, as std does: when
/// thousands of clients connect at once (a replica restarting, a fleet
/// reconnecting) the queue overflowed, the kernel dropped handshakes, and
/// clients waited for SYN retransmits (1 s, 3 s, 7 s …); one whose request
/// was dropped too could reach the gateway after its request deadline and
/// be closed without an answer (see PERFORMANCE.md, scale-out).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// tokio's `bind` sets it).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Gateway {
    /// Checks the configuration and binds both listeners (port 0 picks a
    /// free port; see [`control_addr`](Self::control_addr)).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        // Checked and built once here: every key and token file is read
        // once, so a file cannot change (or vanish) between the check and
        // its use.
        let config::Options {
            replica_id,
            hub: hub_config,
            credentials,
            stream: mut stream_options,
            control: control_options,
            mercure: mercure_options,
            buses,
            timings,
        } = config.build()?;
        let bind = |plane, addr| {
            listen(addr).map_err(|source| StartError::Bind {
                plane,
                addr,
                source,
            })
        };
        let control = bind("control", config.control_addr)?;
        let stream = bind("stream", config.stream_addr)?;
        let hub = Hub::new(hub_config);
        let mercure = mercure_options.map(|options| mercure::Mercure::install(options, &hub));
        stream_options.mercure = mercure.clone();
        let tracker = TaskTracker::new();
        let buses = Buses::new(buses, &hub, &tracker)?;
        Ok(Gateway {
            hub,
            config,
            control,
            stream,
            tracker,
            buses,
            replica: replica_id.into(),
            credentials,
            mercure,
            stream_options,
            control_options,
            timings,
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
            buses,
            replica,
            credentials,
            mercure,
            mut stream_options,
            mut control_options,
            timings,
        } = self;
        let life = Lifecycle::with_tracker(shutdown, tracker.clone());
        let control_addr = control.local_addr().unwrap_or(c.control_addr);
        let stream_addr = stream.local_addr().unwrap_or(c.stream_addr);
        let mut metrics = metrics::Metrics::new(hub.clone());
        metrics.register_lifecycle(life.clone());
        buses.spawn(&life);
        metrics.register_buses(&buses);

        if c.cors_allow_origin.is_empty()
            && let Some(cors) = stream::cors::Cors::operators_page(control_addr)
        {
            tracing::info!(
                origin = %format_args!("http://{control_addr}"),
                "no --cors-allow-origin: the stream plane allows the operators' page's own origins (control plane on loopback)"
            );
            stream_options.cors = cors;
        }
        // Both planes' sockets must fit the open-files limit, or a flood of
        // one makes accept fail on the other.
        let wanted = control::serve::SocketBudget {
            stream: stream_options.max_connections,
            stream_refusals: stream_options.max_refusing,
            control: control_options.max_connections,
        };
        if let Some(fitted) = control::serve::open_files_limit().and_then(|l| wanted.fit(l)) {
            stream_options.max_connections = fitted.stream;
            stream_options.max_refusing = fitted.stream_refusals;
            control_options.max_connections = fitted.control;
        }

        tracker.spawn(stream::serve(
            stream,
            hub.clone(),
            stream_options,
            life.clone(),
        ));

        let state = control::ControlState {
            hub: hub.clone(),
            life: life.clone(),
            metrics: Arc::new(metrics),
            #[cfg(feature = "redis")]
            cluster: buses.cluster(&hub, &life),
            replica: replica.clone(),
            access: Arc::new(control::auth::Access::new(
                &credentials,
                client_ip::TrustedProxies::new(c.trusted_proxy.clone()),
                c.publish_rate,
            )),
            addrs: Some((control_addr, stream_addr)),
        };
        let mut router = control::router(state, c.max_body);
        if let Some(m) = &mercure {
            router = router.layer(axum::Extension(m.clone()));
        }
        // Publishes cross from the control runtime to the streams': one
        // wake-up per topic per pass of a control worker, not per PATCH.
        hub.coalesce_wakes();
        control::spawn_dedicated(control, router, control_options, life.clone());

        tracker.spawn(hub.clone().maintain(c.heartbeat, life.stop_token()));
        if let Some(m) = &mercure {
            tracker.spawn(m.clone().follow(hub.clone(), life.clone()));
        }
        if c.demo {
            tracker.spawn(demo::run(hub.clone(), life.clone()));
        }

        // Logged once both planes are serving (tests wait for this line).
        tracing::info!(
            control_addr = %control_addr,
            stream_addr = %stream_addr,
            replica = %replica,
            backend = hub.bus().map_or("memory", |bus| bus.name()),
            "streamline listening"
        );
        if hub.bus().is_none() {
            // Said at start-up, where an operator reads: several replicas
            // without a bus each serve their own events only. Naming the
            // replica (--replica-id) suggests there are others: a warning.
            const ALONE: &str = "no shared bus: this replica's events and history are its own; \
                 run one replica, or give every replica --redis-url or --kafka-brokers";
            if c.replica_id.is_some() {
                tracing::warn!(backend = "memory", "{ALONE}");
            } else {
                tracing::info!(backend = "memory", "{ALONE}");
            }
        }
        auth::log_posture(
            credentials.jwt.is_some(),
            credentials.control_token.is_some(),
            stream_addr,
            control_addr,
        );
        life.shutdown_requested().await;
        lifecycle::shut_down(&life, &hub, timings).await;
    }
}

/// Starts a gateway with `config` and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Gateway::bind(config).await?.run(shutdown).await;
    Ok(())
}
