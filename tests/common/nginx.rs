//! A real nginx per test, running `deploy/nginx/streamline.conf` — the
//! shipped file, with only its `listen` port and its upstreams' `server`
//! lines rewritten — on an ephemeral loopback port, from a temp dir that
//! holds its pid file, logs and temp paths. Killed by pid when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::redis::{RedisServer, free_port};
use super::{BinaryGateway, WAIT};

/// The shipped configuration.
pub const SHIPPED: &str = include_str!("../../deploy/nginx/streamline.conf");

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// A fresh directory under the system temp dir, removed by [`Nginx`]'s drop.
pub fn temp_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamline-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `shipped` with `listen` on `127.0.0.1:port` and the `server` lines of
/// upstream `streamline_stream` (`streamline_control`) replaced by one line
/// per address in `stream` (`control`), keeping the shipped line's
/// parameters (`max_fails=…`). Panics if the file no longer has those lines.
pub fn render(shipped: &str, port: u16, stream: &[SocketAddr], control: &[SocketAddr]) -> String {
    let mut out = String::new();
    let (mut listens, mut upstream, mut seen) = (0, None::<&str>, Vec::new());
    for line in shipped.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if let Some(name) = t.strip_prefix("upstream ") {
            upstream = name.strip_suffix(" {").map(str::trim);
        } else if t == "}" {
            upstream = None;
        } else if t.starts_with("listen ") {
            listens += 1;
            out.push_str(&format!("{indent}listen 127.0.0.1:{port};\n"));
            continue;
        } else if let (Some(name), Some(rest)) = (upstream, t.strip_prefix("server ")) {
            if seen.contains(&name) {
                continue; // the first server line stood for all of them
            }
            seen.push(name);
            let params = rest
                .trim_end_matches(';')
                .split_once(' ')
                .map_or("", |p| p.1);
            let addrs = match name {
                "streamline_stream" => stream,
                "streamline_control" => control,
                other => panic!("unexpected upstream {other}"),
            };
            for addr in addrs {
                out.push_str(&format!("{indent}server {addr} {params};\n"));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_eq!(listens, 1, "streamline.conf has one listen line");
    seen.sort();
    assert_eq!(
        seen,
        ["streamline_control", "streamline_stream"],
        "both upstreams have server lines"
    );
    out
}

impl Nginx {
    pub async fn start(stream: &[SocketAddr], control: &[SocketAddr]) -> Nginx {
        Self::start_with(stream, control, &[]).await
    }

    /// Also writes `files` (path relative to nginx's directory, contents)
    /// first, e.g. `streamline.d/page.conf` for an extra location (relative
    /// `root`/`alias` paths resolve against that directory too).
    pub async fn start_with(
        stream: &[SocketAddr],
        control: &[SocketAddr],
        files: &[(&str, &str)],
    ) -> Nginx {
        let port = free_port();
        let mut files = files.to_vec();
        let conf = render(SHIPPED, port, stream, control);
        files.push(("streamline.conf", &conf));
        Self::launch(port, &files).await
    }

    /// Runs another `http`-context file (e.g. deploy/k8s/base/come-back.conf)
    /// with its one `listen` line moved to an ephemeral loopback port.
    pub async fn start_conf(conf: &str) -> Nginx {
        let port = free_port();
        let mut listens = 0;
        let conf: String = conf
            .lines()
            .map(|line| {
                let t = line.trim_start();
                if t.starts_with("listen ") {
                    listens += 1;
                    let indent = &line[..line.len() - t.len()];
                    format!("{indent}listen 127.0.0.1:{port};\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        assert_eq!(listens, 1, "one listen line");
        Self::launch(port, &[("streamline.conf", &conf)]).await
    }

    /// Starts nginx on `port` in a fresh directory holding `files`, the
    /// main config including `streamline.conf`.
    async fn launch(port: u16, files: &[(&str, &str)]) -> Nginx {
        let dir = temp_dir("nginx");
        let d = dir.display();
        std::fs::create_dir_all(dir.join("temp")).unwrap();
        std::fs::create_dir_all(dir.join("streamline.d")).unwrap();
        for (path, contents) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        // One process (no master, no workers): killing its pid stops all of
        // nginx, and it reads the temp dir with the test's own rights.
        let main = format!(
            "master_process off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/temp/client_body;\n\
             \x20   proxy_temp_path {d}/temp/proxy;\n\
             \x20   fastcgi_temp_path {d}/temp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/temp/uwsgi;\n\
             \x20   scgi_temp_path {d}/temp/scgi;\n\
             \x20   include streamline.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx is installed (bash .ci/test installs it)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut nginx = Nginx { child, addr, dir };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.error_log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not listen in time:\n{}",
                nginx.error_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The directory nginx runs in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("nginx error log:\n{}", self.error_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Real `streamline` replicas sharing one Redis, behind nginx (which they
/// trust with `--trusted-proxy`). The replicas drain fast
/// (`--shutdown-delay 0s --drain-window 500ms`) and ask clients to come
/// back after 300 ms. Each keeps its ports for life, so that it can be
/// stopped and started again behind the same nginx, as in a rolling
/// restart.
pub struct Cluster {
    pub replicas: Vec<BinaryGateway>,
    pub nginx: Nginx,
    pub redis: RedisServer,
    /// Each replica's command line, to start it again on the same ports.
    flags: Vec<Vec<String>>,
}

/// `n` distinct loopback ports that were free a moment ago, chosen outside
/// the kernel's ephemeral range: a replica restarted on its port must not
/// find it taken by some test's outgoing connection meanwhile.
pub fn stable_ports(n: usize) -> Vec<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut seed =
        u64::from(std::process::id()) << 16 ^ u64::from(NEXT.fetch_add(1, Ordering::Relaxed));
    let mut held = Vec::new();
    while held.len() < n {
        // A small LCG is enough to spread the tries over 20000..32000.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = 20_000 + (seed >> 33) as u16 % 12_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(&[]).await
    }

    /// `files` as for [`Nginx::start_with`].
    pub async fn start_with(files: &[(&str, &str)]) -> Cluster {
        Self::start_n(2, &[], files).await
    }

    /// `n` replicas, each also given `extra` flags (later flags win).
    pub async fn start_n(n: usize, extra: &[&str], files: &[(&str, &str)]) -> Cluster {
        let redis = RedisServer::start().await;
        let url = redis.url();
        let mut replicas = Vec::new();
        let mut all_flags = Vec::new();
        for i in 0..n {
            let (replica, flags) = Self::start_replica(i, &url, extra).await;
            replicas.push(replica);
            all_flags.push(flags);
        }
        let stream: Vec<SocketAddr> = replicas.iter().map(|r| r.stream).collect();
        let control: Vec<SocketAddr> = replicas.iter().map(|r| r.control).collect();
        let nginx = Nginx::start_with(&stream, &control, files).await;
        Cluster {
            replicas,
            nginx,
            redis,
            flags: all_flags,
        }
    }

    /// Starts replica `i` on two stable ports. Ports free a moment ago can
    /// be taken by the time the replica binds them (another test chose them
    /// too): then it tries again on two others.
    async fn start_replica(i: usize, url: &str, extra: &[&str]) -> (BinaryGateway, Vec<String>) {
        let mut tries = 0;
        loop {
            let ports = stable_ports(2);
            let flags = Self::replica_flags(i, url, ports[0], ports[1], extra);
            let args: Vec<&str> = flags.iter().map(String::as_str).collect();
            match BinaryGateway::try_start(&args).await {
                Ok(replica) => return (replica, flags),
                Err(said) if said.contains("Address already in use") && tries < 5 => tries += 1,
                Err(said) => panic!("replica {i} exited before listening; it said: {said}"),
            }
        }
    }

    fn replica_flags(
        i: usize,
        url: &str,
        control: u16,
        stream: u16,
        extra: &[&str],
    ) -> Vec<String> {
        let name = format!("replica-{}", (b'a' + i as u8) as char);
        let control = format!("127.0.0.1:{control}");
        let stream = format!("127.0.0.1:{stream}");
        let mut flags: Vec<String> = [
            "--redis-url",
            url,
            "--replica-id",
            &name,
            "--control-addr",
            &control,
            "--stream-addr",
            &stream,
            "--shutdown-delay",
            "0s",
            "--drain-window",
            "500ms",
            "--retry",
            "300ms",
            // As deployed: nginx's X-Forwarded-For names the client.
            "--trusted-proxy",
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    }

    /// Sends replica `i` SIGTERM and waits until it has exited cleanly.
    pub async fn stop(&mut self, i: usize) {
        self.replicas[i].signal("TERM");
        let status = self.replicas[i].wait_exit().await;
        assert!(status.success(), "replica {i} exits cleanly: {status}");
    }

    /// Starts replica `i` again, on its ports, and waits until its
    /// `/ready` says 200.
    pub async fn restart(&mut self, i: usize) {
        let args: Vec<&str> = self.flags[i].iter().map(String::as_str).collect();
        self.replicas[i] = BinaryGateway::start(&args).await;
        let ready = self.replicas[i].control_url("/ready");
        super::eventually_async("the restarted replica is ready", || async {
            super::http()
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// The replica holding the stream with client id `id`.
    pub async fn holder_of(&self, id: &str) -> usize {
        for (i, r) in self.replicas.iter().enumerate() {
            let v = super::get_json(&r.control_url("/clients")).await;
            if v["clients"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == id)
            {
                return i;
            }
        }
        panic!("no replica holds client {id}")
    }

    /// The replica holding the only open stream (waits for it to open).
    pub async fn holder_of_the_stream(&self) -> usize {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for (i, r) in self.replicas.iter().enumerate() {
                let v = super::get_json(&r.control_url("/clients")).await;
                if v["clients"].as_array().unwrap().len() == 1 {
                    return i;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica holds a stream"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What one publish attempt through nginx came to.
#[derive(Debug)]
pub enum Outcome {
    Accepted(String),
    /// The replica went away under the request (nginx's `502
    /// replica_failed`): the event may or may not have been published, and
    /// nginx does not resend a PATCH.
    Unknown,
}

/// Splits publish attempts (data → outcome) into the acknowledged ones
/// (id → data) and the data of those whose outcome is unknown.
pub fn split_attempts(
    attempts: &std::collections::BTreeMap<String, Outcome>,
) -> (
    std::collections::BTreeMap<&str, &str>,
    std::collections::BTreeSet<&str>,
) {
    let mut acked = std::collections::BTreeMap::new();
    let mut unknown = std::collections::BTreeSet::new();
    for (data, outcome) in attempts {
        match outcome {
            Outcome::Accepted(id) => {
                acked.insert(id.as_str(), data.as_str());
            }
            Outcome::Unknown => {
                unknown.insert(data.as_str());
            }
        }
    }
    (acked, unknown)
}
