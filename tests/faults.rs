//! Faults against real servers: a hung Redis (SIGSTOP/SIGCONT) and a
//! killed one, publishes whose outcome is unknown and their keyed retries,
//! a flood of half-sent requests on the control plane, and a smuggling-
//! shaped stream request. Each test is a row of README's fault table.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::redis::RedisServer;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn redis_replica(redis: &RedisServer, name: &str) -> TestGateway {
    let url = redis.url();
    let gw = TestGateway::start_with(&[
        "--redis-url",
        &url,
        "--replica-id",
        name,
        "--redis-timeout",
        "300ms",
    ])
    .await;
    let ready = gw.control_url("/ready");
    wait_status("redis up", &ready, 200).await;
    gw
}

/// Issue 15, defect 4: with Redis hung, PATCH answered 503 "nothing was
/// published" and every one of those events was delivered after SIGCONT.
/// Now: requests sent into the hang answer 504 `publish_outcome_unknown`
/// (and are indeed run when Redis resumes); once the outage is known
/// (`/ready` down) PATCH answers 503 and sends nothing. Keyed retries, on
/// either replica, get the ids subscribers saw, and every event is
/// delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_answers_honestly_and_keyed_retries_publish_once() {
    let redis = RedisServer::start().await;
    let a = redis_replica(&redis, "a").await;
    let b = redis_replica(&redis, "b").await;
    let mut on_a = SseClient::connect(&a.stream_url("topic=h")).await;
    let mut on_b = SseClient::connect(&b.stream_url("topic=h")).await;
    a.publish_one("h", "before").await;
    assert_eq!(on_a.next_event().await.unwrap().data, "before");
    assert_eq!(on_b.next_event().await.unwrap().data, "before");

    redis.pause();
    // Sent into the hang, before the health check notices it.
    let body = |data: &str| json!({"topic": "h", "data": data});
    let (b0, b1, b2) = (body("keyed-0"), body("keyed-1"), body("unkeyed"));
    let (k0, k1, unkeyed) = tokio::join!(
        patch_events(a.control, Some("key-0"), &b0),
        patch_events(a.control, Some("key-1"), &b1),
        patch_events(a.control, None, &b2),
    );
    for res in [k0, k1, unkeyed] {
        let detail = expect_api_error(res, 504, "publish_outcome_unknown").await;
        assert!(detail.contains("Idempotency-Key"), "{detail}");
    }
    // Once the outage is known, nothing is sent: 503 is true.
    let ready = a.control_url("/ready");
    wait_status("ready reports redis down", &ready, 503).await;
    for i in 2..4 {
        let data = format!("keyed-{i}");
        let res = patch_events(a.control, Some(&format!("key-{i}")), &body(&data)).await;
        expect_api_error(res, 503, "backend_unavailable").await;
    }
    redis.resume();

    // What the 504s could not promise: Redis ran them when it resumed.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for ev in on_a.events(3).await {
        seen.insert(ev.data, ev.id.unwrap());
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["keyed-0", "keyed-1", "unkeyed"]
    );
    // Every keyed request retried, alternating replicas, as a publisher
    // would after a 504 or a 503.
    let mut answered = BTreeMap::new();
    for i in 0..4 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let data = format!("keyed-{i}");
        let ids = retry_until_accepted(gw.control, &format!("key-{i}"), &body(&data)).await;
        if let Some(id) = seen.get(&data) {
            assert_eq!(
                &ids[0], id,
                "the retry of key-{i} names the event delivered"
            );
        }
        // The same key with other events is refused, publishing nothing.
        let res = patch_events(gw.control, Some(&format!("key-{i}")), &body("other")).await;
        expect_api_error(res, 422, "idempotency_key_reused").await;
        answered.insert(data, ids[0].clone());
    }
    let last = a.publish_one("h", "after").await;
    for (name, client) in [("a", &mut on_a), ("b", &mut on_b)] {
        let mut got: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let ev = client.next_event().await.unwrap();
            if ev.data == "after" {
                assert_eq!(ev.id.as_deref(), Some(last.as_str()));
                break;
            }
            let dup = got.insert(ev.data.clone(), ev.id.unwrap());
            assert!(dup.is_none(), "{} delivered twice on {name}", ev.data);
        }
        if name == "a" {
            got.extend(seen.clone());
        }
        for (data, id) in &answered {
            assert_eq!(got.get(data), Some(id), "{data} on {name}: {got:?}");
        }
        assert_eq!(got.len(), 5, "on {name}: {got:?}");
    }
}

