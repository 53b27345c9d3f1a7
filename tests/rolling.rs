//! Rolling restarts behind the shipped nginx config (deploy/nginx), with
//! real replicas on one real Redis and readers that behave like a browser's
//! `EventSource`: they reconnect with `Last-Event-ID` when a stream ends,
//! wait the last `retry:` first, and give up for good on any answer that is
//! not `200 text/event-stream` — so such an answer fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::nginx::{Cluster, Outcome, split_attempts};
use common::*;
use serde_json::{Value, json};

/// What one `EventSource`-like reader saw, until the event whose data is
/// [`END`].
#[derive(Debug, Default)]
struct Seen {
    /// (id, data) of every message event, in arrival order.
    events: Vec<(String, String)>,
    /// Streams that ended (each followed by a reconnect).
    reconnects: usize,
    /// 200 event streams that ended without the gateway's preamble: nginx
    /// saying that no replica could take the stream.
    come_backs: usize,
    gaps: Vec<SseEvent>,
}

/// The data of the last event published; readers stop when they get it.
const END: &str = "end";

/// Reads `url` as `EventSource` does, until the [`END`] event. Counts the
/// message events it receives in `progress`, and the come-back answers in
/// `come_backs`.
async fn read_like_eventsource(
    url: String,
    progress: Arc<AtomicUsize>,
    come_backs: Arc<AtomicUsize>,
) -> Seen {
    let http = http();
    let mut seen = Seen::default();
    let mut last_id: Option<String> = None;
    // EventSource's default, until the server says otherwise.
    let mut retry = Duration::from_millis(3000);
    loop {
        let mut s = SseClient::try_connect(&http, &url, last_id.as_deref()).await;
        let ct = s
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        // What a browser treats as final: it would never reconnect.
        assert_eq!(s.status, 200, "FATAL for EventSource: status {}", s.status);
        assert!(
            ct.starts_with("text/event-stream"),
            "FATAL for EventSource: content-type {ct:?}"
        );
        let mut preamble = false;
        while let Some(item) = s.next_item().await {
            match item {
                Item::Retry(ms) => retry = Duration::from_millis(ms),
                Item::Comment(c) => preamble |= c.starts_with("client "),
                Item::Event(e) => {
                    if let Some(id) = &e.id {
                        last_id = Some(id.clone());
                    }
                    match e.event.as_str() {
                        "message" => {
                            let id = e.id.clone().expect("events have ids");
                            if e.data == END {
                                return seen;
                            }
                            seen.events.push((id, e.data));
                            progress.fetch_add(1, Ordering::SeqCst);
                        }
                        "streamline.gap" => seen.gaps.push(e),
                        "streamline.close" => {}
                        other => panic!("unexpected event {other}: {e:?}"),
                    }
                }
            }
        }
        if !preamble {
            seen.come_backs += 1;
            come_backs.fetch_add(1, Ordering::SeqCst);
        }
        seen.reconnects += 1;
        // The reconnection delay EventSource waits, as the server set it.
        tokio::time::sleep(retry).await;
    }
}

/// Publishes `e0`, `e1`, … on `topic` through nginx about every 20 ms until
/// `stop`, then [`END`]. While a replica is up nginx must never say there
/// is none (`503 no_replica`).
async fn publish_until(
    nginx: std::net::SocketAddr,
    topic: &'static str,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, Outcome> {
    let http = http();
    let mut attempts = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0.. {
        tick.tick().await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let data = format!("e{i}");
        let outcome = publish_once(&http, nginx, topic, &data).await;
        attempts.insert(data, outcome);
    }
    // The end marker must get through: a failed attempt is sent again.
    while !matches!(
        publish_once(&http, nginx, topic, END).await,
        Outcome::Accepted(_)
    ) {}
    attempts
}

async fn publish_once(
    http: &reqwest::Client,
    nginx: std::net::SocketAddr,
    topic: &str,
    data: &str,
) -> Outcome {
    let res = http
        .patch(format!("http://{nginx}/events"))
        .json(&json!({"topic": topic, "data": data}))
        .send()
        .await
        .expect("nginx answers");
    let status = res.status().as_u16();
    let body: Value = res.json().await.expect("a JSON answer");
    match status {
        202 => Outcome::Accepted(body["ids"][0].as_str().unwrap().to_owned()),
        502 if body["error"] == "replica_failed" => Outcome::Unknown,
        s => panic!("PATCH through nginx while a replica is up: {s} {body}"),
    }
}

