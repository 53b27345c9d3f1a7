//! Reading the JSON reports of `streamline-bench` (and `bench/churn.sh`,
//! which wraps it).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

/// Runs `cmd` (the bench, with its flags) to the end, checks it succeeded
/// and returns its JSON line (the last line of its output).
pub async fn run_bench(mut cmd: Command) -> Value {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn streamline-bench");
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the bench finishes in time")
        .expect("bench output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"))
}

/// The whole number `key` of a report; panics (showing the report) if absent.
pub fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Nothing lost: `streams` streams opened, everything planned was published,
/// every counter in `zero` is 0 and every expected delivery arrived.
pub fn assert_delivered_in_full(r: &Value, streams: u64, zero: &[&str]) {
    assert_eq!(n(r, "published"), n(r, "planned"), "{r}");
    assert_counts(r, streams, zero);
}

/// `streams` streams opened, every counter in `zero` is 0 and every
/// expected delivery (of what was published) arrived.
pub fn assert_counts(r: &Value, streams: u64, zero: &[&str]) {
    assert_eq!(n(r, "streams_open"), streams, "{r}");
    for key in zero {
        assert_eq!(n(r, key), 0, "{key}: {r}");
    }
    assert_eq!(n(r, "delivered"), n(r, "expected_deliveries"), "{r}");
}
