//! Running `streamline-bench` (the workspace's other crate, `bench/`) and
//! reading its JSON reports (and those of `bench/churn.sh`, which wraps it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;
use tokio::sync::OnceCell;

/// The `streamline-bench` binary, built on first use (once per test
/// process) in this target dir with the tests' profile, so a test that
/// needs it runs alone too (`cargo test --test scale`): the bench is
/// another package, which `CARGO_BIN_EXE_*` does not reach.
pub async fn bench_bin() -> &'static Path {
    static BIN: OnceCell<PathBuf> = OnceCell::const_new();
    BIN.get_or_init(build_bench).await
}

/// A command that runs the bench (see [`bench_bin`]).
pub async fn bench_command() -> Command {
    Command::new(bench_bin().await)
}

/// `cargo build -p streamline-bench`, by the cargo that builds the tests,
/// into their target dir (`CARGO_TARGET_TMPDIR` is `<target dir>/tmp`) and
/// with their profile (the test binary runs from `<profile dir>/deps/`);
/// the binary's path is read from cargo's JSON messages rather than
/// guessed.
async fn build_bench() -> PathBuf {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target dir>/tmp");
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = match exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
    {
        Some("debug") | None => "dev",
        Some(dir) => dir,
    };
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--locked", "--package", "streamline-bench"])
        .args(["--bin", "streamline-bench", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build -p streamline-bench failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "streamline-bench")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the streamline-bench executable")
}

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