/// Opens `n` new streams through nginx, one after the other (each must be
/// a 200 event stream with the gateway's preamble); returns them and their
/// client ids.
async fn open_fresh(c: &Cluster, n: usize) -> (Vec<SseClient>, BTreeSet<String>) {
    let mut streams = Vec::new();
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        let mut s = SseClient::connect(&c.nginx.url("/stream?topic=fresh")).await;
        ids.insert(s.client_id().await);
        streams.push(s);
    }
    (streams, ids)
}

/// How many of the streams `ids` replica `i` holds.
async fn held_by(c: &Cluster, i: usize, ids: &BTreeSet<String>) -> usize {
    let listed = get_json(&c.replicas[i].control_url("/clients")).await;
    listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cl| ids.contains(cl["id"].as_str().unwrap()))
        .count()
}

/// Waits until `counter` has reached `n`.
async fn reach(what: &str, counter: &AtomicUsize, n: usize) {
    eventually(what, || counter.load(Ordering::SeqCst) >= n).await;
}

/// `n` replicas behind nginx, restarted one at a time in `order` (SIGTERM,
/// wait for exit, start on the same ports, wait for `/ready`), while
/// `EventSource`-like readers read a topic published to through nginx.
async fn rolling_restart(n: usize, order: &[usize]) {
    const READERS: usize = 4;
    let mut c = Cluster::start_n(n, &[], &[]).await;
    let url = c.nginx.url("/stream?topic=roll");
    let progress = Arc::new(AtomicUsize::new(0));
    let come_backs = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            tokio::spawn(read_like_eventsource(
                url.clone(),
                progress.clone(),
                come_backs.clone(),
            ))
        })
        .collect();
    // Every reader has its stream before the first event.
    eventually_async("every reader is streaming", || async {
        let mut open = 0;
        for r in &c.replicas {
            let v = get_json(&r.control_url("/clients?topic=roll")).await;
            open += v["clients"].as_array().unwrap().len();
        }
        open == READERS
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(c.nginx.addr, "roll", stop.clone()));
    reach("events flow", &progress, READERS * 10).await;

    for &i in order {
        c.stop(i).await;
        // New clients arriving meanwhile get streams from the replicas that
        // are up (nginx tries the stopped one too, in its turn).
        drop(open_fresh(&c, 2 * n).await);
        c.restart(i).await;
        // The restarted replica takes its share of new streams again (with
        // passive health checks it stayed marked failed and got none).
        let (fresh, ids) = open_fresh(&c, 3 * n).await;
        let on_it = held_by(&c, i, &ids).await;
        drop(fresh);
        assert!(
            on_it >= 2,
            "replica {i} got {on_it} of {} new streams after its restart",
            3 * n
        );
        // Events flow to every reader before the next replica goes.
        let now = progress.load(Ordering::SeqCst);
        reach("events flow again", &progress, now + READERS * 10).await;
    }
    stop.store(true, Ordering::SeqCst);
    let attempts = publisher.await.unwrap();
    let (acked, unknown) = split_attempts(&attempts);

    let mut total_reconnects = 0;
    for reader in readers {
        let seen = reader.await.expect("no answer EventSource treats as final");
        assert!(seen.gaps.is_empty(), "no gap: {:?}", seen.gaps);
        assert_eq!(seen.come_backs, 0, "a replica was up all along");
        let ids: Vec<&str> = seen.events.iter().map(|(id, _)| id.as_str()).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "no event twice");
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| position(id));
        assert_eq!(ids, sorted, "events in publication order");
        for (id, data) in &seen.events {
            match acked.get(id.as_str()) {
                Some(want) => assert_eq!(data, want, "event {id}"),
                None => assert!(unknown.contains(data.as_str()), "{id} ({data}) unpublished"),
            }
        }
        let lost: Vec<_> = acked.keys().filter(|id| !unique.contains(*id)).collect();
        assert!(lost.is_empty(), "lost: {lost:?}");
        total_reconnects += seen.reconnects;
    }
    // Each drain ended the streams of the replica it stopped: every reader
    // was on one of them at least once.
    assert!(total_reconnects >= READERS, "{total_reconnects} reconnects");
    eprintln!(
        "{n} replicas, {} drains: {} events acked, {} of unknown outcome, {} reconnects",
        order.len(),
        acked.len(),
        unknown.len(),
        total_reconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_restarted_a_b_a_lose_no_reader_and_no_event() {
    rolling_restart(2, &[0, 1, 0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_restarted_in_turn_lose_no_reader_and_no_event() {
    rolling_restart(3, &[2, 0, 1]).await;
}

/// Reads a whole answer through nginx: (status, headers, body).
async fn get_all(url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let res = tokio::time::timeout(WAIT, http().get(url).send())
        .await
        .expect("an answer in time")
        .expect("nginx answers");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    // The body ends at once: this does not wait for a stream.
    let body = tokio::time::timeout(WAIT, res.text())
        .await
        .expect("the body ends")
        .unwrap();
    (status, headers, body)
}

/// nginx's answer to a stream request no replica takes: a 200 event stream
/// carrying `retry:` that ends at once, so EventSource comes back.
async fn assert_come_back(nginx: &common::nginx::Nginx, what: &str) {
    let (status, headers, body) = get_all(&nginx.url("/stream?topic=a")).await;
    assert_eq!(status, 200, "{what}: {body}");
    assert_eq!(headers["content-type"], "text/event-stream", "{what}");
    assert_eq!(headers["cache-control"], "no-store", "{what}");
    assert!(
        body.lines().any(|l| l.starts_with("retry: ")),
        "{what}: {body}"
    );
    assert!(!body.contains("data:"), "{what}: no event: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replica_up_nginx_tells_clients_to_come_back() {
    // A long drain window: the replica still refuses new streams (503
    // shutting_down) while it closes its two streams, 10 s apart.
    let mut c = Cluster::start_n(2, &["--drain-window", "20s", "--grace-period", "30s"], &[]).await;
    c.stop(1).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = SseClient::connect(&c.replicas[0].stream_url("topic=held")).await;
        s.client_id().await;
        held.push(s);
    }

    // One replica stopped, the other draining.
    c.replicas[0].signal("TERM");
    c.replicas[0].wait_log("draining").await;
    let res = http()
        .get(c.replicas[0].stream_url("topic=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503, "the replica itself refuses new streams");
    assert_come_back(&c.nginx, "one stopped, one draining").await;
    // Its control plane still serves while it drains.
    let ids = publish_to(
        &http(),
        c.nginx.addr,
        &json!({"topic": "a", "data": "while draining"}),
    )
    .await;
    assert_eq!(ids.len(), 1);

    // None at all.
    c.replicas[0].child.start_kill().unwrap();
    c.replicas[0].wait_exit().await;
    drop(held);
    assert_come_back(&c.nginx, "none running").await;
    for (method, path) in [
        (reqwest::Method::PATCH, "/events"),
        (reqwest::Method::GET, "/topics"),
        (reqwest::Method::GET, "/clients"),
    ] {
        let res = http()
            .request(method.clone(), c.nginx.url(path))
            .json(&json!({"topic": "a", "data": "nobody"}))
            .send()
            .await
            .unwrap();
        let retry_after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1, "{method} {path}");
        expect_api_error(res, 503, "no_replica").await;
    }

    // A reader that arrives meanwhile keeps coming back, and streams once
    // a replica is up again.
    let (progress, come_backs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = tokio::spawn(read_like_eventsource(
        c.nginx.url("/stream?topic=back"),
        progress.clone(),
        come_backs.clone(),
    ));
    reach("the reader was told to come back", &come_backs, 2).await;
    c.restart(0).await;
    let http = http();
    // Published until the reader has one (it may still be waiting out
    // `retry:` when the first goes out).
    let mut n = 0;
    while progress.load(Ordering::SeqCst) == 0 {
        let body = json!({"topic": "back", "data": format!("b{n}")});
        publish_to(&http, c.nginx.addr, &body).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(n < 400, "the reader never streamed again");
    }
    publish_to(&http, c.nginx.addr, &json!({"topic": "back", "data": END})).await;
    let seen = reader.await.expect("no answer EventSource treats as final");
    assert!(seen.come_backs >= 2, "{seen:?}");
    assert!(seen.gaps.is_empty(), "{seen:?}");
}
