//! A stream's lag (`Hub::lag_of`, shown by `GET /clients` and summed up in
//! `/stats` and `/metrics`): events published to its rings that it has not
//! written, over a topic's partitions and several topics, resumed history
//! included.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::task::noop_waker_ref;
use streamline::hub::{Bus, BusError, CatchUp, NewEvent};
use streamline::hub::{Chunk, ClientMeta, Hub, HubConfig, HubError, Subscription};
use streamline::id::{Cursor, Position};
use tokio::sync::mpsc;

/// A bus whose rings the test creates itself (as Kafka's follow does).
struct Partitions;

impl Bus for Partitions {
    fn name(&self) -> &'static str {
        "test"
    }

    fn publish<'a>(&'a self, _: &'a [NewEvent]) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn follow<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async { Ok(()) })
    }

    fn catch_up(&self, _: &str, _: Position, _: Position) -> mpsc::Receiver<CatchUp> {
        mpsc::channel(1).1
    }

    fn is_up(&self) -> bool {
        true
    }
}

fn meta() -> ClientMeta {
    ClientMeta {
        remote_addr: "127.0.0.1:1".parse().unwrap(),
        user_agent: None,
        protocol: "HTTP/1.1",
        connection: None,
        client_ip: "127.0.0.1".parse().unwrap(),
        expires_at: None,
    }
}

/// Writes `n` events of the stream (skipping the preamble and notices).
fn read_events(sub: &mut Subscription, n: usize) {
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut read = 0;
    while read < n {
        match sub.poll_next(&mut cx) {
            Poll::Ready(Some(Chunk::One(bytes))) if bytes.starts_with(b"id:") => read += 1,
            Poll::Ready(Some(Chunk::Two(..))) => read += 1,
            Poll::Ready(Some(_)) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

fn lag(hub: &Hub, sub: &Subscription) -> Option<u64> {
    hub.lag_of(sub.client())
}

#[test]
fn lag_sums_a_stream_s_partitions_and_topics() {
    let hub = Hub::new(HubConfig::default());
    assert!(hub.set_bus(Arc::new(Partitions)).is_ok());
    hub.ensure_partition_at("p#0", "p", 0, Position::new(0, 0))
        .unwrap();
    hub.ensure_partition_at("p#1", "p", 1, Position::new(1, 0))
        .unwrap();
    hub.ensure_topic_at("q", Position::new(5, 0)).unwrap();
    let mut sub = hub
        .subscribe(&["p".into(), "q".into()], None, meta())
        .unwrap();
    assert_eq!(lag(&hub, &sub), Some(0));

    for lo in 1..=3 {
        assert!(hub.publish_at("p#0", Position::new(0, lo), None, "x"));
    }
    for lo in 1..=2 {
        assert!(hub.publish_at("p#1", Position::new(1, lo), None, "x"));
    }
    assert!(hub.publish_at("q", Position::new(5, 1), None, "x"));
    assert_eq!(lag(&hub, &sub), Some(6), "3 + 2 + 1 unwritten");
    assert_eq!(hub.client_info(sub.client()).lag, Some(6));
    assert_eq!(hub.stats().max_lag, 6);

    read_events(&mut sub, 2);
    assert_eq!(lag(&hub, &sub), Some(4));
    read_events(&mut sub, 4);
    assert_eq!(lag(&hub, &sub), Some(0));

    // A partition added since the stream subscribed: its cursors no longer
    // match the topic's rings, and its lag is not guessed.
    hub.ensure_partition_at("p#2", "p", 2, Position::new(2, 0))
        .unwrap();
    assert_eq!(lag(&hub, &sub), None);
    assert_eq!(hub.client_info(sub.client()).lag, None);
    let listed = serde_json::to_value(hub.client_info(sub.client())).unwrap();
    assert!(listed.get("lag").is_none(), "no lag field: {listed}");
}

#[test]
fn resumed_history_counts_until_it_is_written() {
    let hub = Hub::new(HubConfig::default());
    let first = hub.publish("r", None, "0").unwrap();
    for i in 1..5 {
        hub.publish("r", None, &i.to_string()).unwrap();
    }
    let resume = Cursor::parse(&first).unwrap();
    let mut sub = hub.subscribe(&["r".into()], Some(&resume), meta()).unwrap();
    assert_eq!(
        lag(&hub, &sub),
        Some(4),
        "four events after the resume point"
    );
    read_events(&mut sub, 4);
    assert_eq!(lag(&hub, &sub), Some(0));
    // Two topics: the sum.
    let mut both = hub
        .subscribe(&["r".into(), "s".into()], None, meta())
        .unwrap();
    hub.publish("r", None, "5").unwrap();
    hub.publish("s", None, "6").unwrap();
    assert_eq!(lag(&hub, &both), Some(2));
    read_events(&mut both, 1);
    assert_eq!(lag(&hub, &both), Some(1));
    assert_eq!(lag(&hub, &sub), Some(1));
}
