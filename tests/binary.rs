//! The real `streamline` binary: its flags, shutdown on signals, resource use
//! over many connections, and `--demo`.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Every flag the documentation promises.
const FLAGS: &[&str] = &[
    "control-addr",
    "stream-addr",
    "heartbeat",
    "retry",
    "max-clients",
    "max-topics",
    "max-stream-topics",
    "max-body",
    "history-size",
    "history-ttl",
    "max-lag",
    "slow-client-policy",
    "header-read-timeout",
    "write-timeout",
    "shutdown-delay",
    "drain-window",
    "grace-period",
    "demo",
    "log-format",
];

#[tokio::test]
async fn help_lists_every_flag_with_its_env_var() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let help = String::from_utf8(out.stdout).unwrap();
    let documented = FLAGS.iter().map(|f| f.to_string());
    let declared = <streamline::Config as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect::<Vec<_>>();
    for flag in documented.chain(declared) {
        assert!(
            help.contains(&format!("--{flag}")),
            "--help lacks --{flag}:\n{help}"
        );
        if flag != "help" && flag != "version" {
            let env = format!("STREAMLINE_{}", flag.to_uppercase().replace('-', "_"));
            assert!(help.contains(&env), "--help lacks {env}:\n{help}");
        }
    }
}

/// Opens streams of every kind, sends `sig`, and checks that each ends with a
/// shutdown notice and that the process exits cleanly.
async fn a_signal_ends_every_stream_then_the_process(sig: &str) {
    let mut gw = BinaryGateway::start(&["--shutdown-delay", "0s", "--drain-window", "200ms"]).await;
    let mut streams = Vec::new();
    for (protocol, client, query) in [
        ("HTTP/1.1", http(), "topic=a"),
        ("HTTP/1.1", http(), "topic=a&topic=b"),
        ("HTTP/1.1", http(), "topic=c"),
        ("HTTP/2", http2(), "topic=a"),
        ("HTTP/2", http2(), "topic=b"),
    ] {
        let mut s = SseClient::connect_with(&client, &gw.stream_url(query), None).await;
        s.client_id().await;
        streams.push((format!("{protocol} stream on {query}"), s));
    }
    let clients: Value = get_json(&gw.control_url("/clients")).await;
    assert_eq!(clients["clients"].as_array().unwrap().len(), streams.len());

    gw.signal(sig);
    for (what, s) in &mut streams {
        let rest = s.until_end().await;
        let last = rest
            .last()
            .unwrap_or_else(|| panic!("{what} ended without a notice"));
        assert_eq!(last.event, "streamline.close", "{what}");
        assert_eq!(
            serde_json::from_str::<Value>(&last.data).unwrap(),
            json!({"reason": "shutdown"}),
            "{what}"
        );
    }
    gw.wait_log("stopped").await;
    let status = gw.wait_exit().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_stream_with_a_notice_and_exits_zero() {
    a_signal_ends_every_stream_then_the_process("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_every_stream_with_a_notice_and_exits_zero() {
    a_signal_ends_every_stream_then_the_process("INT").await;
}

/// Opens and drops `n` streams, `at_once` at a time, each after reading its
/// preamble.
async fn churn(client: &reqwest::Client, url: &str, n: usize, at_once: usize) {
    futures_util::stream::iter(0..n)
        .for_each_concurrent(at_once, |_| async move {
            let mut s = SseClient::connect_with(client, url, None).await;
            s.client_id().await;
        })
        .await;
}

async fn wait_no_clients(gw: &BinaryGateway) {
    let url = gw.control_url("/clients");
    eventually_async("no clients left", || async {
        get_json(&url).await["clients"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_leave_no_threads_memory_or_clients_behind() {
    let mut gw = BinaryGateway::start(&[]).await;
    let pid = gw.pid();
    let threads_at_start = threads(pid);
    let (client, url) = (http(), gw.stream_url("topic=churn"));

    churn(&client, &url, 1_000, 50).await;
    wait_no_clients(&gw).await;
    let rss_warm = rss_kib(pid);

    churn(&client, &url, 10_000, 50).await;
    wait_no_clients(&gw).await;
    assert_eq!(threads(pid), threads_at_start, "thread count");
    let rss = rss_kib(pid);
    assert!(
        rss < rss_warm + 8 * 1024,
        "RSS grew from {rss_warm} KiB to {rss} KiB"
    );

    // Every one of them was counted in and out.
    let metrics = get_text(&gw.control_url("/metrics")).await;
    for name in [
        "streamline_connections_opened_total 11000",
        "streamline_connections_closed_total 11000",
    ] {
        assert!(metrics.lines().any(|l| l == name), "{name}:\n{metrics}");
    }
    gw.signal("TERM");
    assert!(gw.wait_exit().await.success());
}

#[tokio::test]
async fn demo_publishes_the_time_on_topic_time() {
    let gw = BinaryGateway::start(&["--demo"]).await;
    let mut sub = SseClient::connect(&gw.stream_url("topic=time")).await;
    sub.client_id().await;
    let ev = sub.next_event().await.expect("a demo event");
    assert_eq!(ev.event, "time");
    assert!(ev.id.unwrap().starts_with("time:"));
    humantime::parse_rfc3339(&ev.data)
        .unwrap_or_else(|e| panic!("{:?} is not a time: {e}", ev.data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_without_a_bus_say_so_at_start_and_when_a_client_crosses_over() {
    // A named replica suggests there are others: without a bus, a warning.
    let mut a = BinaryGateway::start(&["--replica-id", "replica-a"]).await;
    let mut b = BinaryGateway::start(&["--replica-id", "replica-b"]).await;
    for gw in [&mut a, &mut b] {
        let line = gw
            .wait_log(
                "no shared bus: this replica's events and history are its own; \
                 run one replica, or give every replica --redis-url or --kafka-brokers",
            )
            .await;
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["backend"], "memory", "{line}");
    }
    // A client whose reconnect lands on the other replica is told it
    // missed events, and the replica says why, once.
    let id = publish_to(&http(), a.control, &json!({"topic": "t", "data": "on a"}))
        .await
        .remove(0);
    for _ in 0..2 {
        let mut s = SseClient::connect_with(&http(), &b.stream_url("topic=t"), Some(&id)).await;
        s.client_id().await;
        let gap = s.next_event().await.expect("a gap notice");
        assert_eq!(gap.event, "streamline.gap");
        assert_eq!(gap.data, r#"{"topic":"t","reason":"unknown_origin"}"#);
    }
    let told = b
        .wait_log(
            "a client resumed with an event id from another replica or an earlier run; \
             without a shared bus (--redis-url or --kafka-brokers) replicas share no \
             events, so it missed what was published meanwhile (told once per run)",
        )
        .await;
    assert_eq!(told["level"], "WARN", "{told}");
    b.signal("TERM");
    b.wait_exit().await;
    let mut again = 0;
    while let Some(line) = b.logs.recv().await {
        again += usize::from(line["message"] == told["message"]);
    }
    assert_eq!(again, 0, "told once per run");
}

/// Text logs off a terminal carry no colour codes, and a stream's lines carry
/// its client id and topics as fields of its span, from open to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colour_codes_and_name_the_stream() {
    let mut gw = BinaryGateway::start_text(&[], "streamline=debug").await;
    let mut s = SseClient::connect(&gw.stream_url("topic=alpha&topic=beta")).await;
    let client = s.client_id().await;
    let mut seen = Vec::new();
    let opened = tokio::time::timeout(WAIT, async {
        loop {
            let line = gw.logs.recv().await.expect("streamline exited");
            let line = line.as_str().expect("a text line").to_string();
            seen.push(line.clone());
            if line.contains("stream opened") {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no \"stream opened\" line in time:\n{}", seen.join("\n")));
    assert!(
        opened.contains(&format!("client={client}")),
        "the span names the client: {opened}"
    );
    assert!(
        opened.contains(r#"topics=["alpha", "beta"]"#),
        "the span names the topics: {opened}"
    );
    assert!(opened.contains("remote=127.0.0.1:"), "{opened}");
    // An HTTP/2 stream: a span of its own inside its connection's.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut s2 = SseClient::connect_with(&h2, &gw.stream_url("topic=gamma"), None).await;
    let client2 = s2.client_id().await;
    let opened2 = tokio::time::timeout(WAIT, async {
        loop {
            let line = gw.logs.recv().await.expect("streamline exited");
            let line = line.as_str().expect("a text line").to_string();
            seen.push(line.clone());
            if line.contains("stream opened") {
                return line;
            }
        }
    })
    .await
    .expect("an HTTP/2 \"stream opened\" line");
    assert!(
        opened2.contains(&format!(r#"stream{{client={client2} topics=["gamma"]}}"#)),
        "the HTTP/2 stream's span names it: {opened2}"
    );
    assert!(opened2.contains("conn{remote=127.0.0.1:"), "{opened2}");
    drop(s2);
    // A control request: one DEBUG line with its status, in its span.
    publish_to(&http(), gw.control, &json!({"topic": "alpha", "data": "x"})).await;
    let answered = tokio::time::timeout(WAIT, async {
        loop {
            let line = gw.logs.recv().await.expect("streamline exited");
            let line = line.as_str().expect("a text line").to_string();
            seen.push(line.clone());
            if line.contains("answered") {
                return line;
            }
        }
    })
    .await
    .expect("a control request is logged at debug");
    assert!(answered.contains("DEBUG"), "{answered}");
    assert!(answered.contains("method=PATCH"), "{answered}");
    assert!(answered.contains("route=/events"), "{answered}");
    assert!(answered.contains("status=202"), "{answered}");
    assert!(answered.contains("latency_us="), "{answered}");
    drop(s);
    gw.signal("TERM");
    gw.wait_exit().await;
    while let Some(line) = gw.logs.recv().await {
        seen.push(line.as_str().unwrap_or_default().to_string());
    }
    for line in &seen {
        assert!(!line.contains('\u{1b}'), "a colour code in {line:?}");
    }
}
