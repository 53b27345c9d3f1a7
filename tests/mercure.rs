//! Mercure over real sockets: publishing with form posts on the control
//! plane, subscribing on the stream plane, the draft's matching rules one
//! case each, authorization, resume, and two replicas on Redis.

mod common;

use std::net::SocketAddr;

use common::redis::RedisServer;
use common::{SseClient, SseEvent, TestGateway, expect_api_error, http};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const PUBLISHER_KEY: &str = "publisher-secret-of-at-least-32-bytes!";
const SUBSCRIBER_KEY: &str = "subscriber-secret-of-at-least-32-bytes";

fn sign(key: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

fn publisher() -> String {
    sign(PUBLISHER_KEY, json!({"mercure": {"publish": ["*"]}}))
}

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = vec![
        "--mercure",
        "--mercure-publisher-jwt-secret",
        PUBLISHER_KEY,
        "--mercure-subscriber-jwt-secret",
        SUBSCRIBER_KEY,
    ];
    f.extend_from_slice(extra);
    f
}

async fn gateway(extra: &[&str]) -> TestGateway {
    let gw = TestGateway::start_with(&flags(extra)).await;
    // With a bus, each replica follows the Mercure topic from start-up.
    if extra.contains(&"--redis-url") {
        let hub = gw.hub.clone();
        common::eventually("the Mercure topic is followed", move || {
            hub.topic_names().iter().any(|t| &**t == "mercure")
        })
        .await;
    }
    gw
}

/// POSTs an update; returns the status and body.
async fn post(
    control: SocketAddr,
    token: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut req = http()
        .post(format!("http://{control}/.well-known/mercure"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("POST /.well-known/mercure")
}

/// Publishes an update and returns its id; panics unless 200 text/plain.
async fn publish_direct(control: SocketAddr, form: &[(&str, &str)]) -> String {
    publish(control, form).await
}

/// Publishes an update and returns its id; panics unless 200 text/plain.
async fn publish(control: SocketAddr, form: &[(&str, &str)]) -> String {
    let res = post(control, Some(&publisher()), form).await;
    assert_eq!(res.status(), 200, "publish {form:?}");
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    res.text().await.unwrap()
}

fn sub_url(stream: SocketAddr, selectors: &[&str], extra: &str) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for s in selectors {
        q.append_pair("topic", s);
    }
    format!("http://{stream}/.well-known/mercure?{}{extra}", q.finish())
}

async fn subscribe(stream: SocketAddr, selectors: &[&str]) -> SseClient {
    SseClient::connect(&sub_url(stream, selectors, "")).await
}

async fn subscribe_as(stream: SocketAddr, selectors: &[&str], token: &str) -> SseClient {
    let client = client_sending(reqwest::header::AUTHORIZATION, &format!("Bearer {token}"));
    SseClient::connect_with(&client, &sub_url(stream, selectors, ""), None).await
}

/// Subscribes resuming after `last_id` (sent as `Last-Event-ID`).
async fn subscribe_from(stream: SocketAddr, selectors: &[&str], last_id: &str) -> SseClient {
    SseClient::connect_with(&http(), &sub_url(stream, selectors, ""), Some(last_id)).await
}

/// An HTTP client that sends `name: value` with every request.
fn client_sending(name: reqwest::header::HeaderName, value: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers([(name, value.parse().unwrap())].into_iter().collect())
        .build()
        .unwrap()
}

/// Reads events until one with data `last`; returns every data seen.
async fn data_until(c: &mut SseClient, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let e = c.next_event().await.expect("stream open");
        out.push(e.data.clone());
        if e.data == last {
            return out;
        }
    }
}

const FOO: &str = "https://example.com/foo";
const BOOKS: &str = "https://example.com/books/{id}";

