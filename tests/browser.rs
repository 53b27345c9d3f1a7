//! A real browser (headless Chromium over the DevTools protocol) against
//! real servers: `EventSource` through deploy/nginx across a replica's drain
//! and across a moment with no replica at all, cross-origin streams with and without `--cors-allow-origin`, and the
//! operators' page. Every assertion reads what the page itself recorded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::browser::{Browser, Page};
use common::nginx::{Cluster, Nginx};
use common::*;
use serde_json::{Value, json};

/// Records every message (`[lastEventId, data]`), every open, error and
/// close notice of one `EventSource` in `window.rec`.
fn recorder(url: &str, with_credentials: bool) -> String {
    format!(
        r#"<!doctype html>
<meta charset="utf-8">
<title>recorder</title>
<script>
window.rec = {{ got: [], opens: 0, errors: 0, closed: false, notices: [] }};
const es = new EventSource({url}, {{ withCredentials: {with_credentials} }});
es.onopen = () => {{ rec.opens++; }};
es.onerror = () => {{ rec.errors++; rec.closed = es.readyState === EventSource.CLOSED; }};
es.onmessage = (e) => {{ rec.got.push([e.lastEventId, e.data]); }};
es.addEventListener("streamline.close", (e) => {{ rec.notices.push(e.data); }});
</script>
"#,
        url = json!(url)
    )
}

/// `window.rec.got` as (id, data) pairs.
async fn recorded(page: &Page<'_>) -> Vec<(String, String)> {
    let v = page.eval("window.rec.got").await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_owned(),
                p[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn count(page: &Page<'_>, expr: &str) -> u64 {
    page.eval(expr).await.as_u64().unwrap()
}

const RECORDER_PAGE: &str = "/test/recorder.html";

/// A cluster whose nginx also serves a [`recorder`] of `topic` at
/// [`RECORDER_PAGE`] (same-origin with /stream), and a browser to open it.
async fn cluster_serving_a_recorder(topic: &str) -> (Cluster, Browser) {
    let page_conf = "location = /test/recorder.html { root www; default_type text/html; }\n";
    let html = recorder(&format!("/stream?topic={topic}"), false);
    let c = Cluster::start_with(&[
        ("streamline.d/test-page.conf", page_conf),
        ("www/test/recorder.html", &html),
    ])
    .await;
    (c, Browser::launch().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_through_nginx_resumes_on_its_own_across_a_drain() {
    let (mut c, browser) = cluster_serving_a_recorder("browser").await;
    let page = browser.open(&c.nginx.url(RECORDER_PAGE)).await;
    page.wait_for("the stream opens", "window.rec.opens === 1")
        .await;
    let holder = c.holder_of_the_stream().await;

    // Publishes through nginx until told to stop; a 502 (the replica went
    // away under the request; nginx does not resend a PATCH) is an event
    // that may or may not exist.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, nginx) = (stop.clone(), c.nginx.addr);
        tokio::spawn(async move {
            let http = http();
            let (mut acked, mut unknown) = (BTreeMap::new(), BTreeSet::new());
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let data = format!("b{i}");
                let res = http
                    .patch(format!("http://{nginx}/events"))
                    .json(&json!({"topic": "browser", "data": data}))
                    .send()
                    .await
                    .expect("nginx answers");
                match res.status().as_u16() {
                    202 => {
                        let v: Value = res.json().await.unwrap();
                        acked.insert(v["ids"][0].as_str().unwrap().to_owned(), data);
                    }
                    502 => {
                        unknown.insert(data);
                    }
                    s => panic!("PATCH through nginx: {s}"),
                }
            }
            (acked, unknown)
        })
    };

    page.wait_for("10 events", "window.rec.got.length >= 10")
        .await;
    c.replicas[holder].signal("TERM");
    // EventSource reconnects by itself after the close notice's retry hint,
    // with Last-Event-ID, through nginx, to the other replica.
    page.wait_for("the reconnect", "window.rec.opens >= 2")
        .await;
    let before = count(&page, "window.rec.got.length").await;
    page.wait_for(
        "10 events after the reconnect",
        &format!("window.rec.got.length >= {}", before + 10),
    )
    .await;
    assert!(
        c.replicas[holder].wait_exit().await.success(),
        "the drained replica exits cleanly"
    );
    stop.store(true, Ordering::Relaxed);
    let (acked, unknown) = publisher.await.unwrap();
    let ids: Vec<&String> = acked.keys().collect();
    let all_in = format!(
        "(() => {{ const seen = new Set(window.rec.got.map(p => p[0])); return {}.every(id => seen.has(id)); }})()",
        json!(ids)
    );
    page.wait_for("every acknowledged event", &all_in).await;

    let got = recorded(&page).await;
    let got_ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let unique: BTreeSet<&str> = got_ids.iter().copied().collect();
    assert_eq!(unique.len(), got_ids.len(), "no event twice: {got_ids:?}");
    let mut sorted = got_ids.clone();
    sorted.sort_by_key(|id| position(id));
    assert_eq!(got_ids, sorted, "events in publication order");
    for (id, data) in &got {
        match acked.get(id) {
            Some(want) => assert_eq!(data, want, "event {id}"),
            None => assert!(unknown.contains(data), "{id} ({data}) was never published"),
        }
    }
    let notices = page.eval("window.rec.notices").await;
    assert!(
        notices.to_string().contains("shutdown"),
        "the page saw the close notice: {notices}"
    );
    assert_eq!(count(&page, "window.rec.opens").await, 2, "one reconnect");
}

/// The text of the operators' page's list entry for event `id`, once shown.
async fn received_item(page: &Page<'_>, id: &str) -> Value {
    page.wait_for(
        "the event on the page's list",
        &format!(
            "(li => li && li.textContent)(document.querySelector('#received li[data-id={}]'))",
            json!(id)
        ),
    )
    .await
}

/// Serves `html` at `/` on a fresh loopback port (an origin of its own).
async fn page_server(listener: tokio::net::TcpListener, html: String) {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(html) }),
    );
    axum::serve(listener, app).await.unwrap();
}

