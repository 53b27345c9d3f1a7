//! Unit tests of the hub and its subscriptions, without sockets: a
//! subscription is polled by hand, as the stream plane's response body would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use super::*;
use crate::id::Cursor;
use crate::sse::tests::{Parsed, parse_stream};

fn hub_with(adjust: impl FnOnce(&mut HubConfig)) -> Arc<Hub> {
    let mut config = HubConfig::default();
    adjust(&mut config);
    Hub::new(config)
}

fn hub() -> Arc<Hub> {
    hub_with(|_| {})
}

pub(super) fn meta() -> ClientMeta {
    ClientMeta {
        remote_addr: "127.0.0.1:4000".parse().unwrap(),
        user_agent: None,
        protocol: "HTTP/1.1",
        connection: None,
        client_ip: "127.0.0.1".parse().unwrap(),
        expires_at: None,
    }
}

fn open(hub: &Arc<Hub>, topics: &[&str], resume: Option<&str>) -> Subscription {
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    let resume = resume.map(|r| Cursor::parse(r).unwrap());
    hub.subscribe(&topics, resume.as_ref(), meta()).unwrap()
}

fn publish(hub: &Hub, topic: &str, data: &str) -> String {
    hub.publish(topic, None, data).unwrap()
}

/// `topic:<epoch>-<lo>` for this hub.
fn id(hub: &Hub, topic: &str, lo: u64) -> String {
    format!("{topic}:{}-{lo}", hub.epoch())
}

/// A waker that counts how often it was woken.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl Counter {
    fn wakes(&self) -> usize {
        self.0.load(SeqCst)
    }
}

/// One poll, with a multi-topic stream's two parts joined.
fn poll(sub: &mut Subscription, waker: &Waker) -> Poll<Option<String>> {
    let mut cx = Context::from_waker(waker);
    sub.poll_next(&mut cx).map(|chunk| {
        chunk.map(|c| {
            let bytes = match c {
                Chunk::One(b) => b.to_vec(),
                Chunk::Two(a, b) => [a, b].concat(),
            };
            String::from_utf8(bytes).unwrap()
        })
    })
}

/// Polls until the stream waits or ends: the chunks written, and whether it
/// ended.
fn drain_with(sub: &mut Subscription, waker: &Waker) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    loop {
        match poll(sub, waker) {
            Poll::Ready(Some(chunk)) => out.push(chunk),
            Poll::Ready(None) => return (out, true),
            Poll::Pending => return (out, false),
        }
    }
}

fn drain(sub: &mut Subscription) -> (Vec<String>, bool) {
    drain_with(sub, Waker::noop())
}

/// What an EventSource would dispatch for `chunks`.
fn events(chunks: &[String]) -> Vec<Parsed> {
    parse_stream(&chunks.concat()).0
}

/// Polls past the preamble; the stream must then be waiting.
fn skip_preamble(sub: &mut Subscription) {
    let (chunks, ended) = drain(sub);
    assert!(!ended);
    assert!(events(&chunks).is_empty(), "only the preamble: {chunks:?}");
}

fn gap(id: &str, topic: &str, reason: &str) -> Parsed {
    Parsed {
        id: id.into(),
        event: sse::GAP_EVENT.into(),
        data: format!(r#"{{"topic":"{topic}","reason":"{reason}"}}"#),
    }
}

fn message(id: &str, data: &str) -> Parsed {
    Parsed {
        id: id.into(),
        event: "message".into(),
        data: data.into(),
    }
}

#[test]
fn the_preamble_comes_first_and_names_the_client() {
    let hub = hub_with(|c| c.retry = Duration::from_millis(1500));
    publish(&hub, "a", "before");
    // Even a resume gap waits for the preamble.
    let mut sub = open(&hub, &["a"], Some("a:1-1"));
    let first = poll(&mut sub, Waker::noop());
    let expected = sse::preamble(Duration::from_millis(1500), sub.client().id());
    assert_eq!(
        first,
        Poll::Ready(Some(String::from_utf8(expected.to_vec()).unwrap()))
    );
    let (rest, _) = drain(&mut sub);
    assert_eq!(
        events(&rest),
        [gap(&id(&hub, "a", 1), "a", "unknown_origin")]
    );
}

#[test]
fn events_arrive_in_publish_order_then_the_stream_waits() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let ids: Vec<String> = (0..5)
        .map(|i| publish(&hub, "a", &format!("e{i}")))
        .collect();
    let (chunks, ended) = drain(&mut sub);
    assert!(!ended);
    let expected: Vec<Parsed> = (0..5).map(|i| message(&ids[i], &format!("e{i}"))).collect();
    assert_eq!(events(&chunks), expected);
    assert_eq!(sub.client().events_sent(), 5);
    let bytes: usize = chunks.iter().map(String::len).sum();
    assert_eq!(sub.client().bytes_sent(), bytes as u64);
    assert_eq!(poll(&mut sub, Waker::noop()), Poll::Pending);
}

