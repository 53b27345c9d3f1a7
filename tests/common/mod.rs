//! Shared helpers for the integration tests: a gateway on ephemeral ports
//! (in-process or the real binary), an SSE client over real sockets, and
//! condition waits with deadlines (never bare sleeps).

#![allow(dead_code, reason = "each test binary uses only some of these helpers")]

pub mod bench;
pub mod browser;
pub mod kafka;
pub mod nginx;
pub mod redis;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use serde_json::Value;
use streamline::Config;
use streamline::hub::Hub;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Puts a server that a test hangs with SIGSTOP in a process group of its
/// own, so that only the test resumes it.
///
/// The kernel sends SIGHUP then SIGCONT to every process of a process group
/// that becomes orphaned while one of them is stopped (POSIX job control).
/// A server in the test's own group was resumed mid-hang (or, without
/// `nohup`, killed by the SIGHUP) whenever the shell that had started the
/// tests in the background exited during the hang: the test then waited in
/// vain for `/ready` to say 503, or for a dead broker to make it say 200.
/// A group whose only member is the server, child of the test process, is
/// not orphaned while the test runs.
pub fn own_process_group(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0)
}

/// Flags every test gateway gets: ephemeral ports, a fast shutdown.
fn base_args() -> Vec<String> {
    [
        "streamline",
        "--control-addr",
        "127.0.0.1:0",
        "--stream-addr",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0s",
        "--drain-window",
        "200ms",
        "--write-timeout",
        "2s",
        "--grace-period",
        "10s",
        // Every test client comes from 127.0.0.1: per-address limits off
        // (tests/security.rs turns them on where it tests them).
        "--max-streams-per-ip",
        "0",
        "--max-conn-rate-per-ip",
        "0",
        "--publish-rate",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A gateway running inside the test process.
pub struct TestGateway {
    pub control: SocketAddr,
    pub stream: SocketAddr,
    pub hub: Arc<Hub>,
    pub token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(&[]).await
    }

    /// Starts with extra flags (later flags override the defaults above).
    pub async fn start_with(extra: &[&str]) -> TestGateway {
        let mut args = base_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::try_parse_from(&args).expect("test flags parse");
        let gw = streamline::Gateway::bind(config)
            .await
            .expect("gateway binds");
        let (control, stream, hub) = (gw.control_addr(), gw.stream_addr(), gw.hub().clone());
        let token = CancellationToken::new();
        let task = tokio::spawn(gw.run(token.clone()));
        TestGateway {
            control,
            stream,
            hub,
            token,
            task: Some(task),
        }
    }

    pub fn control_url(&self, path: &str) -> String {
        format!("http://{}{}", self.control, path)
    }

    /// `query` is everything after `?`, e.g. `topic=a&topic=b`.
    pub fn stream_url(&self, query: &str) -> String {
        format!("http://{}/stream?{}", self.stream, query)
    }

    /// PATCHes `body` and returns the ids; panics unless the answer is 202.
    pub async fn publish(&self, body: Value) -> Vec<String> {
        publish_to(&http(), self.control, &body).await
    }

    /// Publishes one event with string data and returns its id.
    pub async fn publish_one(&self, topic: &str, data: &str) -> String {
        self.publish(serde_json::json!({"topic": topic, "data": data}))
            .await
            .remove(0)
    }

    /// Waits until the hub reports `n` connected clients.
    pub async fn wait_clients(&self, n: usize) {
        let hub = self.hub.clone();
        eventually(&format!("{n} clients connected"), move || {
            hub.client_count() == n
        })
        .await;
    }

    /// Cancels the shutdown token and waits for the gateway to finish.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("gateway stops in time")
                .unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A plain HTTP/1.1 client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// Polls `cond` every 10 ms until it holds; fails the test after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One parsed item of an SSE stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(SseEvent),
    Comment(String),
    Retry(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `id:` field of this event, if it had one.
    pub id: Option<String>,
    /// `message` when the event had no `event:` field.
    pub event: String,
    pub data: String,
}

/// An SSE client over a real socket, parsing as EventSource does.
pub struct SseClient {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Item>,
    cur: SseEvent,
    has_data: bool,
    ended: bool,
}

impl SseClient {
    pub async fn connect(url: &str) -> SseClient {
        Self::connect_with(&http(), url, None).await
    }

    /// Connects, sending `Last-Event-ID` when given. Panics unless 200.
    pub async fn connect_with(
        client: &reqwest::Client,
        url: &str,
        last_id: Option<&str>,
    ) -> SseClient {
        let c = Self::try_connect(client, url, last_id).await;
        assert_eq!(c.status, 200, "stream request to {url} refused");
        c
    }

    /// Connects and returns whatever status the server answered.
    pub async fn try_connect(
        client: &reqwest::Client,
        url: &str,
        last_id: Option<&str>,
    ) -> SseClient {
        let mut req = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let res = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("connect in time")
            .expect("connect");
        SseClient {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: res.bytes_stream().boxed(),
            buf: Vec::new(),
            pending: Default::default(),
            cur: SseEvent::default(),
            has_data: false,
            ended: false,
        }
    }

    /// The next item, or `None` once the server ended the stream.
    pub async fn next_item(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("stream item in time")
            {
                Some(Ok(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    self.parse_lines();
                }
                Some(Err(_)) | None => self.ended = true,
            }
        }
    }

    /// The next event (skipping comments and retry fields).
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.next_item().await? {
                Item::Event(e) => return Some(e),
                _ => continue,
            }
        }
    }

    /// Reads `n` events, failing if the stream ends first.
    pub async fn events(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let e = self
                .next_event()
                .await
                .unwrap_or_else(|| panic!("stream ended after {} of {n} events", out.len()));
            out.push(e);
        }
        out
    }

    /// Reads until the server ends the stream; returns the events seen.
    pub async fn until_end(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await {
            out.push(e);
        }
        out
    }

    /// The client id from the preamble comment (`: client <id>`).
    pub async fn client_id(&mut self) -> String {
        loop {
            match self.next_item().await.expect("preamble") {
                Item::Comment(c) if c.starts_with("client ") => {
                    return c["client ".len()..].to_owned();
                }
                Item::Retry(_) => continue,
                other => panic!("expected the preamble, got {other:?}"),
            }
        }
    }

    fn parse_lines(&mut self) {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8(line[..line.len() - 1].to_vec()).expect("stream is UTF-8");
            let line = line.strip_suffix('\r').unwrap_or(&line).to_owned();
            if line.is_empty() {
                if self.has_data {
                    let mut ev = std::mem::take(&mut self.cur);
                    ev.data.pop();
                    if ev.event.is_empty() {
                        ev.event = "message".into();
                    }
                    self.pending.push_back(Item::Event(ev));
                }
                self.cur = SseEvent::default();
                self.has_data = false;
                continue;
            }
            if let Some(c) = line.strip_prefix(':') {
                self.pending
                    .push_back(Item::Comment(c.strip_prefix(' ').unwrap_or(c).to_owned()));
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "data" => {
                    self.cur.data.push_str(&value);
                    self.cur.data.push('\n');
                    self.has_data = true;
                }
                "event" => self.cur.event = value,
                "id" => self.cur.id = Some(value),
                "retry" => {
                    if let Ok(ms) = value.parse() {
                        self.pending.push_back(Item::Retry(ms));
                    }
                }
                _ => {}
            }
        }
    }
}