async fn origin_listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", l.local_addr().unwrap());
    (l, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_streams_need_the_origin_allowed() {
    let (allowed_l, allowed) = origin_listener().await;
    let (foreign_l, foreign) = origin_listener().await;
    let gw = TestGateway::start_with(&["--cors-allow-origin", &allowed]).await;
    let stream_url = gw.stream_url("topic=cors");
    tokio::spawn(page_server(allowed_l, recorder(&stream_url, true)));
    tokio::spawn(page_server(foreign_l, recorder(&stream_url, true)));

    let browser = Browser::launch().await;
    let ok = browser.open(&format!("{allowed}/")).await;
    let refused = browser.open(&format!("{foreign}/")).await;
    ok.wait_for("the allowed page's stream opens", "window.rec.opens === 1")
        .await;
    refused
        .wait_for(
            "the foreign page's EventSource fails for good",
            "window.rec.closed",
        )
        .await;

    let id = gw.publish_one("cors", "for allowed pages").await;
    ok.wait_for("the event", "window.rec.got.length === 1")
        .await;
    assert_eq!(
        recorded(&ok).await,
        [(id, "for allowed pages".to_owned())],
        "the allowed page got the event"
    );
    assert_eq!(count(&ok, "window.rec.errors").await, 0);
    assert_eq!(count(&refused, "window.rec.opens").await, 0);
    assert_eq!(
        recorded(&refused).await,
        [],
        "the foreign page received nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_publishes_watches_and_kicks() {
    let gw = TestGateway::start().await;
    let nginx = Nginx::start(&[gw.stream], &[gw.control]).await;
    let browser = Browser::launch().await;
    let page = browser.open(&nginx.url("/operator/")).await;
    page.wait_for(
        "the page's own stream opens",
        "document.getElementById('stream-status').textContent.startsWith('(open')",
    )
    .await;

    let mut victim = SseClient::connect(&nginx.url("/stream?topic=victim")).await;
    let victim_id = victim.client_id().await;
    page.wait_for(
        "two clients listed",
        "document.getElementById('clients-count').textContent === '2'",
    )
    .await;
    page.wait_for(
        "topic counts",
        "Number(document.getElementById('topics-count').textContent) >= 2",
    )
    .await;

    // Publish from the page's box; the page's stream receives it.
    page.eval(
        "document.getElementById('data').value = 'ping from the page'; \
         document.getElementById('publish').click()",
    )
    .await;
    let status = page
        .wait_for(
            "the publish answer",
            "(t => t.startsWith('published ') && t)(document.getElementById('publish-status').textContent)",
        )
        .await;
    let id = status.as_str().unwrap()["published ".len()..].to_owned();
    let item = received_item(&page, &id).await;
    assert_eq!(item, json!(format!("{id} ping from the page")));
    page.wait_for(
        "an events/s figure",
        "/^[0-9.]+$/.test(document.getElementById('events-rate').textContent)",
    )
    .await;

    // Kick the other client from its row.
    page.eval(&format!(
        "document.querySelector('button.kick[data-client-id={}]').click()",
        json!(victim_id)
    ))
    .await;
    let last = victim.until_end().await;
    let close = last.last().expect("a close notice");
    assert_eq!(close.event, "streamline.close");
    assert_eq!(close.data, r#"{"reason":"kicked"}"#);
    page.wait_for(
        "one client left",
        "document.getElementById('clients-count').textContent === '1'",
    )
    .await;
    let kicked = page
        .eval("document.getElementById('kick-status').textContent")
        .await;
    assert_eq!(kicked, json!(format!("kicked {victim_id}")));
}

#[tokio::test]
async fn the_operators_page_is_one_self_contained_html_file() {
    let gw = TestGateway::start().await;
    let res = http().get(gw.control_url("/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = res.text().await.unwrap();
    for external in ["src=\"http", "href=\"http", "@import", "src=\"//"] {
        assert!(!html.contains(external), "loads {external}…");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_reaches_another_stream_origin_with_cors() {
    // The page on the control port, its stream on the stream port: another
    // origin, which must allow the page's.
    let control = format!("127.0.0.1:{}", common::redis::free_port());
    let gw = TestGateway::start_with(&[
        "--control-addr",
        &control,
        "--cors-allow-origin",
        &format!("http://{control}"),
    ])
    .await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&format!("http://{control}/?stream=http://{}", gw.stream))
        .await;
    page.wait_for(
        "the page's stream opens",
        "document.getElementById('stream-status').textContent.startsWith('(open')",
    )
    .await;
    let id = gw.publish_one("operator-test", "across origins").await;
    let item = received_item(&page, &id).await;
    assert_eq!(item, json!(format!("{id} across origins")));
}

/// The text of the operators' page's cell `col` in client `id`'s row.
fn client_cell(id: &str, col: &str) -> String {
    format!(
        "(td => td && td.textContent)(document.querySelector('#clients tr[data-client-id={}] td[data-col={}]'))",
        json!(id),
        json!(col)
    )
}

/// Clicks the kick button of `id`'s row and checks that its stream ends
/// with the kicked event.
async fn kick_from_page(page: &Page<'_>, client: &mut SseClient, id: &str) {
    page.eval(&format!(
        "document.querySelector('button.kick[data-client-id={}]').click()",
        json!(id)
    ))
    .await;
    let last = client.until_end().await;
    assert_eq!(
        last.last().map(|e| e.data.as_str()),
        Some(r#"{"reason":"kicked"}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_on_a_quick_start_charts_rates_lag_and_kicks() {
    // As a new user would: `--demo` (an event every 2 s) and no other flag;
    // the page opened on the control port, its stream on the stream port.
    let gw = TestGateway::start_with(&["--demo"]).await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(SseClient::connect(&gw.stream_url("topic=time")).await);
    }
    let browser = Browser::launch().await;
    let page = browser.open(&gw.control_url("/")).await;
    page.set_viewport(1280, 1000).await;
    page.wait_for(
        "the page's own stream opens on the other origin, with no flag",
        "document.getElementById('stream-status').textContent.startsWith('(open')",
    )
    .await;
    page.wait_for(
        "four clients listed (three readers and the page)",
        "document.getElementById('clients-count').textContent === '4'",
    )
    .await;

    // Rates are averaged over a window: with one event every 2 s, none of
    // them reads 0 once the page has a few seconds of samples.
    page.wait_for(
        "samples over more than the rate window on the publishes chart",
        "Number(document.querySelector('svg[data-chart=publishes]').dataset.points) >= 8",
    )
    .await;
    let rates = page
        .eval(
            "(() => { const o = window.streamlineOps, s = o.history.get(o.replica()); \
             return s.slice(-5).map((_, k) => o.rateAt(s, s.length - 5 + k, 'events_published')); })()",
        )
        .await;
    for r in rates.as_array().unwrap() {
        let r = r.as_f64().expect("a rate");
        assert!(r > 0.2 && r < 1.0, "publishes/s with the demo: {rates}");
    }
    let shown = page
        .eval("document.getElementById('events-rate').textContent")
        .await;
    let shown: f64 = shown.as_str().unwrap().parse().expect("a number");
    assert!(shown > 0.0, "the events/s figure reads {shown}");
    for chart in ["clients", "deliveries", "bytes"] {
        let points = page
            .eval(&format!(
                "Number(document.querySelector('svg[data-chart={chart}]').dataset.points)"
            ))
            .await;
        assert!(points.as_u64().unwrap() >= 8, "{chart} chart: {points}");
    }
    // And they keep moving: the next poll adds a point.
    let before = page
        .eval("Number(document.querySelector('svg[data-chart=deliveries]').dataset.points)")
        .await;
    page.wait_for(
        "a new point on the deliveries chart",
        &format!(
            "Number(document.querySelector('svg[data-chart=deliveries]').dataset.points) > {before}"
        ),
    )
    .await;

    // A client that stopped reading, and a burst on its topic: the page
    // shows how many events it is behind, and the burst's topic on top.
    let stalled = RawStream::open(gw.stream, "topic=bulk", Some(4096)).await;
    gw.wait_clients(5).await;
    let stalled_id = {
        let list = get_json(&gw.control_url("/clients?topic=bulk")).await;
        list["clients"][0]["id"].as_str().unwrap().to_owned()
    };
    let http = http();
    let payload = "x".repeat(16 * 1024);
    for b in 0..4 {
        let batch: Vec<Value> = (0..50)
            .map(|i| json!({"topic": "bulk", "data": format!("{b}-{i} {payload}")}))
            .collect();
        publish_to(&http, gw.control, &json!(batch)).await;
    }
    page.wait_for(
        "the stalled client's lag on the page",
        &format!("Number({}) > 0", client_cell(&stalled_id, "lag")),
    )
    .await;
    let listed = get_json(&gw.control_url(&format!("/clients/{stalled_id}"))).await;
    assert!(
        listed["lag"].as_u64().unwrap() > 0,
        "GET /clients/{{id}}: {listed}"
    );
    page.wait_for(
        "the most-behind figure",
        "Number(document.getElementById('max-lag').textContent) > 0",
    )
    .await;
    page.wait_for(
        "the burst's topic first",
        "document.querySelector('#topics tbody tr').dataset.topic === 'bulk'",
    )
    .await;

    // Sorting and filtering the clients.
    page.eval("document.querySelector('#clients th[data-sort=lag]').click()")
        .await;
    let first = page
        .eval("document.querySelector('#clients tbody tr').dataset.clientId")
        .await;
    assert_eq!(first, json!(stalled_id), "sorted by lag, most behind first");
    page.eval(
        "(f => { f.value = 'curl-less-agent-that-matches-nothing'; f.dispatchEvent(new Event('input')); })(document.getElementById('client-filter'))",
    )
    .await;
    assert_eq!(
        page.eval("document.querySelectorAll('#clients tbody tr').length")
            .await,
        json!(0)
    );
    page.eval(
        "(f => { f.value = 'bulk'; f.dispatchEvent(new Event('input')); })(document.getElementById('client-filter'))",
    )
    .await;
    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('#clients tbody tr')].map(r => r.dataset.clientId)"
        )
        .await,
        json!([stalled_id])
    );
    page.eval(
        "(f => { f.value = ''; f.dispatchEvent(new Event('input')); })(document.getElementById('client-filter'))",
    )
    .await;

    let dir = common::nginx::temp_dir("operators-page");
    let shot = dir.join("operators-page.png");
    page.screenshot(&shot).await;
    println!("operators' page screenshot: {}", shot.display());
    if let Ok(keep) = std::env::var("STREAMLINE_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("copy the screenshot");
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // Kick a reader from its row.
    let mut victim = readers.pop().unwrap();
    let victim_id = victim.client_id().await;
    kick_from_page(&page, &mut victim, &victim_id).await;
    page.wait_for(
        "the kicked client's row gone",
        &format!(
            "!document.querySelector('#clients tr[data-client-id={}]')",
            json!(victim_id)
        ),
    )
    .await;
    assert_eq!(
        page.eval("window.streamlineOps.errors").await,
        json!([]),
        "no script error"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_says_which_origin_to_allow_when_refused() {
    // An explicit --cors-allow-origin replaces the loopback default, so the
    // page (on the control port) may not open its stream.
    let gw = TestGateway::start_with(&["--cors-allow-origin", "https://app.example"]).await;
    let browser = Browser::launch().await;
    let page = browser.open(&gw.control_url("/")).await;
    let help = page
        .wait_for(
            "the page's advice",
            "document.getElementById('stream-help').textContent",
        )
        .await;
    let origin = format!("http://{}", gw.control);
    let help = help.as_str().unwrap();
    assert!(
        help.contains(&format!("--cors-allow-origin {origin}"))
            && help.contains(&format!("STREAMLINE_CORS_ALLOW_ORIGIN={origin}")),
        "{help}"
    );
    assert_eq!(
        page.eval("document.getElementById('stream-status').textContent")
            .await,
        json!("(refused)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_charts_each_replica_and_kicks_across_them() {
    let redis = common::redis::RedisServer::start().await;
    let url = redis.url();
    let a = TestGateway::start_with(&["--redis-url", &url, "--replica-id", "a", "--demo"]).await;
    let b = TestGateway::start_with(&["--redis-url", &url, "--replica-id", "b"]).await;
    let mut on_b = SseClient::connect(&b.stream_url("topic=time")).await;
    let on_b_id = on_b.client_id().await;
    let mut on_a = SseClient::connect(&a.stream_url("topic=time")).await;
    on_a.client_id().await;

    let browser = Browser::launch().await;
    let page = browser.open(&a.control_url("/")).await;
    page.set_viewport(1280, 1000).await;
    page.wait_for(
        "a line per replica on the clients chart",
        "document.querySelectorAll('svg[data-chart=clients] polyline').length === 2",
    )
    .await;
    page.wait_for(
        "both replicas listed",
        "document.querySelectorAll('#replicas tbody tr').length === 2",
    )
    .await;
    page.wait_for(
        "b's client listed, with its replica",
        &format!(
            "(r => r && r.children[1].textContent === 'b')(document.querySelector('#clients tr[data-client-id={}]'))",
            json!(on_b_id)
        ),
    )
    .await;
    // Both replicas deliver the demo's events: per-replica deliveries.
    page.wait_for(
        "deliveries charted for both replicas",
        "document.querySelectorAll('svg[data-chart=deliveries] polyline').length === 2",
    )
    .await;
    if let Ok(keep) = std::env::var("STREAMLINE_CLUSTER_SCREENSHOT") {
        page.wait_for(
            "15 s of samples",
            "Number(document.querySelector('svg[data-chart=publishes]').dataset.points) >= 18",
        )
        .await;
        page.screenshot(std::path::Path::new(&keep)).await;
    }

    // Kick b's client from the page served by a.
    kick_from_page(&page, &mut on_b, &on_b_id).await;
    page.wait_for(
        "the kick reported",
        &format!(
            "document.getElementById('kick-status').textContent === {}",
            json!(format!("kicked {on_b_id}"))
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_shows_why_the_stream_plane_refused_its_stream() {
    // The origin is allowed (loopback default), but streams need a token.
    let gw =
        TestGateway::start_with(&["--jwt-secret", "operators-page-test-secret-32-bytes!"]).await;
    let browser = Browser::launch().await;
    let page = browser.open(&gw.control_url("/")).await;
    let help = page
        .wait_for(
            "the page's explanation",
            "document.getElementById('stream-help').textContent",
        )
        .await;
    let help = help.as_str().unwrap();
    assert!(
        help.starts_with("The stream plane answered 401 unauthorized"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_through_nginx_comes_back_after_every_replica_was_down() {
    let (mut c, browser) = cluster_serving_a_recorder("outage").await;
    let page = browser.open(&c.nginx.url(RECORDER_PAGE)).await;
    page.wait_for("the stream opens", "window.rec.opens === 1")
        .await;
    let body = json!({"topic": "outage", "data": "before"});
    publish_to(&http(), c.nginx.addr, &body).await;
    page.wait_for("the first event", "window.rec.got.length === 1")
        .await;

    // Every replica goes. nginx answers each reconnect with an event stream
    // that carries `retry:` and ends: the browser keeps coming back, where
    // a 502 or 503 would have closed the EventSource for good.
    c.stop(0).await;
    c.stop(1).await;
    page.wait_for(
        "two come-backs",
        "window.rec.opens >= 3 && window.rec.errors >= 3",
    )
    .await;
    assert_eq!(page.eval("window.rec.closed").await, false);

    // One comes back: the browser resumes on it with its Last-Event-ID and
    // gets what was published meanwhile.
    c.restart(0).await;
    let body = json!({"topic": "outage", "data": "after"});
    publish_to(&http(), c.nginx.addr, &body).await;
    page.wait_for(
        "the event published after the outage",
        "window.rec.got.length === 2",
    )
    .await;
    let got = recorded(&page).await;
    let data: Vec<&str> = got.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(data, ["before", "after"]);
    assert_eq!(page.eval("window.rec.closed").await, false);
}
