//! Issue 9 over real sockets: who may subscribe (JWTs from a header, a
//! cookie or the query, every way a token can be wrong, topics and
//! patterns, expiry mid-stream), who may publish (the control token, its
//! file, publisher JWTs), and what hostile clients get (slowloris, per-IP
//! stream caps and connection rates, trusted proxies, PATCH floods).

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{BinaryGateway, SseClient, TestGateway, WAIT, expect_api_error, get_json};
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "security-test-secret-0123456789abcdef";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Signs `claims` (with an `exp` a minute away unless given).
fn sign(alg: Algorithm, key: &EncodingKey, mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = (now() + 60).into();
    }
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn rs(claims: Value) -> String {
    let key = EncodingKey::from_rsa_pem(&pem("test-only-rsa-private.pem")).unwrap();
    sign(Algorithm::RS256, &key, claims)
}

fn es(claims: Value) -> String {
    let key = EncodingKey::from_ec_pem(&pem("test-only-ec-private.pem")).unwrap();
    sign(Algorithm::ES256, &key, claims)
}

/// An unsigned token, `alg: none`.
fn unsigned(claims: Value) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        part(json!({"alg": "none", "typ": "JWT"})),
        part(claims)
    )
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address).
fn from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Like [`from`], with a new connection for every request.
fn fresh_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn get(client: &reqwest::Client, url: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut req = client.get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    tokio::time::timeout(WAIT, req.send())
        .await
        .expect("answer in time")
        .expect("request")
}

/// Expects a 401 with a Bearer challenge whose body does not contain
/// `token`; returns the detail.
async fn expect_401(res: reqwest::Response, token: &str) -> String {
    let challenge = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let detail = expect_api_error(res, 401, "unauthorized").await;
    assert!(
        token.is_empty() || !detail.contains(token),
        "the body echoes the token"
    );
    detail
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_topics_are_enforced() {
    let gw = TestGateway::start_with(&[
        "--jwt-secret",
        SECRET,
        "--jwt-issuer",
        "https://issuer.example",
        "--jwt-audience",
        "streamline",
        "--jwt-leeway",
        "0s",
    ])
    .await;
    let http = common::http();
    let good = json!({"iss": "https://issuer.example", "aud": "streamline", "topics": ["chat", "orders.*"]});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let url = |q: &str| gw.stream_url(q);

    // No token at all.
    let res = get(&http, &url("topic=chat"), None).await;
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer realm="streamline""#
    );
    let detail = expect_401(res, "").await;
    assert!(detail.contains("Authorization: Bearer"), "{detail}");

    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not the gateway's secret, but 32+ bytes"),
        good.clone(),
    );
    let hs384 = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        good.clone(),
    );
    let cases = [
        ("bad signature", forged, "signature"),
        ("another HMAC algorithm", hs384, "HS256"),
        ("alg none", unsigned(good.clone()), "well-formed"),
        ("garbage", "x.y.z".to_owned(), "well-formed"),
        ("expired", hs(with("exp", json!(now() - 10))), "expired"),
        (
            "not yet valid",
            hs(with("nbf", json!(now() + 600))),
            "not valid yet",
        ),
        (
            "wrong audience",
            hs(with("aud", json!("someone-else"))),
            "audience",
        ),
        (
            "wrong issuer",
            hs(with("iss", json!("https://evil.example"))),
            "issuer",
        ),
        (
            "no issuer",
            hs(json!({"aud": "streamline", "topics": ["chat"]})),
            "iss",
        ),
        (
            "malformed topics claim",
            hs(with("topics", json!("chat"))),
            "topics",
        ),
    ];
    for (what, token, why) in &cases {
        for (bearer, query) in [
            (Some(token.as_str()), "topic=chat".to_owned()),
            (None, format!("topic=chat&access_token={token}")),
        ] {
            let res = get(&http, &url(&query), bearer).await;
            assert_eq!(
                res.headers()["www-authenticate"],
                r#"Bearer realm="streamline", error="invalid_token""#,
                "{what}"
            );
            let detail = expect_401(res, token).await;
            assert!(detail.contains(why), "{what}: {detail}");
        }
    }

    // A good token reads its topics, exact and by prefix...
    let token = hs(good.clone());
    for q in [
        "topic=chat",
        "topic=orders.eu",
        "topic=chat&topic=orders.us.west",
    ] {
        let res = get(&http, &url(q), Some(&token)).await;
        assert_eq!(res.status(), 200, "{q}");
    }
    // ... and nothing else: 403 naming the topic.
    for (q, topic) in [
        ("topic=secret", "secret"),
        ("topic=chat&topic=secret", "secret"),
        ("topic=orders", "orders"),
        ("topic=ordersX", "ordersX"),
    ] {
        let res = get(&http, &url(q), Some(&token)).await;
        let detail = expect_api_error(res, 403, "topic_not_allowed").await;
        assert!(detail.contains(&format!("{topic:?}")), "{q}: {detail}");
        assert!(!detail.contains(&token));
    }
    // A token without a topics claim reads nothing.
    let empty = hs(json!({"iss": "https://issuer.example", "aud": "streamline"}));
    let res = get(&http, &url("topic=chat"), Some(&empty)).await;
    expect_api_error(res, 403, "topic_not_allowed").await;
    gw.shutdown().await;
}

