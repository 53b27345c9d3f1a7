//! deploy/nginx/streamline.conf in front of two real `streamline` replicas
//! sharing a real `redis-server`: events flow through it unbuffered, the
//! operations endpoints stay private, and a replica drained mid-stream loses
//! a reconnecting client nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::nginx::{Cluster, Outcome, SHIPPED, render, split_attempts};
use common::*;
use serde_json::{Value, json};

#[test]
fn the_test_config_differs_from_the_shipped_one_only_in_addresses() {
    let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
    let out = render(SHIPPED, 9, &[a, b], &[a]);
    assert!(out.contains("listen 127.0.0.1:9;"));
    assert!(out.contains("server 127.0.0.1:1001 max_fails=0;"));
    assert!(out.contains("server 127.0.0.1:1002 max_fails=0;"));
    assert!(!out.contains("streamline-1:"), "{out}");
    let rest = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                let t = l.trim_start();
                !t.starts_with("server ") && !t.starts_with("listen ")
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rest(&out), rest(SHIPPED), "nothing else changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_through_nginx_and_operations_endpoints_stay_private() {
    let c = Cluster::start().await;
    let http = http();

    // Asking for gzip changes nothing: a stream is never compressed.
    let res = http
        .get(c.nginx.url("/stream?topic=live"))
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert!(res.headers().get("content-encoding").is_none());
    drop(res);

    let mut client = SseClient::connect(&c.nginx.url("/stream?topic=live")).await;
    client.client_id().await;
    // Published through nginx too; it arrives while the stream stays open,
    // so nothing holds it back in a buffer.
    let ids = publish_to(
        &http,
        c.nginx.addr,
        &json!({"topic": "live", "data": "through nginx"}),
    )
    .await;
    let ev = client.next_event().await.expect("the stream stays open");
    assert_eq!(ev.id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(ev.data, "through nginx");

    let topics = get_json(&c.nginx.url("/topics")).await;
    assert!(
        topics["topics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "live")
    );
    let clients = c.nginx.url("/clients?scope=cluster");
    eventually_async("the cluster lists the stream", || async {
        get_json(&clients).await["clients"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;

    for path in ["/metrics", "/health", "/ready"] {
        let res = http.get(c.nginx.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 403, "{path} through nginx");
    }
    for replica in &c.replicas {
        let health = get_json(&replica.control_url("/health")).await;
        assert_eq!(health["status"], "ok");
        let res = http
            .get(replica.control_url("/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "/metrics on the replica itself");
    }
    let res = http.get(c.nginx.url("/elsewhere")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    // nginx refuses what the gateway would refuse (--max-body, 1 MiB), from
    // the headers alone.
    let head = raw_request(
        c.nginx.addr,
        "PATCH /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 1048577\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
}

/// Sends `request` (head only) and returns the response's status line.
async fn raw_request(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(WAIT, tokio::io::BufReader::new(stream).read_line(&mut line))
        .await
        .expect("an answer in time")
        .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_drained_mid_stream_loses_a_reconnecting_client_nothing() {
    let mut c = Cluster::start().await;
    let url = c.nginx.url("/stream?topic=drain");
    let mut client = SseClient::connect(&url).await;
    let first_id = client.client_id().await;
    let holder = c.holder_of(&first_id).await;

    // Publishes through nginx until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, nginx) = (stop.clone(), c.nginx.addr);
        tokio::spawn(async move {
            let http = http();
            let mut attempts = BTreeMap::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let data = format!("e{i}");
                let res = http
                    .patch(format!("http://{nginx}/events"))
                    .json(&json!({"topic": "drain", "data": data}))
                    .send()
                    .await
                    .expect("nginx answers");
                let outcome = match res.status().as_u16() {
                    202 => {
                        let v: Value = res.json().await.unwrap();
                        Outcome::Accepted(v["ids"][0].as_str().unwrap().to_owned())
                    }
                    502 => Outcome::Unknown,
                    s => panic!("PATCH through nginx: {s}"),
                };
                attempts.insert(data, outcome);
            }
            attempts
        })
    };

    // Read like EventSource: on stream end, reconnect (through nginx) with
    // the last id seen.
    let mut received: Vec<(String, String)> = Vec::new();
    let mut close_notices = Vec::new();
    let (mut reconnects, mut after_reconnect, mut signalled) = (0, 0, false);
    while !stop.load(Ordering::Relaxed) {
        match client.next_event().await {
            Some(e) if e.event == "message" => {
                received.push((e.id.expect("events have ids"), e.data));
                if reconnects > 0 {
                    after_reconnect += 1;
                }
            }
            Some(e) => close_notices.push(e),
            None => {
                let last = received.last().map(|(id, _)| id.as_str());
                client = SseClient::try_connect(&http(), &url, last).await;
                assert_eq!(
                    client.status, 200,
                    "nginx sends a reconnect to a replica that takes it"
                );
                reconnects += 1;
            }
        }
        if !signalled && received.len() >= 20 {
            c.replicas[holder].signal("TERM");
            signalled = true;
        }
        // Keep publishing until the drained replica is gone altogether (its
        // control plane too: nginx must send the PATCHes elsewhere).
        let exited = c.replicas[holder].child.try_wait().unwrap().is_some();
        if after_reconnect >= 20 && exited {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let attempts = publisher.await.unwrap();
    assert!(
        c.replicas[holder].wait_exit().await.success(),
        "the drained replica exits cleanly"
    );

    let (acked, unknown) = split_attempts(&attempts);
    // The events published after the reader stopped are still on their way.
    let mut seen: BTreeSet<String> = received.iter().map(|(id, _)| id.clone()).collect();
    while acked.keys().any(|id| !seen.contains(*id)) {
        match client.next_event().await {
            Some(e) if e.event == "message" => {
                let id = e.id.expect("events have ids");
                seen.insert(id.clone());
                received.push((id, e.data));
            }
            Some(e) => close_notices.push(e),
            None => panic!("the surviving replica ended the stream"),
        }
    }

    assert!(reconnects >= 1, "the stream was ended by the drain");
    assert!(
        close_notices
            .iter()
            .any(|e| e.event == "streamline.close" && e.data.contains("shutdown")),
        "the drained stream got a close notice: {close_notices:?}"
    );
    let ids: Vec<&str> = received.iter().map(|(id, _)| id.as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice: {ids:?}");
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| position(id));
    assert_eq!(ids, sorted, "events in publication order");
    for (id, data) in &received {
        match acked.get(id.as_str()) {
            Some(want) => assert_eq!(data, want, "event {id}"),
            None => assert!(
                unknown.contains(data.as_str()),
                "{id} ({data}) was never published"
            ),
        }
    }
    let missing: Vec<_> = acked.keys().filter(|id| !unique.contains(*id)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    eprintln!(
        "{} events, {} reconnects, {} publishes of unknown outcome",
        received.len(),
        reconnects,
        unknown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_come_back_server_answers_an_event_stream_that_ends() {
    // ingress-nginx sends it the stream requests no pod took, path
    // rewritten to `/`, with the code in X-Code.
    let conf = include_str!("../deploy/k8s/base/come-back.conf");
    let nginx = common::nginx::Nginx::start_conf(conf).await;
    for code in ["502", "503", "504"] {
        let res = http()
            .get(nginx.url("/"))
            .header("x-code", code)
            .header("x-original-uri", "/stream?topic=a")
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "X-Code {code}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-store");
        // The body ends: this returns.
        let body = res.text().await.unwrap();
        assert!(body.contains("\nretry: 1000\n\n"), "{body:?}");
        assert!(!body.contains("data:"), "no event: {body:?}");
    }
}