#[tokio::test]
async fn each_matching_rule_over_sockets() {
    let gw = gateway(&["--mercure-anonymous"]).await;
    let mut exact = subscribe(gw.stream, &[FOO]).await;
    let mut template = subscribe(gw.stream, &[BOOKS]).await;
    let mut star = subscribe(gw.stream, &["*"]).await;
    let mut several = subscribe(gw.stream, &["bar", "https://example.com/x/{+rest}"]).await;
    let reader = sign(SUBSCRIBER_KEY, json!({"mercure": {"subscribe": [BOOKS]}}));
    let mut private_reader = subscribe_as(gw.stream, &[BOOKS], &reader).await;
    let other = sign(
        SUBSCRIBER_KEY,
        json!({"mercure": {"subscribe": ["https://example.com/authors/{id}"]}}),
    );
    let mut other_reader = subscribe_as(gw.stream, &[BOOKS], &other).await;
    gw.wait_clients(6).await;

    publish(gw.control, &[("topic", FOO), ("data", "foo")]).await;
    publish(
        gw.control,
        &[("topic", "https://example.com/books/1"), ("data", "book 1")],
    )
    .await;
    publish(
        gw.control,
        &[
            ("topic", "https://example.com/nothing"),
            ("data", "nothing"),
        ],
    )
    .await;
    publish(gw.control, &[("topic", "bar"), ("data", "bar")]).await;
    publish(
        gw.control,
        &[("topic", "https://example.com/x/a/b"), ("data", "x")],
    )
    .await;
    publish(
        gw.control,
        &[
            ("topic", "https://example.com/books/2"),
            ("data", "secret"),
            ("private", "on"),
        ],
    )
    .await;
    // An alternate topic is enough.
    publish(
        gw.control,
        &[
            ("topic", "https://example.com/other"),
            ("topic", FOO),
            ("data", "alternate"),
        ],
    )
    .await;
    let end = [
        ("topic", FOO),
        ("topic", "https://example.com/books/9"),
        ("topic", "bar"),
        ("data", "end"),
    ];
    publish(gw.control, &end).await;

    assert_eq!(
        data_until(&mut exact, "end").await,
        ["foo", "alternate", "end"]
    );
    assert_eq!(data_until(&mut template, "end").await, ["book 1", "end"]);
    assert_eq!(
        data_until(&mut star, "end").await,
        ["foo", "book 1", "nothing", "bar", "x", "alternate", "end"],
        "`*` gets every public update, and no private one without a claim"
    );
    assert_eq!(data_until(&mut several, "end").await, ["bar", "x", "end"]);
    assert_eq!(
        data_until(&mut private_reader, "end").await,
        ["book 1", "secret", "end"],
        "a subscribe claim matching the private update's topic"
    );
    assert_eq!(
        data_until(&mut other_reader, "end").await,
        ["book 1", "end"],
        "a claim that matches none of its topics"
    );
}

#[tokio::test]
async fn updates_carry_id_type_and_retry() {
    let gw = gateway(&["--mercure-anonymous"]).await;
    let mut c = subscribe(gw.stream, &["*"]).await;
    gw.wait_clients(1).await;
    let id = publish(
        gw.control,
        &[
            ("topic", FOO),
            ("data", "line 1\nline 2"),
            ("id", "urn:uuid:5e94c686-2c0b-4f9b-958c-92ccc3bbb4eb"),
            ("type", "book.updated"),
            ("retry", "1500"),
        ],
    )
    .await;
    assert_eq!(id, "urn:uuid:5e94c686-2c0b-4f9b-958c-92ccc3bbb4eb");
    let generated = publish(gw.control, &[("topic", FOO), ("data", "plain")]).await;
    assert!(generated.starts_with('#'), "{generated}");
    let mut items = Vec::new();
    let mut retry_before_first = false;
    while items.len() < 2 {
        match c.next_item().await.expect("open") {
            common::Item::Event(e) => items.push(e),
            common::Item::Retry(1500) => retry_before_first = items.is_empty(),
            _ => {}
        }
    }
    assert!(retry_before_first, "the update's retry field");
    assert_eq!(
        items[0],
        SseEvent {
            id: Some(id),
            event: "book.updated".into(),
            data: "line 1\nline 2".into(),
        }
    );
    assert_eq!(items[1].id.as_deref(), Some(&*generated));
    assert_eq!(items[1].event, "message");
}

