//! The command line: one clap-derived struct, every flag also an environment
//! variable `STREAMLINE_BENCH_*`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Load generator for SSE gateways: opens N streams, publishes at a fixed
/// rate, and reports delivery, loss, publish-to-receive latency and the
/// server's memory and CPU. Works against Streamline and against any server
/// that takes a publish over HTTP and serves `text/event-stream`.
///
/// Prints a progress line on stderr once a second, a table on stdout at the
/// end, and last one JSON line with every figure.
#[derive(Debug, Clone, Parser)]
// A later flag overrides an earlier one (scripts set defaults, callers
// override them).
#[command(
    name = "streamline-bench",
    version,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Args {
    /// Stream URL; `{topic}` is replaced by the stream's topic. Plain
    /// `http://` only (raw HTTP/1.1 over TCP). Several separated by commas
    /// (one per replica): the streams of each topic are dealt round them.
    #[arg(
        long,
        env = "STREAMLINE_BENCH_URL",
        default_value = "http://127.0.0.1:8081/stream?topic={topic}"
    )]
    pub url: String,

    /// Number of SSE streams to open.
    #[arg(
        short = 'n',
        long,
        env = "STREAMLINE_BENCH_SUBSCRIBERS",
        default_value_t = 100
    )]
    pub subscribers: usize,

    /// Topics `bench-0..K-1`; streams and events are spread over them
    /// round-robin.
    #[arg(long, env = "STREAMLINE_BENCH_TOPICS", default_value_t = 1)]
    pub topics: usize,

    /// Events published per second (all topics together).
    #[arg(long, env = "STREAMLINE_BENCH_RATE", default_value_t = 100.0)]
    pub rate: f64,

    /// Length of the publish phase (with --idle-only: how long to hold the
    /// idle streams), in seconds.
    #[arg(long, env = "STREAMLINE_BENCH_DURATION", default_value_t = 10.0)]
    pub duration: f64,

    /// Payload size in bytes: `<seq> <unix-micros> ` padded with `x`
    /// (never shorter than that header).
    #[arg(long, env = "STREAMLINE_BENCH_SIZE", default_value_t = 100)]
    pub size: usize,

    /// Publish request method.
    #[arg(long, env = "STREAMLINE_BENCH_PUB_METHOD", default_value = "PATCH")]
    pub pub_method: String,

    /// Publish URL; `{topic}` is replaced by the event's topic.
    #[arg(
        long,
        env = "STREAMLINE_BENCH_PUB_URL",
        default_value = "http://127.0.0.1:8080/events"
    )]
    pub pub_url: String,

    /// Publish request body; `{topic}` and `{payload}` are replaced (the
    /// payload is JSON-string-safe). nchan: `--pub-body '{payload}'`.
    #[arg(
        long,
        env = "STREAMLINE_BENCH_PUB_BODY",
        default_value = r#"{"topic":"{topic}","data":"{payload}"}"#
    )]
    pub pub_body: String,

    /// Content-Type of publish requests; by default `application/json` when
    /// the body template starts with `{` or `[`, else `text/plain`.
    #[arg(long, env = "STREAMLINE_BENCH_PUB_CONTENT_TYPE")]
    pub pub_content_type: Option<String>,

    /// Concurrent publishers, each with one keep-alive connection and its
    /// own share of the events, sent in order (0: one per 1,000 events/s,
    /// at most 8).
    #[arg(long, env = "STREAMLINE_BENCH_PUBLISHERS", default_value_t = 0)]
    pub publishers: usize,

    /// How events reach the server. `serial`: --publishers publishers, each
    /// sending its share one after another on one keep-alive connection (a
    /// slow answer holds its next events back). `pool`: as a publishing
    /// service with a connection pool does, each event when due goes out on
    /// an idle keep-alive connection, and another is opened (up to
    /// --pool-max) only when all are busy.
    #[arg(
        long,
        env = "STREAMLINE_BENCH_PUBLISHER_MODE",
        value_enum,
        default_value = "serial"
    )]
    pub publisher_mode: crate::publisher::Mode,

    /// The time an event's payload carries, from which its latency is
    /// measured: `sent` (just before its request) or `due` (when the
    /// schedule called for it, so time spent waiting in the publisher for a
    /// connection counts too).
    #[arg(
        long,
        env = "STREAMLINE_BENCH_STAMP",
        value_enum,
        default_value = "sent"
    )]
    pub stamp: crate::publisher::Stamp,

    /// With --publisher-mode pool: most connections (requests in flight).
    #[arg(long, env = "STREAMLINE_BENCH_POOL_MAX", default_value_t = 4)]
    pub pool_max: usize,

    /// Send each publish request with an `Idempotency-Key` and resend it,
    /// with the same key, up to this many times when its outcome is unknown
    /// or nothing was published (502, 503, 504, or no answer), as a
    /// publisher following Streamline's "Safe retries" does. 0: send once.
    #[arg(long, env = "STREAMLINE_BENCH_KEYED_RETRIES", default_value_t = 0)]
    pub keyed_retries: u32,

    /// Most events per publish request: a publisher that has fallen behind
    /// sends what is due as one JSON array `[body,body,…]` (Streamline's
    /// PATCH /events takes arrays). 1 sends one request per event. Needs a
    /// publish URL without `{topic}`.
    #[arg(long, env = "STREAMLINE_BENCH_PUB_BATCH", default_value_t = 1)]
    pub pub_batch: usize,

    /// How long after --duration a publisher that fell behind may keep
    /// sending; events still unsent then count as not published.
    #[arg(long, env = "STREAMLINE_BENCH_PUBLISH_GRACE", default_value = "1s", value_parser = duration)]
    pub publish_grace: Duration,

    /// Source addresses 127.0.0.1..127.0.0.K to spread the streams over
    /// (about 28k connections per source address and server port); 0 picks
    /// one per 25,000 streams for a loopback target and none otherwise.
    #[arg(long, env = "STREAMLINE_BENCH_SOURCE_ADDRS", default_value_t = 0)]
    pub source_addrs: u8,

    /// Streams being opened at once (connect until the status line). Keep
    /// it under the server's listen backlog (often 128) or SYNs are dropped
    /// and retried a second later.
    #[arg(
        long,
        env = "STREAMLINE_BENCH_CONNECT_CONCURRENCY",
        default_value_t = 64
    )]
    pub connect_concurrency: usize,

    /// Time allowed for one stream to connect and get its response head.
    #[arg(long, env = "STREAMLINE_BENCH_CONNECT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// After publishing: stop waiting for deliveries once none arrived for
    /// this long (or all expected ones did).
    #[arg(long, env = "STREAMLINE_BENCH_DRAIN_QUIET", default_value = "2s", value_parser = duration)]
    pub drain_quiet: Duration,

    /// Server process to sample for memory (VmRSS) and CPU time, summed
    /// over the process and its descendants (nginx workers, say). Several
    /// separated by commas (one per replica): the figures are summed, and
    /// each one's is reported too.
    #[arg(long, env = "STREAMLINE_BENCH_PID", value_delimiter = ',')]
    pub pid: Vec<u32>,

    /// The bus's process (redis-server, a Kafka broker), sampled as --pid
    /// is and reported apart.
    #[arg(long, env = "STREAMLINE_BENCH_BUS_PID")]
    pub bus_pid: Option<u32>,

    /// Load processes: spread the streams over N child processes of this
    /// tool (each opens its share, so a run may hold more streams than one
    /// process may open); the publisher stays in this one, and the report
    /// merges theirs. 0: every stream in this process.
    #[arg(long, env = "STREAMLINE_BENCH_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Run as worker K of --workers, driven by its parent over stdin and
    /// stdout (internal).
    #[arg(long, hide = true)]
    pub worker: Option<usize>,

    /// Open the streams, measure the server's memory, hold them for
    /// --duration, and exit without publishing.
    #[arg(long, env = "STREAMLINE_BENCH_IDLE_ONLY")]
    pub idle_only: bool,

    /// Reconnection delay of a client whose server sent no `retry:` (the
    /// default of an `EventSource` is the browser's choice; a few seconds).
    #[arg(long, env = "STREAMLINE_BENCH_RECONNECT_DELAY", default_value = "3s", value_parser = duration)]
    pub reconnect_delay: Duration,

    /// Rolling-restart mode (bench/churn.sh): publish until stdin closes,
    /// then for --duration more. Each line read on stdin (`restart
    /// replica-1`, say) marks the start of a restart; the reconnects that
    /// follow, up to the next mark, are that restart's drain window. Prints
    /// `churn: publishing` on stderr once the first mark may come.
    #[arg(long, env = "STREAMLINE_BENCH_CHURN")]
    pub churn: bool,

    /// The gateways' --drain-window (with --churn): a drain's mean
    /// reconnect rate is its reconnects over this window.
    #[arg(long, env = "STREAMLINE_BENCH_DRAIN_WINDOW", default_value = "3s", value_parser = duration)]
    pub drain_window: Duration,

    /// Name for this run in the JSON line and in --table.
    #[arg(long, env = "STREAMLINE_BENCH_LABEL", default_value = "")]
    pub label: String,

    /// Worker threads (0: one per core).
    #[arg(long, env = "STREAMLINE_BENCH_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// No progress lines on stderr.
    #[arg(long, short, env = "STREAMLINE_BENCH_QUIET")]
    pub quiet: bool,

    /// Print a comparison table of the JSON lines in FILE (one run each,
    /// as this tool prints them) and exit.
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,

    /// Print a rate sweep of the JSON lines in FILE (runs of one or more
    /// servers, told apart by --label, at several --rate) side by side with
    /// each server's knee: the highest deliveries/s of a run with every
    /// planned event published, nothing lost and p99 within --knee-p99;
    /// and exit.
    #[arg(long, value_name = "FILE")]
    pub knee: Option<PathBuf>,

    /// The p99 latency a run may have and still count for --knee.
    #[arg(long, default_value = "100ms", value_parser = duration)]
    pub knee_p99: Duration,
}

