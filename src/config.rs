//! Configuration: one clap-derived struct. Every flag is also an environment
//! variable `STREAMLINE_*`; `streamline --help` and README's table list the
//! same set (a test keeps them in step).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::hub::{HubConfig, SlowClientPolicy};

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

    /// Interval between heartbeat comments on idle streams.
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

    /// Largest accepted request body on the control plane, in bytes.
    #[arg(long, env = "STREAMLINE_MAX_BODY", default_value_t = 1024 * 1024)]
    pub max_body: usize,

    /// Events retained per topic for resume (Last-Event-ID).
    #[arg(long, env = "STREAMLINE_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// How long a retained event stays available for resume.
    #[arg(long, env = "STREAMLINE_HISTORY_TTL", default_value = "5m", value_parser = duration)]
    pub history_ttl: Duration,

    /// Events a stream may fall behind before the slow-client policy applies.
    #[arg(long, env = "STREAMLINE_MAX_LAG", default_value_t = 500)]
    pub max_lag: u64,

    /// What happens to a stream that falls more than --max-lag events behind.
    #[arg(
        long,
        env = "STREAMLINE_SLOW_CLIENT_POLICY",
        value_enum,
        default_value = "disconnect"
    )]
    pub slow_client_policy: SlowClientPolicy,

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
    /// terminationGracePeriodSeconds. Must exceed shutdown delay + drain window.
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

    /// Most history readers (resume beyond memory) running at once.
    #[arg(long, env = "STREAMLINE_MAX_CATCH_UP", default_value_t = 64)]
    pub max_catch_up: usize,

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
        "--grace-period ({grace:?}) must exceed --shutdown-delay + --drain-window + 1s ({needed:?})"
    )]
    GraceTooShort { grace: Duration, needed: Duration },
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
}

impl Config {
    /// The defaults, as if started with no flags (for tests and embedding).
    pub fn defaults() -> Config {
        Config::parse_from(["streamline"])
    }

    /// Checks relations between values that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let needed = self.shutdown_delay + self.drain_window + Duration::from_secs(1);
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
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.heartbeat.is_zero() {
            return Err(ConfigError::Zero("heartbeat"));
        }
        Ok(())
    }

    /// `--replica-id`, or the host name and a random suffix.
    pub fn replica_id(&self) -> String {
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

    pub fn hub(&self) -> HubConfig {
        HubConfig {
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            max_lag: self.max_lag,
            slow_client_policy: self.slow_client_policy,
            max_clients: self.max_clients,
            max_topics: self.max_topics,
            retry: self.retry,
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
        c.validate().unwrap();
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
    fn a_repeated_flag_takes_its_last_value() {
        let c = Config::parse_from(["streamline", "--retry", "1s", "--retry", "3s"]);
        assert_eq!(c.retry, Duration::from_secs(3));
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
        assert!(matches!(
            c.validate(),
            Err(ConfigError::GraceTooShort { .. })
        ));
        let c = Config::parse_from(["streamline", "--max-lag", "0"]);
        assert!(matches!(c.validate(), Err(ConfigError::Zero("max-lag"))));
    }
}
