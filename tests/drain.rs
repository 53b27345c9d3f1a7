//! Shutdown against the real binary: the drain timeline after SIGTERM, and
//! clients that vanish mid-write leaving nothing behind.

mod common;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// Reads the rest of a stream the gateway is closing: the `retry:` hint and
/// the close notice, then the end. Returns the close notice's data and the
/// hint.
async fn close_notice(stream: &mut SseClient) -> (String, Option<u64>) {
    let mut retry = None;
    loop {
        match stream.next_item().await {
            Some(Item::Retry(ms)) => retry = Some(ms),
            Some(Item::Comment(_)) => {}
            Some(Item::Event(ev)) => {
                assert_eq!(ev.event, "streamline.close", "{ev:?}");
                assert!(
                    stream.next_item().await.is_none(),
                    "the stream ends after the notice"
                );
                return (ev.data, retry);
            }
            None => panic!("the stream ended without a close notice"),
        }
    }
}

/// Collects log lines into `lines` up to the one whose `phase` is `phase`.
async fn log_until(gw: &mut BinaryGateway, lines: &mut Vec<Value>, phase: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            let line = gw.logs.recv().await.expect("the gateway is running");
            let found = line["phase"] == phase;
            lines.push(line);
            if found {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {phase:?} phase logged in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_phases_and_exits_zero() {
    // The delay is long enough that the checks made during it (a few
    // requests) fit easily, even on a busy machine.
    let mut gw = BinaryGateway::start(&[
        "--shutdown-delay",
        "3s",
        "--drain-window",
        "1s",
        "--grace-period",
        "10s",
    ])
    .await;
    let client = http();
    let ready = gw.control_url("/ready");
    let url = gw.stream_url("topic=a");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = SseClient::connect(&url).await;
        s.client_id().await;
        streams.push(s);
    }
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);

    gw.signal("TERM");

    // 1. Not ready at once, while everything else is served as before.
    eventually_async("/ready answers 503", || async {
        let res = client.get(&ready).send().await.unwrap();
        res.status() == 503
    })
    .await;
    // The operators' page and Prometheus see the phase.
    let stats = get_json(&gw.control_url("/stats")).await;
    assert_eq!(stats["replicas"][0]["phase"], "not_ready", "{stats}");
    let metrics = get_text(&gw.control_url("/metrics")).await;
    assert!(
        metrics.contains("streamline_lifecycle_phase{phase=\"not_ready\"} 1\n"),
        "{metrics}"
    );
    let mut late = SseClient::connect(&url).await;
    late.client_id().await;
    streams.push(late);
    let body = json!({"topic": "a", "data": "during the delay"});
    let id = publish_to(&client, gw.control, &body).await.remove(0);

    // 2. Draining: every new stream is refused with 503 and Retry-After,
    // also on a fresh connection (a closed socket would not tell the client
    // to go elsewhere).
    let mut lines = Vec::new();
    log_until(&mut gw, &mut lines, "draining").await;
    eventually_async("new streams are refused", || async {
        let res = http().get(&url).send().await.unwrap();
        res.status() == 503
    })
    .await;
    for _ in 0..10 {
        let res = http()
            .get(&url)
            .send()
            .await
            .expect("a response, not a closed connection");
        let retry_after = res
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!(retry_after >= 1);
        expect_api_error(res, 503, "shutting_down").await;
    }

    // Each open stream got the event published during the delay, then a
    // close notice with a retry hint.
    for s in &mut streams {
        let ev = s.next_event().await.unwrap();
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str()),
            (Some(id.as_str()), "during the delay")
        );
        let (data, retry) = close_notice(s).await;
        assert_eq!(data, r#"{"reason":"shutdown"}"#);
        assert_eq!(retry, Some(2000));
    }

    // 3. Listeners close and the process exits 0, within the grace period:
    // it did not have to give up on any task.
    let status = gw.wait_exit().await;
    assert!(status.success(), "exit status {status}");
    while let Some(line) = gw.logs.recv().await {
        lines.push(line);
    }
    let phases: Vec<&str> = lines.iter().filter_map(|l| l["phase"].as_str()).collect();
    assert_eq!(phases, ["not_ready", "draining", "stopping", "stopped"]);
    let draining = lines.iter().find(|l| l["phase"] == "draining").unwrap();
    assert_eq!(draining["streams"], 4);
    let stopping = lines.iter().find(|l| l["phase"] == "stopping").unwrap();
    assert_eq!(stopping["drained"], 4, "the drain closed every stream");
    let warnings: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Limits the vanishing client never reaches: it must go because of the
/// reset, not for being slow.
const NOT_SLOW: [&str; 4] = ["--max-lag", "5000", "--history-size", "5000"];

