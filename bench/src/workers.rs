//! `--workers N`: more streams than one process may open. The parent
//! starts N child processes of this same binary (`--worker K`); worker K
//! opens streams K, K+N, K+2N, … (so topics, replicas and source addresses
//! are spread exactly as in one process) and the parent publishes. They talk
//! in JSON lines: a worker writes [`Msg`]s on its stdout; the parent writes
//! [`Go`] on its stdin once publishing is over, then `stop`. The parent
//! merges what the workers counted, and their latency histograms (bucket by
//! bucket, never their percentiles).

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::args::Args;
use crate::payload::unix_micros;
use crate::procstat::{self, Phase, Server, Watch};
use crate::report::{self, Latency, Report};
use crate::subscriber::{self, Streams};
use crate::target::Target;

/// What a worker tells its parent, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Msg {
    /// Every one of its streams is open or failed.
    Opened {
        open_per_topic: Vec<u64>,
        open_errors: Vec<(String, u64)>,
    },
    /// Once a second.
    Progress { open: u64, delivered: u64 },
    /// It has all it expected, or nothing came for --drain-quiet.
    Drained {
        delivered: u64,
        /// When the last delivery was seen, µs since the Unix epoch.
        last_us: u64,
    },
    /// Its streams are closed; what they saw.
    Done {
        report: Box<Report>,
        /// Histograms as (value, count) pairs.
        latency: Vec<(u64, u64)>,
        gaps: Vec<(u64, u64)>,
    },
}

/// What the parent published, so a worker can count what its streams
/// missed.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Go {
    events_per_topic: Vec<u64>,
    /// Events whose publish request failed.
    failed: Vec<u64>,
}

fn emit(msg: &Msg) {
    let Ok(line) = serde_json::to_string(msg) else {
        return;
    };
    // One locked write per line, so the progress task's lines never split
    // another's.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        // Out of bounds cannot happen: the workers use the same bounds.
        let _ = h.record_n(v, n);
    }
}

/// Worker `k`: opens its share, reports, waits for [`Go`], drains, waits
/// for `stop`, closes and reports what its streams saw.
pub async fn child(args: Args, k: usize) -> Result<(), String> {
    let n = args.workers.max(1);
    let target =
        Target::resolve(&args.url, args.source_addrs, args.subscribers, args.topics).await?;
    let (streams, mut opened) = Streams::new(
        target,
        args.topics,
        args.publisher_count(),
        args.connect_concurrency,
        args.connect_timeout,
        args.reconnect_delay,
    );
    // From the start, so the parent's progress line counts streams opening.
    let progress = {
        let streams = streams.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                emit(&Msg::Progress {
                    open: streams.open.load(Relaxed) as u64,
                    delivered: streams.delivered(),
                });
            }
        })
    };

    let mine: Vec<usize> = (k..args.subscribers).step_by(n).collect();
    let tasks: Vec<_> = mine
        .iter()
        .map(|&i| tokio::spawn(subscriber::run(streams.clone(), i)))
        .collect();
    let mut open_per_topic = vec![0u64; args.topics];
    let mut open_errors = Vec::new();
    for _ in 0..mine.len() {
        match opened.recv().await {
            Some((topic, Ok(()))) => open_per_topic[topic] += 1,
            Some((_, Err(why))) => open_errors.push((why, 1)),
            None => break,
        }
    }
    emit(&Msg::Opened {
        open_per_topic: open_per_topic.clone(),
        open_errors: report::ranked(open_errors),
    });
    // The parent's lines, read on a thread of their own (std's blocking
    // stdin: this tool's tokio has no async stdin).
    let (lines_tx, mut lines) = mpsc::channel::<String>(2);
    std::thread::Builder::new()
        .name("parent-lines".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if lines_tx.blocking_send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot read from the parent: {e}"))?;
    let mut line = async || {
        lines
            .recv()
            .await
            .ok_or_else(|| "the parent went away".to_owned())
    };
    let go = line().await?;
    let go: Go = serde_json::from_str(&go).map_err(|e| format!("bad line from parent: {e}"))?;
    let mut events = go.events_per_topic.clone();
    events.resize(args.topics, 0);
    let expected = open_per_topic.iter().zip(&events).map(|(s, e)| s * e).sum();
    let last = crate::drain(&streams, expected, args.drain_quiet).await;
    let ago = last.elapsed().as_micros() as u64;
    emit(&Msg::Drained {
        delivered: streams.delivered(),
        last_us: unix_micros().saturating_sub(ago),
    });
    line().await?;
    progress.abort();

    streams.stop();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| format!("a stream task failed: {e}"))?,
        );
    }
    let mut report = Report::default();
    crate::count_loss(&mut report, &outcomes, &events, &go.failed);
    report.delivered = streams.delivered();
    report.stream_end_reasons = report::ranked(streams.ends());
    report.reconnect_failures = report::ranked(streams.reconnect_failures());
    emit(&Msg::Done {
        report: Box::new(report),
        latency: pairs(&streams.latency()),
        gaps: pairs(&streams.gaps()),
    });
    Ok(())
}

