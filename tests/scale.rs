//! Issue 17's scenario in small: the streams of one run spread over load
//! worker processes (`streamline-bench --workers`) and over several
//! replicas sharing a Redis bus, one publisher, one merged report. Checks
//! that every stream opened, that every event reached every stream once
//! across replicas, and that every replica served its share; no timing.

mod common;

use common::bench::{bench_command, run_bench};
use common::redis::RedisServer;
use common::*;
use serde_json::Value;

const REPLICAS: usize = 3;
const STREAMS: u64 = 3_000;
const WORKERS: u64 = 2;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_workers_and_replicas_each_get_every_event_once() {
    let redis = RedisServer::start().await;
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        let id = format!("replica-{i}");
        replicas
            .push(BinaryGateway::start(&["--redis-url", &redis.url(), "--replica-id", &id]).await);
    }
    let join = |f: &dyn Fn(&BinaryGateway) -> String| -> String {
        replicas.iter().map(f).collect::<Vec<_>>().join(",")
    };
    let urls = join(&|r| format!("http://{}/stream?topic={{topic}}", r.stream));
    let pids = join(&|r| r.pid().to_string());
    let (streams, workers) = (STREAMS.to_string(), WORKERS.to_string());
    let bus_pid = redis.pid().to_string();
    let args = [
        "--url",
        &urls,
        "-n",
        &streams,
        "--workers",
        &workers,
        "--topics",
        "3",
        "--rate",
        "20",
        "--duration",
        "1",
        "--pid",
        &pids,
        "--bus-pid",
        &bus_pid,
        // Streams come from two source addresses, so their spreading is
        // exercised too.
        "--source-addrs",
        "2",
        "--quiet",
        // No timing: a slow machine may delay events but must not lose them.
        "--publish-grace",
        "120s",
        "--drain-quiet",
        "30s",
    ];
    let pub_url = replicas[0].control_url("/events");
    let mut cmd = bench_command().await;
    cmd.args(args).args(["--pub-url", &pub_url]);
    let r = run_bench(cmd).await;

    assert_eq!(n(&r, "workers"), WORKERS, "{r}");
    assert_eq!(n(&r, "streams_open"), STREAMS, "{r}");
    assert_eq!(n(&r, "streams_failed"), 0, "{r}");
    assert!(n(&r, "published") > 0, "{r}");
    assert_eq!(n(&r, "published"), n(&r, "planned"), "{r}");
    assert_eq!(
        n(&r, "expected_deliveries"),
        n(&r, "published") * STREAMS / 3,
        "{r}"
    );
    assert_eq!(n(&r, "delivered"), n(&r, "expected_deliveries"), "{r}");
    for key in [
        "missing",
        "duplicated",
        "out_of_order",
        "wrong_topic",
        "fatal",
    ] {
        assert_eq!(n(&r, key), 0, "{key}: {r}");
    }
    // The workers' histograms merged: one latency per delivery.
    assert_eq!(r["latency_us"]["count"], r["delivered"], "{r}");
    let servers = r["servers"].as_array().expect("one entry per replica");
    assert_eq!(servers.len(), REPLICAS, "{r}");
    for s in servers {
        assert!(s["rss_idle_kib"].as_u64().is_some_and(|v| v > 0), "{r}");
        assert!(s["cpu_s"].as_f64().is_some(), "{r}");
    }
    assert_eq!(r["bus"]["pid"], redis.pid(), "{r}");
    assert!(
        r["bus"]["rss_idle_kib"].as_u64().is_some_and(|v| v > 0),
        "{r}"
    );

    // Each replica served its share of the streams (the bench deals each
    // topic's streams round the replicas), and between them they wrote
    // every delivery, though every event was published on one replica.
    let mut written = 0;
    for (i, gw) in replicas.iter().enumerate() {
        let share = (0..STREAMS)
            .filter(|g| (g / 3) % REPLICAS as u64 == i as u64)
            .count();
        let page = get_text(&gw.control_url("/metrics")).await;
        assert_eq!(
            metric(&page, "streamline_connections_opened_total"),
            share as u64,
            "replica {i}: {page}"
        );
        written += metric(&page, "streamline_events_delivered_total");
    }
    assert_eq!(written, n(&r, "delivered"), "{r}");
}
