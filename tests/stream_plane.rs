//! The stream plane over real sockets: what a subscriber receives, the
//! headers and preamble, fan-out, bad requests, heartbeats, HTTP/2 and
//! disconnects.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_single_topic_stream_delivers_events_with_their_ids() {
    let gw = TestGateway::start().await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=news")).await;
    sub.client_id().await;
    let first = gw.publish_one("news", "one").await;
    let second = gw.publish_one("news", "two").await;
    assert!(first.starts_with("news:"), "{first}");
    let (hi1, lo1) = position(&first);
    let (hi2, lo2) = position(&second);
    assert_eq!(hi1, hi2, "one run, one epoch");
    assert!(lo2 > lo1, "{first} then {second}");
    let got = sub.events(2).await;
    assert_eq!(got[0].id.as_deref(), Some(first.as_str()));
    assert_eq!(got[0].event, "message");
    assert_eq!(got[0].data, "one");
    assert_eq!(got[1].id.as_deref(), Some(second.as_str()));
    assert_eq!(got[1].data, "two");
}

#[tokio::test]
async fn a_multi_topic_stream_carries_composite_cursors_that_resume() {
    let gw = TestGateway::start().await;
    let url = gw.stream_url("topic=a&topic=b");
    let mut sub = SseClient::connect(&url).await;
    sub.client_id().await;
    let a1 = gw.publish_one("a", "a1").await;
    let b1 = gw.publish_one("b", "b1").await;
    let a2 = gw.publish_one("a", "a2").await;
    let (epoch, _) = position(&a1);
    // Each topic's entry is its last event written, or where it started.
    let cursors = [
        format!("{a1},b:{epoch}-0"),
        format!("{a1},{b1}"),
        format!("{a2},{b1}"),
    ];
    let got = sub.events(3).await;
    let ids: Vec<_> = got.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids, cursors);
    let data: Vec<_> = got.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["a1", "b1", "a2"]);

    // The first cursor, sent back, resumes with exactly the events missed
    // (catching up, topics take turns, so only per-topic order holds).
    let mut resumed = SseClient::connect_with(&http(), &url, Some(&cursors[0])).await;
    resumed.client_id().await;
    let got = resumed.events(2).await;
    let mut data: Vec<_> = got.iter().map(|e| e.data.as_str()).collect();
    data.sort();
    assert_eq!(data, ["a2", "b1"]);
    assert_eq!(got[1].id.as_ref(), Some(&cursors[2]));
}

#[tokio::test]
async fn a_stream_answers_with_sse_headers_then_the_preamble() {
    let gw = TestGateway::start_with(&["--retry", "1500ms"]).await;
    let mut res = http().get(gw.stream_url("topic=a")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-accel-buffering", "no"),
    ] {
        assert_eq!(res.headers()[name], value, "header {name}");
    }
    let mut head = Vec::new();
    while !head.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(WAIT, res.chunk())
            .await
            .expect("preamble in time")
            .unwrap()
            .expect("stream still open");
        head.extend_from_slice(&chunk);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("retry: 1500"), "{head:?}");
    let id = lines
        .next()
        .and_then(|l| l.strip_prefix(": client "))
        .unwrap_or_else(|| panic!("no client comment in {head:?}"));
    assert!(!id.is_empty());
    let client = get_json(&gw.control_url(&format!("/clients/{id}"))).await;
    assert_eq!(client["id"], id);
}

#[tokio::test]
async fn payloads_arrive_intact() {
    let gw = TestGateway::start().await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=p")).await;
    sub.client_id().await;
    // (what is sent as a JSON string, what EventSource hands the page)
    let cases = [
        ("plain", "plain"),
        ("line1\nline2\nline3", "line1\nline2\nline3"),
        ("cr\rseparated", "cr\nseparated"),
        ("crlf\r\nseparated", "crlf\nseparated"),
        ("mixed\n\r\r\n.", "mixed\n\n\n."),
        ("", ""),
        ("\n", "\n"),
        ("trailing\n", "trailing\n"),
        ("  leading spaces", "  leading spaces"),
        ("héllo ✓ 🎉 日本語", "héllo ✓ 🎉 日本語"),
        (
            "x\n\nid: forged\nevent: admin\ndata: pwned",
            "x\n\nid: forged\nevent: admin\ndata: pwned",
        ),
        (": not a comment", ": not a comment"),
    ];
    let batch: Vec<Value> = cases
        .iter()
        .map(|(sent, _)| json!({"topic": "p", "data": sent}))
        .collect();
    let ids = gw.publish(Value::Array(batch)).await;
    let got = sub.events(cases.len()).await;
    for ((sent, expected), (ev, id)) in cases.iter().zip(got.iter().zip(&ids)) {
        assert_eq!(ev.data, *expected, "payload {sent:?}");
        assert_eq!(ev.id.as_ref(), Some(id), "payload {sent:?} is one event");
        assert_eq!(ev.event, "message");
    }
}