/// What the parent keeps of one worker.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    cpu: Option<Server>,
}

impl Worker {
    /// One short line into a pipe the worker reads promptly: a blocking
    /// write does not block for long.
    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("cannot write to a worker: {e}"))
    }
}

impl Drop for Worker {
    /// A worker never outlives a parent that failed.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the workers, publishes, merges their reports.
pub async fn parent(args: Args) -> Result<Report, String> {
    let n = args.workers;
    let target =
        Target::resolve(&args.url, args.source_addrs, args.subscribers, args.topics).await?;
    let mut watch = Watch::new(&args.pid, args.bus_pid)?;
    let ticks = procstat::clock_ticks();
    let mut report = crate::base_report(&args, &target);
    let plan = Arc::new(crate::plan(&args, args.publisher_count())?);
    watch.rss(Phase::Before);

    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<(usize, Msg)>(4 * n);
    // Each worker's latest (open, delivered), for the progress line.
    let seen = Arc::new(Mutex::new(vec![(0u64, 0u64); n]));
    let mut workers = Vec::with_capacity(n);
    let open_start = Instant::now();
    for k in 0..n {
        let mut child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .args(["--worker", &k.to_string(), "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker {k}: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(format!("worker {k} has no pipes"));
        };
        let cpu = Server::new(child.id()).ok();
        let (tx, seen) = (tx.clone(), seen.clone());
        let reader = std::thread::Builder::new()
            .name(format!("worker-{k}"))
            .spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Msg>(&line) {
                        Ok(Msg::Progress { open, delivered }) => {
                            seen.lock().unwrap_or_else(|e| e.into_inner())[k] = (open, delivered);
                        }
                        Ok(msg) => {
                            if tx.blocking_send((k, msg)).is_err() {
                                break;
                            }
                        }
                        Err(e) => eprintln!("streamline-bench: worker {k} said {line:?}: {e}"),
                    }
                }
            });
        if let Err(e) = reader {
            return Err(format!("cannot read from worker {k}: {e}"));
        }
        workers.push(Worker { child, stdin, cpu });
    }
    drop(tx);
    let printer = (!args.quiet).then(|| {
        let (seen, plan) = (seen.clone(), plan.clone());
        let total = args.subscribers;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let (open, delivered) = seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                eprintln!(
                    "[{:>4.0}s] open {open}/{total}  published {}  delivered {delivered}",
                    open_start.elapsed().as_secs_f64(),
                    plan.published.load(Relaxed),
                );
            }
        })
    });
    let mut next = async |what: &str| -> Result<(usize, Msg), String> {
        rx.recv()
            .await
            .ok_or_else(|| format!("a worker exited before it {what}"))
    };

    let mut open_per_topic = vec![0u64; args.topics];
    let mut open_errors = Vec::new();
    for _ in 0..n {
        if let (
            _,
            Msg::Opened {
                open_per_topic: o,
                open_errors: e,
            },
        ) = next("opened its streams").await?
        {
            for (t, c) in o.iter().enumerate().take(args.topics) {
                open_per_topic[t] += c;
            }
            open_errors.extend(e);
        }
    }
    report.open_s = open_start.elapsed().as_secs_f64();
    report.streams_open = open_per_topic.iter().sum();
    report.open_errors = report::ranked(open_errors);
    report.streams_failed = report.open_errors.iter().map(|(_, c)| c).sum();
    if !watch.is_empty() {
        // Let the servers settle (allocator, lazily sent heads) first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        watch.rss(Phase::Idle);
    }

    let mut go = Go {
        events_per_topic: vec![0; args.topics],
        failed: Vec::new(),
    };
    let cpu_of = |ws: &[Worker]| -> f64 {
        procstat::own_cpu_secs(ticks)
            + ws.iter()
                .filter_map(|w| w.cpu.and_then(|s| s.cpu_secs()))
                .sum::<f64>()
    };
    let mut start_us = unix_micros();
    let own_before = cpu_of(&workers);
    if args.idle_only {
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    } else {
        watch.cpu_start();
        let start = Instant::now() + Duration::from_millis(10);
        start_us = unix_micros() + 10_000;
        plan.end_at(Duration::from_secs_f64(args.duration));
        let mut sent =
            crate::publish(plan.clone(), args.publisher_mode, args.pool_max, start).await?;
        report.record_publishing(&plan, start, &mut sent);
        sent.per_topic.resize(args.topics, 0);
        go.events_per_topic = sent.per_topic;
        go.failed = sent.failed;
        report.expected_deliveries = open_per_topic
            .iter()
            .zip(&go.events_per_topic)
            .map(|(s, e)| s * e)
            .sum();
    }
    let line = serde_json::to_string(&go).map_err(|e| e.to_string())?;
    for w in &mut workers {
        w.send(&line)?;
    }
    let mut last_us = start_us;
    for _ in 0..n {
        if let (_, Msg::Drained { last_us: l, .. }) = next("drained").await? {
            last_us = last_us.max(l);
        }
    }
    if !args.idle_only {
        watch.cpu_end();
        report.bench_cpu_s = cpu_of(&workers) - own_before;
    }
    watch.rss(Phase::End);
    for w in &mut workers {
        w.send("stop")?;
    }

    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
    let mut gaps = latency.clone();
    let mut ends = Vec::new();
    let mut retried = Vec::new();
    let mut fatal = Vec::new();
    for _ in 0..n {
        let (
            _,
            Msg::Done {
                report: r,
                latency: l,
                gaps: g,
            },
        ) = next("reported").await?
        else {
            continue;
        };
        add_pairs(&mut latency, &l);
        add_pairs(&mut gaps, &g);
        merge(&mut report, &r);
        ends.extend(r.stream_end_reasons);
        retried.extend(r.reconnect_failures);
        fatal.extend(r.fatal_reasons);
    }
    report.stream_end_reasons = report::ranked(ends);
    report.reconnect_failures = report::ranked(retried);
    report.fatal_reasons = report::ranked(fatal);
    report.latency_us = Latency::from_histogram(&latency);
    report.stream_gap_us = Latency::from_histogram(&gaps);
    let span = last_us.saturating_sub(start_us) as f64 / 1e6;
    if !args.idle_only && span > 0.0 {
        report.deliveries_per_s = report.delivered as f64 / span;
    }
    let open = report.streams_open;
    watch.fill(&mut report, open);
    // Each has sent its last line; Drop reaps it.
    drop(workers);
    if let Some(p) = printer {
        p.abort();
    }
    Ok(report)
}