#[test]
fn a_publish_wakes_a_waiting_stream_once() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    let (_, ended) = drain_with(&mut sub, &waker);
    assert!(!ended);
    assert_eq!(counter.wakes(), 0);

    publish(&hub, "other", "x");
    assert_eq!(
        counter.wakes(),
        0,
        "another topic's event wakes nobody here"
    );

    let id = publish(&hub, "a", "x");
    assert_eq!(counter.wakes(), 1);
    // The waker is spent until the stream registers it again.
    publish(&hub, "a", "y");
    assert_eq!(counter.wakes(), 1);

    let (chunks, _) = drain_with(&mut sub, &waker);
    assert_eq!(events(&chunks)[0], message(&id, "x"));
    assert_eq!(events(&chunks).len(), 2);
    publish(&hub, "a", "z");
    assert_eq!(counter.wakes(), 2);
}

#[tokio::test]
async fn coalesced_publishes_wake_a_stream_once_after_the_publishers_pass() {
    let hub = hub();
    hub.coalesce_wakes();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);

    let first = publish_batch(&hub, "a", 1).await;
    let second = publish_batch(&hub, "a", 2).await;
    assert_eq!(counter.wakes(), 0, "woken once the publishing task yields");
    while counter.wakes() == 0 {
        tokio::task::yield_now().await;
    }
    let (chunks, _) = drain_with(&mut sub, &waker);
    let ids: Vec<String> = events(&chunks).into_iter().map(|e| e.id).collect();
    assert_eq!(ids, [first, second].concat());
    assert_eq!(counter.wakes(), 1, "one wake-up for both batches");

    // Queued again once the flush took it: a later publish wakes it.
    publish_batch(&hub, "a", 1).await;
    while counter.wakes() == 1 {
        tokio::task::yield_now().await;
    }
    assert_eq!(events(&drain_with(&mut sub, &waker).0).len(), 1);
    // Outside a runtime, at once.
    let outside = hub.clone();
    std::thread::spawn(move || {
        let events = [NewEvent {
            topic: "a".into(),
            event: None,
            data: "x".into(),
        }];
        let publish = std::pin::pin!(outside.publish_batch(&events));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(publish.poll(&mut cx), Poll::Ready(Ok(_))));
    })
    .join()
    .unwrap();
    assert_eq!(counter.wakes(), 3);
}

#[test]
fn a_multi_topic_stream_carries_a_cursor_over_all_its_topics() {
    let hub = hub();
    let mut sub = open(&hub, &["a", "b"], None);
    skip_preamble(&mut sub);
    let a1 = publish(&hub, "a", "a1");
    let b2 = publish(&hub, "b", "b2");
    let a3 = publish(&hub, "a", "a3");
    let (chunks, _) = drain(&mut sub);
    // Topics take turns; each event's id is the stream's whole cursor.
    let b0 = id(&hub, "b", 0);
    assert_eq!(
        events(&chunks),
        [
            message(&format!("{a1},{b0}"), "a1"),
            message(&format!("{a1},{b2}"), "b2"),
            message(&format!("{a3},{b2}"), "a3"),
        ]
    );

    // Resuming from a composite id replays what each topic missed.
    let mut again = open(&hub, &["a", "b"], Some(&format!("{a1},{b0}")));
    let b4 = publish(&hub, "b", "b4");
    let (chunks, _) = drain(&mut again);
    assert_eq!(
        events(&chunks),
        [
            message(&format!("{a3},{b0}"), "a3"),
            message(&format!("{a3},{b2}"), "b2"),
            message(&format!("{a3},{b4}"), "b4"),
        ]
    );
}

