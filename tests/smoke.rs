mod common;

use common::*;

#[tokio::test]
async fn a_published_event_reaches_a_subscriber() {
    let gw = TestGateway::start().await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=news")).await;
    sub.client_id().await;
    let id = gw.publish_one("news", "hello").await;
    let ev = sub.next_event().await.unwrap();
    assert_eq!(ev.data, "hello");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    gw.shutdown().await;
}