#[tokio::test]
async fn publishing_is_authorized_and_checked() {
    let gw = gateway(&["--mercure-anonymous", "--max-body", "1024"]).await;
    let form = [("topic", FOO), ("data", "x")];
    expect_api_error(post(gw.control, None, &form).await, 401, "unauthorized").await;
    let with_subscriber_key = sign(SUBSCRIBER_KEY, json!({"mercure": {"publish": ["*"]}}));
    expect_api_error(
        post(gw.control, Some(&with_subscriber_key), &form).await,
        401,
        "unauthorized",
    )
    .await;
    let narrow = sign(PUBLISHER_KEY, json!({"mercure": {"publish": [BOOKS]}}));
    expect_api_error(
        post(gw.control, Some(&narrow), &form).await,
        403,
        "topic_not_allowed",
    )
    .await;
    // Every topic of the update must be allowed.
    let mixed = [("topic", "https://example.com/books/1"), ("topic", FOO)];
    expect_api_error(
        post(gw.control, Some(&narrow), &mixed).await,
        403,
        "topic_not_allowed",
    )
    .await;
    let ok = post(
        gw.control,
        Some(&narrow),
        &[("topic", "https://example.com/books/1")],
    )
    .await;
    assert_eq!(ok.status(), 200);
    let none = sign(PUBLISHER_KEY, json!({"sub": "x"}));
    expect_api_error(
        post(gw.control, Some(&none), &form).await,
        403,
        "topic_not_allowed",
    )
    .await;

    let p = publisher();
    let detail = expect_api_error(
        post(gw.control, Some(&p), &[("data", "x")]).await,
        400,
        "invalid_event",
    )
    .await;
    assert!(detail.starts_with("topic:"), "{detail}");
    expect_api_error(
        post(gw.control, Some(&p), &[("topic", FOO), ("id", "#1-1")]).await,
        400,
        "invalid_event",
    )
    .await;
    expect_api_error(
        post(gw.control, Some(&p), &[("topic", FOO), ("retry", "x")]).await,
        400,
        "invalid_event",
    )
    .await;
    let big = "x".repeat(2048);
    expect_api_error(
        post(gw.control, Some(&p), &[("topic", FOO), ("data", &big)]).await,
        413,
        "payload_too_large",
    )
    .await;
    let json_body = http()
        .post(gw.control_url("/.well-known/mercure"))
        .bearer_auth(&p)
        .json(&json!({"topic": FOO}))
        .send()
        .await
        .unwrap();
    expect_api_error(json_body, 415, "unsupported_media_type").await;

    // Streamline's own API cannot read or write the Mercure topic.
    let raw = http()
        .get(gw.stream_url("topic=mercure"))
        .send()
        .await
        .unwrap();
    expect_api_error(raw, 403, "topic_not_allowed").await;
    let patch = http()
        .patch(gw.control_url("/events"))
        .json(&json!({"topic": "mercure", "data": "x"}))
        .send()
        .await
        .unwrap();
    expect_api_error(patch, 400, "invalid_event").await;
}

