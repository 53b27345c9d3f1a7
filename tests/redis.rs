//! Several replicas sharing one real `redis-server`: shared events and
//! history, resume across replicas, cluster-wide clients, outages, shutdown.

mod common;

use common::redis::RedisServer;
use common::*;
use serde_json::{Value, json};

/// A replica on `redis` named `name`, with extra flags.
async fn replica(redis: &RedisServer, name: &str, extra: &[&str]) -> TestGateway {
    let url = redis.url();
    let mut args = vec![
        "--redis-url",
        &url,
        "--replica-id",
        name,
        "--redis-timeout",
        "500ms",
    ];
    args.extend_from_slice(extra);
    TestGateway::start_with(&args).await
}

fn sorted_by_position(mut ids: Vec<String>) -> Vec<String> {
    ids.sort_by_key(|id| position(id));
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_on_either_replica_reach_clients_of_both() {
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &[]).await;
    let mut on_a = SseClient::connect(&a.stream_url("topic=t")).await;
    let mut on_b = SseClient::connect(&b.stream_url("topic=t")).await;

    let mut published = Vec::new();
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        published.extend(
            gw.publish(json!([{"topic": "t", "event": "n", "data": format!("e{i}")}]))
                .await,
        );
    }
    let published = sorted_by_position(published);
    for client in [&mut on_a, &mut on_b] {
        let got = client.events(10).await;
        let ids: Vec<String> = got.iter().map(|e| e.id.clone().unwrap()).collect();
        assert_eq!(ids, published, "same ids, same order, on every replica");
        assert!(got.iter().all(|e| e.event == "n"));
    }
    let ready = get_json(&a.control_url("/ready")).await;
    assert_eq!(ready["backends"]["redis"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_on_another_replica_without_loss_or_duplicates() {
    const N: usize = 400;
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &[]).await;
    let (ca, cb) = (a.control, b.control);

    // Follow the topic on both replicas before publishing starts.
    let mut client = SseClient::connect(&a.stream_url("topic=r")).await;
    let publisher = tokio::spawn(async move {
        let http = http();
        let mut ids = Vec::new();
        for i in 0..N {
            let control = if i % 2 == 0 { ca } else { cb };
            ids.extend(
                publish_to(
                    &http,
                    control,
                    &json!({"topic": "r", "data": i.to_string()}),
                )
                .await,
            );
        }
        ids
    });

    let mut received: Vec<String> = Vec::new();
    let mut hop = 0;
    while received.len() < N {
        // Read a few, then move to the other replica with Last-Event-ID.
        for _ in 0..37 {
            if received.len() == N {
                break;
            }
            received.push(client.next_event().await.expect("stream open").id.unwrap());
        }
        hop += 1;
        let gw = if hop % 2 == 0 { &a } else { &b };
        let last = received.last().cloned();
        client = SseClient::connect_with(&http(), &gw.stream_url("topic=r"), last.as_deref()).await;
    }
    let published = sorted_by_position(publisher.await.unwrap());
    assert_eq!(
        received, published,
        "every event once, in order, across {hop} hops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_older_than_memory_is_read_back_from_redis() {
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &["--history-size", "5"]).await;
    // Make b follow the topic, so its small ring fills up and evicts.
    let mut watcher = SseClient::connect(&b.stream_url("topic=h")).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.extend(
            a.publish(json!({"topic": "h", "data": format!("{i}")}))
                .await,
        );
    }
    watcher.events(50).await;

    let mut client =
        SseClient::connect_with(&http(), &b.stream_url("topic=h"), Some(&ids[9])).await;
    for i in 50..60 {
        ids.extend(
            a.publish(json!({"topic": "h", "data": format!("{i}")}))
                .await,
        );
    }
    let got = client.events(50).await;
    let got_ids: Vec<&str> = got.iter().map(|e| e.id.as_deref().unwrap()).collect();
    let want: Vec<&str> = ids[10..].iter().map(String::as_str).collect();
    assert_eq!(got_ids, want, "events 10..60, from Redis and then the ring");
    assert_eq!(got[0].data, "10");
    assert_eq!(got[49].data, "59");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_one_replica_ends_a_client_on_another() {
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &[]).await;
    let mut client = SseClient::connect(&b.stream_url("topic=k")).await;
    let id = client.client_id().await;

    // The cluster list on a shows b's client, with its replica.
    let list_url = a.control_url("/clients?scope=cluster");
    eventually_async("a lists b's client", || async {
        let v = get_json(&list_url).await;
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str() && c["replica"] == "b")
    })
    .await;
    let local = get_json(&a.control_url("/clients")).await;
    assert_eq!(
        local["clients"],
        json!([]),
        "the default scope is this replica"
    );

    let res = delete(&a.control_url(&format!("/clients/{id}"))).await;
    assert_eq!(res.status(), 204);
    let last = client.until_end().await;
    let close = last.last().expect("a close notice");
    assert_eq!(close.event, "streamline.close");
    assert_eq!(close.data, r#"{"reason":"kicked"}"#);

    let res = delete(&a.control_url("/clients/nobody-1")).await;
    expect_api_error(res, 404, "not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rides_out_a_redis_outage() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let gw = replica(&redis, "a", &[]).await;
    let mut client = SseClient::connect(&gw.stream_url("topic=o")).await;
    gw.publish_one("o", "before").await;
    assert_eq!(client.next_event().await.unwrap().data, "before");

    redis.kill().await;
    let ready = gw.control_url("/ready");
    eventually_async("ready reports redis down", || async {
        let res = http().get(&ready).send().await.unwrap();
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        status == 503 && body["backends"]["redis"] == "down"
    })
    .await;
    let res = http()
        .patch(gw.control_url("/events"))
        .json(&json!({"topic": "o", "data": "lost?"}))
        .send()
        .await
        .unwrap();
    expect_api_error(res, 503, "backend_unavailable").await;
    assert_eq!(gw.hub.client_count(), 1, "the stream stays open");

    let _redis = RedisServer::start_on(port).await;
    wait_status("ready again", &ready, 200).await;
    let id = gw.publish_one("o", "after").await;
    let ev = client.next_event().await.unwrap();
    assert_eq!(
        (ev.data.as_str(), ev.id.as_deref()),
        ("after", Some(id.as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deregisters_this_replicas_clients() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut gw = BinaryGateway::start(&["--redis-url", &url, "--replica-id", "gone"]).await;
    let _client = SseClient::connect(&gw.stream_url("topic=d")).await;
    let mut conn = redis.conn().await;
    let registered = || {
        let mut conn = conn.clone();
        async move {
            let n: usize = ::redis::cmd("HLEN")
                .arg("streamline:clients:gone")
                .query_async(&mut conn)
                .await
                .unwrap();
            n == 1
        }
    };
    eventually_async("the client is registered", registered).await;

    gw.signal("TERM");
    assert!(gw.wait_exit().await.success());
    let exists: bool = ::redis::cmd("EXISTS")
        .arg("streamline:clients:gone")
        .query_async(&mut conn)
        .await
        .unwrap();
    let score: Option<f64> = ::redis::cmd("ZSCORE")
        .arg("streamline:replicas")
        .arg("gone")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists && score.is_none(), "no trace of the replica left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_with_scope_cluster_lists_every_live_replica() {
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &[]).await;
    let mut client = SseClient::connect(&b.stream_url("topic=st")).await;
    client.client_id().await;

    let url = a.control_url("/stats?scope=cluster");
    eventually_async("a's stats list b with its client", || async {
        let v = get_json(&url).await;
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["replica"] == "b" && r["clients"] == 1)
    })
    .await;
    let v = get_json(&url).await;
    let replicas = v["replicas"].as_array().unwrap();
    let names: Vec<&str> = replicas
        .iter()
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "the answering replica first: {v}");
    assert_eq!(v["replica"], "a");
    for r in replicas {
        assert_eq!(r["phase"], "serving");
        assert!(r["at"].as_u64().unwrap() > 0);
    }
    // The default scope is this replica.
    let local = get_json(&a.control_url("/stats")).await;
    assert_eq!(local["replicas"].as_array().unwrap().len(), 1);

    // A replica that stops leaves the list.
    b.shutdown().await;
    eventually_async("b gone from a's stats", || async {
        let v = get_json(&url).await;
        v["replicas"].as_array().unwrap().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_batch_reaches_prompt_readers_on_every_replica_whole() {
    // More events than b's history and than --max-lag, in one PATCH that
    // reaches b through its Redis tail.
    const N: usize = 2000;
    let redis = RedisServer::start().await;
    let a = replica(&redis, "a", &[]).await;
    let b = replica(&redis, "b", &["--history-size", "5"]).await;
    let mut readers = Vec::new();
    for gw in [&a, &b] {
        for _ in 0..2 {
            let mut r = SseClient::connect(&gw.stream_url("topic=big")).await;
            r.client_id().await;
            readers.push(r);
        }
        gw.wait_clients(2).await;
    }
    let events: Vec<Value> = (0..N)
        .map(|i| json!({"topic": "big", "data": format!("b{i}")}))
        .collect();
    let ids = a.publish(json!(events)).await;
    for (r, reader) in readers.iter_mut().enumerate() {
        let got = reader.events(N).await;
        let got: Vec<(&str, &str)> = got
            .iter()
            .map(|e| (e.id.as_deref().unwrap(), e.data.as_str()))
            .collect();
        let data: Vec<String> = (0..N).map(|i| format!("b{i}")).collect();
        let want: Vec<(&str, &str)> = ids
            .iter()
            .map(String::as_str)
            .zip(data.iter().map(String::as_str))
            .collect();
        assert!(got == want, "reader {r}: not the batch, whole and in order");
    }
    let live = b.publish_one("big", "after").await;
    for reader in &mut readers {
        let ev = reader.next_event().await.expect("the stream stays open");
        assert_eq!(ev.id.as_deref(), Some(live.as_str()));
    }
    for gw in [&a, &b] {
        let t = gw.hub.totals();
        assert_eq!(
            t.slow_disconnected
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(t.slow_skipped.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_older_than_redis_keeps_gets_the_notice_then_everything_retained() {
    let redis = RedisServer::start().await;
    let gw = replica(
        &redis,
        "a",
        &["--history-size", "5", "--redis-stream-maxlen", "10"],
    )
    .await;
    // Follow the topic, so the ring fills up and evicts.
    let mut watcher = SseClient::connect(&gw.stream_url("topic=t")).await;
    watcher.client_id().await;
    let mut ids = Vec::new();
    for chunk in 0..5 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"topic": "t", "data": format!("e{}", chunk * 100 + i)}))
            .collect();
        ids.extend(gw.publish(json!(events)).await);
    }
    watcher.events(ids.len()).await;
    // What Redis still has (MAXLEN ~ trims whole nodes, so more than 10).
    let mut conn = redis.conn().await;
    let kept: Vec<(String, Vec<(String, String)>)> = ::redis::cmd("XRANGE")
        .arg("streamline:s:t")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let kept: Vec<String> = kept.into_iter().map(|(id, _)| format!("t:{id}")).collect();
    let first_kept = ids.iter().position(|id| *id == kept[0]).unwrap();
    assert!(first_kept > 1, "Redis trimmed nothing: {}", kept.len());
    assert_eq!(kept[..], ids[first_kept..], "Redis keeps the newest events");

    let mut client =
        SseClient::connect_with(&http(), &gw.stream_url("topic=t"), Some(&ids[0])).await;
    client.client_id().await;
    let notice = client.next_event().await.unwrap();
    assert_eq!(notice.event, "streamline.gap");
    assert_eq!(notice.data, r#"{"topic":"t","reason":"expired"}"#);
    let got = client.events(kept.len()).await;
    let got: Vec<&str> = got.iter().map(|e| e.id.as_deref().unwrap()).collect();
    assert_eq!(got, kept, "every event Redis or the ring retains, in order");
    let live = gw.publish_one("t", "live").await;
    let ev = client.next_event().await.unwrap();
    assert_eq!(ev.id.as_deref(), Some(live.as_str()));
    // The notice's id is past the gap: resuming from it reports none.
    let mut again =
        SseClient::connect_with(&http(), &gw.stream_url("topic=t"), notice.id.as_deref()).await;
    again.client_id().await;
    let ev = again.next_event().await.unwrap();
    assert_eq!(ev.id.as_deref(), Some(kept[0].as_str()));
}