/// A keyed publish answered 202 is answered again with the same ids by any
/// replica, and delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_after_a_202_is_answered_by_every_replica_with_the_same_ids() {
    let redis = RedisServer::start().await;
    let a = redis_replica(&redis, "a").await;
    let b = redis_replica(&redis, "b").await;
    let mut sub = SseClient::connect(&b.stream_url("topic=k&topic=l")).await;
    let batch = json!([{"topic": "k", "data": 1}, {"topic": "l", "event": "x", "data": {"a": 2}}]);
    let first = ids_of(patch_events(a.control, Some("batch-1"), &batch).await).await;
    assert_eq!(first.len(), 2);
    // Re-encoded differently: the same events, so the same batch.
    let spaced = json!([{"topic": "k", "data": 1}, {"data": {"a": 2}, "event": "x", "topic": "l"}]);
    for gw in [&a, &b, &a] {
        let again = ids_of(patch_events(gw.control, Some("\"batch-1\""), &spaced).await).await;
        assert_eq!(again, first);
    }
    a.publish_one("k", "marker").await;
    let events = sub.events(3).await;
    // A multi-topic stream's ids are cursors: each carries its event's id.
    for (ev, id) in events.iter().zip(&first) {
        let cursor = ev.id.clone().unwrap();
        assert!(
            cursor.split(',').any(|part| part == id),
            "{cursor} lacks {id}"
        );
    }
    assert_eq!(events[2].data, "marker", "delivered once: {events:?}");
}

/// Issue 15, defect 9: the outage and the recovery are each logged once,
/// after kill -9 and after SIGSTOP/SIGCONT, however many retries happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outages_are_logged_once_per_transition() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let url = redis.url();
    let mut gw = BinaryGateway::start(&["--redis-url", &url, "--redis-timeout", "300ms"]).await;
    // (Its "redis is reachable" may come before "streamline listening".)
    let ready = gw.control_url("/ready");
    wait_status("redis up", &ready, 200).await;

    redis.kill().await;
    gw.wait_log("redis is unreachable").await;
    // Several reconnect attempts (backoff from 100 ms) while it is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let redis = RedisServer::start_on(port).await;
    let lines = until_log(&mut gw, "redis is reachable again").await;
    assert_eq!(count(&lines, "redis is unreachable"), 0, "{lines:?}");

    redis.pause();
    gw.wait_log("redis is unreachable").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.resume();
    let lines = until_log(&mut gw, "redis is reachable again").await;
    assert_eq!(count(&lines, "redis is unreachable"), 0, "{lines:?}");
}