/// `--publish-rate` counts Mercure publishes too (by address, before the
/// body is read): a flood gets 429s, and what was refused never reaches a
/// subscriber while what was accepted all does, in order.
#[tokio::test]
async fn a_mercure_publish_flood_is_rate_limited_and_loses_nothing_accepted() {
    let gw = gateway(&["--mercure-anonymous", "--publish-rate", "5"]).await;
    let mut sub = subscribe(gw.stream, &[FOO]).await;
    let p = publisher();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        let data = format!("flood {i}");
        let res = post(gw.control, Some(&p), &[("topic", FOO), ("data", &data)]).await;
        match res.status().as_u16() {
            200 => accepted.push(data),
            429 => {
                assert_eq!(res.headers()["retry-after"], "1");
                let body: Value = res.json().await.unwrap();
                assert_eq!(body["error"], "rate_limited", "{body}");
                refused += 1;
            }
            s => panic!("unexpected {s}: {}", res.text().await.unwrap()),
        }
    }
    assert!(refused > 0, "40 publishes at once, none refused at 5/s");
    assert!(accepted.len() >= 5, "the burst is accepted: {accepted:?}");

    // Once the bucket refills, a last update goes through; the stream
    // carries exactly the accepted ones before it.
    common::eventually_async("a publish is accepted again", || async {
        post(gw.control, Some(&p), &[("topic", FOO), ("data", "last")])
            .await
            .status()
            == 200
    })
    .await;
    accepted.push("last".to_owned());
    assert_eq!(data_until(&mut sub, "last").await, accepted);
}

#[tokio::test]
async fn subscribers_are_authorized() {
    let gw = gateway(&[]).await;
    let url = sub_url(gw.stream, &[FOO], "");
    let c = SseClient::try_connect(&http(), &url, None).await;
    assert_eq!(c.status, 401, "no token and no --mercure-anonymous");
    let forged = sign(PUBLISHER_KEY, json!({"mercure": {"subscribe": ["*"]}}));
    let c = SseClient::try_connect(
        &http(),
        &sub_url(gw.stream, &[FOO], &format!("&authorization={forged}")),
        None,
    )
    .await;
    assert_eq!(c.status, 401, "signed with the publisher's key");
    let bad = SseClient::try_connect(
        &http(),
        &format!("http://{}/.well-known/mercure", gw.stream),
        None,
    )
    .await;
    assert_eq!(bad.status, 400, "no topic");

    // The cookie, as a browser sends it.
    let token = sign(SUBSCRIBER_KEY, json!({"mercure": {"subscribe": [FOO]}}));
    let client = client_sending(
        reqwest::header::COOKIE,
        &format!("mercureAuthorization={token}"),
    );
    let mut c = SseClient::connect_with(&client, &url, None).await;
    gw.wait_clients(1).await;
    publish(
        gw.control,
        &[("topic", FOO), ("data", "mine"), ("private", "")],
    )
    .await;
    assert_eq!(c.next_event().await.unwrap().data, "mine");

    // An expired token is refused.
    let expired = sign(
        SUBSCRIBER_KEY,
        json!({"exp": 1, "mercure": {"subscribe": ["*"]}}),
    );
    let c = SseClient::try_connect(
        &http(),
        &sub_url(gw.stream, &[FOO], &format!("&authorization={expired}")),
        None,
    )
    .await;
    assert_eq!(c.status, 401);
}

#[tokio::test]
async fn resume_by_generated_id_publisher_id_and_earliest() {
    let gw = gateway(&["--mercure-anonymous"]).await;
    let first = publish(gw.control, &[("topic", FOO), ("data", "1")]).await;
    publish(
        gw.control,
        &[("topic", FOO), ("data", "2"), ("id", "urn:example:2")],
    )
    .await;
    publish(
        gw.control,
        &[("topic", "https://example.com/else"), ("data", "skip")],
    )
    .await;
    publish(gw.control, &[("topic", FOO), ("data", "3")]).await;

    let url = sub_url(gw.stream, &[FOO], "");
    let mut c = SseClient::connect_with(&http(), &url, Some(&first)).await;
    assert_eq!(c.headers["last-event-id"], first.as_str());
    assert_eq!(
        c.events(2)
            .await
            .iter()
            .map(|e| &*e.data)
            .collect::<Vec<_>>(),
        ["2", "3"]
    );

    let by_param = sub_url(gw.stream, &[FOO], "&lastEventID=urn%3Aexample%3A2");
    let mut c = SseClient::connect(&by_param).await;
    assert_eq!(c.headers["last-event-id"], "urn:example:2");
    assert_eq!(c.next_event().await.unwrap().data, "3");

    let mut c = SseClient::connect(&sub_url(gw.stream, &[FOO], "&lastEventID=earliest")).await;
    assert_eq!(c.headers["last-event-id"], "earliest");
    assert_eq!(
        c.events(3)
            .await
            .iter()
            .map(|e| &*e.data)
            .collect::<Vec<_>>(),
        ["1", "2", "3"]
    );

    // An id the hub does not know: live only, and the header says so.
    let mut c = SseClient::connect_with(&http(), &url, Some("urn:unknown")).await;
    assert_eq!(c.headers["last-event-id"], "earliest");
    gw.wait_clients(4).await;
    publish(gw.control, &[("topic", FOO), ("data", "4")]).await;
    assert_eq!(c.next_event().await.unwrap().data, "4");

    // Without a resume point, no header.
    let c = SseClient::connect(&url).await;
    assert!(c.headers.get("last-event-id").is_none());
}

