//! `--cors-allow-origin` on the stream plane, over real sockets: the headers
//! an allowed origin gets, preflights, and nothing for anyone else.

mod common;

use common::*;
use reqwest::Method;

const ALLOWED: &str = "https://app.example.com";

async fn stream(gw: &TestGateway, origin: Option<&str>) -> reqwest::Response {
    let mut req = http().get(gw.stream_url("topic=c"));
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    req.send().await.unwrap()
}

async fn preflight(gw: &TestGateway, origin: Option<&str>) -> reqwest::Response {
    let mut req = http()
        .request(Method::OPTIONS, gw.stream_url("topic=c"))
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id");
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    req.send().await.unwrap()
}

fn cors_headers(res: &reqwest::Response) -> Vec<String> {
    res.headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn an_allowed_origin_gets_credentialed_cors_headers() {
    let gw = TestGateway::start_with(&[
        "--cors-allow-origin",
        &format!("http://other.example,{ALLOWED}"),
    ])
    .await;
    let res = stream(&gw, Some(ALLOWED)).await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], ALLOWED);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "origin");
    drop(res);

    // Errors carry them too, so the page may read them.
    let res = http()
        .get(gw.stream_url("topic=a%20b"))
        .header("origin", ALLOWED)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED);
    expect_api_error(res, 400, "invalid_topic").await;

    let res = preflight(&gw, Some(ALLOWED)).await;
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], ALLOWED);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-methods"], "GET");
    assert_eq!(
        h["access-control-allow-headers"],
        "Last-Event-ID, Authorization"
    );
    assert!(h.contains_key("access-control-max-age"));
}

#[tokio::test]
async fn other_origins_get_no_cors_headers_and_a_403_preflight() {
    for flags in [&["--cors-allow-origin", ALLOWED][..], &[]] {
        let gw = TestGateway::start_with(flags).await;
        let res = stream(&gw, Some("https://evil.example.com")).await;
        assert_eq!(res.status(), 200, "the stream itself is served…");
        assert_eq!(cors_headers(&res), Vec::<String>::new(), "…but not shared");
        drop(res);
        let res = stream(&gw, None).await;
        assert_eq!(cors_headers(&res), Vec::<String>::new());
        drop(res);

        let res = preflight(&gw, Some("https://evil.example.com")).await;
        assert_eq!(cors_headers(&res), Vec::<String>::new());
        expect_api_error(res, 403, "origin_not_allowed").await;
        // OPTIONS without an Origin is no preflight: an ordinary 405.
        let res = preflight(&gw, None).await;
        expect_api_error(res, 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn with_no_flag_a_loopback_control_plane_s_own_origins_are_allowed() {
    // The quick start: the operators' page on the control port opens its
    // stream on the stream port, another origin.
    let gw = TestGateway::start().await;
    let port = gw.control.port();
    for origin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let res = stream(&gw, Some(&origin)).await;
        assert_eq!(res.headers()["access-control-allow-origin"], &*origin);
        assert_eq!(res.headers()["access-control-allow-credentials"], "true");
        drop(res);
        assert_eq!(preflight(&gw, Some(&origin)).await.status(), 204);
    }
    // Another port on the same host is another origin, and is refused.
    let other = format!("http://127.0.0.1:{}", gw.stream.port());
    let res = stream(&gw, Some(&other)).await;
    assert_eq!(cors_headers(&res), Vec::<String>::new());
    drop(res);

    // A listed origin replaces the default.
    let gw = TestGateway::start_with(&["--cors-allow-origin", ALLOWED]).await;
    let own = format!("http://127.0.0.1:{}", gw.control.port());
    let res = stream(&gw, Some(&own)).await;
    assert_eq!(cors_headers(&res), Vec::<String>::new());
}

#[test]
fn the_default_is_only_for_a_control_plane_on_loopback() {
    use streamline::stream::cors::Cors;
    assert!(Cors::operators_page("127.0.0.1:8080".parse().unwrap()).is_some());
    assert!(Cors::operators_page("[::1]:8080".parse().unwrap()).is_some());
    for public in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
        assert!(
            Cors::operators_page(public.parse().unwrap()).is_none(),
            "{public}"
        );
    }
}

#[tokio::test]
async fn an_invalid_origin_is_a_start_up_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamline"))
        .args([
            "--control-addr",
            "127.0.0.1:0",
            "--stream-addr",
            "127.0.0.1:0",
        ])
        .env(
            "STREAMLINE_CORS_ALLOW_ORIGIN",
            "https://ok.example,https://bad.example/path",
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("https://bad.example/path"), "{stderr}");
}