/// The real `streamline` binary, started on ephemeral ports with JSON logs.
pub struct BinaryGateway {
    pub child: Child,
    pub control: SocketAddr,
    pub stream: SocketAddr,
    /// Every log line the process printed so far is forwarded here.
    pub logs: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl BinaryGateway {
    pub async fn start(extra: &[&str]) -> BinaryGateway {
        Self::start_logging(extra, "info").await
    }

    /// Starts with `RUST_LOG=filter` (e.g. `streamline=debug`).
    pub async fn start_logging(extra: &[&str], filter: &str) -> BinaryGateway {
        Self::start_as(extra, filter, "json").await
    }

    /// Starts with `--log-format text`: `logs` gets each line as a string.
    pub async fn start_text(extra: &[&str], filter: &str) -> BinaryGateway {
        Self::start_as(extra, filter, "text").await
    }

    async fn start_as(extra: &[&str], filter: &str, format: &str) -> BinaryGateway {
        Self::try_start_as(extra, filter, format)
            .await
            .unwrap_or_else(|said| panic!("streamline exited before listening; it said: {said}"))
    }

    /// As [`BinaryGateway::start`], but a process that exits before it
    /// listens is an `Err` carrying everything it printed.
    pub async fn try_start(extra: &[&str]) -> Result<BinaryGateway, String> {
        Self::try_start_as(extra, "info", "json").await
    }

    async fn try_start_as(
        extra: &[&str],
        filter: &str,
        format: &str,
    ) -> Result<BinaryGateway, String> {
        let mut args = base_args();
        args.remove(0);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--log-format".into(), format.into()]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamline"))
            .args(&args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn streamline");
        let stderr = child.stderr.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let listening = tokio::time::timeout(WAIT, async {
            // Kept to say why, should the process exit before it listens.
            let mut said = Vec::new();
            loop {
                let Some(line) = rx.recv().await else {
                    return Err(format!("{said:#?}"));
                };
                said.push(line.clone());
                if line["message"] == "streamline listening" {
                    return Ok(line);
                }
                // A text line: `… streamline listening control_addr=… stream_addr=…`.
                if let Some(text) = line.as_str().filter(|l| l.contains("streamline listening")) {
                    let fields = text
                        .split_whitespace()
                        .filter_map(|f| f.split_once('='))
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())));
                    return Ok(Value::Object(fields.collect()));
                }
            }
        })
        .await
        .expect("streamline starts in time")?;
        let addr = |k: &str| listening[k].as_str().unwrap().parse().unwrap();
        Ok(BinaryGateway {
            control: addr("control_addr"),
            stream: addr("stream_addr"),
            child,
            logs: rx,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the log line whose `message` is `msg` (or whose `phase` is `msg`).
    pub async fn wait_log(&mut self, msg: &str) -> Value {
        tokio::time::timeout(WAIT, async {
            loop {
                let line = self
                    .logs
                    .recv()
                    .await
                    .unwrap_or_else(|| panic!("exited before logging {msg:?}"));
                if line["message"] == msg || line["phase"] == msg {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log {msg:?} in time"))
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits in time")
            .unwrap()
    }

    pub fn control_url(&self, path: &str) -> String {
        format!("http://{}{}", self.control, path)
    }

    pub fn stream_url(&self, query: &str) -> String {
        format!("http://{}/stream?{}", self.stream, query)
    }
}

/// Resident set size of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Number of threads of a process.
pub fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Like [`eventually`], for conditions that need to await (an HTTP request).
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a GET of `url` answers `status` (e.g. `/ready` turning 200
/// once the backend answers, or 503 once its outage is known).
pub async fn wait_status(what: &str, url: &str, status: u16) {
    eventually_async(what, || async {
        http()
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status() == status)
    })
    .await;
}

/// PATCHes `body` with an `Idempotency-Key` (when given).
pub async fn patch_events(
    control: std::net::SocketAddr,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = http()
        .patch(format!("http://{control}/events"))
        .timeout(WAIT)
        .json(body);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.send().await.expect("PATCH /events answered")
}

/// The ids of a 202 answer.
pub async fn ids_of(res: reqwest::Response) -> Vec<String> {
    assert_eq!(res.status(), 202, "{:?}", res.url());
    let v: Value = res.json().await.unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect()
}

/// What a publisher does after a 504 (or no answer): the same request,
/// same key, until it is accepted.
pub async fn retry_until_accepted(
    control: std::net::SocketAddr,
    key: &str,
    body: &Value,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = patch_events(control, Some(key), body).await;
        match res.status().as_u16() {
            202 => return ids_of(res).await,
            503 | 504 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            status => panic!("retry of {key}: {status} {}", res.text().await.unwrap()),
        }
    }
}

/// Runs `f` when dropped, also when the test fails (so a failing assertion
/// does not leave a server stopped for the rest of the test's cleanup).
pub fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// An HTTP/2 client speaking h2c with prior knowledge.
pub fn http2() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// GETs `url`; panics unless the answer is 200.
async fn get_ok(url: &str) -> reqwest::Response {
    let res = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(res.status(), 200, "GET {url}");
    res
}

/// GETs `url` and returns its JSON body; panics unless the answer is 200.
pub async fn get_json(url: &str) -> Value {
    get_ok(url)
        .await
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// GETs `url` and returns its body as text (`/metrics`, say); panics unless
/// the answer is 200.
/// A counter's value in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} in\n{page}")) as u64
}

pub async fn get_text(url: &str) -> String {
    get_ok(url)
        .await
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// DELETEs `url` (a client, say) and returns the answer, whatever it is.
pub async fn delete(url: &str) -> reqwest::Response {
    http()
        .delete(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DELETE {url}: {e}"))
}

/// Checks that `res` carries the JSON error body `{"error": code, "detail": …}`
/// and returns the detail.
pub async fn expect_api_error(res: reqwest::Response, status: u16, code: &str) -> String {
    let url = res.url().clone();
    assert_eq!(res.status(), status, "status of {url}");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "content-type of {url}: {ct:?}"
    );
    let body: Value = res
        .json()
        .await
        .unwrap_or_else(|e| panic!("error body of {url} is not JSON: {e}"));
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("error body of {url} is not an object: {body}"));
    assert_eq!(
        obj.len(),
        2,
        "error body of {url} has exactly error and detail: {body}"
    );
    assert_eq!(body["error"], code, "error code of {url}: {body}");
    let detail = body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail string: {body}"));
    assert!(!detail.is_empty(), "empty detail: {body}");
    detail.to_owned()
}

/// The `(hi, lo)` position of a single-topic event id `topic:hi-lo`.
pub fn position(id: &str) -> (u64, u64) {
    let (_, pos) = id
        .split_once(':')
        .unwrap_or_else(|| panic!("id {id:?} has no topic"));
    let (hi, lo) = pos
        .split_once('-')
        .unwrap_or_else(|| panic!("id {id:?} has no hi-lo"));
    (hi.parse().unwrap(), lo.parse().unwrap())
}

/// PATCHes `body` to the control plane at `control` and returns the ids;
/// panics unless the answer is 202.
pub async fn publish_to(
    client: &reqwest::Client,
    control: SocketAddr,
    body: &Value,
) -> Vec<String> {
    let res = client
        .patch(format!("http://{control}/events"))
        .json(body)
        .send()
        .await
        .expect("PATCH /events");
    assert_eq!(res.status(), 202, "PATCH {body}");
    let v: Value = res.json().await.expect("JSON reply");
    v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_str().unwrap().to_owned())
        .collect()
}

/// The `remote_addr` of every client `GET /clients` lists.
pub async fn client_addrs(control: SocketAddr) -> Vec<String> {
    let v = get_json(&format!("http://{control}/clients")).await;
    v["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["remote_addr"].as_str().unwrap().to_owned())
        .collect()
}

/// A stream request over a raw socket that nobody reads until
/// [`into_sse`](RawStream::into_sse): a client that stopped reading.
pub struct RawStream {
    pub stream: tokio::net::TcpStream,
}

impl RawStream {
    /// Sends `GET /stream?{query}` over HTTP/1.1 and reads nothing. With
    /// `recv_buf`, the socket's receive buffer is set before connecting, so
    /// the window it advertises stays that small.
    pub async fn open(addr: SocketAddr, query: &str, recv_buf: Option<u32>) -> RawStream {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let request = format!(
            "GET /stream?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        RawStream { stream }
    }

    /// The client's address, as `GET /clients` shows it (`remote_addr`).
    pub fn local_addr(&self) -> String {
        self.stream.local_addr().unwrap().to_string()
    }

    /// Drops the socket with `SO_LINGER` 0: the gateway sees a reset, as
    /// when a client vanishes.
    pub fn reset(self) {
        self.stream.set_zero_linger().unwrap();
        drop(self.stream);
    }

    /// Starts reading: the response head, then the (chunked) body as SSE.
    pub async fn into_sse(self) -> SseClient {
        use tokio::io::AsyncReadExt;
        let mut reader = BufReader::new(self.stream);
        let mut line = String::new();
        async fn read_line(reader: &mut BufReader<tokio::net::TcpStream>, line: &mut String) {
            line.clear();
            tokio::time::timeout(WAIT, reader.read_line(line))
                .await
                .expect("response head in time")
                .expect("response head");
        }
        read_line(&mut reader, &mut line).await;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = reqwest::header::HeaderMap::new();
        loop {
            read_line(&mut reader, &mut line).await;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').expect("a header line");
            headers.append(
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                value.trim().parse().unwrap(),
            );
        }
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        assert!(chunked, "a stream's body is chunked: {headers:?}");
        // Yields each chunk's payload; ends at the last chunk, EOF or an error.
        let body = futures_util::stream::unfold(reader, |mut reader| async move {
            let mut size_line = String::new();
            if reader.read_line(&mut size_line).await.ok()? == 0 {
                return None;
            }
            let size = size_line.trim_end().split(';').next()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            chunk.truncate(size);
            Some((Ok(bytes::Bytes::from(chunk)), reader))
        });
        SseClient {
            status,
            headers,
            body: body.boxed(),
            buf: Vec::new(),
            pending: Default::default(),
            cur: SseEvent::default(),
            has_data: false,
            ended: false,
        }
    }
}
