//! What operators see of a gateway on Kafka (a real Tansu broker): a
//! stream of a partitioned topic has a lag (its cursors matched to the
//! topic's partition rings), and `/metrics` and `/stats` report the bus.

mod common;

use common::kafka::{Tansu, produce};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_s_stream_has_a_lag_and_the_bus_is_reported_up() {
    let broker = Tansu::start().await;
    broker.create_topic("parts", 3).await;
    let brokers = broker.brokers();
    let gw = TestGateway::start_with(&[
        "--kafka-brokers",
        &brokers,
        "--kafka-topics",
        "parts",
        "--kafka-timeout",
        "2s",
    ])
    .await;
    let metrics_url = gw.control_url("/metrics");
    eventually_async("kafka reported up", || async {
        get_text(&metrics_url)
            .await
            .contains("streamline_backend_up{backend=\"kafka\"} 1\n")
    })
    .await;
    let mut reader = SseClient::connect(&gw.stream_url("topic=parts")).await;
    let id = reader.client_id().await;
    let producer = broker.producer();
    for i in 0..9 {
        produce(&producer, "parts", i % 3, format!("r{i}").as_bytes(), None).await;
    }
    assert_eq!(reader.events(9).await.len(), 9);

    let url = gw.control_url(&format!("/clients/{id}"));
    eventually_async("the reader's lag is known and zero", || async {
        get_json(&url).await["lag"] == 0
    })
    .await;
    let stats = get_json(&gw.control_url("/stats")).await;
    assert_eq!(stats["replicas"][0]["max_lag"], 0, "{stats}");
    assert_eq!(stats["replicas"][0]["events_published"], 9, "{stats}");
    let metrics = get_text(&metrics_url).await;
    assert!(
        metrics.contains("streamline_topic_events_published_total{topic=\"parts\"} 9\n"),
        "per-topic counts sum a topic's partitions:\n{metrics}"
    );
    assert!(metrics.contains("streamline_clients_by_lag{le=\"0\"} 1\n"));
}
