//! `Idempotency-Key` with Kafka as the bus, against a real Kafka-protocol
//! broker (Tansu): copies of a keyed record are dropped by every consumer,
//! a retry gets the ids subscribers saw, and a publish into a hung broker
//! answers 504 and is made whole by its keyed retry.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kafka::Tansu;
use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::json;

async fn gateway(broker: &Tansu, name: &str) -> TestGateway {
    let brokers = broker.brokers();
    let gw = TestGateway::start_with(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topics",
        "orders",
        "--kafka-timeout",
        "2s",
        "--replica-id",
        name,
    ])
    .await;
    let ready = gw.control_url("/ready");
    wait_status("kafka up", &ready, 200).await;
    gw
}

/// Events (data → id) a stream gets before `marker`'s data, failing on a
/// second copy of any.
async fn until_marker(client: &mut SseClient, marker: &str) -> BTreeMap<String, String> {
    let mut got = BTreeMap::new();
    loop {
        let ev = client.next_event().await.expect("stream open");
        if ev.data == marker {
            return got;
        }
        let dup = got.insert(ev.data.clone(), ev.id.unwrap());
        assert!(dup.is_none(), "{} delivered twice", ev.data);
    }
}

/// A retried batch written again to Kafka (as a replica that had not seen
/// the first would) reaches no subscriber of either replica, and every
/// replica answers the retry with the first ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_keyed_batch_are_dropped_and_retries_get_the_first_ids() {
    let broker = Tansu::start().await;
    broker.create_topic("orders", 2).await;
    let a = gateway(&broker, "a").await;
    let b = gateway(&broker, "b").await;
    let mut on_a = SseClient::connect(&a.stream_url("topic=orders")).await;
    let mut on_b = SseClient::connect(&b.stream_url("topic=orders")).await;
    let batch = json!([{"topic": "orders", "data": "one"}, {"topic": "orders", "event": "x", "data": "two"}]);
    let first = ids_of(patch_events(a.control, Some("order-7"), &batch).await).await;
    for gw in [&a, &b] {
        let again = ids_of(patch_events(gw.control, Some("order-7"), &batch).await).await;
        assert_eq!(again, first);
        let other = json!({"topic": "orders", "data": "three"});
        let res = patch_events(gw.control, Some("order-7"), &other).await;
        expect_api_error(res, 422, "idempotency_key_reused").await;
    }

    // The batch written again, tagged as Streamline tags it, on the same
    // partition (the key is the record key).
    let events = streamline::control::events::parse_batch(batch.to_string().as_bytes()).unwrap();
    let fingerprint = streamline::idempotency::fingerprint(&events);
    let producer = broker.producer();
    for (i, ev) in events.iter().enumerate() {
        let tag = format!("{i}/2 {fingerprint} order-7");
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "streamline-idempotency",
            value: Some(tag.as_str()),
        });
        if let Some(name) = &ev.event {
            headers = headers.insert(Header {
                key: "event",
                value: Some(name.as_str()),
            });
        }
        let record = FutureRecord::to("orders")
            .key("order-7")
            .payload(ev.data.as_str())
            .headers(headers);
        producer
            .send(record, WAIT)
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    let marker_body = json!({"topic": "orders", "data": "marker"});
    let res = http()
        .patch(a.control_url("/events"))
        .json(&marker_body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    for client in [&mut on_a, &mut on_b] {
        let got = until_marker(client, "marker").await;
        assert_eq!(got.len(), 2, "{got:?}");
        // Ids on a partitioned topic are cursors carrying the event's id.
        for (data, id) in [("one", &first[0]), ("two", &first[1])] {
            assert!(
                got[data].split(',').any(|p| p == id),
                "{data}: {got:?} vs {id}"
            );
        }
    }
    // At least the two written here (b's own retry may have produced the
    // batch again too, if b had not consumed it yet: dropped the same way).
    let metrics = get_text(&b.control_url("/metrics")).await;
    let dropped = metric(&metrics, "streamline_kafka_duplicates_dropped_total");
    assert!(dropped >= 2, "{dropped}");
}

/// A keyed publish into a hung broker (SIGSTOP) answers 504 (or 503, when
/// the hang was already noticed); after SIGCONT
/// its retry is accepted with the id subscribers got, and the event is
/// delivered exactly once, whether the first attempt was written or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_into_a_hung_broker_is_made_whole_by_its_keyed_retry() {
    let broker = Tansu::start().await;
    broker.create_topic("orders", 1).await;
    let gw = gateway(&broker, "a").await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=orders")).await;
    let body = json!({"topic": "orders", "data": "hung"});
    let pid = broker.pid().expect("running").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    let res = patch_events(gw.control, Some("hung-1"), &body).await;
    let status = res.status().as_u16();
    let cont = scopeguard(|| signal("-CONT"));
    // 504 when the publish was sent into the hang; 503 (nothing sent) when
    // the gateway had already seen the broker stop answering (its watch
    // may get there first on a loaded machine). Either way the retry below
    // must make it whole, exactly once.
    match status {
        503 => expect_api_error(res, 503, "backend_unavailable").await,
        _ => expect_api_error(res, 504, "publish_outcome_unknown").await,
    };
    drop(cont);

    let ids = retry_until_accepted(gw.control, "hung-1", &body).await;
    // The retry may be answered from the key's record before a fresh
    // producer is ready: until then an unkeyed publish gets 503, which
    // promises nothing was sent, so it is simply sent again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = http()
            .patch(gw.control_url("/events"))
            .json(&json!({"topic": "orders", "data": "marker"}))
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            202 => break,
            503 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            s => panic!("marker: {s} {}", res.text().await.unwrap()),
        }
    }
    let got = until_marker(&mut sub, "marker").await;
    assert_eq!(got.len(), 1, "first answer {status}: {got:?}");
    assert_eq!(got["hung"], ids[0]);
}
