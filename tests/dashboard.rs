//! deploy/grafana/streamline.json against what the gateway exports: every
//! metric a panel queries is on `/metrics` (a replica on a real Redis; the
//! Kafka bus's figures from the same renderer with its collector), and the
//! file is a dashboard Grafana can import.
//!
//! It needs both buses' metrics: a build without them has other panels.
#![cfg(all(feature = "kafka", feature = "redis"))]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::redis::RedisServer;
use common::*;
use serde_json::Value;
use streamline::backend::kafka::KafkaStats;
use streamline::hub::{Hub, HubConfig};
use streamline::metrics::Metrics;

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/streamline.json"
    );
    let text = std::fs::read_to_string(path).expect("deploy/grafana/streamline.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every query of every panel.
fn exprs(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// The series names an exposition declares: `name` for a gauge,
/// `name_total` for a counter, `_bucket`/`_sum`/`_count` for a histogram.
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' '))
        else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// The `streamline_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("streamline_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let redis = RedisServer::start().await;
    let gw = TestGateway::start_with(&["--redis-url", &redis.url()]).await;
    let res = http().get(gw.control_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut names = exported(&res.text().await.unwrap());
    // The Kafka bus's collector, rendered as /metrics renders it.
    let mut kafka = Metrics::new(Hub::new(HubConfig::default()));
    kafka.register_kafka(Arc::new(KafkaStats::default()));
    names.extend(exported(&kafka.render()));

    let dash = dashboard();
    let mut queried = BTreeSet::new();
    for expr in exprs(&dash) {
        let found = metric_names(&expr);
        assert!(!found.is_empty(), "a query on no Streamline metric: {expr}");
        queried.extend(found);
    }
    let missing: Vec<&String> = queried.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard but not exported: {missing:?}"
    );
    // And it covers what operators look at first.
    for needed in [
        "streamline_clients_connected",
        "streamline_events_delivered_total",
        "streamline_patch_latency_seconds_bucket",
        "streamline_slow_clients_disconnected_total",
        "streamline_clients_by_lag",
        "streamline_topic_events_published_total",
        "streamline_backend_up",
        "streamline_lifecycle_phase",
        "streamline_drain_closed_total",
    ] {
        assert!(queried.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn the_dashboard_is_importable() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "streamline");
    assert!(dash["title"].is_string());
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    // The data source is a variable, so the import asks for nothing else.
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource")
    );
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{} fits the 24-column grid", panel["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    panel["title"]
                );
            }
        }
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}");
            assert!(!panel["targets"].as_array().unwrap().is_empty());
        }
    }
}
