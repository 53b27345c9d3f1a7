//! The control plane over real sockets: publishing, its bad-input matrix, and
//! the operator endpoints (`/health`, `/ready`, `/clients`, `/topics`,
//! `/metrics`).

mod common;

use common::*;
use serde_json::{Value, json};

async fn patch(
    gw: &TestGateway,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = http().patch(gw.control_url("/events")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    req.send().await.expect("PATCH /events")
}

#[tokio::test]
async fn patch_answers_202_with_the_ids_in_order() {
    let gw = TestGateway::start().await;
    let one = gw.publish(json!({"topic": "a", "data": "x"})).await;
    assert_eq!(one.len(), 1);
    assert!(one[0].starts_with("a:"), "{one:?}");

    let topics = ["b", "a", "b", "c", "a"];
    let batch: Vec<Value> = topics
        .iter()
        .map(|t| json!({"topic": t, "data": 1}))
        .collect();
    let ids = gw.publish(Value::Array(batch)).await;
    assert_eq!(ids.len(), topics.len());
    let (epoch, mut last) = position(&one[0]);
    for (id, topic) in ids.iter().zip(topics) {
        assert!(id.starts_with(&format!("{topic}:")), "{id} is on {topic}");
        let (hi, lo) = position(id);
        assert_eq!(hi, epoch);
        assert!(lo > last, "ids ascend in batch order: {ids:?}");
        last = lo;
    }

    // A charset parameter and any letter case are still JSON.
    let res = patch(
        &gw,
        Some("Application/JSON; charset=utf-8"),
        r#"{"topic":"a","data":2}"#,
    )
    .await;
    assert_eq!(res.status(), 202);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    assert!(position(v["ids"][0].as_str().unwrap()).1 > last);
}

/// One `PATCH /events` the control plane must refuse.
struct Rejected {
    content_type: Option<&'static str>,
    body: String,
    status: u16,
    code: &'static str,
    /// Everything the detail must mention (the field, the problem).
    detail_has: &'static [&'static str],
}

const JSON: &str = "invalid_json";
const EVENT: &str = "invalid_event";

