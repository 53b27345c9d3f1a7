//! A real `redis-server` per test, on an ephemeral loopback port, killed by
//! pid when dropped (also when the test fails).

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::WAIT;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

/// A port that was free a moment ago (redis-server cannot pick one itself:
/// `--port 0` turns TCP off).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_on(free_port()).await
    }

    /// Starts (or restarts) on `port`, and waits until it answers PING.
    pub async fn start_on(port: u16) -> RedisServer {
        let mut cmd = Command::new("redis-server");
        // Hung with SIGSTOP by tests (`pause`): only they may resume it.
        super::own_process_group(&mut cmd);
        let child = cmd
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (bash .ci/test installs it)");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while server.ping().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> redis::RedisResult<String> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut conn).await
    }

    /// A command connection for assertions about what is stored.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// Hangs the server (SIGSTOP): it keeps its connections and what they
    /// send, and answers nothing until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes a hung server (SIGCONT); it runs what it received meanwhile.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// The server's process id (for sampling its memory and CPU).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}
