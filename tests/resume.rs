//! Resuming a stream with `Last-Event-ID` (or `?lastEventId=`): exactly once
//! delivery across reconnects under concurrent publishing, and the gap
//! notices for resume points the gateway cannot serve.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{Value, json};

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const TOTAL: usize = 2000;

/// A publisher PATCHes `TOTAL` events spread over `topics` as fast as it
/// can, while a reader takes a few events at a time, disconnects and
/// resumes from the last id it saw. Every event must arrive exactly once,
/// in order per topic, and each id must be the stream's whole cursor.
async fn resume_under_load(topics: &[&str]) {
    // History holds everything, so no resume point can expire.
    let gw = TestGateway::start_with(&["--history-size", "5000"]).await;
    // A first event on each topic: every connection, the first included,
    // resumes from a known point, so nothing is missed before it.
    let mut start = HashMap::new();
    for t in topics {
        start.insert(t.to_string(), gw.publish_one(t, "start").await);
    }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // (topic, data) of each event, in publishing order.
    let plan: Vec<(String, String)> = (0..TOTAL)
        .map(|n| {
            let t = topics[rng.below(topics.len() as u64) as usize];
            (t.to_owned(), format!("{t}-{n}"))
        })
        .collect();

    let publisher = {
        let plan = plan.clone();
        let control = gw.control;
        tokio::spawn(async move {
            let client = http();
            let mut rng = Rng(7);
            let mut ids = Vec::with_capacity(plan.len());
            for batch in plan.chunk_by(|_, _| rng.below(4) != 0) {
                let body: Vec<Value> = batch
                    .iter()
                    .map(|(t, d)| json!({"topic": t, "data": d}))
                    .collect();
                ids.extend(publish_to(&client, control, &json!(body)).await);
            }
            ids
        })
    };

    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let url = gw.stream_url(&query.join("&"));
    let cursor_of = |current: &HashMap<String, String>| -> String {
        let ids: Vec<&str> = topics.iter().map(|t| current[*t].as_str()).collect();
        ids.join(",")
    };
    let client = http();
    // Topics are read in turns, so the order across topics is not the
    // publishing order: the reader is done once each topic's last event
    // arrived (everything before it on that topic came first).
    let mut awaited: std::collections::HashSet<String> = topics
        .iter()
        .filter_map(|t| plan.iter().rev().find(|(topic, _)| topic == t))
        .map(|(_, data)| data.clone())
        .collect();
    let mut current = start.clone();
    let mut last_id = cursor_of(&current);
    let mut received: Vec<SseEvent> = Vec::new();
    let mut connections = 0;
    while !awaited.is_empty() {
        let mut stream = SseClient::connect_with(&client, &url, Some(&last_id)).await;
        connections += 1;
        for _ in 0..=rng.below(300) {
            // An end (say, closed for being slow) is resumed like a disconnect.
            let Some(ev) = stream.next_event().await else {
                break;
            };
            if ev.event == "streamline.close" {
                continue;
            }
            assert_eq!(ev.event, "message", "no notice expected: {ev:?}");
            last_id = ev.id.clone().expect("every event has an id");
            awaited.remove(&ev.data);
            received.push(ev);
            if awaited.is_empty() {
                break;
            }
        }
    }
    let published = publisher.await.unwrap();
    assert_eq!(published.len(), TOTAL);
    assert!(connections >= 4, "only {connections} connections");

    // Each event's own id is its topic's entry in the stream's cursor.
    let id_of: HashMap<&str, (&str, &str)> = plan
        .iter()
        .zip(&published)
        .map(|((t, d), id)| (d.as_str(), (t.as_str(), id.as_str())))
        .collect();
    let mut per_topic: HashMap<&str, Vec<&str>> = HashMap::new();
    for ev in &received {
        let (topic, id) = id_of
            .get(ev.data.as_str())
            .unwrap_or_else(|| panic!("unexpected event {ev:?}"));
        current.insert(topic.to_string(), id.to_string());
        assert_eq!(
            ev.id.as_deref(),
            Some(&*cursor_of(&current)),
            "cursor of {ev:?}"
        );
        per_topic.entry(topic).or_default().push(id);
    }
    if received.len() != TOTAL {
        let mut seen = std::collections::HashSet::new();
        let twice: Vec<&str> = received
            .iter()
            .filter(|e| !seen.insert(e.data.as_str()))
            .map(|e| e.data.as_str())
            .collect();
        panic!(
            "{} events received for {TOTAL} published; twice: {twice:?}",
            received.len()
        );
    }
    for t in topics {
        let expected: Vec<&str> = plan
            .iter()
            .zip(&published)
            .filter(|((topic, _), _)| topic == t)
            .map(|(_, id)| id.as_str())
            .collect();
        assert_eq!(
            per_topic.remove(t).unwrap_or_default(),
            expected,
            "topic {t}"
        );
    }
    if topics.len() == 1 {
        let ids: Vec<&str> = received.iter().map(|e| e.id.as_deref().unwrap()).collect();
        assert_eq!(ids, published, "one topic: the exact published order");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnects_under_load_single_topic() {
    resume_under_load(&["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_disconnects_under_load_two_topics() {
    resume_under_load(&["a", "b"]).await;
}

/// Opens `/stream?{query}` with an optional `Last-Event-ID` header, then
/// publishes `live` on `topic`: the events before it are the replay.
async fn replay(gw: &TestGateway, query: &str, header: Option<&str>, topic: &str) -> Vec<SseEvent> {
    let mut stream = SseClient::connect_with(&http(), &gw.stream_url(query), header).await;
    stream.client_id().await;
    gw.publish_one(topic, "live").await;
    let mut out = Vec::new();
    loop {
        let ev = stream.next_event().await.expect("the stream stays open");
        let live = ev.data == "live";
        out.push(ev);
        if live {
            return out;
        }
    }
}

/// Percent-encodes an id for a query parameter.
fn encode(id: &str) -> String {
    id.replace(':', "%3A").replace(',', "%2C")
}

#[tokio::test]
async fn last_event_id_from_query_or_header_and_the_header_wins() {
    let gw = TestGateway::start().await;
    // (query id, header id, first event replayed); indexes into e0..e3,
    // `None` in the last column: nothing replayed.
    let cases: [(Option<usize>, Option<&str>, Option<usize>); 6] = [
        (Some(0), None, Some(1)),
        (None, Some("1"), Some(2)),
        (Some(0), Some("2"), Some(3)),
        // An empty header means none: the parameter applies.
        (Some(1), Some(""), Some(2)),
        // The very last id: nothing is replayed.
        (None, Some("3"), None),
        (Some(3), None, None),
    ];
    for (case, (query_id, header_id, first)) in cases.into_iter().enumerate() {
        let topic = format!("t{case}");
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(gw.publish_one(&topic, &format!("e{i}")).await);
        }
        let mut query = format!("topic={topic}");
        if let Some(i) = query_id {
            query += &format!("&lastEventId={}", encode(&ids[i]));
        }
        let header = header_id.map(|h| match h {
            "" => String::new(),
            i => ids[i.parse::<usize>().unwrap()].clone(),
        });
        let events = replay(&gw, &query, header.as_deref(), &topic).await;
        let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let mut expected: Vec<String> = match first {
            Some(f) => (f..4).map(|i| format!("e{i}")).collect(),
            None => vec![],
        };
        expected.push("live".into());
        assert_eq!(
            got, expected,
            "case {case}: query {query:?}, header {header:?}"
        );
        let replayed: Vec<&str> = events.iter().filter_map(|e| e.id.as_deref()).collect();
        assert_eq!(
            replayed[..replayed.len() - 1],
            ids[first.unwrap_or(4)..],
            "case {case}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_resume_further_back_than_max_lag_replays_the_history() {
    // The lag limit is about keeping up with live events: a client closed
    // for being slow must be able to resume from history when it returns.
    for policy in ["disconnect", "skip"] {
        let gw =
            TestGateway::start_with(&["--max-lag", "10", "--slow-client-policy", policy]).await;
        let mut ids = Vec::new();
        for i in 0..50 {
            ids.push(gw.publish_one("a", &format!("e{i}")).await);
        }
        let events = replay(&gw, "topic=a", Some(&ids[0]), "a").await;
        let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let mut expected: Vec<String> = (1..50).map(|i| format!("e{i}")).collect();
        expected.push("live".into());
        assert_eq!(got, expected, "{policy}");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_resume_point_older_than_the_history_gets_an_expired_gap_then_every_retained_event() {
    let gw = TestGateway::start_with(&["--history-size", "5"]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(gw.publish_one("a", &format!("e{i}")).await);
    }
    let events = replay(&gw, "topic=a", Some(&ids[0]), "a").await;
    let got: Vec<(&str, Option<&str>, &str)> = events
        .iter()
        .map(|e| (e.event.as_str(), e.id.as_deref(), e.data.as_str()))
        .collect();
    // The notice, whose id is the newest evicted event (a reconnect with
    // it does not report the same gap again), then the five retained.
    let mut want = vec![(
        "streamline.gap",
        Some(ids[14].as_str()),
        r#"{"topic":"a","reason":"expired"}"#,
    )];
    let data: Vec<String> = (15..20).map(|i| format!("e{i}")).collect();
    for (i, d) in (15..20).zip(&data) {
        want.push(("message", Some(ids[i].as_str()), d.as_str()));
    }
    assert_eq!(got[..6], want[..]);
    assert_eq!(got.len(), 7, "then live: {got:?}");
    assert_eq!(got[6].2, "live");
    // `live` evicted e15: resuming from the notice's id now misses it.
    let again = replay(&gw, "topic=a", events[0].id.as_deref(), "a").await;
    assert_eq!(again[0].event, "streamline.gap");
    assert_eq!(again[1].data, "e16");
    // Resuming from the newest event: nothing missed, nothing replayed.
    let last = events.last().unwrap().id.clone();
    let again = replay(&gw, "topic=a", last.as_deref(), "a").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].data, "live");
    gw.shutdown().await;
}

#[tokio::test]
async fn history_older_than_its_ttl_is_not_replayed() {
    // Age is enforced when a resume is located, not only by the sweep
    // (every 5 s): this resume comes about a second after the events.
    let ttl = std::time::Duration::from_secs(1);
    let gw = TestGateway::start_with(&["--history-ttl", "1s"]).await;
    let published = tokio::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(gw.publish_one("a", &format!("e{i}")).await);
    }
    // Within the TTL the history is replayed (the resume runs at once).
    let events = replay(&gw, "topic=a", Some(&ids[0]), "a").await;
    if published.elapsed() < ttl {
        let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(got, ["e1", "e2", "live"]);
    }
    // Wait until everything published so far is past its age.
    let newest = tokio::time::Instant::now();
    let deadline = newest + ttl + WAIT;
    while newest.elapsed() <= ttl + std::time::Duration::from_millis(100) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let live = events.last().unwrap().id.clone().unwrap();
    let events = replay(&gw, "topic=a", Some(&ids[0]), "a").await;
    let got: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e.event.as_str(), e.id.as_deref()))
        .collect();
    // Everything up to the first `live` has expired: the notice carries
    // its id, and nothing expired is replayed.
    assert_eq!(
        got[0],
        ("streamline.gap", Some(live.as_str())),
        "{events:?}"
    );
    assert_eq!(events[0].data, r#"{"topic":"a","reason":"expired"}"#);
    assert_eq!(got.len(), 2, "{events:?}");
    assert_eq!(events[1].data, "live");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unknown_resume_point_gets_an_unknown_gap_then_live_events() {
    let gw = TestGateway::start().await;
    let a1 = gw.publish_one("a", "a1").await;
    gw.publish_one("a", "a2").await;
    let b = gw.publish_one("b", "b1").await;
    let (epoch, lo) = position(&b);
    let future = format!("a:{epoch}-{}", lo + 1000);
    // (query, Last-Event-ID, expected events before `live` as (event, data))
    let cases = [
        (
            "topic=a",
            "a:1-1".to_string(),
            vec![(
                "streamline.gap",
                r#"{"topic":"a","reason":"unknown_origin"}"#,
            )],
        ),
        (
            "topic=a",
            future,
            vec![("streamline.gap", r#"{"topic":"a","reason":"unknown"}"#)],
        ),
        // One topic unknown, the other replayed.
        (
            "topic=a&topic=b",
            format!("{a1},b:1-1"),
            vec![
                (
                    "streamline.gap",
                    r#"{"topic":"b","reason":"unknown_origin"}"#,
                ),
                ("message", "a2"),
            ],
        ),
    ];
    for (query, id, expected) in cases {
        let events = replay(&gw, query, Some(&id), "a").await;
        let mut got: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e.event.as_str(), e.data.as_str()))
            .collect();
        assert_eq!(got.pop(), Some(("message", "live")), "{id}");
        assert_eq!(got, expected, "resume from {id}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_malformed_resume_point_is_refused_with_400() {
    let gw = TestGateway::start().await;
    for bad in [
        "zzz",
        "a",
        "a:1",
        "a:1-x",
        "a:-1-2",
        "a:1-2,a:1-3",
        "a b:1-2",
    ] {
        let url = gw.stream_url("topic=a");
        let res = http()
            .get(&url)
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        expect_api_error(res, 400, "invalid_last_event_id").await;
        let url = gw.stream_url(&format!("topic=a&lastEventId={}", bad.replace(' ', "%20")));
        let res = http().get(&url).send().await.unwrap();
        expect_api_error(res, 400, "invalid_last_event_id").await;
    }
    assert_eq!(gw.hub.client_count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_id_from_another_replica_without_a_bus_gets_an_unknown_origin_gap() {
    // Two in-memory replicas, as when a Deployment is scaled without Redis
    // or Kafka: they share nothing.
    let a = TestGateway::start().await;
    let b = TestGateway::start().await;
    assert_ne!(a.hub.epoch(), b.hub.epoch(), "two runs, two epochs");
    b.publish_one("a", "only on b").await;
    let from_a = a.publish_one("a", "only on a").await;
    // The client reconnects to the other replica with its last id.
    let events = replay(&b, "topic=a", Some(&from_a), "a").await;
    let got: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.event.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "streamline.gap",
                r#"{"topic":"a","reason":"unknown_origin"}"#
            ),
            ("message", "live"),
        ]
    );
    a.shutdown().await;
    b.shutdown().await;
}
