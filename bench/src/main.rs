//! `streamline-bench`: a load generator for SSE gateways. Opens N streams,
//! publishes at a fixed rate, and reports delivery, loss, publish-to-receive
//! latency and the server's memory and CPU (see `--help`).
//!
//! The phases, in order: open every stream (bounded concurrency) and wait
//! for each HTTP 200; sample the server's memory; publish for `--duration`
//! (with `--churn`: until stdin closes, then `--duration` more, taking each
//! line read meanwhile as the start of a restart); wait until deliveries
//! stop; sample again; close and report. Meanwhile each client behaves as
//! a browser's `EventSource` does: it reconnects when its stream ends, with
//! `Last-Event-ID`, after the `retry:` delay.
//!
//! Modules: [`args`] (the flags), [`target`] (stream URL and source
//! addresses), [`subscriber`] (the stream tasks), [`scan`] (HTTP head,
//! chunked coding and `data:` lines off raw bytes), [`tracker`] (loss and
//! order per stream), [`payload`] (what an event carries), [`publisher`]
//! (paced publishing), [`procstat`] (/proc sampling), [`report`] (output).

mod args;
mod payload;
mod procstat;
mod publisher;
mod report;
mod scan;
mod subscriber;
mod target;
mod tracker;
mod workers;

use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use args::Args;
use publisher::{Plan, Sent, Template};
use report::{Latency, Report};
use subscriber::{Outcome, Streams};
use target::Target;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(file) = &args.table {
        return print_comparison(file, None);
    }
    if let Some(file) = &args.knee {
        return print_comparison(file, Some(args.knee_p99.as_micros() as u64));
    }
    if let Err(e) = args.check() {
        eprintln!("streamline-bench: {e}");
        return ExitCode::from(2);
    }
    let nofile = procstat::raise_nofile();
    let per_process = match args.workers {
        0 => args.subscribers,
        n => args.subscribers.div_ceil(n),
    };
    if args.worker.is_none() && (nofile as usize) < per_process + 64 {
        eprintln!(
            "streamline-bench: warning: the open-files limit is {nofile}, \
             too low for {} streams",
            args.subscribers
        );
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streamline-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(k) = args.worker {
        return match rt.block_on(workers::child(args, k)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("streamline-bench: worker {k}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = if args.workers > 0 {
        rt.block_on(workers::parent(args))
    } else {
        rt.block_on(run(args))
    };
    match result {
        Ok(report) => {
            print!("{}", report.table());
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("streamline-bench: cannot encode the report: {e}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("streamline-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--table` (`knee_p99_us` None) or `--knee`.
fn print_comparison(file: &std::path::Path, knee_p99_us: Option<u64>) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("streamline-bench: cannot read {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let mut reports = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        match serde_json::from_str::<Report>(line) {
            Ok(r) => reports.push(r),
            Err(e) => eprintln!(
                "streamline-bench: skipping a line of {}: {e}",
                file.display()
            ),
        }
    }
    match knee_p99_us {
        None => print!("{}", report::compare(&reports)),
        Some(p99) => print!("{}", report::knees(&reports, p99)),
    }
    ExitCode::SUCCESS
}

/// What the progress line shows, shared with the task that prints it.
struct Progress {
    start: Instant,
    phase: Mutex<&'static str>,
    subscribers: usize,
    idle_only: bool,
    quiet: bool,
}

impl Progress {
    fn set(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    async fn print_every_second(self: Arc<Self>, streams: Arc<Streams>, plan: Arc<Plan>) {
        if self.quiet {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = 0;
        loop {
            tick.tick().await;
            let delivered = streams.delivered();
            let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
            let planned = match plan.planned() {
                _ if self.idle_only => "0".to_owned(),
                u64::MAX => "?".to_owned(),
                n => n.to_string(),
            };
            eprintln!(
                "[{:>4.0}s] {phase:<10} open {}/{}  published {}/{planned}  delivered {} (+{}/s)",
                self.start.elapsed().as_secs_f64(),
                streams.open.load(Relaxed),
                self.subscribers,
                plan.published.load(Relaxed),
                delivered,
                delivered - last,
            );
            last = delivered;
        }
    }
}

/// The figures every run starts from.
fn base_report(args: &Args, target: &Target) -> Report {
    Report {
        label: args.label.clone(),
        url: args.url.clone(),
        pub_url: args.pub_url.clone(),
        idle_only: args.idle_only,
        subscribers: args.subscribers,
        topics: args.topics,
        rate: args.rate,
        duration_s: args.duration,
        size: args.size,
        publishers: args.publisher_count(),
        publisher_mode: args.publisher_mode,
        stamp: args.stamp,
        pool_max: (args.publisher_mode == publisher::Mode::Pool).then_some(args.pool_max),
        source_addrs: target.sources.len(),
        workers: args.workers,
        churn: args.churn,
        ..Report::default()
    }
}

async fn run(args: Args) -> Result<Report, String> {
    let target =
        Target::resolve(&args.url, args.source_addrs, args.subscribers, args.topics).await?;
    let mut watch = procstat::Watch::new(&args.pid, args.bus_pid)?;
    let ticks = procstat::clock_ticks();
    let publishers = args.publisher_count();
    let mut report = base_report(&args, &target);
    let plan = Arc::new(plan(&args, publishers)?);
    let (mode, pool_max) = (args.publisher_mode, args.pool_max);
    watch.rss(procstat::Phase::Before);

    let progress = Arc::new(Progress {
        start: Instant::now(),
        phase: Mutex::new("opening"),
        subscribers: args.subscribers,
        idle_only: args.idle_only,
        quiet: args.quiet,
    });
    let (streams, mut opened) = Streams::new(
        target,
        args.topics,
        publishers,
        args.connect_concurrency,
        args.connect_timeout,
        args.reconnect_delay,
    );
    let printer = tokio::spawn(
        progress
            .clone()
            .print_every_second(streams.clone(), plan.clone()),
    );

    // Open every stream.
    let open_start = Instant::now();
    // One task per stream: measured against a few tasks each driving many
    // streams (FuturesUnordered), no difference showed; the kernel's TCP
    // work is most of a delivery's cost either way.
    let tasks: Vec<_> = (0..args.subscribers)
        .map(|i| tokio::spawn(subscriber::run(streams.clone(), i)))
        .collect();
    let mut open_per_topic = vec![0u64; args.topics];
    let mut open_errors = Vec::new();
    for _ in 0..args.subscribers {
        match opened.recv().await {
            Some((topic, Ok(()))) => open_per_topic[topic] += 1,
            Some((_, Err(why))) => open_errors.push(why),
            None => break,
        }
    }
    report.open_s = open_start.elapsed().as_secs_f64();
    report.streams_open = open_per_topic.iter().sum();
    report.streams_failed = open_errors.len() as u64;
    report.open_errors = report::ranked(open_errors.into_iter().map(|why| (why, 1)));
    if !watch.is_empty() {
        // Let the server settle (allocator, lazily sent heads) before sampling.
        tokio::time::sleep(Duration::from_millis(500)).await;
        watch.rss(procstat::Phase::Idle);
    }

    let mut events_per_topic = vec![0u64; args.topics];
    let mut failed = Vec::new();
    let marks: Arc<Mutex<Vec<(f64, String)>>> = Default::default();
    if args.idle_only {
        progress.set("idle");
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    } else {
        progress.set("publishing");
        watch.cpu_start();
        let own_before = procstat::own_cpu_secs(ticks);
        let start = Instant::now() + Duration::from_millis(10);
        if args.churn {
            read_marks(
                plan.clone(),
                start,
                Duration::from_secs_f64(args.duration),
                streams.epoch,
                marks.clone(),
            )?;
            // Always printed: a script waits for it before its first restart.
            eprintln!("churn: publishing");
        } else {
            plan.end_at(Duration::from_secs_f64(args.duration));
        }
        let mut sent = publish(plan.clone(), mode, pool_max, start).await?;
        report.record_publishing(&plan, start, &mut sent);
        failed = sent.failed;
        sent.per_topic.resize(args.topics, 0);
        events_per_topic = sent.per_topic;
        report.expected_deliveries = open_per_topic
            .iter()
            .zip(&events_per_topic)
            .map(|(streams, events)| streams * events)
            .sum();

        progress.set("draining");
        let last_delivery = drain(&streams, report.expected_deliveries, args.drain_quiet).await;
        let span = last_delivery.saturating_duration_since(start).as_secs_f64();
        watch.cpu_end();
        report.bench_cpu_s = procstat::own_cpu_secs(ticks) - own_before;
        report.delivered = streams.delivered();
        report.deliveries_per_s = if span > 0.0 {
            report.delivered as f64 / span
        } else {
            0.0
        };
        report.latency_us = Latency::from_histogram(&streams.latency());
    }
    watch.rss(procstat::Phase::End);
    let open = report.streams_open;
    watch.fill(&mut report, open);

    progress.set("closing");
    streams.stop();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| format!("a stream task failed: {e}"))?,
        );
    }
    count_loss(&mut report, &outcomes, &events_per_topic, &failed);
    report.stream_end_reasons = report::ranked(streams.ends());
    report.reconnect_failures = report::ranked(streams.reconnect_failures());
    report.stream_gap_us = Latency::from_histogram(&streams.gaps());
    let marks = marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.drains = report::Drain::windows(
        &marks,
        &streams.reconnect_times(),
        args.drain_window.as_secs_f64(),
    );
    report.max_reconnect_peak_over_mean = report
        .drains
        .iter()
        .map(report::Drain::ratio)
        .fold(0.0, f64::max);
    printer.abort();
    Ok(report)
}

/// With --churn: reads marks from stdin on a thread of its own, each line
/// stamped with the time it came (s since `epoch`); at the end of stdin,
/// ends the publish phase `tail` later.
fn read_marks(
    plan: Arc<Plan>,
    start: Instant,
    tail: Duration,
    epoch: std::time::Instant,
    marks: Arc<Mutex<Vec<(f64, String)>>>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("churn-marks".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                let at = epoch.elapsed().as_secs_f64();
                let label = line.trim();
                if !label.is_empty() {
                    marks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at, label.to_owned()));
                }
            }
            plan.end_at(Instant::now().saturating_duration_since(start) + tail);
        })
        .map(drop)
        .map_err(|e| format!("cannot start the churn marks' reader: {e}"))
}

/// Adds up what the clients saw. A client lost what was published on its
/// topic (a 2xx answer) and never arrived over all its streams; an event
/// whose publish request failed and arrived anyway is counted apart (with
/// --idle-only nothing was published).
pub(crate) fn count_loss(
    report: &mut Report,
    outcomes: &[Outcome],
    events_per_topic: &[u64],
    failed: &[u64],
) {
    let topics = events_per_topic.len().max(1) as u64;
    let mut failed_by_topic = vec![Vec::new(); events_per_topic.len()];
    for &s in failed {
        failed_by_topic[(s % topics) as usize].push(s);
    }
    let mut fatal = Vec::new();
    for o in outcomes.iter().filter(|o| o.opened) {
        report.duplicated += o.counts.duplicated;
        report.out_of_order += o.counts.out_of_order;
        report.wrong_topic += o.counts.wrong_topic;
        report.foreign_data_lines += o.foreign;
        report.holes_forgotten += o.counts.forgotten;
        let unconfirmed = failed_by_topic[o.topic]
            .iter()
            .filter(|&&s| o.tracker.received(s))
            .count() as u64;
        report.delivered_unconfirmed += unconfirmed;
        let confirmed = o.counts.unique.saturating_sub(unconfirmed);
        let missing = events_per_topic[o.topic].saturating_sub(confirmed);
        report.missing += missing;
        if missing > 0 {
            report.streams_with_loss += 1;
            report.max_missing_per_stream = report.max_missing_per_stream.max(missing);
        }
        if o.counts.duplicated > 0 {
            report.streams_with_duplicates += 1;
            report.max_duplicated_per_stream =
                report.max_duplicated_per_stream.max(o.counts.duplicated);
        }
        report.streams_ended += o.ends;
        report.reconnects += o.reconnects;
        report.max_reconnects_per_stream = report.max_reconnects_per_stream.max(o.reconnects);
        if o.reconnects > 0 {
            report.streams_reconnected += 1;
        }
        if let Some(why) = &o.fatal {
            fatal.push((why.clone(), 1));
        }
    }
    report.fatal = fatal.len() as u64;
    report.fatal_reasons = report::ranked(fatal);
}

/// Runs the publishers on a thread and runtime of their own, so that their
/// pacing and their requests do not queue behind thousands of stream tasks:
/// they should behave like an outside client of the server.
pub(crate) async fn publish(
    plan: Arc<Plan>,
    mode: publisher::Mode,
    pool_max: usize,
    start: Instant,
) -> Result<Sent, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("publishers".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let sent = rt.map_err(|e| e.to_string()).map(|rt| {
                rt.block_on(async {
                    if mode == publisher::Mode::Pool {
                        return publisher::run_pool(plan, pool_max, start).await;
                    }
                    let lanes: Vec<_> = (0..plan.publishers)
                        .map(|l| tokio::spawn(publisher::run(plan.clone(), l, start)))
                        .collect();
                    let mut sent = Sent::default();
                    for lane in lanes {
                        if let Ok(s) = lane.await {
                            sent.merge(s);
                        }
                    }
                    sent
                })
            });
            let _ = tx.send(sent);
        });
    spawned.map_err(|e| format!("cannot start the publishers: {e}"))?;
    rx.await
        .map_err(|_| "the publishers' thread failed".to_owned())?
        .map_err(|e| format!("cannot start the publishers' runtime: {e}"))
}

/// Waits until `expected` deliveries arrived or none arrived for `quiet`;
/// returns when the last one was seen.
pub(crate) async fn drain(streams: &Streams, expected: u64, quiet: Duration) -> Instant {
    let mut seen = streams.delivered();
    let mut at = Instant::now();
    loop {
        if seen >= expected {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = streams.delivered();
        if now != seen {
            seen = now;
            at = Instant::now();
        } else if at.elapsed() >= quiet {
            return at;
        }
    }
}

pub(crate) fn plan(args: &Args, publishers: usize) -> Result<Plan, String> {
    let method = reqwest::Method::from_bytes(args.pub_method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("bad --pub-method {:?}", args.pub_method))?;
    let content_type = args.pub_content_type.clone().unwrap_or_else(|| {
        if args.pub_body.trim_start().starts_with(['{', '[']) {
            "application/json".into()
        } else {
            "text/plain".into()
        }
    });
    Ok(Plan {
        method,
        url: Template::parse(&args.pub_url),
        body: Template::parse(&args.pub_body),
        content_type,
        rate: args.rate,
        size: args.size,
        topics: args.topics,
        publishers,
        batch: args.pub_batch,
        stamp: args.stamp,
        end_us: std::sync::atomic::AtomicU64::new(u64::MAX),
        grace: args.publish_grace,
        keyed_retries: args.keyed_retries,
        run_id: std::process::id() as u64 ^ payload::unix_micros(),
        published: Default::default(),
    })
}