#[tokio::test]
async fn public_keys_pin_their_algorithm() {
    let rsa = fixture("test-only-rsa-public.pem");
    let ec = fixture("test-only-ec-public.pem");
    let claims = json!({"topics": ["*"]});
    let http = common::http();

    let gw = TestGateway::start_with(&["--jwt-public-key", rsa.to_str().unwrap()]).await;
    let url = gw.stream_url("topic=any");
    assert_eq!(
        get(&http, &url, Some(&rs(claims.clone()))).await.status(),
        200
    );
    // Algorithm confusion: HS256 "signed" with the public key as secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pem("test-only-rsa-public.pem")),
        claims.clone(),
    );
    for token in [
        confused,
        es(claims.clone()),
        unsigned(claims.clone()),
        hs(claims.clone()),
    ] {
        expect_401(get(&http, &url, Some(&token)).await, &token).await;
    }
    gw.shutdown().await;

    let gw = TestGateway::start_with(&["--jwt-public-key", ec.to_str().unwrap()]).await;
    let url = gw.stream_url("topic=any");
    assert_eq!(
        get(&http, &url, Some(&es(claims.clone()))).await.status(),
        200
    );
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pem("test-only-ec-public.pem")),
        claims.clone(),
    );
    for token in [confused, rs(claims.clone())] {
        expect_401(get(&http, &url, Some(&token)).await, &token).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_cookie_carries_the_token() {
    let gw = TestGateway::start_with(&["--jwt-secret", SECRET, "--jwt-cookie", "sl_token"]).await;
    let token = hs(json!({"topics": ["chat"]}));
    let url = gw.stream_url("topic=chat");
    let res = common::http()
        .get(&url)
        .header("cookie", format!("theme=dark; sl_token={token}; other=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = common::http()
        .get(&url)
        .header("cookie", "theme=dark")
        .send()
        .await
        .unwrap();
    let detail = expect_401(res, "").await;
    assert!(detail.contains("`sl_token` cookie"), "{detail}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_query_token_never_reaches_the_logs_or_the_client_list() {
    let mut gw = BinaryGateway::start_logging(&["--jwt-secret", SECRET], "streamline=debug").await;
    let token = hs(json!({"topics": ["chat"], "sub": "user-1"}));
    let mut stream =
        SseClient::connect(&gw.stream_url(&format!("topic=chat&access_token={token}"))).await;
    stream.client_id().await;
    // Refused, with the token in the query: the error body does not echo it.
    let res = get(
        &common::http(),
        &gw.stream_url(&format!("topic=other&access_token={token}")),
        None,
    )
    .await;
    let detail = expect_api_error(res, 403, "topic_not_allowed").await;
    assert!(!detail.contains(&token));

    let clients = get_json(&gw.control_url("/clients")).await.to_string();
    assert!(clients.contains("chat"), "{clients}");
    assert!(
        !clients.contains(&token),
        "GET /clients shows the token: {clients}"
    );

    // Both requests were logged, with the token redacted.
    let mut lines = Vec::new();
    let (mut opened, mut refused) = (false, false);
    tokio::time::timeout(WAIT, async {
        while !(opened && refused) {
            let line = gw.logs.recv().await.expect("streamline logs");
            let query = line["query"].as_str().unwrap_or("");
            if line["message"] == "stream opened" {
                assert_eq!(query, "topic=chat&access_token=[redacted]");
                opened = true;
            }
            if line["message"] == "stream refused" {
                assert_eq!(query, "topic=other&access_token=[redacted]");
                refused = true;
            }
            lines.push(line.to_string());
        }
    })
    .await
    .expect("both requests logged");
    while let Ok(line) = gw.logs.try_recv() {
        lines.push(line.to_string());
    }
    for line in &lines {
        assert!(
            !line.contains(&token),
            "a log line carries the token: {line}"
        );
    }
    drop(stream);
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let gw = TestGateway::start_with(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0s",
        "--heartbeat",
        "200ms",
    ])
    .await;
    let exp = now() + 2;
    let token = hs(json!({"topics": ["chat"], "exp": exp}));
    let start = Instant::now();
    let mut stream =
        SseClient::connect(&gw.stream_url(&format!("topic=chat&access_token={token}"))).await;
    gw.publish_one("chat", "before").await;
    let events = stream.until_end().await;
    let last = events.last().expect("a close notice");
    assert_eq!(events[0].data, "before");
    assert_eq!(last.event, "streamline.close");
    assert_eq!(last.data, r#"{"reason":"token_expired"}"#);
    // Not before the token expired (whole seconds), soon after it.
    let now_secs = now();
    assert!(
        now_secs >= exp,
        "ended at {now_secs}, token expires at {exp}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    gw.wait_clients(0).await;
    gw.shutdown().await;

    // Unless told otherwise.
    let gw = TestGateway::start_with(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0s",
        "--heartbeat",
        "200ms",
        "--jwt-allow-expiry-during-stream",
    ])
    .await;
    let exp = now() + 1;
    let token = hs(json!({"topics": ["chat"], "exp": exp}));
    let mut stream =
        SseClient::connect(&gw.stream_url(&format!("topic=chat&access_token={token}"))).await;
    stream.client_id().await;
    // Heartbeats go on past the expiry...
    let mut beats = 0;
    while now() <= exp + 1 {
        match stream.next_item().await.expect("the stream goes on") {
            common::Item::Comment(c) if c.is_empty() => beats += 1,
            common::Item::Event(e) => panic!("unexpected event {e:?}"),
            _ => {}
        }
    }
    assert!(beats > 0);
    // ... and so do events.
    gw.publish_one("chat", "after").await;
    assert_eq!(stream.next_event().await.unwrap().data, "after");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_control_plane_needs_its_token() {
    let gw = TestGateway::start_with(&[
        "--control-token",
        "ops-secret-1",
        "--metrics-token",
        "metrics-secret",
    ])
    .await;
    let http = common::http();
    let patch = |bearer: Option<&str>| {
        let mut req = http
            .patch(gw.control_url("/events"))
            .json(&json!({"topic": "chat", "data": "hi"}));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let res = patch(None).await.unwrap();
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer realm="streamline""#
    );
    expect_401(res, "").await;
    expect_401(patch(Some("ops-secret-2")).await.unwrap(), "ops-secret-2").await;
    expect_401(patch(Some("ops-secret-")).await.unwrap(), "ops-secret-").await;
    assert_eq!(patch(Some("ops-secret-1")).await.unwrap().status(), 202);
    // Basic auth is not a bearer token.
    let res = http
        .get(gw.control_url("/clients"))
        .basic_auth("ops", Some("ops-secret-1"))
        .send()
        .await
        .unwrap();
    expect_401(res, "ops-secret-1").await;

    for path in ["/clients", "/clients/x", "/topics", "/nope"] {
        expect_401(get(&http, &gw.control_url(path), None).await, "").await;
        expect_401(
            get(&http, &gw.control_url(path), Some("wrong")).await,
            "wrong",
        )
        .await;
    }
    let res = http
        .delete(gw.control_url("/clients/x"))
        .send()
        .await
        .unwrap();
    expect_401(res, "").await;
    assert_eq!(
        get(&http, &gw.control_url("/clients"), Some("ops-secret-1"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&http, &gw.control_url("/topics"), Some("ops-secret-1"))
            .await
            .status(),
        200
    );
    let res = get(&http, &gw.control_url("/clients/x"), Some("ops-secret-1")).await;
    expect_api_error(res, 404, "not_found").await;
    for path in ["/health", "/ready", "/"] {
        assert_eq!(
            get(&http, &gw.control_url(path), None).await.status(),
            200,
            "{path}"
        );
    }
    // /metrics takes its own token, or the control token.
    expect_401(get(&http, &gw.control_url("/metrics"), None).await, "").await;
    for t in ["metrics-secret", "ops-secret-1"] {
        assert_eq!(
            get(&http, &gw.control_url("/metrics"), Some(t))
                .await
                .status(),
            200
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_control_token_can_come_from_a_file() {
    let dir = std::env::temp_dir().join(format!("streamline-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "from-a-secret-volume\n").unwrap();
    let gw = TestGateway::start_with(&["--control-token-file", file.to_str().unwrap()]).await;
    let http = common::http();
    let url = gw.control_url("/clients");
    assert_eq!(
        get(&http, &url, Some("from-a-secret-volume"))
            .await
            .status(),
        200
    );
    expect_401(get(&http, &url, Some("from-a-secret")).await, "").await;
    expect_401(get(&http, &url, None).await, "").await;
    gw.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();

    // A missing file stops the start, as does giving both.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamline"))
        .args([
            "--control-token-file",
            "/nonexistent/token",
            "--stream-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control-token-file"));
}

#[tokio::test]
async fn publishers_may_use_a_jwt_limited_to_their_topics() {
    let gw = TestGateway::start_with(&["--control-token", "ops", "--jwt-secret", SECRET]).await;
    let http = common::http();
    let token = hs(json!({"sub": "billing-service", "publish": ["billing.*", "audit"]}));
    let patch = |body: Value, bearer: String| {
        http.patch(gw.control_url("/events"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
    };
    let mut sub = SseClient::connect(&gw.stream_url(&format!(
        "topic=billing.eu&access_token={}",
        hs(json!({"topics": ["billing.*"]}))
    )))
    .await;
    let res = patch(json!({"topic": "billing.eu", "data": 1}), token.clone())
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(sub.next_event().await.unwrap().data, "1");
    // One topic out of its claim refuses the whole batch.
    let batch = json!([{"topic": "audit", "data": 2}, {"topic": "chat", "data": 3}]);
    let res = patch(batch, token.clone()).await.unwrap();
    let detail = expect_api_error(res, 403, "topic_not_allowed").await;
    assert!(detail.contains("\"chat\""), "{detail}");
    // A JWT is no control token.
    let res = get(&http, &gw.control_url("/clients"), Some(&token)).await;
    expect_401(res, &token).await;
    let expired = hs(json!({"publish": ["audit"], "exp": now() - 100}));
    let res = patch(json!({"topic": "audit", "data": 4}), expired.clone())
        .await
        .unwrap();
    let detail = expect_401(res, &expired).await;
    assert!(detail.contains("expired"), "{detail}");
    // The control token may publish anywhere.
    let res = patch(json!({"topic": "chat", "data": 5}), "ops".into())
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    gw.shutdown().await;
}

#[tokio::test]
async fn one_address_over_its_stream_cap_gets_429_and_others_still_connect() {
    let gw = TestGateway::start_with(&["--max-streams-per-ip", "2"]).await;
    let url = gw.stream_url("topic=a");
    let crowd = from("127.0.0.2");
    let a = SseClient::connect_with(&crowd, &url, None).await;
    let _b = SseClient::connect_with(&crowd, &url, None).await;
    let res = get(&crowd, &url, None).await;
    assert_eq!(res.headers()["retry-after"], "5");
    let detail = expect_api_error(res, 429, "too_many_streams").await;
    assert!(detail.contains('2'), "{detail}");
    // Other addresses are unaffected.
    let _c = SseClient::connect_with(&from("127.0.0.3"), &url, None).await;
    let _d = SseClient::connect_with(&from("127.0.0.3"), &url, None).await;
    // A stream that ends gives its place back.
    drop(a);
    gw.wait_clients(3).await;
    let _e = SseClient::connect_with(&crowd, &url, None).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn one_address_opening_connections_too_fast_gets_429() {
    let gw = TestGateway::start_with(&["--max-conn-rate-per-ip", "3"]).await;
    let url = gw.stream_url("topic=a");
    let hasty = fresh_from("127.0.0.4");
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..5 {
        let res = get(&hasty, &url, None).await;
        statuses.push(res.status().as_u16());
        if res.status() == 429 {
            refused = Some(res);
        }
    }
    // A burst of 3; then about one more per 333 ms.
    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let res = refused.unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["connection"], "close");
    expect_api_error(res, 429, "rate_limited").await;
    // Others are unaffected.
    let calm = fresh_from("127.0.0.5");
    for _ in 0..3 {
        assert_eq!(get(&calm, &url, None).await.status(), 200);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let gw =
        TestGateway::start_with(&["--trusted-proxy", "127.0.0.6", "--max-streams-per-ip", "1"])
            .await;
    let url = gw.stream_url("topic=a");
    let via = |client: &reqwest::Client, xff: &str| {
        client.get(&url).header("x-forwarded-for", xff).send()
    };
    let proxy = from("127.0.0.6");
    let first = via(&proxy, "198.51.100.7").await.unwrap();
    assert_eq!(first.status(), 200);
    let second = via(&proxy, "198.51.100.8").await.unwrap();
    assert_eq!(second.status(), 200);
    // Same client again, also when it tries to spoof an address on the left.
    for xff in ["198.51.100.7", "203.0.113.99, 198.51.100.7"] {
        let res = via(&proxy, xff).await.unwrap();
        expect_api_error(res, 429, "too_many_streams").await;
    }
    // From a peer that is not trusted, the header is ignored.
    let direct = from("127.0.0.7");
    let third = via(&direct, "198.51.100.7").await.unwrap();
    assert_eq!(third.status(), 200);
    let res = via(&direct, "198.51.100.9").await.unwrap();
    expect_api_error(res, 429, "too_many_streams").await;

    let clients = get_json(&gw.control_url("/clients")).await;
    let mut ips: Vec<String> = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_ip"].as_str().unwrap().to_owned())
        .collect();
    ips.sort();
    assert_eq!(ips, ["127.0.0.7", "198.51.100.7", "198.51.100.8"]);
    let proxied = clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_ip"] == "198.51.100.7")
        .unwrap();
    assert!(
        proxied["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.6:")
    );
    drop((first, second, third));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_patch_flood_gets_429_without_starving_accepted_publishes() {
    let gw = TestGateway::start_with(&["--publish-rate", "20"]).await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=flood")).await;
    sub.client_id().await;
    let events_url = gw.control_url("/events");

    // A well-behaved publisher, 10 a second from its own address.
    let calm = {
        let (client, url) = (from("127.0.0.9"), events_url.clone());
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for i in 0..15 {
                let started = Instant::now();
                let res = client
                    .patch(&url)
                    .json(&json!({"topic": "flood", "data": format!("calm {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 202, "the calm publisher was refused");
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            slowest
        })
    };
    // The flood: 600 requests, 32 at a time, as fast as they are answered.
    let flooder = from("127.0.0.8");
    let started = Instant::now();
    let results: Vec<(u16, Option<String>, Value)> = futures_util::stream::iter(0..600)
        .map(|i| {
            let (client, url) = (flooder.clone(), events_url.clone());
            async move {
                let res = client
                    .patch(&url)
                    .json(&json!({"topic": "flood", "data": format!("flood {i}")}))
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                let retry = res
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                (status, retry, res.json().await.unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let flood_secs = started.elapsed().as_secs_f64();
    let accepted = results.iter().filter(|r| r.0 == 202).count();
    for (status, retry, body) in &results {
        match status {
            202 => {}
            429 => {
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"], "rate_limited");
            }
            s => panic!("unexpected {s}: {body}"),
        }
    }
    assert!(accepted >= 20, "the burst is accepted: {accepted}");
    let most = 20.0 + 20.0 * flood_secs + 2.0;
    assert!(
        (accepted as f64) <= most,
        "{accepted} accepted in {flood_secs:.1}s"
    );
    assert!(accepted < 600, "nothing was refused");

    let slowest = calm.await.unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "a calm PATCH took {slowest:?}"
    );
    // Every accepted event, and only those, reaches the subscriber.
    let got = sub.events(accepted + 15).await;
    assert_eq!(
        got.iter().filter(|e| e.data.starts_with("calm")).count(),
        15
    );
    gw.shutdown().await;
}

/// Opens a connection and trickles a request's bytes one by one, every
/// `every`, until the server closes it; returns how long it stayed open.
async fn slowloris(addr: std::net::SocketAddr, every: Duration) -> Duration {
    let request = b"GET /stream?topic=slow HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    // Timed from before the handshake, so never shorter than the server's view.
    let opened = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 256];
    for byte in request.iter().cycle() {
        tokio::select! {
            read = sock.read(&mut buf) => match read {
                Ok(n) if n > 0 => continue, // an error response; the close follows
                _ => return opened.elapsed(),
            },
            _ = tokio::time::sleep(every) => {
                if sock.write_all(&[*byte]).await.is_err() {
                    return opened.elapsed();
                }
            }
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slowloris_connections_are_closed_while_streams_go_on() {
    // Two sockets per connection in this process.
    let _ = rlimit::increase_nofile_limit(10_000);
    let gw = TestGateway::start_with(&["--header-read-timeout", "1s"]).await;
    let mut live = SseClient::connect(&gw.stream_url("topic=live")).await;
    live.client_id().await;

    let attackers: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(slowloris(gw.stream, Duration::from_millis(200))))
        .collect();
    // While they trickle, the live stream gets every event and a new
    // client connects.
    for i in 0..10 {
        let data = format!("event {i}");
        gw.publish_one("live", &data).await;
        assert_eq!(live.next_event().await.unwrap().data, data);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = SseClient::connect(&gw.stream_url("topic=live")).await;
    late.client_id().await;

    let mut open_for = Vec::new();
    for a in attackers {
        open_for.push(
            tokio::time::timeout(WAIT, a)
                .await
                .expect("closed in time")
                .unwrap(),
        );
    }
    let shortest = open_for.iter().min().unwrap();
    let longest = open_for.iter().max().unwrap();
    assert!(
        *shortest >= Duration::from_millis(900),
        "closed early: {shortest:?}"
    );
    assert!(
        *longest < Duration::from_secs(8),
        "closed late: {longest:?}"
    );
    assert_eq!(gw.hub.client_count(), 2, "no slowloris became a stream");

    gw.publish_one("live", "after").await;
    assert_eq!(live.next_event().await.unwrap().data, "after");
    assert_eq!(late.next_event().await.unwrap().data, "after");
    gw.shutdown().await;
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let gw = TestGateway::start_with(&["--header-read-timeout", "500ms"]).await;
    // Silent, and trickling the HTTP/2 preface (which hyper's own timeout
    // does not cover).
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let mut sock = tokio::net::TcpStream::connect(gw.stream).await.unwrap();
        sock.write_all(first).await.unwrap();
        let opened = Instant::now();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, sock.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(opened.elapsed() >= Duration::from_millis(400));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn flood_of_refused_requests_costs_no_stream() {
    // Wrong tokens, over and over, from one address: all 401, and the
    // authenticated subscriber next door is served.
    let gw = TestGateway::start_with(&["--jwt-secret", SECRET]).await;
    let good = hs(json!({"topics": ["t"]}));
    let mut sub = SseClient::connect(&gw.stream_url(&format!("topic=t&access_token={good}"))).await;
    sub.client_id().await;
    let http = from("127.0.0.10");
    let url = gw.stream_url("topic=t&access_token=forged.token.here");
    let statuses: Vec<u16> = futures_util::stream::iter(0..200)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
    gw.publish_one("t", "still here").await;
    assert_eq!(sub.next_event().await.unwrap().data, "still here");
    assert_eq!(gw.hub.client_count(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let gw = TestGateway::start_with(&["--max-header-size", "8192"]).await;
    let mut sock = tokio::net::TcpStream::connect(gw.stream).await.unwrap();
    let head = format!(
        "GET /stream?topic=a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    // The server may close before taking it all.
    let _ = sock.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, sock.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    let text = String::from_utf8_lossy(&buf);
    // hyper answers 431 and closes; a reset may overtake the answer.
    assert!(
        text.starts_with("HTTP/1.1 431") || read.is_err(),
        "{text:?} {read:?}"
    );
    assert_eq!(gw.hub.client_count(), 0);
    // Within the limit, a request is served.
    let res = common::http()
        .get(gw.stream_url("topic=a"))
        .header("x-pad", "a".repeat(4000))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    gw.shutdown().await;
}
