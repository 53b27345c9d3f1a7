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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_through_nginx_resumes_on_its_own_across_a_drain() {
    // The page is served by nginx itself, same-origin with /stream.
    let page_conf = "location = /test/recorder.html { root www; default_type text/html; }\n";
    let html = recorder("/stream?topic=browser", false);
    let mut c = Cluster::start_with(&[
        ("streamline.d/test-page.conf", page_conf),
        ("www/test/recorder.html", &html),
    ])
    .await;
    let browser = Browser::launch().await;
    let page = browser.open(&c.nginx.url("/test/recorder.html")).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_through_nginx_comes_back_after_every_replica_was_down() {
    let page_conf = "location = /test/recorder.html { root www; default_type text/html; }\n";
    let html = recorder("/stream?topic=outage", false);
    let mut c = Cluster::start_with(&[
        ("streamline.d/test-page.conf", page_conf),
        ("www/test/recorder.html", &html),
    ])
    .await;
    let browser = Browser::launch().await;
    let page = browser.open(&c.nginx.url("/test/recorder.html")).await;
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