/// A JSON body rejected with 400.
fn bad(body: impl Into<String>, code: &'static str, has: &'static [&'static str]) -> Rejected {
    Rejected {
        content_type: Some("application/json"),
        body: body.into(),
        status: 400,
        code,
        detail_has: has,
    }
}

/// A batch whose first event is good and second is `event`: one bad event
/// holds back the whole batch.
fn bad_second(event: &str, has: &'static [&'static str]) -> Rejected {
    bad(
        format!(r#"[{{"topic":"ok","data":"good"}},{event}]"#),
        EVENT,
        has,
    )
}

const GOOD: &str = r#"{"topic":"ok","data":1}"#;

/// A good event sent with the wrong content type.
fn bad_type(content_type: Option<&'static str>) -> Rejected {
    Rejected {
        content_type,
        status: 415,
        ..bad(GOOD, "unsupported_media_type", &["application/json"])
    }
}

#[tokio::test]
async fn bad_patches_are_rejected_with_a_detail_and_publish_nothing() {
    let gw = TestGateway::start_with(&["--max-body", "1024"]).await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=ok")).await;
    sub.client_id().await;

    let long_topic = format!(r#"{{"topic":"{}","data":1}}"#, "t".repeat(129));
    let long_event = format!(r#"{{"topic":"ok","event":"{}","data":1}}"#, "e".repeat(129));
    let too_big = format!(r#"[{{"topic":"ok","data":"{}"}}]"#, "x".repeat(1100));
    let cases = [
        // Not JSON, or not events at all.
        bad(r#"{"topic":"#, JSON, &["EOF"]),
        bad("not json", JSON, &["JSON"]),
        bad("", JSON, &["JSON"]),
        bad("42", JSON, &["object"]),
        bad(r#""a string""#, JSON, &["object"]),
        bad(r#"[{"topic":"ok","data":1},]"#, JSON, &[]),
        bad("[]", EVENT, &["empty"]),
        bad("[1]", EVENT, &["[0]", "invalid type"]),
        // Wrong types.
        bad(r#"{"topic":5,"data":1}"#, EVENT, &["topic", "invalid type"]),
        bad(
            r#"{"topic":"ok","event":7,"data":1}"#,
            EVENT,
            &["event", "invalid type"],
        ),
        bad_second(
            r#"{"topic":["ok"],"data":1}"#,
            &["[1].topic", "invalid type"],
        ),
        // Missing and unknown fields.
        bad(r#"{"data":1}"#, EVENT, &["missing field `topic`"]),
        bad(r#"{"topic":"ok"}"#, EVENT, &["missing field `data`"]),
        bad_second(r#"{"topic":"ok"}"#, &["[1]", "missing field `data`"]),
        bad_second(
            r#"{"topic":"ok","data":1,"x":0}"#,
            &["[1]", "unknown field `x`"],
        ),
        // Values the gateway cannot carry.
        bad(r#"{"topic":"","data":1}"#, EVENT, &["topic", "empty"]),
        bad(long_topic, EVENT, &["topic", "128"]),
        bad_second(r#"{"topic":"a b","data":1}"#, &["[1].topic", "character"]),
        bad_second(r#"{"topic":"a:b","data":1}"#, &["[1].topic"]),
        bad_second(
            r#"{"topic":"ok","event":"a\nb","data":1}"#,
            &["[1].event", "CR or LF"],
        ),
        bad(
            r#"{"topic":"ok","event":"a\rb","data":1}"#,
            EVENT,
            &["event", "CR or LF"],
        ),
        bad(long_event, EVENT, &["event", "128"]),
        // Size and content type.
        Rejected {
            status: 413,
            ..bad(too_big, "payload_too_large", &[])
        },
        bad_type(None),
        bad_type(Some("text/plain")),
        bad_type(Some("application/jsonl")),
        bad_type(Some("application/x-www-form-urlencoded")),
    ];
    for case in cases {
        let what = format!("{:?} {:?}", case.content_type, case.body);
        let res = patch(&gw, case.content_type, case.body).await;
        let detail = expect_api_error(res, case.status, case.code).await;
        for part in case.detail_has {
            assert!(
                detail.contains(part),
                "{what}: detail {detail:?} should mention {part:?}"
            );
        }
    }

    // Nothing was published: no topic but the subscriber's exists, it holds
    // no event, and the subscriber's first event is the one sent next.
    let topics = get_json(&gw.control_url("/topics")).await;
    assert_eq!(
        topics["topics"],
        json!([{"name": "ok", "subscribers": 1, "events_published": 0, "last_event_id": null}])
    );
    let id = gw.publish_one("ok", "first").await;
    let ev = sub.next_event().await.unwrap();
    assert_eq!((ev.id, ev.data.as_str()), (Some(id), "first"));
}

#[tokio::test]
async fn health_and_readiness() {
    let gw = TestGateway::start().await;
    // Other fields may join `status`; its value is the contract.
    let health = get_json(&gw.control_url("/health")).await;
    assert_eq!(health["status"], "ok", "{health}");
    let ready = get_json(&gw.control_url("/ready")).await;
    assert_eq!(ready["status"], "ready", "{ready}");
}

/// The exact bytes a stream wrote: its preamble and these events.
fn bytes_written(client_id: &str, events: &[SseEvent]) -> u64 {
    let preamble = format!("retry: 2000\n: client {client_id}\n\n").len();
    let frames: usize = events
        .iter()
        .map(|e| format!("id: {}\ndata: {}\n\n", e.id.as_ref().unwrap(), e.data).len())
        .sum();
    (preamble + frames) as u64
}

#[tokio::test]
async fn clients_lists_every_stream_with_its_details() {
    // No heartbeat may add to the exact byte counts below.
    let gw = TestGateway::start_with(&["--heartbeat", "1h"]).await;
    let with_agent = reqwest::Client::builder()
        .user_agent("streamline-test/1.0")
        .build()
        .unwrap();
    let mut reader =
        SseClient::connect_with(&with_agent, &gw.stream_url("topic=a&topic=b"), None).await;
    let reader_id = reader.client_id().await;
    let mut idle = SseClient::connect(&gw.stream_url("topic=c")).await;
    let idle_id = idle.client_id().await;
    gw.publish_one("a", "one").await;
    gw.publish_one("b", "two").await;
    let got = reader.events(2).await;

    let list = get_json(&gw.control_url("/clients")).await;
    let list = list["clients"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let find = |id: &str| {
        list.iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} listed"))
    };
    let (r, i) = (find(&reader_id), find(&idle_id));

    let mut keys: Vec<_> = r.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bytes_sent",
            "client_ip",
            "connected_at",
            "events_sent",
            "id",
            "lag",
            "protocol",
            "remote_addr",
            "topics",
            "user_agent"
        ]
    );
    assert_eq!(r["topics"], json!(["a", "b"]));
    assert_eq!(i["topics"], json!(["c"]));
    for c in [&r, &i] {
        let addr: std::net::SocketAddr = c["remote_addr"].as_str().unwrap().parse().unwrap();
        assert!(addr.ip().is_loopback(), "{c}");
        // No trusted proxy: the client is the TCP peer.
        assert_eq!(c["client_ip"], addr.ip().to_string());
        humantime::parse_rfc3339(c["connected_at"].as_str().unwrap())
            .expect("connected_at is RFC 3339");
        assert_eq!(c["protocol"], "HTTP/1.1");
    }
    assert_ne!(r["remote_addr"], i["remote_addr"]);
    assert_eq!(r["user_agent"], "streamline-test/1.0");
    assert_eq!(i["user_agent"], Value::Null);
    assert_eq!(r["events_sent"], 2);
    assert_eq!(i["events_sent"], 0);
    // Both have written every event of their topics.
    assert_eq!((&r["lag"], &i["lag"]), (&json!(0), &json!(0)));
    assert_eq!(r["bytes_sent"], bytes_written(&reader_id, &got));
    assert_eq!(i["bytes_sent"], bytes_written(&idle_id, &[]));

    // The topic filter, and one client by id.
    for (query, expected) in [
        ("a", vec![&reader_id]),
        ("b", vec![&reader_id]),
        ("c", vec![&idle_id]),
        ("zzz", vec![]),
    ] {
        let filtered = get_json(&gw.control_url(&format!("/clients?topic={query}"))).await;
        let ids: Vec<_> = filtered["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.iter().collect::<Vec<_>>(), expected, "?topic={query}");
    }
    assert_eq!(
        get_json(&gw.control_url(&format!("/clients/{reader_id}"))).await,
        r
    );
    let res = http()
        .get(gw.control_url("/clients/no-such-client"))
        .send()
        .await
        .unwrap();
    let detail = expect_api_error(res, 404, "not_found").await;
    assert!(detail.contains("no-such-client"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_client_ends_its_stream_with_a_kicked_notice() {
    let gw = TestGateway::start().await;
    let mut bystander = SseClient::connect(&gw.stream_url("topic=k")).await;
    bystander.client_id().await;
    for (protocol, client) in [("HTTP/1.1", http()), ("HTTP/2", http2())] {
        let mut kicked = SseClient::connect_with(&client, &gw.stream_url("topic=k"), None).await;
        let id = kicked.client_id().await;
        gw.wait_clients(2).await;

        let res = delete(&gw.control_url(&format!("/clients/{id}"))).await;
        assert_eq!(res.status(), 204, "{protocol}");
        assert!(res.bytes().await.unwrap().is_empty());
        let rest = kicked.until_end().await;
        assert_eq!(
            rest.len(),
            1,
            "{protocol}: only the notice follows: {rest:?}"
        );
        assert_eq!(rest[0].event, "streamline.close");
        assert_eq!(
            serde_json::from_str::<Value>(&rest[0].data).unwrap(),
            json!({"reason": "kicked"})
        );
        gw.wait_clients(1).await;

        let res = delete(&gw.control_url(&format!("/clients/{id}"))).await;
        expect_api_error(res, 404, "not_found").await;
        let res = http()
            .get(gw.control_url(&format!("/clients/{id}")))
            .send()
            .await
            .unwrap();
        expect_api_error(res, 404, "not_found").await;
    }
    let id = gw.publish_one("k", "bystander unaffected").await;
    assert_eq!(bystander.next_event().await.unwrap().id, Some(id));
}

#[tokio::test]
async fn topics_reports_subscribers_published_and_last_id() {
    let gw = TestGateway::start().await;
    let mut subs = Vec::new();
    for query in ["topic=a", "topic=a&topic=b", "topic=quiet"] {
        let mut s = SseClient::connect(&gw.stream_url(query)).await;
        s.client_id().await;
        subs.push(s);
    }
    let a_ids = gw
        .publish(json!([{"topic": "a", "data": 1}, {"topic": "a", "data": 2}]))
        .await;
    let c_id = gw.publish_one("c", "no one listens").await;

    let topics = get_json(&gw.control_url("/topics")).await;
    assert_eq!(
        topics["topics"],
        json!([
            {"name": "a", "subscribers": 2, "events_published": 2, "last_event_id": a_ids[1]},
            {"name": "b", "subscribers": 1, "events_published": 0, "last_event_id": null},
            {"name": "c", "subscribers": 0, "events_published": 1, "last_event_id": c_id},
            {"name": "quiet", "subscribers": 1, "events_published": 0, "last_event_id": null},
        ])
    );
}

/// The value of the sample named exactly `name` (labels included, if any).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn scrape(gw: &TestGateway) -> String {
    let res = http().get(gw.control_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "{ct}"
    );
    res.text().await.unwrap()
}

#[tokio::test]
async fn metrics_exposes_the_gateway_counters_and_they_move() {
    // No heartbeat may add to the exact byte counts below.
    let gw = TestGateway::start_with(&["--heartbeat", "1h"]).await;
    let before = scrape(&gw).await;
    assert!(
        before.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for (family, kind) in [
        ("streamline_clients_connected", "gauge"),
        ("streamline_events_published", "counter"),
        ("streamline_events_delivered", "counter"),
        ("streamline_bytes_sent", "counter"),
        ("streamline_connections_opened", "counter"),
        ("streamline_connections_closed", "counter"),
        ("streamline_slow_clients_disconnected", "counter"),
        ("streamline_patch_latency_seconds", "histogram"),
    ] {
        assert!(
            before.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} is a {kind}:\n{before}"
        );
    }
    for name in [
        "streamline_clients_connected",
        "streamline_events_published_total",
        "streamline_events_delivered_total",
        "streamline_bytes_sent_total",
        "streamline_connections_opened_total",
        "streamline_connections_closed_total",
        "streamline_slow_clients_disconnected_total",
        "streamline_patch_latency_seconds_count",
    ] {
        assert_eq!(sample(&before, name), 0.0, "{name} starts at zero");
    }

    let mut sub = SseClient::connect(&gw.stream_url("topic=m")).await;
    let sub_id = sub.client_id().await;
    let ids = gw
        .publish(json!([{"topic": "m", "data": "1"}, {"topic": "m", "data": "2"}]))
        .await;
    gw.publish_one("m", "3").await;
    gw.publish_one("elsewhere", "4").await;
    let rejected = patch(&gw, Some("application/json"), "[]").await;
    assert_eq!(rejected.status(), 400);
    let got = sub.events(3).await;
    assert_eq!(got[0].id.as_ref(), Some(&ids[0]));

    let during = scrape(&gw).await;
    for (name, value) in [
        ("streamline_clients_connected", 1.0),
        ("streamline_events_published_total", 4.0),
        ("streamline_events_delivered_total", 3.0),
        (
            "streamline_bytes_sent_total",
            bytes_written(&sub_id, &got) as f64,
        ),
        ("streamline_connections_opened_total", 1.0),
        ("streamline_connections_closed_total", 0.0),
        ("streamline_slow_clients_disconnected_total", 0.0),
        // Every PATCH is timed, rejected ones too.
        ("streamline_patch_latency_seconds_count", 4.0),
        ("streamline_patch_latency_seconds_bucket{le=\"+Inf\"}", 4.0),
    ] {
        assert_eq!(sample(&during, name), value, "{name}");
    }
    assert!(sample(&during, "streamline_patch_latency_seconds_sum") > 0.0);

    drop(sub);
    gw.wait_clients(0).await;
    let after = scrape(&gw).await;
    for (name, value) in [
        ("streamline_clients_connected", 0.0),
        ("streamline_connections_closed_total", 1.0),
        // A closed stream's counts are kept.
        ("streamline_events_delivered_total", 3.0),
        (
            "streamline_bytes_sent_total",
            bytes_written(&sub_id, &got) as f64,
        ),
    ] {
        assert_eq!(sample(&after, name), value, "{name}");
    }
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let gw = TestGateway::start().await;
    let cases = [
        ("GET", "/index.php", 404, "not_found"),
        ("GET", "/nope", 404, "not_found"),
        ("PATCH", "/event", 404, "not_found"),
        ("GET", "/clients/a/b", 404, "not_found"),
        ("GET", "/stream?topic=a", 404, "not_found"),
        ("GET", "/events", 405, "method_not_allowed"),
        ("POST", "/events", 405, "method_not_allowed"),
        ("PUT", "/events", 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("DELETE", "/clients", 405, "method_not_allowed"),
        ("PUT", "/clients/x", 405, "method_not_allowed"),
        ("PATCH", "/topics", 405, "method_not_allowed"),
        ("POST", "/metrics", 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in cases {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = http()
            .request(m, gw.control_url(path))
            .send()
            .await
            .unwrap();
        let allow = res
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        expect_api_error(res, status, code).await;
        if status == 405 {
            let allow = allow.unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
            assert!(!allow.contains(method), "{method} {path}: Allow {allow:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_lag_and_per_topic_metrics_show_who_is_behind() {
    let gw = TestGateway::start_with(&["--heartbeat", "1h"]).await;
    let mut reader = SseClient::connect(&gw.stream_url("topic=s")).await;
    let reader_id = reader.client_id().await;
    // A client that stopped reading, with a small receive window.
    let stalled = RawStream::open(gw.stream, "topic=s", Some(4096)).await;
    gw.wait_clients(2).await;
    let payload = "x".repeat(16 * 1024);
    let http = http();
    for b in 0..4 {
        let batch: Vec<Value> = (0..50)
            .map(|i| json!({"topic": "s", "data": format!("{b}-{i} {payload}")}))
            .collect();
        publish_to(&http, gw.control, &json!(batch)).await;
    }
    assert_eq!(reader.events(200).await.len(), 200);

    // The reader is level with the topic's head; the stalled client is
    // behind by what it has not been written, and stays there.
    let lag_of = |list: &Value, id: &str| {
        list["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .and_then(|c| c["lag"].as_u64())
    };
    let url = gw.control_url("/clients");
    eventually_async("the reader level, the stalled client behind", || {
        let url = url.clone();
        let reader_id = reader_id.clone();
        async move {
            let list = get_json(&url).await;
            list["clients"].as_array().unwrap().iter().all(|c| {
                let lag = c["lag"].as_u64().unwrap();
                if c["id"] == reader_id.as_str() {
                    lag == 0
                } else {
                    lag > 0
                }
            })
        }
    })
    .await;
    let list = get_json(&url).await;
    let stalled_id = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] != reader_id.as_str())
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .unwrap();
    let stalled_lag = lag_of(&list, &stalled_id).unwrap();
    assert!(stalled_lag < 200, "some of it was written: {list}");
    let one = get_json(&gw.control_url(&format!("/clients/{stalled_id}"))).await;
    assert!(one["lag"].as_u64().unwrap() > 0, "{one}");

    let stats = get_json(&gw.control_url("/stats")).await;
    let me = &stats["replicas"][0];
    assert_eq!(stats["replicas"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(me["replica"], stats["replica"]);
    assert_eq!(stats["control_port"], gw.control.port());
    assert_eq!(stats["stream_port"], gw.stream.port());
    assert_eq!(me["phase"], "serving");
    assert_eq!(me["clients"], 2);
    assert_eq!(me["topics"], 1);
    assert_eq!(me["events_published"], 200);
    assert!(me["max_lag"].as_u64().unwrap() > 0, "{me}");
    assert!(me["events_delivered"].as_u64().unwrap() >= 200, "{me}");
    assert!(me["at"].as_u64().unwrap() > 1_700_000_000_000, "{me}");
    // Without Redis this replica is the cluster.
    let cluster = get_json(&gw.control_url("/stats?scope=cluster")).await;
    assert_eq!(cluster["replicas"].as_array().unwrap().len(), 1);
    let res = http
        .get(gw.control_url("/stats?scope=galaxy"))
        .send()
        .await
        .unwrap();
    expect_api_error(res, 400, "invalid_scope").await;

    let text = scrape(&gw).await;
    for (name, value) in [
        ("streamline_clients_by_lag{le=\"+Inf\"}", 2.0),
        ("streamline_clients_by_lag{le=\"0\"}", 1.0),
        (
            "streamline_topic_events_published_total{topic=\"s\"}",
            200.0,
        ),
        ("streamline_topic_subscribers{topic=\"s\"}", 2.0),
        ("streamline_lifecycle_phase{phase=\"serving\"}", 1.0),
        ("streamline_lifecycle_phase{phase=\"draining\"}", 0.0),
        ("streamline_drain_closed_total", 0.0),
    ] {
        assert_eq!(sample(&text, name), value, "{name}");
    }
    assert!(sample(&text, "streamline_client_lag_max") > 0.0);

    // Per-topic series are bounded: only the busiest topics are labelled.
    for t in 0..30 {
        gw.publish_one(&format!("t{t}"), "x").await;
    }
    let text = scrape(&gw).await;
    let labelled = text
        .lines()
        .filter(|l| l.starts_with("streamline_topic_events_published_total{"))
        .count();
    assert_eq!(labelled, streamline::metrics::TOP_TOPICS, "{text}");
    assert_eq!(
        sample(
            &text,
            "streamline_topic_events_published_total{topic=\"s\"}"
        ),
        200.0,
        "the busiest topic stays labelled"
    );
    drop(stalled);
}