/// Log lines up to and including the one whose message is `msg`.
async fn until_log(gw: &mut BinaryGateway, msg: &str) -> Vec<Value> {
    tokio::time::timeout(WAIT, async {
        let mut lines = Vec::new();
        loop {
            let line = gw.logs.recv().await.expect("still running");
            let done = line["message"] == msg;
            lines.push(line);
            if done {
                return lines;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log {msg:?} in time"))
}

fn count(lines: &[Value], msg: &str) -> usize {
    lines.iter().filter(|l| l["message"] == msg).count()
}

/// Issue 15, defect 9: RFC 9112 §6.1 — a request with both Content-Length
/// and Transfer-Encoding is refused, and the connection closed.
/// Reads until the server closes the connection after its answer.
async fn read_answer(s: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_stream_request_with_content_length_and_transfer_encoding_is_refused() {
    let gw = TestGateway::start().await;
    for head in [
        "GET /stream?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET /stream?topic=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "GET /stream?topic=a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw.stream).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let answer = read_answer(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{head:?}: {answer}");
        assert!(answer.contains("\"invalid_framing\""), "{answer}");
        assert!(!answer.contains("text/event-stream"), "{answer}");
    }
    assert_eq!(gw.hub.client_count(), 0);
}

/// Issue 15, defect 8: half-sent PATCH heads hold at most
/// `--control-max-connections` sockets; the header timeout reclaims them,
/// so `/health` answers on a fresh connection, and the stream plane keeps
/// accepting throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_requests_cannot_starve_either_plane() {
    const CAP: usize = 20;
    const FLOOD: usize = 3 * CAP;
    let gw = BinaryGateway::start(&[
        "--control-max-connections",
        &CAP.to_string(),
        "--control-header-read-timeout",
        "1s",
    ])
    .await;
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let mut s = TcpStream::connect(gw.control).await.unwrap();
        s.write_all(b"PATCH /events HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            .await
            .unwrap();
        flood.push(s);
    }
    // The cap holds: the rest wait in the backlog, costing the gateway no
    // descriptor.
    eventually("the first connections accepted", || fds() >= before + CAP).await;
    assert!(fds() <= before + CAP + 2, "{} > {before} + {CAP}", fds());

    // The stream plane is untouched.
    let mut stream = SseClient::connect(&gw.stream_url("topic=f")).await;
    assert_eq!(stream.status, 200);

    // A probe on a fresh connection is served once the header timeout has
    // reclaimed the slots (the flood ahead of it in the backlog goes the
    // same way).
    let health = http()
        .get(gw.control_url("/health"))
        .timeout(WAIT)
        .send()
        .await
        .expect("/health answered despite the flood");
    assert_eq!(health.status(), 200);
    let res = http()
        .patch(gw.control_url("/events"))
        .json(&json!({"topic": "f", "data": "through"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(stream.next_event().await.unwrap().data, "through");

    // Every half-sent request was closed by the gateway.
    for mut s in flood {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a half-sent request is still open");
    }
    assert!(fds() <= before + 4, "slots returned: {} vs {before}", fds());
}

/// A body that trickles past `--control-body-read-timeout` gets 408 JSON
/// and a closed connection, however steadily it trickles.
#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_body_read_timeout() {
    let gw = TestGateway::start_with(&["--control-body-read-timeout", "700ms"]).await;
    let mut s = TcpStream::connect(gw.control).await.unwrap();
    s.write_all(
        b"PATCH /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{",
    )
    .await
    .unwrap();
    let trickle = async {
        // A byte every 200 ms: an idle timeout would never fire.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), trickle).await;
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
}

/// An `Idempotency-Key` that is not 1–255 visible ASCII characters is
/// refused before anything is read or published; in memory a retry gets
/// the first ids.
#[tokio::test]
async fn idempotency_keys_are_checked_and_honoured_in_memory() {
    let gw = TestGateway::start().await;
    let body = json!({"topic": "m", "data": 1});
    for bad in ["", "has space", &"k".repeat(256)] {
        let res = patch_events(gw.control, Some(bad), &body).await;
        expect_api_error(res, 400, "invalid_idempotency_key").await;
    }
    let mut sub = SseClient::connect(&gw.stream_url("topic=m")).await;
    let first = ids_of(patch_events(gw.control, Some("mem-1"), &body).await).await;
    let again = ids_of(patch_events(gw.control, Some("mem-1"), &body).await).await;
    assert_eq!(first, again);
    let res = patch_events(gw.control, Some("mem-1"), &json!({"topic": "m", "data": 2})).await;
    expect_api_error(res, 422, "idempotency_key_reused").await;
    gw.publish_one("m", "marker").await;
    let events = sub.events(2).await;
    assert_eq!(events[0].id.as_deref(), Some(first[0].as_str()));
    assert_eq!(events[1].data, "marker");
}

/// A replica killed with kill -9: its streams break (a network error, so
/// EventSource reconnects), the reconnect through nginx lands on the
/// survivor with `Last-Event-ID`, and what was published meanwhile arrives
/// from Redis, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_loses_a_reconnecting_client_nothing() {
    let mut c = common::nginx::Cluster::start().await;
    let url = c.nginx.url("/stream?topic=k9");
    let mut client = SseClient::connect(&url).await;
    let id = client.client_id().await;
    let holder = c.holder_of(&id).await;
    let survivor = &c.replicas[1 - holder];
    let survivor_control = survivor.control;
    let mut last = String::new();
    for i in 0..3 {
        let body = json!({"topic": "k9", "data": format!("before-{i}")});
        publish_to(&http(), survivor_control, &body).await;
        last = client.next_event().await.unwrap().id.unwrap();
    }

    c.replicas[holder].signal("KILL");
    assert!(!c.replicas[holder].wait_exit().await.success());
    let rest = client.until_end().await;
    assert!(rest.is_empty(), "no event after the kill: {rest:?}");
    let mut published = Vec::new();
    for i in 0..3 {
        let body = json!({"topic": "k9", "data": format!("after-{i}")});
        published.extend(publish_to(&http(), survivor_control, &body).await);
    }

    let mut again = SseClient::try_connect(&http(), &url, Some(&last)).await;
    assert_eq!(
        again.status, 200,
        "nginx sends the reconnect to the survivor"
    );
    let events = again.events(3).await;
    let ids: Vec<String> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids, published, "the missed events, in order, once");
}

/// `nginx -s reload`: open streams stay on the old worker, uninterrupted,
/// until they end; new streams go to the new worker. (The shipped config
/// under a master process, as nginx runs when deployed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nginx_reload_keeps_open_streams_flowing() {
    use common::nginx::{SHIPPED, render, temp_dir};
    let gw = TestGateway::start().await;
    let dir = temp_dir("nginx-reload");
    let port = common::redis::free_port();
    let d = dir.display();
    std::fs::create_dir_all(dir.join("temp")).unwrap();
    std::fs::create_dir_all(dir.join("streamline.d")).unwrap();
    std::fs::write(
        dir.join("streamline.conf"),
        render(SHIPPED, port, &[gw.stream], &[gw.control]),
    )
    .unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log notice;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/temp/cb;\n\
             proxy_temp_path {d}/temp/p;\n fastcgi_temp_path {d}/temp/f;\n\
             uwsgi_temp_path {d}/temp/u;\n scgi_temp_path {d}/temp/s;\n\
             include streamline.conf;\n}}\n"
        ),
    )
    .unwrap();
    let nginx = |args: &[&str]| {
        let mut cmd = std::process::Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(&dir);
        cmd.arg("-e").arg(dir.join("error.log")).args(args);
        cmd
    };
    let master = nginx(&["-g", "daemon off;"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nginx");
    // SIGTERM to the master stops its workers, old and new, before it exits
    // (SIGKILL would leave them running); then the directory goes.
    let _stop = scopeguard({
        let dir = dir.clone();
        move || {
            let mut master = master;
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &master.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + WAIT;
            while matches!(master.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = master.kill();
            let _ = master.wait();
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    eventually_async("nginx listens", || async {
        TcpStream::connect(addr).await.is_ok() && dir.join("nginx.pid").exists()
    })
    .await;
    let url = format!("http://{addr}/stream?topic=r");
    let mut open = SseClient::connect(&url).await;
    gw.publish_one("r", "e1").await;
    assert_eq!(open.next_event().await.unwrap().data, "e1");

    assert!(nginx(&["-s", "reload"]).status().unwrap().success());
    let log = dir.join("error.log");
    eventually("the old worker is shutting down gracefully", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("gracefully shutting down"))
    })
    .await;

    gw.publish_one("r", "e2").await;
    assert_eq!(open.next_event().await.unwrap().data, "e2", "same stream");
    let mut fresh = SseClient::connect(&url).await;
    gw.wait_clients(2).await;
    gw.publish_one("r", "e3").await;
    assert_eq!(open.next_event().await.unwrap().data, "e3");
    assert_eq!(fresh.next_event().await.unwrap().data, "e3");
}

/// An idle keep-alive connection on the control plane holds its slot no
/// longer than `--control-header-read-timeout`.
#[tokio::test]
async fn an_idle_keep_alive_control_connection_is_closed_at_the_header_timeout() {
    let gw = TestGateway::start_with(&["--control-header-read-timeout", "500ms"]).await;
    let mut s = TcpStream::connect(gw.control).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0; 512];
    let n = s.read(&mut answer).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200 "));
    // Then idle: the server closes it (read gives end of stream).
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .unwrap();
    assert!(rest.is_empty());
}