/// Adds one worker's counts to the run's.
fn merge(into: &mut Report, r: &Report) {
    into.delivered += r.delivered;
    into.missing += r.missing;
    into.duplicated += r.duplicated;
    into.out_of_order += r.out_of_order;
    into.wrong_topic += r.wrong_topic;
    into.streams_with_loss += r.streams_with_loss;
    into.max_missing_per_stream = into.max_missing_per_stream.max(r.max_missing_per_stream);
    into.streams_with_duplicates += r.streams_with_duplicates;
    into.max_duplicated_per_stream = into
        .max_duplicated_per_stream
        .max(r.max_duplicated_per_stream);
    into.delivered_unconfirmed += r.delivered_unconfirmed;
    into.holes_forgotten += r.holes_forgotten;
    into.streams_ended += r.streams_ended;
    into.reconnects += r.reconnects;
    into.max_reconnects_per_stream = into
        .max_reconnects_per_stream
        .max(r.max_reconnects_per_stream);
    into.streams_reconnected += r.streams_reconnected;
    into.fatal += r.fatal;
    into.foreign_data_lines += r.foreign_data_lines;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_bucket_by_bucket() {
        let mut a = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        let mut b = a.clone();
        for v in 1..=1000 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let mut both = a.clone();
        both.add(&b).unwrap();
        let mut merged = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        add_pairs(&mut merged, &pairs(&a));
        add_pairs(&mut merged, &pairs(&b));
        assert_eq!(merged.len(), both.len());
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), both.value_at_quantile(q));
        }
    }
}
