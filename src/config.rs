//! Configuration: one clap-derived struct. Every flag is also an environment
//! variable `STREAMLINE_*`; `streamline --help` and README's table list the
//! same set (a test keeps them in step).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::auth::{Credentials, JwtOptions, KeyError, Secret, Verifier};

use crate::backend::BusOptions;
use crate::control::serve::ControlOptions;
use crate::hub::{HubConfig, SlowClientPolicy};
use crate::lifecycle::Timings;
use crate::mercure::MercureOptions;
use crate::stream::StreamOptions;
use crate::stream::cors::Cors;

/// `--slow-client-policy`'s values: the command line's names for the hub's
/// [`SlowClientPolicy`] (the hub knows nothing of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowClientPolicyArg {
    /// End the stream with a `streamline.close` notice (reason `slow`); the
    /// client resumes from history when it reconnects.
    Disconnect,
    /// Jump to the live position with a `streamline.gap` notice (reason `slow`).
    Skip,
}

impl From<SlowClientPolicyArg> for SlowClientPolicy {
    fn from(arg: SlowClientPolicyArg) -> Self {
        match arg {
            SlowClientPolicyArg::Disconnect => SlowClientPolicy::Disconnect,
            SlowClientPolicyArg::Skip => SlowClientPolicy::Skip,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for Kubernetes log collectors).
    Json,
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A network in CIDR notation, or a single address.
fn network(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a CIDR network (10.0.0.0/8)"))
}

/// Streamline: a gateway that pushes events to browsers and services over
/// Server-Sent Events.
#[derive(Debug, Clone, Parser)]
#[command(name = "streamline", version, about, max_term_width = 100)]
// The last of a repeated flag wins, so wrappers (and tests) can append
// overrides to a base command line.
#[command(args_override_self = true)]
pub struct Config {
    /// Address of the control plane (REST API, health, metrics).
    #[arg(
        long,
        env = "STREAMLINE_CONTROL_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub control_addr: SocketAddr,

    /// Address of the stream plane (SSE streams, HTTP/1.1 and h2c).
    #[arg(long, env = "STREAMLINE_STREAM_ADDR", default_value = "127.0.0.1:8081")]
    pub stream_addr: SocketAddr,

    /// Interval between heartbeat comments on idle streams (those that
    /// carried no event since the previous tick).
    #[arg(long, env = "STREAMLINE_HEARTBEAT", default_value = "15s", value_parser = duration)]
    pub heartbeat: Duration,

    /// Reconnection delay sent to clients in the `retry:` field.
    #[arg(long, env = "STREAMLINE_RETRY", default_value = "2s", value_parser = duration)]
    pub retry: Duration,

    /// Most streams served at once; more get 503 with Retry-After.
    #[arg(long, env = "STREAMLINE_MAX_CLIENTS", default_value_t = 20_000)]
    pub max_clients: usize,

    /// Most topics held at once (topics are created on first use and
    /// forgotten once empty and unsubscribed).
    #[arg(long, env = "STREAMLINE_MAX_TOPICS", default_value_t = 100_000)]
    pub max_topics: usize,

    /// Most topics one stream may subscribe to.
    #[arg(long, env = "STREAMLINE_MAX_STREAM_TOPICS", default_value_t = 16)]
    pub max_stream_topics: usize,

    /// Origin (`scheme://host[:port]`) whose pages may open streams from
    /// the browser cross-origin, with credentials (CORS); repeatable, or
    /// comma-separated. Unset: the control plane's own origins when it
    /// listens on loopback (for the operators' page), else none.
    #[arg(long, env = "STREAMLINE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// Largest accepted request body on the control plane, in bytes.
    #[arg(long, env = "STREAMLINE_MAX_BODY", default_value_t = 1024 * 1024)]
    pub max_body: usize,

    /// Most control-plane connections open at once; more wait in the
    /// listen backlog until one closes. Kept apart from --max-connections, so
    /// a flood of one plane cannot take the sockets the other needs.
    #[arg(
        long,
        env = "STREAMLINE_CONTROL_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub control_max_connections: usize,

    /// Time allowed for a control-plane client to send a request's headers
    /// (also how long an idle keep-alive connection is kept).
    #[arg(long, env = "STREAMLINE_CONTROL_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub control_header_read_timeout: Duration,

    /// Time allowed for a control-plane client to send a whole request body,
    /// from the end of its headers; past it the request gets 408.
    #[arg(long, env = "STREAMLINE_CONTROL_BODY_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub control_body_read_timeout: Duration,

    /// How long a PATCH /events Idempotency-Key is remembered: a retry with
    /// the same key within it gets the first publish's ids and publishes
    /// nothing (with Redis, in Redis; with Kafka and in memory, per replica,
    /// see --idempotency-capacity).
    #[arg(long, env = "STREAMLINE_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = duration)]
    pub idempotency_window: Duration,

    /// Most Idempotency-Keys a replica remembers at once (in memory, and
    /// with Kafka); the oldest are forgotten first, even within the window.
    #[arg(
        long,
        env = "STREAMLINE_IDEMPOTENCY_CAPACITY",
        default_value_t = 100_000
    )]
    pub idempotency_capacity: usize,