#[tokio::test]
async fn two_replicas_on_redis_share_updates_ids_and_resume() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let extra = ["--mercure-anonymous", "--redis-url", &url];
    let one = gateway(&extra).await;
    let two = gateway(&extra).await;

    let mut on_two = subscribe(two.stream, &[BOOKS]).await;
    two.wait_clients(1).await;
    let a = publish(
        one.control,
        &[("topic", "https://example.com/books/1"), ("data", "a")],
    )
    .await;
    let b = publish(
        one.control,
        &[
            ("topic", "https://example.com/books/2"),
            ("data", "b"),
            ("id", "urn:b"),
        ],
    )
    .await;
    let got = on_two.events(2).await;
    assert_eq!(got[0].id.as_deref(), Some(&*a), "one id on every replica");
    assert_eq!(got[1].id.as_deref(), Some("urn:b"));
    drop(on_two);

    // Published while the client is away; it comes back to the other
    // replica with the generated id it last saw.
    let c_id = publish(
        two.control,
        &[("topic", "https://example.com/books/3"), ("data", "c")],
    )
    .await;
    let mut on_one = subscribe_from(one.stream, &[BOOKS], &a).await;
    assert_eq!(on_one.headers["last-event-id"], a.as_str());
    let got = on_one.events(2).await;
    assert_eq!(
        got.iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>(),
        [b.clone(), c_id.clone()]
    );
    // A publisher's id resumes on a replica that has seen the update.
    let mut again = subscribe_from(one.stream, &[BOOKS], &b).await;
    assert_eq!(again.next_event().await.unwrap().data, "c");
    // `earliest` reads everything Redis keeps, on a replica that never saw it.
    let three = gateway(&extra).await;
    let mut all =
        SseClient::connect(&sub_url(three.stream, &[BOOKS], "&lastEventID=earliest")).await;
    assert_eq!(
        all.events(3)
            .await
            .iter()
            .map(|e| &*e.data)
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
}