#[tokio::test]
async fn non_string_data_arrives_as_compact_json() {
    let gw = TestGateway::start().await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=j")).await;
    sub.client_id().await;
    // Raw bodies, so the whitespace the publisher sent is really there.
    let cases = [
        (
            r#"{ "k" : [1, 2, 3], "s": "has  space" }"#,
            r#"{"k":[1,2,3],"s":"has  space"}"#,
        ),
        (
            "{\n  \"zeta\": 1,\n  \"alpha\": {\"x\": null}\n}",
            r#"{"zeta":1,"alpha":{"x":null}}"#,
        ),
        (
            r#"{"big": 123456789012345678901234567890, "f": 1.50}"#,
            r#"{"big":123456789012345678901234567890,"f":1.50}"#,
        ),
        (r#"[ 1, "two", true ]"#, r#"[1,"two",true]"#),
        ("42", "42"),
        ("null", "null"),
        ("false", "false"),
        (
            r#"{"esc": "quote \" and \\ and \n"}"#,
            r#"{"esc":"quote \" and \\ and \n"}"#,
        ),
    ];
    let mut ids = Vec::new();
    for (data, _) in &cases {
        let body = format!(r#"{{"topic": "j", "data": {data}}}"#);
        let res = http()
            .patch(gw.control_url("/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "data {data}");
        let v: Value = res.json().await.unwrap();
        ids.push(v["ids"][0].as_str().unwrap().to_owned());
    }
    let got = sub.events(cases.len()).await;
    for ((sent, expected), (ev, id)) in cases.iter().zip(got.iter().zip(&ids)) {
        assert_eq!(ev.data, *expected, "data {sent}");
        assert_eq!(ev.id.as_ref(), Some(id));
    }
}

#[tokio::test]
async fn a_batch_arrives_in_order_with_its_event_names() {
    let gw = TestGateway::start().await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=o")).await;
    sub.client_id().await;
    let batch: Vec<Value> = (0..20)
        .map(|i| match i % 3 {
            0 => json!({"topic": "o", "data": i.to_string()}),
            1 => json!({"topic": "o", "event": "tick", "data": i.to_string()}),
            _ => json!({"topic": "o", "event": "user.update-v2", "data": i.to_string()}),
        })
        .collect();
    let ids = gw.publish(Value::Array(batch.clone())).await;
    let got = sub.events(batch.len()).await;
    for ((sent, id), ev) in batch.iter().zip(&ids).zip(&got) {
        assert_eq!(ev.id.as_ref(), Some(id));
        assert_eq!(ev.data, sent["data"].as_str().unwrap());
        assert_eq!(ev.event, sent["event"].as_str().unwrap_or("message"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_each_receive_every_event_in_order() {
    const SUBSCRIBERS: usize = 1000;
    const EVENTS: usize = 50;
    let gw = TestGateway::start().await;
    let client = http();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SUBSCRIBERS {
        let (client, url) = (client.clone(), gw.stream_url("topic=fanout"));
        tasks.spawn(async move {
            let mut sub = SseClient::connect_with(&client, &url, None).await;
            sub.client_id().await;
            let got = sub.events(EVENTS).await;
            got.into_iter()
                .map(|e| (e.id.unwrap(), e.data))
                .collect::<Vec<_>>()
        });
    }
    gw.wait_clients(SUBSCRIBERS).await;
    let mut expected = Vec::new();
    for chunk in 0..5 {
        let data: Vec<String> = (0..EVENTS / 5)
            .map(|i| (chunk * EVENTS / 5 + i).to_string())
            .collect();
        let batch = data.iter().map(|d| json!({"topic": "fanout", "data": d}));
        let ids = gw.publish(Value::Array(batch.collect())).await;
        expected.extend(ids.into_iter().zip(data));
    }
    let mut finished = 0;
    while let Some(got) = tasks.join_next().await {
        assert_eq!(got.expect("subscriber task"), expected);
        finished += 1;
    }
    assert_eq!(finished, SUBSCRIBERS);
}

/// One request the stream plane must refuse.
struct Refused {
    method: &'static str,
    target: String,
    last_event_id: Option<&'static str>,
    status: u16,
    code: &'static str,
    /// Something the detail must mention.
    detail_has: &'static str,
}

fn refused(
    method: &'static str,
    target: impl Into<String>,
    status: u16,
    code: &'static str,
    detail_has: &'static str,
) -> Refused {
    Refused {
        method,
        target: target.into(),
        last_event_id: None,
        status,
        code,
        detail_has,
    }
}

#[tokio::test]
async fn bad_stream_requests_are_refused_and_harm_no_one() {
    let gw = TestGateway::start_with(&["--max-stream-topics", "3", "--max-clients", "1"]).await;
    // The one stream allowed; every refusal below must leave it working.
    let mut good = SseClient::connect(&gw.stream_url("topic=good")).await;
    good.client_id().await;

    let bad_id = |id, query: &str| Refused {
        last_event_id: Some(id),
        ..refused(
            "GET",
            format!("/stream?topic=a{query}"),
            400,
            "invalid_last_event_id",
            "Last-Event-ID",
        )
    };
    let cases = [
        refused("GET", "/stream", 400, "missing_topic", "topic"),
        refused("GET", "/stream?other=1", 400, "missing_topic", "topic"),
        refused("GET", "/stream?topic=", 400, "invalid_topic", "topic"),
        refused("GET", "/stream?topic=a%20b", 400, "invalid_topic", "topic"),
        refused("GET", "/stream?topic=a:b", 400, "invalid_topic", "topic"),
        refused(
            "GET",
            "/stream?topic=ok&topic=%C3%A9",
            400,
            "invalid_topic",
            "topic",
        ),
        refused(
            "GET",
            format!("/stream?topic={}", "x".repeat(129)),
            400,
            "invalid_topic",
            "128",
        ),
        refused(
            "GET",
            "/stream?topic=a&topic=b&topic=c&topic=d",
            400,
            "too_many_stream_topics",
            "3",
        ),
        refused("POST", "/stream?topic=a", 405, "method_not_allowed", "GET"),
        refused("PUT", "/stream?topic=a", 405, "method_not_allowed", "GET"),
        refused(
            "DELETE",
            "/stream?topic=a",
            405,
            "method_not_allowed",
            "GET",
        ),
        refused("GET", "/", 404, "not_found", "/stream"),
        refused("GET", "/streams?topic=a", 404, "not_found", "/stream"),
        refused("GET", "/stream/a?topic=a", 404, "not_found", "/stream"),
        refused("GET", "/stream?topic=a", 503, "too_many_clients", "1"),
        bad_id("garbage", ""),
        bad_id("a:1-x", ""),
        bad_id("a:1-2,a:1-3", ""),
        Refused {
            last_event_id: None,
            ..bad_id("", "&lastEventId=zzz")
        },
    ];
    let client = http();
    for case in &cases {
        let what = format!(
            "{} {} (Last-Event-ID {:?})",
            case.method, case.target, case.last_event_id
        );
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let url = format!("http://{}{}", gw.stream, case.target);
        let mut req = client.request(method, &url);
        if let Some(id) = case.last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let allow = res.headers().get("allow").cloned();
        let retry_after = res.headers().get("retry-after").cloned();
        let detail = expect_api_error(res, case.status, case.code).await;
        assert!(
            detail.contains(case.detail_has),
            "{what}: detail {detail:?} should mention {:?}",
            case.detail_has
        );
        match case.status {
            405 => assert_eq!(
                allow.as_ref().map(|v| v.to_str().unwrap()),
                Some("GET"),
                "{what}"
            ),
            503 => {
                let secs: u64 = retry_after
                    .unwrap_or_else(|| panic!("{what}: no Retry-After"))
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(secs > 0, "{what}");
            }
            _ => {}
        }

        let id = gw.publish_one("good", &what).await;
        let ev = good
            .next_event()
            .await
            .expect("the good stream is still open");
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str()),
            (Some(id.as_str()), what.as_str())
        );
    }
    assert_eq!(gw.hub.client_count(), 1);
}

#[tokio::test]
async fn an_idle_stream_receives_heartbeat_comments() {
    let gw = TestGateway::start_with(&["--heartbeat", "200ms"]).await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=quiet")).await;
    sub.client_id().await;
    // The next items are heartbeats (an empty comment) and nothing else.
    for _ in 0..2 {
        let item = sub.next_item().await.expect("stream open");
        assert_eq!(
            item,
            Item::Comment(String::new()),
            "an idle stream got {item:?}"
        );
    }
    // Heartbeats do not disturb delivery.
    let id = gw.publish_one("quiet", "after").await;
    let ev = sub.next_event().await.unwrap();
    assert_eq!(ev.id, Some(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_share_a_connection_and_are_listed_as_http2() {
    let gw = TestGateway::start().await;
    let h2 = http2();
    let mut one = SseClient::connect_with(&h2, &gw.stream_url("topic=a"), None).await;
    let one_id = one.client_id().await;
    let mut two = SseClient::connect_with(&h2, &gw.stream_url("topic=a&topic=b"), None).await;
    let two_id = two.client_id().await;
    assert_eq!(one.headers["content-type"], "text/event-stream");

    let id = gw.publish_one("a", "over h2").await;
    assert_eq!(one.next_event().await.unwrap().id.as_ref(), Some(&id));
    let ev = two.next_event().await.unwrap();
    assert_eq!(ev.data, "over h2");
    let (epoch, _) = position(&id);
    assert_eq!(ev.id, Some(format!("{id},b:{epoch}-0")));

    let clients = get_json(&gw.control_url("/clients")).await;
    let clients = clients["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2);
    for c in clients {
        assert_eq!(c["protocol"], "HTTP/2", "{c}");
        assert_eq!(
            c["remote_addr"], clients[0]["remote_addr"],
            "one connection carries both"
        );
    }
    let ids: Vec<_> = clients.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&one_id.as_str()) && ids.contains(&two_id.as_str()));

    // Ending one HTTP/2 stream removes only that client; the connection and
    // the other stream go on.
    drop(one);
    gw.wait_clients(1).await;
    let b_id = gw.publish_one("b", "still here").await;
    let ev = two.next_event().await.unwrap();
    assert_eq!(ev.id, Some(format!("{id},{b_id}")));
    assert_eq!(ev.data, "still here");
}

#[tokio::test]
async fn a_client_that_disconnects_is_removed_at_once() {
    let gw = TestGateway::start().await;
    let mut stays = SseClient::connect(&gw.stream_url("topic=t")).await;
    stays.client_id().await;
    let mut leaves = SseClient::connect(&gw.stream_url("topic=t&topic=u")).await;
    let leaving_id = leaves.client_id().await;
    gw.wait_clients(2).await;

    drop(leaves);
    gw.wait_clients(1).await;
    let res = http()
        .get(gw.control_url(&format!("/clients/{leaving_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let topics = get_json(&gw.control_url("/topics")).await;
    let subscribers = |name: &str| {
        topics["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["subscribers"].as_u64().unwrap())
    };
    assert_eq!(subscribers("t"), Some(1));
    assert!(matches!(subscribers("u"), None | Some(0)));

    let id = gw.publish_one("t", "x").await;
    assert_eq!(stays.next_event().await.unwrap().id, Some(id));
}

/// Reads from `sock` into `buf` until `done(buf)` holds; fails after [`WAIT`].
async fn read_until(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    use tokio::io::AsyncReadExt;
    while !done(buf) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, sock.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("timed out; got {:?}", String::from_utf8_lossy(buf)))
            .expect("read");
        assert!(
            n > 0,
            "closed early; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Ends the stream whose preamble is in `got` with `DELETE /clients/{id}`
/// and reads what the gateway sends until it closes the connection.
async fn kick_and_read_rest(
    gw: &TestGateway,
    sock: &mut tokio::net::TcpStream,
    got: &[u8],
) -> String {
    use tokio::io::AsyncReadExt;
    let text = String::from_utf8_lossy(got);
    let client = text
        .split(": client ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("a preamble with the client id");
    let res = delete(&gw.control_url(&format!("/clients/{client}"))).await;
    assert_eq!(res.status(), 204);
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, sock.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    String::from_utf8_lossy(&rest).into_owned()
}

/// Reads a raw stream's response up to and including its preamble (the
/// `: client <id>` comment).
async fn read_preamble(sock: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    read_until(sock, &mut got, |b| contains(b, ": client ")).await;
    got
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn an_http10_stream_is_close_delimited_and_ends_with_the_connection() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start().await;
    let mut sock = tokio::net::TcpStream::connect(gw.stream).await.unwrap();
    sock.write_all(b"GET /stream?topic=old HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = read_preamble(&mut sock).await;
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.starts_with("http/1.0 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("\r\ndate: "), "{head}");

    let id = gw.publish_one("old", "plain").await;
    // No chunk framing: the event's lines follow each other as sent.
    let event = format!("\nid: {id}\ndata: plain\n\n");
    read_until(&mut sock, &mut got, |b| contains(b, &event)).await;

    // Ended by the gateway: the close notice, then the connection closes.
    let rest = kick_and_read_rest(&gw, &mut sock, &got).await;
    assert!(rest.contains("event: streamline.close"), "{rest}");
    assert!(rest.ends_with("\n\n"), "{rest:?}");
}

#[tokio::test]
async fn a_chunked_stream_ends_with_the_last_chunk_and_a_close() {
    let gw = TestGateway::start().await;
    let RawStream { stream: mut sock } = RawStream::open(gw.stream, "topic=fin", None).await;
    let got = read_preamble(&mut sock).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        text.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{text}"
    );
    let rest = kick_and_read_rest(&gw, &mut sock, &got).await;
    assert!(rest.contains("event: streamline.close"), "{rest}");
    assert!(rest.ends_with("\r\n0\r\n\r\n"), "{rest:?}");
}

#[tokio::test]
async fn bytes_after_the_request_are_ignored_and_a_half_close_ends_the_stream() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start().await;
    let mut watcher = SseClient::connect(&gw.stream_url("topic=chat")).await;
    watcher.client_id().await;
    let RawStream { stream: mut sock } = RawStream::open(gw.stream, "topic=chat", None).await;
    let mut got = read_preamble(&mut sock).await;
    gw.wait_clients(2).await;

    // A pipelined request and some noise: a stream has no next request.
    sock.write_all(b"GET /stream?topic=other HTTP/1.1\r\nHost: x\r\n\r\nnoise")
        .await
        .unwrap();
    let first = gw.publish_one("chat", "still streaming").await;
    read_until(&mut sock, &mut got, |b| {
        contains(b, &format!("id: {first}\n"))
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&got).matches("HTTP/1.1").count(),
        1,
        "one response"
    );

    // The client closes its side: the gateway ends the stream, and only it.
    sock.shutdown().await.unwrap();
    gw.wait_clients(1).await;
    let second = gw.publish_one("chat", "for the watcher").await;
    let ids: Vec<_> = watcher.events(2).await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, [Some(first), Some(second)]);
}

#[tokio::test]
async fn a_stream_on_a_reused_connection_follows_the_answers_before_it() {
    use tokio::io::AsyncWriteExt;
    let gw = TestGateway::start_with(&["--cors-allow-origin", "http://app.example"]).await;
    let mut sock = tokio::net::TcpStream::connect(gw.stream).await.unwrap();
    // A preflight, a refused stream and a stream, pipelined in one write:
    // three answers, in order, on one connection.
    sock.write_all(
        b"OPTIONS /stream?topic=r HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n\
          Access-Control-Request-Method: GET\r\n\r\n\
          GET /stream?topic=bad%20name HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /stream?topic=r HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = read_preamble(&mut sock).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["204", "400", "200"], "{text}");
    assert!(text.contains("invalid_topic"), "{text}");
    let id = gw.publish_one("r", "third answer").await;
    read_until(&mut sock, &mut got, |b| contains(b, &format!("id: {id}\n"))).await;
}

#[tokio::test]
async fn a_client_that_keeps_sending_on_its_stream_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start().await;
    let RawStream { stream: mut sock } = RawStream::open(gw.stream, "topic=noisy", None).await;
    read_preamble(&mut sock).await;
    gw.wait_clients(1).await;
    // Far more than any pipelined request: nothing is ever answered.
    let noise = vec![b'x'; 256 * 1024];
    let _ = sock.write_all(&noise).await;
    gw.wait_clients(0).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, sock.read_to_end(&mut rest))
        .await
        .expect("closed in time");
}