#[test]
fn resume_points_inside_before_and_after_the_history() {
    // History holds the last 3 of 5 events on `a` (lo 3, 4, 5).
    struct Case {
        name: &'static str,
        resume: fn(epoch: u64) -> String,
        /// The notice's reason and the `lo` of its id.
        gap: Option<(&'static str, u64)>,
        replayed: &'static [u64],
    }
    let cases = [
        Case {
            name: "newest event",
            resume: |e| format!("a:{e}-5"),
            gap: None,
            replayed: &[],
        },
        Case {
            name: "inside the history",
            resume: |e| format!("a:{e}-3"),
            gap: None,
            replayed: &[4, 5],
        },
        Case {
            name: "the newest evicted event",
            resume: |e| format!("a:{e}-2"),
            gap: None,
            replayed: &[3, 4, 5],
        },
        Case {
            name: "older than the history",
            resume: |e| format!("a:{e}-1"),
            // The notice (its id: the newest evicted event), then every
            // event still retained.
            gap: Some(("expired", 2)),
            replayed: &[3, 4, 5],
        },
        Case {
            name: "ahead of the newest event",
            resume: |e| format!("a:{e}-6"),
            gap: Some(("unknown", 5)),
            replayed: &[],
        },
        Case {
            name: "an earlier run",
            resume: |e| format!("a:{}-3", e - 1),
            gap: Some(("unknown_origin", 5)),
            replayed: &[],
        },
        Case {
            name: "a later run",
            resume: |e| format!("a:{}-0", e + 1),
            gap: Some(("unknown_origin", 5)),
            replayed: &[],
        },
        Case {
            name: "a cursor without this topic",
            resume: |e| format!("b:{e}-1"),
            gap: None,
            replayed: &[],
        },
    ];
    for case in cases {
        let hub = hub_with(|c| c.history_size = 3);
        for i in 1..=5 {
            publish(&hub, "a", &format!("e{i}"));
        }
        let mut sub = open(&hub, &["a"], Some(&(case.resume)(hub.epoch())));
        let (mut chunks, _) = drain(&mut sub);
        // Then the stream goes on live (published after the replay was
        // read, so that it evicts nothing unread).
        let live = publish(&hub, "a", "live");
        let (more, ended) = drain(&mut sub);
        assert!(!ended, "{}", case.name);
        chunks.extend(more);
        let mut expected: Vec<Parsed> = case
            .gap
            .map(|(r, lo)| gap(&id(&hub, "a", lo), "a", r))
            .into_iter()
            .collect();
        expected.extend(
            case.replayed
                .iter()
                .map(|&lo| message(&id(&hub, "a", lo), &format!("e{lo}"))),
        );
        expected.push(message(&live, "live"));
        assert_eq!(events(&chunks), expected, "resume at {}", case.name);
    }
}

#[test]
fn resume_replays_history_further_back_than_max_lag() {
    // The lag limit is about keeping up with live events, not about how
    // far back a resume point lies: a stream that was closed for being
    // slow must be able to resume from history when it reconnects.
    for policy in [SlowClientPolicy::Disconnect, SlowClientPolicy::Skip] {
        let hub = hub_with(|c| {
            c.max_lag = 3;
            c.slow_client_policy = policy;
        });
        let first = publish(&hub, "a", "e0");
        let ids: Vec<String> = (1..10)
            .map(|i| publish(&hub, "a", &format!("e{i}")))
            .collect();
        let mut sub = open(&hub, &["a"], Some(&first));
        // One more event arrives while the backlog is still unread.
        let live = publish(&hub, "a", "live");
        let (chunks, ended) = drain(&mut sub);
        assert!(!ended, "{policy:?}: {chunks:?}");
        let mut expected: Vec<Parsed> = (1..10)
            .map(|i| message(&ids[i - 1], &format!("e{i}")))
            .collect();
        expected.push(message(&live, "live"));
        assert_eq!(events(&chunks), expected, "{policy:?}");
    }
}

#[test]
fn a_resumed_stream_is_still_judged_by_its_live_lag() {
    // (policy, what the stream writes once 4 live events pile up unread)
    let cases = [
        (SlowClientPolicy::Disconnect, "close"),
        (SlowClientPolicy::Skip, "gap"),
    ];
    for (policy, expected) in cases {
        let hub = hub_with(|c| {
            c.max_lag = 3;
            c.slow_client_policy = policy;
        });
        let first = publish(&hub, "a", "e0");
        for i in 1..10 {
            publish(&hub, "a", &format!("e{i}"));
        }
        let mut sub = open(&hub, &["a"], Some(&first));
        let mut last = String::new();
        for i in 0..4 {
            last = publish(&hub, "a", &format!("live{i}"));
        }
        // Lag counts once a whole sample interval has passed over them.
        hub.sample_lag();
        hub.sample_lag();
        let (chunks, ended) = drain(&mut sub);
        let (parsed, _) = parse_stream(&chunks.concat());
        match expected {
            "close" => {
                assert!(ended);
                assert_eq!(parsed.len(), 1, "{chunks:?}");
                assert_eq!(parsed[0].data, r#"{"reason":"slow"}"#);
            }
            _ => {
                assert!(!ended);
                assert_eq!(parsed, [gap(&last, "a", "slow")]);
            }
        }
    }
}

#[test]
fn skip_policy_jumps_a_lagging_stream_to_live_with_a_gap_notice() {
    let hub = hub_with(|c| {
        c.max_lag = 3;
        c.slow_client_policy = SlowClientPolicy::Skip;
    });
    let mut sub = open(&hub, &["a", "b"], None);
    skip_preamble(&mut sub);
    let ids: Vec<String> = (0..10)
        .map(|i| publish(&hub, "a", &format!("e{i}")))
        .collect();
    hub.sample_lag();
    hub.sample_lag();
    let b0 = id(&hub, "b", 0);
    let (chunks, ended) = drain(&mut sub);
    assert!(!ended);
    assert_eq!(
        events(&chunks),
        [gap(&format!("{},{b0}", ids[9]), "a", "slow")]
    );
    assert_eq!(hub.totals().slow_skipped.load(Relaxed), 1);
    assert_eq!(hub.totals().slow_disconnected.load(Relaxed), 0);

    let live = publish(&hub, "a", "live");
    let (chunks, _) = drain(&mut sub);
    assert_eq!(events(&chunks), [message(&format!("{live},{b0}"), "live")]);
}

#[test]
fn disconnect_policy_ends_a_lagging_stream_with_a_close_notice() {
    // Noticed by the lag sampler (the stream is not being polled), or by
    // the stream itself when events it had not read yet were evicted (past
    // the byte cap on what a ring keeps beyond its history).
    let cases: [(&str, usize, u64, usize); 2] =
        [("sampler", 1000, 3, 1 << 20), ("overrun", 2, 1000, 0)];
    for (name, history_size, max_lag, pinned_bytes) in cases {
        let hub = hub_with(|c| {
            c.history_size = history_size;
            c.max_lag = max_lag;
            c.pinned_bytes = pinned_bytes;
            c.retry = Duration::from_millis(700);
        });
        let mut sub = open(&hub, &["a"], None);
        skip_preamble(&mut sub);
        for i in 0..5 {
            publish(&hub, "a", &format!("e{i}"));
        }
        hub.sample_lag();
        hub.sample_lag();
        let (chunks, ended) = drain(&mut sub);
        assert!(ended, "{name}: the stream ends");
        let (parsed, retry) = parse_stream(&chunks.concat());
        assert_eq!(parsed.len(), 1, "{name}: {chunks:?}");
        assert_eq!(parsed[0].event, sse::CLOSE_EVENT);
        assert_eq!(parsed[0].data, r#"{"reason":"slow"}"#);
        assert_eq!(retry, Some(700));
        assert_eq!(hub.totals().slow_disconnected.load(Relaxed), 1, "{name}");
        assert_eq!(poll(&mut sub, Waker::noop()), Poll::Ready(None));
    }
}

#[test]
fn close_client_ends_the_stream_with_a_close_notice() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);
    let client = sub.client().id().clone();

    assert!(!hub.close_client("no-such-client", sse::CloseReason::Kicked));
    assert!(hub.close_client(&client, sse::CloseReason::Kicked));
    assert_eq!(counter.wakes(), 1);
    // An event published after the close is not delivered.
    publish(&hub, "a", "late");
    let (chunks, ended) = drain_with(&mut sub, &waker);
    assert!(ended);
    let (parsed, retry) = parse_stream(&chunks.concat());
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].event, sse::CLOSE_EVENT);
    assert_eq!(parsed[0].data, r#"{"reason":"kicked"}"#);
    assert_eq!(retry, Some(2000));
    assert_eq!(poll(&mut sub, &waker), Poll::Ready(None));
    // The first reason wins.
    assert!(!sub.client().close(sse::CloseReason::Shutdown));
    assert_eq!(sub.client().close_reason(), Some(sse::CloseReason::Kicked));
}