/// A page that subscribes with `EventSource` to `selector` on its own
/// origin, records `[lastEventId, data]` of every message in `window.rec`,
/// and publishes with `fetch` form posts (`window.publish`).
fn mercure_page(selector: &str, publisher_jwt: &str) -> String {
    format!(
        r#"<!doctype html>
<meta charset="utf-8">
<title>mercure</title>
<script>
window.rec = {{ got: [], opens: 0, errors: 0 }};
const url = new URL("/.well-known/mercure", location.origin);
url.searchParams.append("topic", {selector});
const es = new EventSource(url);
es.onopen = () => {{ rec.opens++; }};
es.onerror = () => {{ rec.errors++; }};
es.onmessage = (e) => {{ rec.got.push([e.lastEventId, e.data]); }};
window.publish = async (fields) => {{
  const body = new URLSearchParams();
  for (const [k, v] of fields) body.append(k, v);
  const res = await fetch("/.well-known/mercure", {{
    method: "POST",
    headers: {{ Authorization: "Bearer " + {jwt} }},
    body,
  }});
  return [res.status, await res.text()];
}};
</script>
"#,
        selector = json!(selector),
        jwt = json!(publisher_jwt),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_and_fetch_on_one_origin_through_nginx_across_replicas() {
    use common::browser::Browser;
    use common::nginx::Cluster;

    let page_conf = "location = /test/mercure.html { root www; default_type text/html; }\n";
    let html = mercure_page(BOOKS, &publisher());
    let mut c = Cluster::start_n(
        2,
        &flags(&["--mercure-anonymous"]),
        &[
            ("streamline.d/test-page.conf", page_conf),
            ("www/test/mercure.html", &html),
        ],
    )
    .await;
    let browser = Browser::launch().await;
    let page = browser.open(&c.nginx.url("/test/mercure.html")).await;
    page.wait_for("the subscription opens", "window.rec.opens === 1")
        .await;
    let holder = c.holder_of_the_stream().await;

    let publish = |fields: Value| {
        let page = &page;
        async move {
            let v = page.eval(&format!("window.publish({fields})")).await;
            assert_eq!(v[0], 200, "publish {fields}: {v}");
            v[1].as_str().unwrap().to_owned()
        }
    };
    let one = publish(json!([
        ["topic", "https://example.com/books/1"],
        ["data", "one"]
    ]))
    .await;
    publish(json!([
        ["topic", "https://example.com/authors/1"],
        ["data", "not a book"]
    ]))
    .await;
    publish(json!([
        ["topic", "https://example.com/books/2"],
        ["data", "private"],
        ["private", "on"]
    ]))
    .await;
    let two = publish(json!([
        ["topic", "https://example.com/books/3"],
        ["data", "two"],
        ["id", "urn:example:two"]
    ]))
    .await;
    page.wait_for("two updates", "window.rec.got.length >= 2")
        .await;

    // The replica holding the stream drains; EventSource comes back by
    // itself through nginx, to the other replica, with Last-Event-ID.
    c.replicas[holder].signal("TERM");
    // Published while the stream is closed and reopened: resume, not live,
    // is what brings these. They go to the other replica directly: through
    // nginx, a publish that reached the draining replica as it exited would
    // be a 502 (outcome unknown, by design).
    let survivor = c.replicas[1 - holder].control;
    let mut expected = vec![json!([one, "one"]), json!(["urn:example:two", "two"])];
    for i in 0..10 {
        let data = format!("during {i}");
        let form = [("topic", "https://example.com/books/5"), ("data", &*data)];
        let id = publish_direct(survivor, &form).await;
        expected.push(json!([id, data]));
    }
    page.wait_for("the reconnect", "window.rec.opens >= 2")
        .await;
    assert!(c.replicas[holder].wait_exit().await.success());
    let three = publish(json!([
        ["topic", "https://example.com/books/4"],
        ["data", "three"]
    ]))
    .await;
    expected.push(json!([three, "three"]));
    page.wait_for(
        "every update",
        &format!("window.rec.got.length >= {}", expected.len()),
    )
    .await;
    let got = page.eval("window.rec.got").await;
    assert_eq!(
        got,
        Value::Array(expected),
        "matching public updates only, once each, in order, with their ids"
    );
    assert_eq!(two, "urn:example:two");
    // Bad input through nginx gets the gateway's 4xx, not a proxy error.
    let v = page.eval(r#"window.publish([["data", "no topic"]])"#).await;
    assert_eq!(v[0], 400, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_kafka_share_updates_ids_and_resume() {
    use common::kafka::Tansu;

    let broker = Tansu::start().await;
    broker.create_topic("mercure", 1).await;
    let brokers = broker.brokers();
    let start = |name: &'static str| {
        let brokers = brokers.clone();
        async move {
            let gw = TestGateway::start_with(&flags(&[
                "--mercure-anonymous",
                "--kafka-brokers",
                &brokers,
                "--kafka-topics",
                "mercure",
                "--kafka-timeout",
                "5s",
                "--replica-id",
                name,
            ]))
            .await;
            let hub = gw.hub.clone();
            common::eventually("the Mercure topic is followed", move || {
                hub.topic_names().iter().any(|t| t.starts_with("mercure"))
            })
            .await;
            gw
        }
    };
    let one = start("k1").await;
    let two = start("k2").await;
    let mut on_two = subscribe(two.stream, &[BOOKS]).await;
    two.wait_clients(1).await;
    let a = publish(
        one.control,
        &[("topic", "https://example.com/books/1"), ("data", "a")],
    )
    .await;
    let got = on_two.next_event().await.unwrap();
    assert_eq!((got.id.as_deref(), &*got.data), (Some(&*a), "a"));
    drop(on_two);
    let b = publish(
        two.control,
        &[("topic", "https://example.com/books/2"), ("data", "b")],
    )
    .await;
    let mut on_one = subscribe_from(one.stream, &[BOOKS], &a).await;
    let got = on_one.next_event().await.unwrap();
    assert_eq!((got.id.as_deref(), &*got.data), (Some(&*b), "b"));
}

#[tokio::test]
async fn subscription_events_announce_start_and_end() {
    let gw = gateway(&["--mercure-anonymous", "--mercure-subscriptions"]).await;
    let template = "/.well-known/mercure/subscriptions/{topic}/{subscriber}";
    let watcher = sign(
        SUBSCRIBER_KEY,
        json!({"mercure": {"subscribe": [template]}}),
    );
    let mut watch = subscribe_as(gw.stream, &[template], &watcher).await;
    // An anonymous subscriber does not see them (they are private).
    let mut anonymous = subscribe(gw.stream, &[template]).await;
    gw.wait_clients(2).await;
    let mut c = subscribe(gw.stream, &[FOO]).await;
    gw.wait_clients(3).await;
    let client = c.client_id().await;
    drop(c);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = watch.next_event().await.expect("open");
        let doc: Value = serde_json::from_str(&e.data).unwrap();
        if doc["topic"] == FOO {
            seen.push(doc);
        }
    }
    let subscriber = format!("urn:streamline:{client}");
    let id = format!(
        "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Ffoo/{}",
        subscriber.replace(':', "%3A")
    );
    for (doc, active) in seen.iter().zip([true, false]) {
        assert_eq!(doc["type"], "Subscription");
        assert_eq!(doc["id"], id.as_str());
        assert_eq!(doc["subscriber"], subscriber.as_str());
        assert_eq!(doc["active"], active, "{doc}");
    }
    // The end marker: a public update both watchers get; the anonymous one
    // saw no subscription event before it.
    publish(
        gw.control,
        &[
            ("topic", "/.well-known/mercure/subscriptions/x/y"),
            ("data", "end"),
        ],
    )
    .await;
    assert_eq!(anonymous.next_event().await.unwrap().data, "end");
}

/// curl, as the README shows it: `-N` to subscribe, `-d` to publish.
#[tokio::test]
async fn curl_subscribes_and_publishes() {
    use tokio::io::AsyncBufReadExt;

    let gw = gateway(&["--mercure-anonymous"]).await;
    let mut sub = tokio::process::Command::new("curl")
        .args(["-gsN", "--max-time", "20"])
        .arg(format!(
            "http://{}/.well-known/mercure?topic=https://example.com/books/{{id}}",
            gw.stream
        ))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl runs");
    gw.wait_clients(1).await;
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-H"])
        .arg(format!("Authorization: Bearer {}", publisher()))
        .args([
            "-d",
            "topic=https://example.com/books/1",
            "-d",
            "data=from curl",
        ])
        .arg(format!("http://{}/.well-known/mercure", gw.control))
        .output()
        .await
        .expect("curl runs");
    let id = String::from_utf8(out.stdout).unwrap();
    assert!(id.starts_with('#'), "the id: {id:?}");
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.contains(&"data: from curl".to_owned()) {
        let line = tokio::time::timeout(common::WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("curl still reading");
        seen.push(line);
    }
    assert!(seen.contains(&format!("id: {id}")), "{seen:?}");
}