/// Opens a raw stream on `topic=a`, lets about 1 MiB of events flow while
/// reading a little, then resets the socket. Publishes on until `gone`.
async fn vanish_mid_write<F, Fut>(
    stream: std::net::SocketAddr,
    control: std::net::SocketAddr,
    mut gone: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let client = http();
    let big = "x".repeat(1024);
    let batch = |n: usize| -> Value {
        let events: Vec<Value> = (0..n).map(|_| json!({"topic": "a", "data": big})).collect();
        json!(events)
    };
    let mut raw = RawStream::open(stream, "topic=a", None).await;
    eventually_async("the stream is open", || {
        let gone = gone();
        async move { !gone.await }
    })
    .await;
    let mut buf = vec![0; 64 * 1024];
    let mut read = 0;
    while read < 256 * 1024 {
        publish_to(&client, control, &batch(100)).await;
        let n = tokio::time::timeout(WAIT, raw.stream.read(&mut buf))
            .await
            .expect("data in time")
            .unwrap();
        assert!(n > 0, "the stream is open");
        read += n;
    }
    // Bytes are still on their way when the client vanishes.
    publish_to(&client, control, &batch(300)).await;
    raw.reset();
    let (client, more) = (&client, batch(10));
    eventually_async("the vanished client is gone", || {
        let gone = gone();
        let more = &more;
        async move {
            publish_to(client, control, more).await;
            gone.await
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_write_leaves_no_client_behind() {
    let gw = TestGateway::start_with(&NOT_SLOW).await;
    let hub = gw.hub.clone();
    vanish_mid_write(gw.stream, gw.control, || {
        let n = hub.client_count();
        async move { n == 0 }
    })
    .await;
    let t = gw.hub.totals();
    let opened = t
        .connections_opened
        .load(std::sync::atomic::Ordering::SeqCst);
    let closed = t
        .connections_closed
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!((opened, closed), (1, 1));
    let slow = t
        .slow_disconnected
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(slow, 0, "gone because it vanished, not because it was slow");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_write_leaves_nothing_behind_in_the_binary() {
    let mut gw = BinaryGateway::start(&NOT_SLOW).await;
    let control = gw.control;
    vanish_mid_write(gw.stream, control, || async move {
        client_addrs(control).await.is_empty()
    })
    .await;
    // Nothing is left to wait for: shutdown completes without giving up.
    gw.signal("TERM");
    let status = gw.wait_exit().await;
    assert!(status.success(), "exit status {status}");
    let mut lines = Vec::new();
    while let Some(line) = gw.logs.recv().await {
        lines.push(line);
    }
    let stopping = lines
        .iter()
        .find(|l| l["phase"] == "stopping")
        .expect("stopping logged");
    assert_eq!(stopping["remaining"], 0);
    let gave_up = lines
        .iter()
        .any(|l| l["message"] == "grace period is over; exiting with tasks still running");
    assert!(!gave_up, "{lines:?}");
}

/// Reads one HTTP/1.1 response (head and `Content-Length` body) off `conn`;
/// returns the head, lowercased.
async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("read");
        assert!(n > 0, "closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    head
}

/// A proxy's kept-alive control connection is closed by the replica's own
/// answer once shutdown began, well before the listener closes: a `PATCH`
/// cannot be sent on it just as the replica drops it.
#[tokio::test]
async fn control_connections_are_not_kept_alive_once_shutdown_began() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start_with(&["--shutdown-delay", "10s", "--grace-period", "20s"]).await;
    let mut conn = tokio::net::TcpStream::connect(gw.control).await.unwrap();
    let request = format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", gw.control);
    conn.write_all(request.as_bytes()).await.unwrap();
    let head = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    gw.token.cancel();
    let body = r#"{"topic":"t","data":"x"}"#;
    let patch = format!(
        "PATCH /events HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        gw.control,
        body.len()
    );
    conn.write_all(patch.as_bytes()).await.unwrap();
    let head = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 202"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(WAIT, conn.read(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the replica closes the connection after its answer");
}

/// A control connection opened before the listener closed gets its first
/// request answered, even one that arrives once the replica stopped
/// listening: a proxy opens a connection to send a request at once, and a
/// connection closed under it (hyper counts one whose first request is not
/// parsed yet as idle) makes it answer 502, the outcome of a PATCH unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_connection_opened_before_the_listener_closed_gets_its_answer() {
    use tokio::io::AsyncWriteExt;
    let mut gw = BinaryGateway::start(&[]).await;
    let control = gw.control;
    let mut conn = tokio::net::TcpStream::connect(control).await.unwrap();
    gw.signal("TERM");
    let mut lines = Vec::new();
    log_until(&mut gw, &mut lines, "stopping").await;
    // The listener is closed: the replica acted on the stop.
    eventually_async("the control listener is closed", || async move {
        tokio::net::TcpStream::connect(control).await.is_err()
    })
    .await;
    let body = r#"{"topic":"t","data":"x"}"#;
    let patch = format!(
        "PATCH /events HTTP/1.1\r\nHost: {control}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(patch.as_bytes()).await.unwrap();
    let head = read_response(&mut conn).await;
    assert!(head.starts_with("http/1.1 202"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let status = gw.wait_exit().await;
    assert!(status.success(), "exit status {status}");
}