/// Publishes `n` events on `topic` as one batch (one `PATCH`).
async fn publish_batch(hub: &Hub, topic: &str, n: usize) -> Vec<String> {
    let events: Vec<NewEvent> = (0..n)
        .map(|i| NewEvent {
            topic: topic.into(),
            event: None,
            data: format!("b{i}"),
        })
        .collect();
    hub.publish_batch(&events).await.unwrap()
}

/// Polls `n` chunks; each must be an event.
fn take(sub: &mut Subscription, n: usize) -> Vec<Parsed> {
    let mut chunks = Vec::new();
    for _ in 0..n {
        match poll(sub, Waker::noop()) {
            Poll::Ready(Some(chunk)) => chunks.push(chunk),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    events(&chunks)
}

#[tokio::test]
async fn a_batch_larger_than_the_history_reaches_a_prompt_reader_under_either_policy() {
    // Issue 15, defect 5: `--history-size 5`, one 20-event PATCH.
    for policy in [SlowClientPolicy::Disconnect, SlowClientPolicy::Skip] {
        let hub = hub_with(|c| {
            c.history_size = 5;
            c.slow_client_policy = policy;
        });
        let mut sub = open(&hub, &["a"], None);
        skip_preamble(&mut sub);
        let ids = publish_batch(&hub, "a", 20).await;
        let mut got = take(&mut sub, 3);
        // Samples go by while it reads: 17 unread is within --max-lag.
        hub.sample_lag();
        hub.sample_lag();
        let (chunks, ended) = drain(&mut sub);
        assert!(!ended, "{policy:?}");
        got.extend(events(&chunks));
        let expected: Vec<Parsed> = (0..20)
            .map(|i| message(&ids[i], &format!("b{i}")))
            .collect();
        assert_eq!(got, expected, "{policy:?}");
        let t = hub.totals();
        assert_eq!(t.slow_disconnected.load(Relaxed), 0, "{policy:?}");
        assert_eq!(t.slow_skipped.load(Relaxed), 0, "{policy:?}");

        // Once read, the batch is released down to the history.
        hub.sample_lag();
        publish(&hub, "a", "next");
        let mut late = open(&hub, &["a"], Some(&ids[0]));
        let (chunks, _) = drain(&mut late);
        let replay = events(&chunks);
        assert_eq!(replay[0].event, sse::GAP_EVENT, "{policy:?}: {replay:?}");
        assert_eq!(
            replay.len(),
            1 + 5,
            "{policy:?}: the notice, then the history"
        );
    }
}

#[tokio::test]
async fn one_batch_above_max_lag_closes_only_the_reader_that_stopped_reading() {
    // With the defaults (history 1000, max-lag 500), a 5,000-event batch:
    // the stream that writes it keeps going, the one that never reads is
    // still judged slow.
    let cases = [
        (SlowClientPolicy::Disconnect, "close"),
        (SlowClientPolicy::Skip, "gap"),
    ];
    for (policy, stalled_gets) in cases {
        let hub = hub_with(|c| c.slow_client_policy = policy);
        let mut prompt = open(&hub, &["a"], None);
        let mut stalled = open(&hub, &["a"], None);
        skip_preamble(&mut prompt);
        skip_preamble(&mut stalled);
        let ids = publish_batch(&hub, "a", 5000).await;
        hub.sample_lag();
        let (chunks, ended) = drain(&mut prompt);
        assert!(!ended);
        let got = events(&chunks);
        assert_eq!(got.len(), 5000, "{policy:?}");
        assert_eq!(got[4999], message(&ids[4999], "b4999"));
        hub.sample_lag();
        hub.sample_lag();
        let live = publish(&hub, "a", "live");
        let (chunks, ended) = drain(&mut prompt);
        assert!(!ended, "{policy:?}: the prompt reader is never closed");
        assert_eq!(events(&chunks), [message(&live, "live")], "{policy:?}");

        let (chunks, ended) = drain(&mut stalled);
        let (parsed, _) = parse_stream(&chunks.concat());
        match stalled_gets {
            "close" => {
                assert!(ended);
                assert_eq!(parsed.len(), 1, "{chunks:?}");
                assert_eq!(parsed[0].data, r#"{"reason":"slow"}"#);
                assert_eq!(hub.totals().slow_disconnected.load(Relaxed), 1);
            }
            _ => {
                assert!(!ended);
                assert_eq!(parsed, [gap(&live, "a", "slow")]);
                assert_eq!(hub.totals().slow_skipped.load(Relaxed), 1);
            }
        }
    }
}

#[test]
fn a_resume_older_than_the_history_gets_the_notice_then_every_retained_event() {
    // Issue 15, defect 6: `--history-size 5`, 20 events, resume from the
    // first: the notice, the five retained, then live.
    let hub = hub_with(|c| c.history_size = 5);
    let ids: Vec<String> = (0..20)
        .map(|i| publish(&hub, "a", &format!("e{i}")))
        .collect();
    let mut sub = open(&hub, &["a"], Some(&ids[0]));
    let (mut chunks, _) = drain(&mut sub);
    // Resuming from the notice's id reports no gap again.
    let mut again = open(&hub, &["a"], Some(&ids[14]));
    let (replay, _) = drain(&mut again);
    assert_eq!(events(&replay)[0], message(&ids[15], "e15"));
    let live = publish(&hub, "a", "live");
    chunks.extend(drain(&mut sub).0);
    let mut expected = vec![gap(&ids[14], "a", "expired")];
    expected.extend((15..20).map(|i| message(&ids[i], &format!("e{i}"))));
    expected.push(message(&live, "live"));
    assert_eq!(events(&chunks), expected);
}

/// Waits (with a deadline) until `ttl` has passed since `since`.
fn wait_past(since: std::time::Instant, ttl: Duration) {
    let deadline = since + ttl + Duration::from_secs(10);
    while since.elapsed() <= ttl {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn history_past_its_age_is_never_replayed_even_before_a_sweep() {
    // Issue 15, defect 7: the age is enforced when a resume is located and
    // while a resumed stream reads its history, not only by the sweep.
    let ttl = Duration::from_millis(50);
    let hub = hub_with(|c| c.history_ttl = ttl);
    let published = std::time::Instant::now();
    let ids: Vec<String> = (0..3)
        .map(|i| publish(&hub, "a", &format!("e{i}")))
        .collect();
    // Opened in time, read too late: the notice instead of the events.
    let mut slow_reader = open(&hub, &["a"], Some(&ids[0]));
    wait_past(published, ttl);
    let mut resumed = open(&hub, &["a"], Some(&ids[0]));
    let live = publish(&hub, "a", "live");
    for sub in [&mut slow_reader, &mut resumed] {
        let (chunks, ended) = drain(sub);
        assert!(!ended);
        assert_eq!(
            events(&chunks),
            [gap(&ids[2], "a", "expired"), message(&live, "live")]
        );
    }
}

#[test]
fn dropping_a_subscription_removes_its_client_and_topic_slots() {
    let hub = hub();
    let one = open(&hub, &["a", "b"], None);
    let two = open(&hub, &["b"], None);
    let subscribers = |hub: &Hub| -> Vec<(String, usize)> {
        hub.topics()
            .into_iter()
            .map(|t| (t.name, t.subscribers))
            .collect()
    };
    assert_eq!(hub.client_count(), 2);
    assert_eq!(subscribers(&hub), [("a".into(), 1), ("b".into(), 2)]);

    let id = one.client().id().clone();
    drop(one);
    assert_eq!(hub.client_count(), 1);
    assert!(hub.client(&id).is_none());
    assert!(!hub.close_client(&id, sse::CloseReason::Kicked));
    assert_eq!(subscribers(&hub), [("a".into(), 0), ("b".into(), 1)]);

    drop(two);
    assert_eq!(hub.client_count(), 0);
    assert_eq!(subscribers(&hub), [("a".into(), 0), ("b".into(), 0)]);
    let t = hub.totals();
    assert_eq!(
        (
            t.connections_opened.load(Relaxed),
            t.connections_closed.load(Relaxed)
        ),
        (2, 2)
    );
}

#[test]
fn sweep_forgets_only_empty_unsubscribed_topics() {
    // (history TTL, topic set-up, kept after a sweep)
    type Setup = fn(&Arc<Hub>, &mut Vec<Subscription>);
    let cases: [(&str, Duration, Setup, bool); 4] = [
        (
            "expired events, no subscriber",
            Duration::ZERO,
            |h, _| {
                publish(h, "t", "x");
            },
            false,
        ),
        (
            "expired events, a subscriber",
            Duration::ZERO,
            |h, subs| {
                subs.push(open(h, &["t"], None));
                publish(h, "t", "x");
            },
            true,
        ),
        (
            "retained events, no subscriber",
            Duration::from_secs(300),
            |h, _| {
                publish(h, "t", "x");
            },
            true,
        ),
        (
            "never used",
            Duration::from_secs(300),
            |h, _| {
                h.ensure_topics(["t"]).unwrap();
            },
            false,
        ),
    ];
    for (name, ttl, setup, kept) in cases {
        let hub = hub_with(|c| c.history_ttl = ttl);
        let mut subs = Vec::new();
        setup(&hub, &mut subs);
        assert_eq!(hub.topic_count(), 1, "{name}");
        hub.sweep();
        assert_eq!(hub.topic_count(), usize::from(kept), "{name}");
        drop(subs);
        if kept && ttl.is_zero() {
            hub.sweep();
            assert_eq!(hub.topic_count(), 0, "{name}: forgotten once unsubscribed");
        }
    }
}

#[test]
fn max_clients_refuses_further_streams_until_one_leaves() {
    let hub = hub_with(|c| c.max_clients = 1);
    let first = open(&hub, &["a"], None);
    let err = hub
        .subscribe(&["a".into()], None, meta())
        .err()
        .expect("a second stream is refused");
    assert!(matches!(err, HubError::TooManyClients(1)), "{err:?}");
    assert_eq!(hub.client_count(), 1);
    drop(first);
    let _again = open(&hub, &["a"], None);
    assert_eq!(hub.client_count(), 1);
}

#[test]
fn max_topics_refuses_new_topics_and_leaves_nothing_behind() {
    let hub = hub_with(|c| c.max_topics = 2);
    let topics: Vec<String> = ["a", "b", "c"].iter().map(|t| t.to_string()).collect();
    let err = hub.subscribe(&topics, None, meta()).err().expect("refused");
    assert!(matches!(err, HubError::TooManyTopics(2)), "{err:?}");
    assert_eq!(hub.client_count(), 0);
    assert!(hub.topics().iter().all(|t| t.subscribers == 0));
    assert!(matches!(
        hub.publish("c", None, "x"),
        Err(HubError::TooManyTopics(2))
    ));
    assert!(matches!(
        hub.ensure_topics(["a", "d"]),
        Err(HubError::TooManyTopics(2))
    ));
    // Existing topics still work.
    let mut sub = open(&hub, &["a", "b"], None);
    skip_preamble(&mut sub);
    publish(&hub, "b", "x");
    assert_eq!(events(&drain(&mut sub).0).len(), 1);
}

#[test]
fn a_heartbeat_tick_yields_one_comment() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);

    hub.heartbeat();
    assert_eq!(counter.wakes(), 1);
    hub.heartbeat();
    // Two ticks before the stream ran still write one comment.
    assert_eq!(
        drain_with(&mut sub, &waker),
        (vec![":\n\n".to_string()], false)
    );
    assert_eq!(poll(&mut sub, &waker), Poll::Pending);
    assert_eq!(sub.client().events_sent(), 0);
}

#[test]
fn a_stream_that_carried_an_event_since_the_last_tick_skips_the_heartbeat() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);

    publish(&hub, "a", "x");
    assert_eq!(events(&drain_with(&mut sub, &waker).0).len(), 1);
    // The tick after the event: not idle, not woken, no comment.
    let woken = counter.wakes();
    hub.heartbeat();
    assert_eq!(counter.wakes(), woken);
    assert_eq!(drain_with(&mut sub, &waker), (vec![], false));
    // A whole interval without an event: woken, the comment.
    hub.heartbeat();
    assert_eq!(counter.wakes(), woken + 1);
    assert_eq!(
        drain_with(&mut sub, &waker),
        (vec![":\n\n".to_string()], false)
    );
}

#[test]
fn a_busy_stream_whose_token_expires_is_woken_by_the_tick_to_end() {
    let hub = hub();
    let topics = vec!["a".to_string()];
    let meta = ClientMeta {
        expires_at: Some(std::time::SystemTime::now()),
        ..meta()
    };
    let mut sub = hub.subscribe(&topics, None, meta).unwrap();
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);
    publish(&hub, "a", "x");
    assert_eq!(events(&drain_with(&mut sub, &waker).0).len(), 1);
    // Not idle, but its expiry is checked on each tick: woken, and it ends.
    let woken = counter.wakes();
    hub.heartbeat();
    assert_eq!(counter.wakes(), woken + 1);
    let (out, ended) = drain_with(&mut sub, &waker);
    assert!(ended, "{out:?}");
    assert!(out.iter().any(|s| s.contains("token_expired")), "{out:?}");
}