    /// Events retained per topic for resume (Last-Event-ID).
    #[arg(long, env = "STREAMLINE_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// How long a retained event stays available for resume (enforced on
    /// every resume and replay).
    #[arg(long, env = "STREAMLINE_HISTORY_TTL", default_value = "5m", value_parser = duration)]
    pub history_ttl: Duration,

    /// Events a stream may fall behind before the slow-client policy applies
    /// (only events published before the previous one-second lag sample
    /// count, so a large batch written promptly is not lag).
    #[arg(long, env = "STREAMLINE_MAX_LAG", default_value_t = 500)]
    pub max_lag: u64,

    /// What happens to a stream that falls more than --max-lag events behind.
    #[arg(
        long,
        env = "STREAMLINE_SLOW_CLIENT_POLICY",
        value_enum,
        default_value = "disconnect"
    )]
    pub slow_client_policy: SlowClientPolicyArg,

    /// Time allowed for a client to send its request headers.
    #[arg(long, env = "STREAMLINE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,

    /// Time a stream ended by the gateway gets to flush its last bytes before
    /// its connection is dropped (clients that stopped reading).
    #[arg(long, env = "STREAMLINE_WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,

    /// After SIGTERM: how long to keep serving with /ready at 503, so load
    /// balancers stop sending traffic first.
    #[arg(long, env = "STREAMLINE_SHUTDOWN_DELAY", default_value = "5s", value_parser = duration)]
    pub shutdown_delay: Duration,

    /// After the shutdown delay: the window over which open streams are
    /// ended, spread out so clients do not reconnect all at once.
    #[arg(long, env = "STREAMLINE_DRAIN_WINDOW", default_value = "10s", value_parser = duration)]
    pub drain_window: Duration,

    /// Hard limit from SIGTERM to exit; match Kubernetes'
    /// terminationGracePeriodSeconds. At least shutdown delay + drain window + write
    /// timeout + 1s.
    #[arg(long, env = "STREAMLINE_GRACE_PERIOD", default_value = "30s", value_parser = duration)]
    pub grace_period: Duration,

    /// Publish the current time on topic `time` every 2 s (for trying it out).
    #[arg(long, env = "STREAMLINE_DEMO")]
    pub demo: bool,

    /// This replica's name in the cluster-wide client registry [default:
    /// the host name and a random suffix].
    #[arg(long, env = "STREAMLINE_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Redis URL (`redis://` or `rediss://`). Enables Redis as the bus and
    /// shared history between replicas, and the cluster-wide client registry.
    #[arg(long, env = "STREAMLINE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key and channel Streamline uses.
    #[arg(long, env = "STREAMLINE_REDIS_PREFIX", default_value = "streamline")]
    pub redis_prefix: String,

    /// Approximate number of events kept per topic in Redis (XADD MAXLEN ~).
    #[arg(
        long,
        env = "STREAMLINE_REDIS_STREAM_MAXLEN",
        default_value_t = 100_000
    )]
    pub redis_stream_maxlen: usize,

    /// Bound on each Redis command; PATCH answers 503 past it.
    #[arg(long, env = "STREAMLINE_REDIS_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub redis_timeout: Duration,

    /// Kafka bootstrap servers (`host:port,…`). Enables Kafka as the bus:
    /// streams carry the records of --kafka-topics, and PATCH /events
    /// produces to them. With --redis-url too, Redis keeps only the
    /// cluster-wide client registry.
    #[arg(long, env = "STREAMLINE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Kafka topics to stream, comma-separated; each is the SSE topic of the
    /// same name, or `kafka_topic=sse_topic`. Required with --kafka-brokers.
    #[arg(long, env = "STREAMLINE_KAFKA_TOPICS", value_delimiter = ',')]
    pub kafka_topics: Vec<String>,

    /// An extra librdkafka setting, `key=value` (SASL, TLS, …); repeatable,
    /// or `;`-separated.
    #[arg(long, env = "STREAMLINE_KAFKA_CONFIG", value_delimiter = ';')]
    pub kafka_config: Vec<String>,

    /// The Kafka record header that carries the SSE event name (a record
    /// without it is a `message` event); PATCH /events writes it.
    #[arg(long, env = "STREAMLINE_KAFKA_EVENT_HEADER", default_value = "event")]
    pub kafka_event_header: String,

    /// Bound on each Kafka request a client waits on; PATCH /events answers
    /// 503 when Kafka has not acknowledged within it.
    #[arg(long, env = "STREAMLINE_KAFKA_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub kafka_timeout: Duration,

    /// Most history readers (resume beyond memory) running at once.
    #[arg(long, env = "STREAMLINE_MAX_CATCH_UP", default_value_t = 64)]
    pub max_catch_up: usize,

    /// HS256 secret (at least 32 bytes) that signs subscribers' and
    /// publishers' JWTs. Enables authentication on the stream plane.
    #[arg(long, env = "STREAMLINE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM file with the RSA (RS256) or EC P-256 (ES256) public key that
    /// verifies JWTs. Enables authentication on the stream plane.
    #[arg(long, env = "STREAMLINE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// The `iss` claim every JWT must carry.
    #[arg(long, env = "STREAMLINE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// The `aud` claim every JWT must carry.
    #[arg(long, env = "STREAMLINE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed when checking a JWT's `exp` and `nbf`.
    #[arg(long, env = "STREAMLINE_JWT_LEEWAY", default_value = "30s", value_parser = duration)]
    pub jwt_leeway: Duration,

    /// The JWT claim listing the topics a subscriber may read (names or
    /// `prefix*` patterns).
    #[arg(long, env = "STREAMLINE_JWT_TOPICS_CLAIM", default_value = "topics")]
    pub jwt_topics_claim: String,

    /// The JWT claim listing the topics a publisher may publish to.
    #[arg(long, env = "STREAMLINE_JWT_PUBLISH_CLAIM", default_value = "publish")]
    pub jwt_publish_claim: String,

    /// A cookie that may carry the subscriber's JWT (for browsers).
    #[arg(long, env = "STREAMLINE_JWT_COOKIE")]
    pub jwt_cookie: Option<String>,

    /// Let streams outlive their JWT. Otherwise a stream ends with
    /// `streamline.close` (reason `token_expired`) once its token expires.
    #[arg(long, env = "STREAMLINE_JWT_ALLOW_EXPIRY_DURING_STREAM")]
    pub jwt_allow_expiry_during_stream: bool,

    /// Bearer token required on the control plane (every route but `/`,
    /// /health, /ready and /metrics).
    #[arg(long, env = "STREAMLINE_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<Secret>,

    /// File holding the control token (e.g. a mounted Kubernetes Secret),
    /// read at start-up.
    #[arg(long, env = "STREAMLINE_CONTROL_TOKEN_FILE")]
    pub control_token_file: Option<PathBuf>,

    /// Bearer token required on /metrics (the control token works too).
    #[arg(long, env = "STREAMLINE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,

    /// Most stream-plane connections open at once; more get 503.
    #[arg(long, env = "STREAMLINE_MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,

    /// Most streams open at once from one client address (IPv6: one /64);
    /// more get 429. 0: no limit.
    #[arg(long, env = "STREAMLINE_MAX_STREAMS_PER_IP", default_value_t = 256)]
    pub max_streams_per_ip: usize,

    /// New stream-plane connections per second from one client address,
    /// in bursts of up to as many; more get 429. 0: no limit.
    #[arg(long, env = "STREAMLINE_MAX_CONN_RATE_PER_IP", default_value_t = 20)]
    pub max_conn_rate_per_ip: u32,

    /// Longest topic name accepted, at most 128.
    #[arg(long, env = "STREAMLINE_MAX_TOPIC_LEN", default_value_t = crate::topic::MAX_TOPIC_LEN)]
    pub max_topic_len: usize,

    /// Largest stream-plane request head (request line and headers), in
    /// bytes, at least 8192; also caps an HTTP/1.1 connection's write buffer.
    #[arg(long, env = "STREAMLINE_MAX_HEADER_SIZE", default_value_t = 64 * 1024)]
    pub max_header_size: usize,

    /// Most concurrent streams on one HTTP/2 connection.
    #[arg(long, env = "STREAMLINE_H2_MAX_STREAMS", default_value_t = 100)]
    pub h2_max_streams: u32,

    /// `PATCH /events` requests per second per publisher (JWT subject, else
    /// client address), in bursts of up to as many; more get 429. 0: no limit.
    #[arg(long, env = "STREAMLINE_PUBLISH_RATE", default_value_t = 1000)]
    pub publish_rate: u32,

    /// Proxies (addresses or CIDR networks) whose X-Forwarded-For names the
    /// client; repeatable, or comma-separated.
    #[arg(long, env = "STREAMLINE_TRUSTED_PROXY", value_delimiter = ',', value_parser = network)]
    pub trusted_proxy: Vec<IpNet>,

    /// Serve the Mercure protocol too: subscriptions at
    /// `GET /.well-known/mercure` on the stream port, publishing at
    /// `POST /.well-known/mercure` on the control port.
    #[arg(long, env = "STREAMLINE_MERCURE")]
    pub mercure: bool,

    /// The hub topic that carries every Mercure update (with Kafka, map it
    /// in --kafka-topics; one partition).
    #[arg(long, env = "STREAMLINE_MERCURE_TOPIC", default_value = "mercure")]
    pub mercure_topic: String,

    /// HS256 secret (at least 32 bytes) of Mercure publishers' JWTs
    /// (default: --jwt-secret or --jwt-public-key).
    #[arg(
        long,
        env = "STREAMLINE_MERCURE_PUBLISHER_JWT_SECRET",
        hide_env_values = true
    )]
    pub mercure_publisher_jwt_secret: Option<Secret>,

    /// PEM file with the RS256/ES256 public key of Mercure publishers' JWTs.
    #[arg(long, env = "STREAMLINE_MERCURE_PUBLISHER_JWT_PUBLIC_KEY")]
    pub mercure_publisher_jwt_public_key: Option<PathBuf>,

    /// HS256 secret of Mercure subscribers' JWTs (default: --jwt-secret or
    /// --jwt-public-key).
    #[arg(
        long,
        env = "STREAMLINE_MERCURE_SUBSCRIBER_JWT_SECRET",
        hide_env_values = true
    )]
    pub mercure_subscriber_jwt_secret: Option<Secret>,

    /// PEM file with the RS256/ES256 public key of Mercure subscribers' JWTs.
    #[arg(long, env = "STREAMLINE_MERCURE_SUBSCRIBER_JWT_PUBLIC_KEY")]
    pub mercure_subscriber_jwt_public_key: Option<PathBuf>,

    /// Let Mercure subscribers without a JWT receive public updates.
    #[arg(long, env = "STREAMLINE_MERCURE_ANONYMOUS")]
    pub mercure_anonymous: bool,

    /// The cookie that may carry a Mercure JWT.
    #[arg(
        long,
        env = "STREAMLINE_MERCURE_COOKIE",
        default_value = "mercureAuthorization"
    )]
    pub mercure_cookie: String,

    /// Publish Mercure subscription events (private updates on
    /// `/.well-known/mercure/subscriptions/{topic}/{subscriber}`) when a
    /// Mercure subscription starts and ends.
    #[arg(long, env = "STREAMLINE_MERCURE_SUBSCRIPTIONS")]
    pub mercure_subscriptions: bool,

    /// Log format; the filter comes from RUST_LOG (default `info`).
    #[arg(
        long,
        env = "STREAMLINE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--grace-period ({grace:?}) must be at least --shutdown-delay + --drain-window + --write-timeout + 1s ({needed:?})"
    )]
    GraceTooShort { grace: Duration, needed: Duration },
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error(transparent)]
    Origin(#[from] crate::stream::cors::InvalidOrigin),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot read {flag} {path:?}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--{0} is empty")]
    Empty(&'static str),
    #[error("give --{0} or --{1}, not both")]
    Conflict(&'static str, &'static str),
    #[error("--{0} needs --jwt-secret or --jwt-public-key")]
    JwtWithoutKey(&'static str),
    #[error("--{flag} must be between {min} and {max}")]
    Range {
        flag: &'static str,
        min: usize,
        max: usize,
    },
    #[error("--{0}: {1}")]
    Kafka(&'static str, String),
    /// A bus's flag given to a build without the bus's feature.
    #[error("--{flag}: this build has no {bus} support (feature `{feature}`)")]
    NotBuiltIn {
        flag: &'static str,
        bus: &'static str,
        feature: &'static str,
    },
    #[error("--mercure: {0}")]
    Mercure(String),
}

/// What a [`Config`] builds, checked: the options each part of the gateway
/// receives. [`Config::build`] reads every file a flag names (key and token
/// files) exactly once, so what was checked is what runs.
#[derive(Debug)]
pub struct Options {
    /// `--replica-id`, or the host name and a random suffix.
    pub replica_id: String,
    pub hub: HubConfig,
    /// The JWT verifier and the control and metrics tokens.
    pub credentials: Credentials,
    /// The stream plane's settings, its CORS policy and authentication
    /// included. `mercure` is left for whoever installs Mercure on a hub.
    pub stream: StreamOptions,
    /// The control plane's connection bounds.
    pub control: ControlOptions,
    /// With `--mercure`.
    pub mercure: Option<MercureOptions>,
    /// The buses: Redis with `--redis-url`, Kafka with `--kafka-brokers`.
    pub buses: BusOptions,
    /// The shutdown sequence's timings.
    pub timings: Timings,
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

impl Config {
    /// The defaults, as if started with no flags (for tests and embedding).
    pub fn defaults() -> Config {
        Config::parse_from(["streamline"])
    }

    /// Checks what clap cannot (relations between values, zero bounds, the
    /// origins, keys and Kafka settings) and builds the [`Options`] every
    /// part of the gateway receives: the one place configuration is turned
    /// into values, so nothing is checked and then built again.
    pub fn build(&self) -> Result<Options, ConfigError> {
        let needed =
            self.shutdown_delay + self.drain_window + self.write_timeout + Duration::from_secs(1);
        if self.grace_period < needed {
            return Err(ConfigError::GraceTooShort {
                grace: self.grace_period,
                needed,
            });
        }
        for (name, v) in [
            ("history-size", self.history_size as u64),
            ("max-lag", self.max_lag),
            ("max-stream-topics", self.max_stream_topics as u64),
            ("max-clients", self.max_clients as u64),
            ("max-catch-up", self.max_catch_up as u64),
            ("max-topics", self.max_topics as u64),
            (
                "control-max-connections",
                self.control_max_connections as u64,
            ),
            ("idempotency-capacity", self.idempotency_capacity as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, d) in [
            ("heartbeat", self.heartbeat),
            (
                "control-header-read-timeout",
                self.control_header_read_timeout,
            ),
            ("control-body-read-timeout", self.control_body_read_timeout),
            ("idempotency-window", self.idempotency_window),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        let cors = Cors::new(&self.cors_allow_origin)?;
        for (flag, v, min, max) in [
            ("max-connections", self.max_connections, 1, usize::MAX),
            (
                "max-topic-len",
                self.max_topic_len,
                1,
                crate::topic::MAX_TOPIC_LEN,
            ),
            // hyper's smallest read buffer; h2 takes a u32.
            (
                "max-header-size",
                self.max_header_size,
                8192,
                u32::MAX as usize,
            ),
            (
                "h2-max-streams",
                self.h2_max_streams as usize,
                1,
                usize::MAX,
            ),
        ] {
            if !(min..=max).contains(&v) {
                return Err(ConfigError::Range { flag, min, max });
            }
        }
        let credentials = self.credentials()?;
        let replica_id = self.replica_id();
        self.refuse_buses_left_out()?;
        let buses = BusOptions {
            #[cfg(feature = "kafka")]
            kafka: self.kafka(&replica_id)?,
            #[cfg(feature = "redis")]
            redis: self.redis(&replica_id),
        };
        let mercure = self.mercure()?;
        let stream = StreamOptions {
            auth: self.stream_auth(&credentials),
            ..self.stream_options(cors)
        };
        Ok(Options {
            hub: self.hub(),
            control: self.control_options(),
            timings: self.timings(),
            replica_id,
            credentials,
            stream,
            mercure,
            buses,
        })
    }

    /// The flags of a bus this build leaves out (its feature off) are an
    /// error: ignored, they would start a gateway without the bus the
    /// operator asked for.
    fn refuse_buses_left_out(&self) -> Result<(), ConfigError> {
        let kafka = self.kafka_brokers.is_some() || !self.kafka_topics.is_empty();
        if kafka && !cfg!(feature = "kafka") {
            return Err(ConfigError::NotBuiltIn {
                flag: match self.kafka_brokers {
                    Some(_) => "kafka-brokers",
                    None => "kafka-topics",
                },
                bus: "Kafka",
                feature: "kafka",
            });
        }
        if self.redis_url.is_some() && !cfg!(feature = "redis") {
            return Err(ConfigError::NotBuiltIn {
                flag: "redis-url",
                bus: "Redis",
                feature: "redis",
            });
        }
        Ok(())
    }

    /// Mercure's options with `--mercure` (key files read here).
    fn mercure(&self) -> Result<Option<MercureOptions>, ConfigError> {
        if !self.mercure {
            return Ok(None);
        }
        crate::topic::validate(&self.mercure_topic, crate::topic::MAX_TOPIC_LEN)
            .map_err(|e| ConfigError::Mercure(format!("--mercure-topic: {e}")))?;
        if self.mercure_cookie.is_empty() {
            return Err(ConfigError::Empty("mercure-cookie"));
        }
        // A role's own key, else the gateway's.
        let verifier = |secret: &Option<Secret>,
                        key: &Option<PathBuf>,
                        flag: &'static str|
         -> Result<Option<Arc<Verifier>>, ConfigError> {
            let (secret, key) = if secret.is_some() || key.is_some() {
                (secret.clone(), key.as_deref().map(|p| (flag, p)))
            } else {
                (
                    self.jwt_secret.clone(),
                    self.jwt_public_key
                        .as_deref()
                        .map(|p| ("--jwt-public-key", p)),
                )
            };
            let public_key = key.map(|(flag, p)| read_file(flag, p)).transpose()?;
            Ok(Verifier::new(&JwtOptions {
                secret,
                public_key,
                leeway: self.jwt_leeway,
                // Mercure's tokens often have no `exp`; one that has it is
                // checked.
                require_exp: false,
                ..JwtOptions::default()
            })?
            .map(Arc::new))
        };
        let publisher = verifier(
            &self.mercure_publisher_jwt_secret,
            &self.mercure_publisher_jwt_public_key,
            "--mercure-publisher-jwt-public-key",
        )?;
        let subscriber = verifier(
            &self.mercure_subscriber_jwt_secret,
            &self.mercure_subscriber_jwt_public_key,
            "--mercure-subscriber-jwt-public-key",
        )?;
        if publisher.is_none() {
            return Err(ConfigError::Mercure(
                "needs a publisher key: --mercure-publisher-jwt-secret or --mercure-publisher-jwt-public-key (or --jwt-secret / --jwt-public-key)".into(),
            ));
        }
        if subscriber.is_none() && !self.mercure_anonymous {
            return Err(ConfigError::Mercure(
                "nobody could subscribe: give a subscriber key or --mercure-anonymous".into(),
            ));
        }
        Ok(Some(MercureOptions {
            topic: self.mercure_topic.clone(),
            anonymous: self.mercure_anonymous,
            cookie: self.mercure_cookie.clone(),
            publisher,
            subscriber,
            max_selectors: self.max_stream_topics,
            end_at_expiry: !self.jwt_allow_expiry_during_stream,
            leeway: self.jwt_leeway,
            subscriptions: self.mercure_subscriptions,
        }))
    }

    /// The Redis bus's options, with `--redis-url`.
    #[cfg(feature = "redis")]
    fn redis(&self, replica_id: &str) -> Option<crate::backend::redis::RedisOptions> {
        Some(crate::backend::redis::RedisOptions {
            url: self.redis_url.clone()?,
            prefix: self.redis_prefix.clone(),
            stream_maxlen: self.redis_stream_maxlen,
            timeout: self.redis_timeout,
            max_catch_up: self.max_catch_up,
            replica_id: replica_id.to_owned(),
            idempotency_window: self.idempotency_window,
        })
    }

    /// The Kafka bus's options, with `--kafka-brokers`.
    #[cfg(feature = "kafka")]
    fn kafka(
        &self,
        replica_id: &str,
    ) -> Result<Option<crate::backend::kafka::KafkaOptions>, ConfigError> {
        use crate::backend::kafka::{KafkaOptions, TopicMap};
        let Some(brokers) = &self.kafka_brokers else {
            if !self.kafka_topics.is_empty() {
                return Err(ConfigError::Kafka(
                    "kafka-topics",
                    "needs --kafka-brokers".into(),
                ));
            }
            return Ok(None);
        };
        let bad = |flag, why: String| ConfigError::Kafka(flag, why);
        if brokers.trim().is_empty() {
            return Err(ConfigError::Empty("kafka-brokers"));
        }
        let mut topics: Vec<TopicMap> = Vec::new();
        for entry in &self.kafka_topics {
            let t = TopicMap::parse(entry).map_err(|e| bad("kafka-topics", e))?;
            if topics.iter().any(|o| o.kafka == t.kafka || o.sse == t.sse) {
                return Err(bad(
                    "kafka-topics",
                    format!("{entry:?}: each Kafka topic and each SSE topic may appear once"),
                ));
            }
            topics.push(t);
        }
        if topics.is_empty() {
            return Err(bad("kafka-topics", "name at least one topic".into()));
        }
        let config = self
            .kafka_config
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
                _ => Err(bad("kafka-config", format!("{kv:?} is not key=value"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.kafka_event_header.is_empty() {
            return Err(ConfigError::Empty("kafka-event-header"));
        }
        if self.kafka_timeout.is_zero() {
            return Err(ConfigError::Zero("kafka-timeout"));
        }
        Ok(Some(KafkaOptions {
            brokers: brokers.clone(),
            topics,
            config,
            event_header: self.kafka_event_header.clone(),
            timeout: self.kafka_timeout,
            max_catch_up: self.max_catch_up,
            replica_id: replica_id.to_owned(),
            idempotency_window: self.idempotency_window,
            idempotency_capacity: self.idempotency_capacity,
        }))
    }

    /// Builds the JWT verifier and reads the tokens (from their files too).
    fn credentials(&self) -> Result<Credentials, ConfigError> {
        let public_key = self
            .jwt_public_key
            .as_deref()
            .map(|p| read_file("--jwt-public-key", p))
            .transpose()?;
        let jwt = Verifier::new(&JwtOptions {
            secret: self.jwt_secret.clone(),
            public_key,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway,
            topics_claim: self.jwt_topics_claim.clone(),
            publish_claim: self.jwt_publish_claim.clone(),
            require_exp: true,
        })?;
        if jwt.is_none() {
            for (flag, set) in [
                ("jwt-issuer", self.jwt_issuer.is_some()),
                ("jwt-audience", self.jwt_audience.is_some()),
                ("jwt-cookie", self.jwt_cookie.is_some()),
            ] {
                if set {
                    return Err(ConfigError::JwtWithoutKey(flag));
                }
            }
        }
        let control_token = match (&self.control_token, &self.control_token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict("control-token", "control-token-file"));
            }
            (Some(token), None) => Some(token.clone()),
            (None, Some(path)) => {
                let bytes = read_file("--control-token-file", path)?;
                // Secrets are usually written with a trailing newline.
                Some(Secret::new(String::from_utf8_lossy(&bytes).trim()))
            }
            (None, None) => None,
        };
        for (flag, token) in [
            ("control-token", &control_token),
            ("metrics-token", &self.metrics_token),
        ] {
            if token.as_ref().is_some_and(|t| t.expose().is_empty()) {
                return Err(ConfigError::Empty(flag));
            }
        }
        Ok(Credentials {
            jwt: jwt.map(Arc::new),
            control_token,
            metrics_token: self.metrics_token.clone(),
        })
    }

    /// `--replica-id`, or the host name and a random suffix.
    fn replica_id(&self) -> String {
        if let Some(id) = &self.replica_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "streamline".into());
        let random =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        format!("{host}-{:06x}", random & 0xff_ffff)
    }

    /// The shutdown sequence's timings.
    fn timings(&self) -> Timings {
        Timings {
            shutdown_delay: self.shutdown_delay,
            drain_window: self.drain_window,
            write_timeout: self.write_timeout,
            grace_period: self.grace_period,
        }
    }

    /// The control plane's connection bounds.
    fn control_options(&self) -> ControlOptions {
        ControlOptions {
            max_connections: self.control_max_connections,
            header_read_timeout: self.control_header_read_timeout,
            body_read_timeout: self.control_body_read_timeout,
        }
    }

    /// The stream plane's settings, with the CORS policy built from
    /// `--cors-allow-origin`.
    fn stream_options(&self, cors: Cors) -> StreamOptions {
        StreamOptions {
            header_read_timeout: self.header_read_timeout,
            write_timeout: self.write_timeout,
            max_stream_topics: self.max_stream_topics,
            cors,
            max_topic_len: self.max_topic_len,
            max_header_size: self.max_header_size,
            h2_max_streams: self.h2_max_streams,
            max_connections: self.max_connections,
            max_refusing: crate::stream::limits::MAX_REFUSING,
            max_streams_per_ip: self.max_streams_per_ip,
            max_conn_rate_per_ip: self.max_conn_rate_per_ip,
            trusted_proxies: crate::client_ip::TrustedProxies::new(self.trusted_proxy.clone()),
            // From the credentials (`build`).
            auth: None,
            // Set by whoever installs Mercure on the plane's hub.
            mercure: None,
        }
    }

    /// The stream plane's authentication, given the verifier built by
    /// [`credentials`](Self::credentials); `None` without one.
    fn stream_auth(
        &self,
        credentials: &Credentials,
    ) -> Option<Arc<crate::stream::auth::StreamAuth>> {
        let verifier = credentials.jwt.clone()?;
        Some(Arc::new(crate::stream::auth::StreamAuth {
            verifier,
            cookie: self.jwt_cookie.clone(),
            end_at_expiry: !self.jwt_allow_expiry_during_stream,
            leeway: self.jwt_leeway,
        }))
    }

    /// The hub's settings.
    fn hub(&self) -> HubConfig {
        HubConfig {
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            max_lag: self.max_lag,
            slow_client_policy: self.slow_client_policy.into(),
            // Room for the frames of one PATCH of any shape (SSE framing of
            // tiny events, or of payloads full of line breaks, is at most
            // about 5x their JSON), so a batch reaches prompt readers whole.
            pinned_bytes: self.max_body.saturating_mul(8),
            max_clients: self.max_clients,
            max_topics: self.max_topics,
            retry: self.retry,
            idempotency_window: self.idempotency_window,
            idempotency_capacity: self.idempotency_capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        c.build().unwrap();
        assert_eq!(c.control_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.stream_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.grace_period, Duration::from_secs(30));
    }

    #[test]
    fn every_flag_has_an_env_var_and_help() {
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            let expected = format!("STREAMLINE_{}", id.to_uppercase());
            assert_eq!(env, expected, "flag {id}");
            assert!(arg.get_help().is_some(), "flag {id} has no help");
        }
    }

    #[test]
    #[cfg(feature = "kafka")]
    fn kafka_flags_are_checked() {
        let c = Config::parse_from([
            "streamline",
            "--kafka-brokers",
            "k:9092",
            "--kafka-topics",
            "a,orders=shop",
            "--kafka-config",
            "security.protocol=SASL_SSL;sasl.mechanism=PLAIN",
            "--kafka-config",
            "sasl.username=u",
        ]);
        let k = c.kafka("r1").unwrap().unwrap();
        let maps: Vec<(&str, &str)> = k.topics.iter().map(|t| (&*t.kafka, &*t.sse)).collect();
        assert_eq!(maps, [("a", "a"), ("orders", "shop")]);
        assert_eq!(k.config.len(), 3);
        assert_eq!(k.config[2], ("sasl.username".into(), "u".into()));
        assert_eq!(k.event_header, "event");
        assert_eq!(k.timeout, Duration::from_secs(5));
        assert!(Config::defaults().kafka("r").unwrap().is_none());
        for bad in [
            &["--kafka-topics", "a"][..],
            &["--kafka-brokers", "k:1"],
            &["--kafka-brokers", "k:1", "--kafka-topics", "a,a"],
            &["--kafka-brokers", "k:1", "--kafka-topics", "a=x,b=x"],
            &["--kafka-brokers", "k:1", "--kafka-topics", "a=b c"],
            &[
                "--kafka-brokers",
                "k:1",
                "--kafka-topics",
                "a",
                "--kafka-config",
                "x",
            ],
        ] {
            let mut args = vec!["streamline"];
            args.extend_from_slice(bad);
            assert!(Config::parse_from(&args).build().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn build_gives_every_part_its_options() {
        let secret = "0123456789abcdef0123456789abcdef";
        let c = Config::parse_from([
            "streamline",
            "--replica-id",
            "r7",
            "--cors-allow-origin",
            "https://a.example",
            "--jwt-secret",
            secret,
            "--slow-client-policy",
            "skip",
        ]);
        let o = c.build().unwrap();
        assert_eq!(o.replica_id, "r7");
        assert!(o.credentials.jwt.is_some() && o.stream.auth.is_some());
        assert!(o.mercure.is_none() && o.stream.mercure.is_none());
        let mut request = http::HeaderMap::new();
        request.insert(http::header::ORIGIN, "https://a.example".parse().unwrap());
        assert!(o.stream.cors.allowed(&request).is_some());
        assert_eq!(o.hub.slow_client_policy, SlowClientPolicy::Skip);
    }

    #[test]
    fn a_bus_is_built_with_its_feature_and_refused_without() {
        let build = |args: &[&str]| {
            let mut all = vec!["streamline", "--replica-id", "r7"];
            all.extend_from_slice(args);
            Config::parse_from(all).build()
        };
        let kafka = build(&["--kafka-brokers", "k:9092", "--kafka-topics", "a"]);
        let redis = build(&["--redis-url", "redis://127.0.0.1:1"]);
        #[cfg(feature = "kafka")]
        assert_eq!(kafka.unwrap().buses.kafka.unwrap().replica_id, "r7");
        #[cfg(not(feature = "kafka"))]
        assert_eq!(
            kafka.unwrap_err().to_string(),
            "--kafka-brokers: this build has no Kafka support (feature `kafka`)"
        );
        #[cfg(feature = "redis")]
        assert_eq!(redis.unwrap().buses.redis.unwrap().replica_id, "r7");
        #[cfg(not(feature = "redis"))]
        assert_eq!(
            redis.unwrap_err().to_string(),
            "--redis-url: this build has no Redis support (feature `redis`)"
        );
        // Without the brokers: an error either way.
        assert!(build(&["--kafka-topics", "a"]).is_err());
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        let c = Config::parse_from(["streamline", "--retry", "1s", "--retry", "3s"]);
        assert_eq!(c.retry, Duration::from_secs(3));
    }

    #[test]
    fn cors_origins_are_repeated_or_comma_separated() {
        let c = Config::parse_from([
            "streamline",
            "--cors-allow-origin",
            "https://a.example,http://b.example:8000",
            "--cors-allow-origin",
            "https://c.example",
        ]);
        assert_eq!(
            c.cors_allow_origin,
            [
                "https://a.example",
                "http://b.example:8000",
                "https://c.example"
            ]
        );
        c.build().unwrap();
        let c = Config::parse_from(["streamline", "--cors-allow-origin", "https://a.example/app"]);
        assert!(matches!(c.build(), Err(ConfigError::Origin(_))));
    }

    #[test]
    fn security_flags_are_checked() {
        let secret = "0123456789abcdef0123456789abcdef";
        let check = |args: &[&str]| {
            let mut all = vec!["streamline"];
            all.extend_from_slice(args);
            Config::parse_from(all).build()
        };
        check(&[
            "--jwt-secret",
            secret,
            "--jwt-cookie",
            "t",
            "--jwt-audience",
            "a",
        ])
        .unwrap();
        assert!(matches!(
            check(&["--jwt-secret", "short"]),
            Err(ConfigError::Key(_))
        ));
        assert!(matches!(
            check(&["--jwt-cookie", "t"]),
            Err(ConfigError::JwtWithoutKey("jwt-cookie"))
        ));
        assert!(matches!(
            check(&["--jwt-public-key", "/nonexistent.pem"]),
            Err(ConfigError::Read { .. })
        ));
        assert!(matches!(
            check(&["--control-token", "a", "--control-token-file", "/x"]),
            Err(ConfigError::Conflict(..))
        ));
        assert!(matches!(
            check(&["--control-token", ""]),
            Err(ConfigError::Empty(_))
        ));
        for (flag, bad) in [
            ("--max-topic-len", "129"),
            ("--max-topic-len", "0"),
            ("--max-header-size", "4096"),
            ("--h2-max-streams", "0"),
            ("--max-connections", "0"),
        ] {
            assert!(
                matches!(check(&[flag, bad]), Err(ConfigError::Range { .. })),
                "{flag} {bad}"
            );
        }
        let c = Config::parse_from([
            "streamline",
            "--trusted-proxy",
            "10.0.0.0/8,192.0.2.1",
            "--trusted-proxy",
            "2001:db8::/32",
            "--control-token",
            "hunter2",
            "--jwt-secret",
            secret,
        ]);
        assert_eq!(c.trusted_proxy.len(), 3);
        assert!(Config::try_parse_from(["streamline", "--trusted-proxy", "nope"]).is_err());
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2") && !printed.contains(secret));
        let creds = c.credentials().unwrap();
        assert!(creds.jwt.is_some() && creds.control_token.unwrap().matches("hunter2"));
    }

    #[test]
    fn grace_period_must_cover_the_drain() {
        let c = Config::parse_from([
            "streamline",
            "--grace-period",
            "10s",
            "--drain-window",
            "10s",
        ]);
        assert!(matches!(c.build(), Err(ConfigError::GraceTooShort { .. })));
        let c = Config::parse_from(["streamline", "--max-lag", "0"]);
        assert!(matches!(c.build(), Err(ConfigError::Zero("max-lag"))));
    }
}