impl Args {
    /// The number of publishers to run (see --publishers).
    pub fn publisher_count(&self) -> usize {
        if self.publisher_mode == crate::publisher::Mode::Pool {
            return 1;
        }
        if self.publishers > 0 {
            return self.publishers;
        }
        ((self.rate / 1000.0).ceil() as usize).clamp(1, 8)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.topics == 0 {
            return Err("--topics must be at least 1".into());
        }
        if !self.idle_only && (self.rate.is_nan() || self.rate <= 0.0) {
            return Err("--rate must be positive".into());
        }
        if !self.duration.is_finite() || self.duration < 0.0 {
            return Err("--duration must be a number of seconds".into());
        }
        if self.pub_batch == 0 {
            return Err("--pub-batch must be at least 1".into());
        }
        if self.pub_batch > 1 && self.pub_url.contains("{topic}") {
            return Err("--pub-batch needs a publish URL without {topic}".into());
        }
        if self.pool_max == 0 {
            return Err("--pool-max must be at least 1".into());
        }
        if self.churn && self.idle_only {
            return Err("--churn publishes: not with --idle-only".into());
        }
        if self.drain_window.is_zero() {
            return Err("--drain-window must be positive".into());
        }
        if self.workers > 0 && self.churn {
            return Err("--churn runs in one process: not with --workers".into());
        }
        if self.worker.is_some_and(|k| k >= self.workers) {
            return Err("--worker must be below --workers".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        Ok(())
    }
}