#[test]
fn events_taken_in_one_read_also_make_the_stream_not_idle() {
    let hub = hub();
    let mut sub = open(&hub, &["a"], None);
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(counter.clone());
    drain_with(&mut sub, &waker);

    publish(&hub, "a", "x");
    publish(&hub, "a", "y");
    let mut taken: Vec<bytes::Bytes> = Vec::new();
    assert_eq!(sub.take_ready(32, false, &mut taken), 2);
    assert_eq!(poll(&mut sub, &waker), Poll::Pending);
    // The tick after those events: not idle, not woken, no comment.
    let woken = counter.wakes();
    hub.heartbeat();
    assert_eq!(counter.wakes(), woken);
    assert_eq!(drain_with(&mut sub, &waker), (vec![], false));
}

/// A bus that only exists: rings are made by the test, events published with
/// `publish_at`, as a partitioned bus (Kafka) would.
struct NullBus;

impl Bus for NullBus {
    fn name(&self) -> &'static str {
        "null"
    }

    fn publish<'a>(
        &'a self,
        _: &'a [NewEvent],
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn follow<'a>(
        &'a self,
        _: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async { Ok(()) })
    }

    fn catch_up(
        &self,
        _: &str,
        _: Position,
        _: Position,
    ) -> tokio::sync::mpsc::Receiver<crate::hub::CatchUp> {
        tokio::sync::mpsc::channel(1).1
    }

    fn is_up(&self) -> bool {
        true
    }
}

