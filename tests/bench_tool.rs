//! The `streamline-bench` binary against an in-process gateway: every
//! published event reaches every stream, once and in order, and the final
//! JSON line says so.

mod common;

use common::bench::{assert_delivered_in_full, bench_command, n, run_bench};
use common::*;
use serde_json::Value;

/// Runs the bench against `gw` with `extra` flags (split at spaces);
/// returns its JSON line.
async fn bench(gw: &TestGateway, extra: &str) -> Value {
    let url = format!("http://{}/stream?topic={{topic}}", gw.stream);
    let pub_url = gw.control_url("/events");
    let pid = std::process::id().to_string();
    let mut cmd = bench_command().await;
    cmd.args([
        "--url",
        &url,
        "--pub-url",
        &pub_url,
        "--pid",
        &pid,
        "--quiet",
    ])
    // No timing in these tests: a slow machine may delay events but
    // must not drop them, so the publisher may finish late and
    // deliveries may pause.
    .args(["--publish-grace", "120s", "--drain-quiet", "30s"])
    .args(extra.split_whitespace());
    run_bench(cmd).await
}

fn assert_no_loss(r: &Value, subscribers: u64) {
    assert_delivered_in_full(
        r,
        subscribers,
        &[
            "streams_failed",
            "missing",
            "duplicated",
            "out_of_order",
            "wrong_topic",
            "streams_ended",
        ],
    );
    assert_eq!(r["latency_us"]["count"], r["delivered"], "{r}");
}

#[tokio::test]
async fn every_event_reaches_every_stream() {
    let gw = TestGateway::start().await;
    let r = bench(
        &gw,
        "--subscribers 50 --rate 200 --duration 2 --label one-topic",
    )
    .await;
    assert_no_loss(&r, 50);
    assert_eq!(n(&r, "planned"), 400);
    assert_eq!(n(&r, "delivered"), 50 * 400);
    assert_eq!(r["label"], "one-topic");
    assert_eq!(r["publisher_mode"], "serial", "{r}");
    assert_eq!(n(&r, "publish_connections"), 1, "{r}");
    assert!(n(&r, "rss_idle_kib") > 0, "{r}");
    gw.shutdown().await;
}

#[tokio::test]
async fn topics_publishers_and_batches() {
    let gw = TestGateway::start().await;
    let flags = concat!(
        "--subscribers 30 --topics 3 --rate 300 --duration 1",
        " --publishers 2 --pub-batch 4 --size 40"
    );
    let r = bench(&gw, flags).await;
    assert_no_loss(&r, 30);
    assert_eq!(n(&r, "planned"), 300);
    // Ten streams on each topic, a third of the events each.
    assert_eq!(n(&r, "delivered"), 30 * 100);
    gw.shutdown().await;
}

/// As a publishing service with a connection pool: every event arrives
/// (events on different connections may overtake each other, so order is
/// not checked), at most --pool-max connections are used, and the report
/// says how it published.
#[tokio::test]
async fn pooled_publisher() {
    let gw = TestGateway::start().await;
    let flags = concat!(
        "--subscribers 20 --topics 2 --rate 200 --duration 1",
        " --publisher-mode pool --pool-max 2 --stamp due"
    );
    let r = bench(&gw, flags).await;
    assert_eq!(n(&r, "streams_open"), 20, "{r}");
    assert_eq!(n(&r, "published"), 200, "{r}");
    for key in ["missing", "duplicated", "wrong_topic", "streams_ended"] {
        assert_eq!(n(&r, key), 0, "{key}: {r}");
    }
    assert_eq!(n(&r, "delivered"), 20 * 100, "{r}");
    assert_eq!(r["publisher_mode"], "pool", "{r}");
    assert_eq!(r["pool_max"], 2, "{r}");
    assert_eq!(r["stamp"], "due", "{r}");
    assert!((1..=2).contains(&n(&r, "publish_connections")), "{r}");
    assert_eq!(r["publish_delay_us"]["count"], 200, "{r}");
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_streams_only() {
    let gw = TestGateway::start().await;
    let r = bench(&gw, "--subscribers 20 --idle-only --duration 0.2").await;
    assert_eq!(n(&r, "streams_open"), 20);
    assert_eq!(n(&r, "planned"), 0);
    assert_eq!(n(&r, "published"), 0);
    assert_eq!(n(&r, "streams_ended"), 0);
    assert!(r["rss_per_idle_stream_kib"].is_number(), "{r}");
    gw.shutdown().await;
}