#[test]
fn a_partitioned_topic_is_read_from_every_partition_with_one_cursor_entry_each() {
    let hub = hub();
    assert!(hub.set_bus(Arc::new(NullBus)).is_ok());
    for p in 0..2 {
        let start = Position::new(p, 0);
        assert_eq!(
            hub.ensure_partition_at(&format!("t#{p}"), "t", p, start)
                .unwrap(),
            start
        );
    }
    hub.ensure_partition_at("u#0", "u", 0, Position::new(0, 0))
        .unwrap();
    let mut sub = open(&hub, &["t"], None);
    let mut single = open(&hub, &["u"], None);
    skip_preamble(&mut sub);
    skip_preamble(&mut single);
    assert!(hub.publish_at("t#1", Position::new(1, 1), None, "a"));
    assert!(hub.publish_at("t#0", Position::new(0, 1), None, "b"));
    assert!(hub.publish_at("t#1", Position::new(1, 2), None, "c"));
    assert!(
        !hub.publish_at("t#1", Position::new(1, 2), None, "again"),
        "a position once"
    );
    assert!(hub.publish_at("u#0", Position::new(0, 1), None, "d"));
    assert_eq!(
        events(&drain(&mut sub).0),
        [
            message("t:0-1,t:1-0", "b"),
            message("t:0-1,t:1-1", "a"),
            message("t:0-1,t:1-2", "c"),
        ],
        "one stream over both partitions, its id the cursor over them"
    );
    assert_eq!(
        events(&drain(&mut single).0),
        [message("u:0-1", "d")],
        "one partition: the event's own id, the topic's name"
    );
    let client = hub.client(sub.client().id()).unwrap();
    assert_eq!(&*client.topics()[0], "t", "clients list topic names");

    // Resume by (topic, partition); a partition missing from the cursor
    // starts live.
    let mut resumed = open(&hub, &["t"], Some("t:0-0,t:1-1"));
    assert_eq!(
        events(&drain(&mut resumed).0),
        [message("t:0-1,t:1-1", "b"), message("t:0-1,t:1-2", "c")]
    );
    let mut partial = open(&hub, &["t"], Some("t:1-1"));
    assert_eq!(
        events(&drain(&mut partial).0),
        [message("t:0-1,t:1-2", "c")]
    );

    let rows = hub.topics();
    assert_eq!(rows.len(), 2, "one row per topic: {rows:?}");
    assert_eq!((rows[0].name.as_str(), rows[0].events_published), ("t", 3));
    assert_eq!(rows[0].last_event_id.as_deref(), Some("t:0-1,t:1-2"));
    assert_eq!(rows[0].subscribers, 3);
}

#[test]
fn a_reset_ring_gives_its_live_streams_a_notice_then_the_new_log() {
    let hub = hub();
    assert!(hub.set_bus(Arc::new(NullBus)).is_ok());
    hub.ensure_partition_at("t#0", "t", 0, Position::new(0, 0))
        .unwrap();
    for lo in 1..=3 {
        assert!(hub.publish_at("t#0", Position::new(0, lo), None, "old"));
    }
    let mut live = open(&hub, &["t"], None);
    let mut behind = open(&hub, &["t"], Some("t:0-1"));
    skip_preamble(&mut live);

    // The log started again: positions restart below the ring's.
    assert!(hub.reset_ring("t#0", Position::new(0, 0)));
    assert!(!hub.reset_ring("nope#0", Position::new(0, 0)));
    assert!(hub.publish_at("t#0", Position::new(0, 1), None, "new"));
    let want = [gap("t:0-0", "t", "reset"), message("t:0-1", "new")];
    assert_eq!(events(&drain(&mut live).0), want);
    // A stream that had not read the old log to its end (not polled yet)
    // is not judged slow for it: the same notice, then the new log.
    assert_eq!(events(&drain(&mut behind).0), want);
    assert_eq!(
        hub.topics()[0].last_event_id.as_deref(),
        Some("t:0-1"),
        "the ring goes on with the new log"
    );
    // A stream opened after the reset has nothing to be told.
    let mut fresh = open(&hub, &["t"], Some("t:0-0"));
    assert_eq!(events(&drain(&mut fresh).0), [message("t:0-1", "new")]);
}

#[test]
fn every_hub_has_its_own_epoch_even_within_one_millisecond() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let epochs: Vec<u64> = (0..50).map(|_| hub_with(|_| {}).epoch()).collect();
    let distinct: std::collections::BTreeSet<u64> = epochs.iter().copied().collect();
    assert_eq!(distinct.len(), epochs.len(), "{epochs:?}");
    // The start time in milliseconds is still readable in it.
    assert!(epochs.iter().all(|e| e / 1000 >= before), "{epochs:?}");
}
