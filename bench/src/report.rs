//! The figures of one run: the JSON line scripts read, the table people
//! read, and the side-by-side table of several runs (`--table`).

use serde::{Deserialize, Serialize};

/// Every figure of one run. Printed as the last line on stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub label: String,
    pub url: String,
    pub pub_url: String,
    pub idle_only: bool,
    pub subscribers: usize,
    pub topics: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub size: usize,
    pub publishers: usize,
    /// `serial` (--publishers connections, each event after the previous
    /// one's answer) or `pool` (up to `pool_max` connections, an event on
    /// an idle one).
    pub publisher_mode: crate::publisher::Mode,
    pub pool_max: Option<usize>,
    /// What the latency is measured from: `sent` or `due` (--stamp).
    pub stamp: crate::publisher::Stamp,
    pub source_addrs: usize,

    /// Streams open (HTTP 200 read) and failed, and how long opening took.
    pub streams_open: u64,
    pub streams_failed: u64,
    pub open_s: f64,
    /// Open failures by reason, most frequent first.
    pub open_errors: Vec<(String, u64)>,

    pub planned: u64,
    pub published: u64,
    pub publish_requests: u64,
    /// Events whose publish request failed, by reason.
    pub publish_errors: Vec<(String, u64)>,
    /// Most requests in flight at once, summed over publishers: in pool
    /// mode, the connections in use at the busiest moment.
    pub publish_connections: u64,
    /// Due → sent, per event, µs: how long events waited in the publisher
    /// for a connection (not part of `latency_us`, which starts when the
    /// payload is stamped, just before its request).
    pub publish_delay_us: Latency,
    /// From the first publish to the last event sent.
    pub publish_s: f64,

    /// What the open streams should have received: the events published on
    /// each stream's topic, summed over streams.
    pub expected_deliveries: u64,
    /// Distinct bench events received, over all streams.
    pub delivered: u64,
    /// `delivered` over the time from the first publish until the last
    /// delivery was seen.
    pub deliveries_per_s: f64,
    /// Published events (2xx) a client never received, summed over
    /// clients, across all of each client's reconnects.
    pub missing: u64,
    /// Events a client received more than once.
    pub duplicated: u64,
    pub out_of_order: u64,
    pub wrong_topic: u64,
    /// Streams that missed at least one event.
    pub streams_with_loss: u64,
    pub max_missing_per_stream: u64,
    pub streams_with_duplicates: u64,
    pub max_duplicated_per_stream: u64,
    /// Deliveries of events whose publish request failed (the outcome of a
    /// failed request is unknown: neither lost nor extra).
    pub delivered_unconfirmed: u64,
    /// Holes a client stopped tracking (more than it keeps; counted lost).
    pub holes_forgotten: u64,
    /// Times a stream ended while the bench ran (each is followed by a
    /// reconnect), by reason.
    pub streams_ended: u64,
    pub stream_end_reasons: Vec<(String, u64)>,
    /// Reconnects attempted, by all clients; the most by one; clients that
    /// reconnected at least once; attempts that failed with a network error
    /// (retried), by reason.
    pub reconnects: u64,
    pub max_reconnects_per_stream: u64,
    pub streams_reconnected: u64,
    pub reconnect_failures: Vec<(String, u64)>,
    /// Clients that gave up for good: a reconnect answered other than
    /// `200 text/event-stream`, as a browser's `EventSource` would.
    pub fatal: u64,
    pub fatal_reasons: Vec<(String, u64)>,
    /// Time without a stream, from a stream's end to the next stream's
    /// response head, over all such gaps, µs.
    pub stream_gap_us: Latency,
    /// With --churn: one entry per restart.
    pub churn: bool,
    pub drains: Vec<Drain>,
    /// The highest peak/mean of `drains`.
    pub max_reconnect_peak_over_mean: f64,
    /// Data lines that were not bench events (server notices).
    pub foreign_data_lines: u64,

    /// Publish-to-receive latency, microseconds.
    pub latency_us: Latency,

    /// Server figures (with --pid).
    pub server_pid: Option<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub rss_per_idle_stream_kib: Option<f64>,
    /// Server CPU seconds from the first publish until deliveries stopped.
    pub server_cpu_s: Option<f64>,
    /// This tool's own CPU seconds over the same span (with --workers:
    /// the parent's and its workers').
    pub bench_cpu_s: f64,
    /// Load processes (--workers; 0: this one only).
    pub workers: usize,
    /// With several --pid: each one's figures (the fields above sum them).
    pub servers: Vec<Proc>,
    /// With --bus-pid: the bus's figures.
    pub bus: Option<Proc>,
}

impl Proc {
    fn row(&self, idle_only: bool) -> String {
        let mut s = format!(
            "pid {}: RSS {} before, {} idle, {} at the end",
            self.pid,
            opt(self.rss_before_kib, " KiB"),
            opt(self.rss_idle_kib, " KiB"),
            opt(self.rss_end_kib, " KiB")
        );
        if let Some(v) = self.rss_per_idle_stream_kib {
            s.push_str(&format!(", {v:.2} KiB per idle stream"));
        }
        if !idle_only {
            s.push_str(&format!(
                "; CPU {}",
                opt(self.cpu_s.map(|v| format!("{v:.2}")), " s")
            ));
        }
        s
    }
}

/// One sampled process (tree): a replica or the bus.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Proc {
    pub pid: u32,
    pub rss_before_kib: Option<u64>,
    pub rss_idle_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// A replica's growth over its share of the open streams.
    pub rss_per_idle_stream_kib: Option<f64>,
    /// CPU seconds from the first publish until deliveries stopped.
    pub cpu_s: Option<f64>,
}

/// One restart of a rolling restart (--churn) and the reconnects that
/// followed it, up to the next restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Drain {
    /// The mark's text (the line read on stdin).
    pub label: String,
    /// When the mark came, s after the bench started.
    pub at_s: f64,
    pub reconnects: u64,
    /// From the mark to the first and to the last reconnect, s.
    pub first_s: f64,
    pub last_s: f64,
    /// Most reconnects in any one-second span.
    pub peak_per_s: u64,
    /// Reconnects over --drain-window.
    pub mean_per_s: f64,
}

impl Drain {
    /// Builds the windows: `marks` (s since start, label) in order, and the
    /// reconnects (when the stream ended, when the reconnect was made; ms
    /// since start). A reconnect belongs to the window in which its stream
    /// ended (it may be made after the next mark); one whose stream ended
    /// before the first mark belongs to none.
    pub fn windows(
        marks: &[(f64, String)],
        reconnects_ms: &[(u32, u32)],
        window: f64,
    ) -> Vec<Drain> {
        let mut out = Vec::new();
        for (k, (at, label)) in marks.iter().enumerate() {
            let from = (at * 1000.0) as u32;
            let to = marks
                .get(k + 1)
                .map_or(u32::MAX, |(next, _)| (next * 1000.0) as u32);
            let mut times: Vec<u32> = reconnects_ms
                .iter()
                .filter(|(ended, _)| (from..to).contains(ended))
                .map(|&(_, made)| made)
                .collect();
            times.sort_unstable();
            // Most reconnects in a span [t, t + 1 s) starting at one of them.
            let mut peak = 0;
            let mut j = 0;
            for (i, &t) in times.iter().enumerate() {
                while times[j] + 1000 <= t {
                    j += 1;
                }
                peak = peak.max(i + 1 - j);
            }
            out.push(Drain {
                label: label.clone(),
                at_s: *at,
                reconnects: times.len() as u64,
                first_s: times.first().map_or(0.0, |&t| t as f64 / 1000.0 - at),
                last_s: times.last().map_or(0.0, |&t| t as f64 / 1000.0 - at),
                peak_per_s: peak as u64,
                mean_per_s: times.len() as f64 / window,
            });
        }
        out
    }

    /// Peak over mean (0 without reconnects).
    pub fn ratio(&self) -> f64 {
        if self.reconnects == 0 {
            0.0
        } else {
            self.peak_per_s as f64 / self.mean_per_s
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// Counts by reason, merged and sorted, most frequent first.
pub fn ranked(counts: impl IntoIterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut by: std::collections::HashMap<String, u64> = Default::default();
    for (why, n) in counts {
        *by.entry(why).or_default() += n;
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// Microseconds, humanly.
fn us(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2} s", v as f64 / 1e6)
    } else if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1e3)
    } else {
        format!("{v} µs")
    }
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.2}%", part as f64 * 100.0 / whole as f64)
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v}{unit}"))
}

impl Report {
    /// What the publishers did, from `start`: planned, published, requests,
    /// errors (taken out of `sent`), connections and the publish delay.
    pub fn record_publishing(
        &mut self,
        plan: &crate::publisher::Plan,
        start: tokio::time::Instant,
        sent: &mut crate::publisher::Sent,
    ) {
        self.planned = plan.planned();
        self.publish_s = start.elapsed().as_secs_f64();
        self.published = sent.published();
        self.publish_requests = sent.requests;
        self.publish_errors = ranked(std::mem::take(&mut sent.errors));
        self.publish_connections = sent.max_in_flight;
        if let Some(h) = &sent.delay {
            self.publish_delay_us = Latency::from_histogram(h);
        }
    }

    /// The publisher mode, as the table shows it.
    fn publisher(&self) -> String {
        match (self.publisher_mode, self.pool_max) {
            (crate::publisher::Mode::Pool, Some(max)) => format!(
                "pool of {max} ({} connections used)",
                self.publish_connections
            ),
            (mode, _) => format!("{} × {}", mode.name(), self.publishers),
        }
        .to_string()
            + match self.stamp {
                crate::publisher::Stamp::Sent => "",
                crate::publisher::Stamp::Due => ", from due",
            }
    }

    /// The loss cell: missing share, then duplicates and reordering if any.
    fn loss(&self) -> String {
        let mut s = pct(self.missing, self.expected_deliveries);
        if self.duplicated + self.out_of_order + self.wrong_topic > 0 {
            s.push_str(&format!(
                " +{}dup {}ooo",
                self.duplicated, self.out_of_order
            ));
        }
        s
    }

    /// The human-readable table of this run.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("stream URL", self.url.clone()),
            (
                "streams",
                format!(
                    "{} open, {} failed, in {:.2} s ({} source addresses)",
                    self.streams_open,
                    self.streams_failed,
                    self.open_s,
                    self.source_addrs.max(1)
                ),
            ),
        ];
        for (why, n) in self.open_errors.iter().take(5) {
            rows.push(("  open failure", format!("{n} × {why}")));
        }
        if !self.idle_only {
            rows.extend([
                ("publish URL", self.pub_url.clone()),
                (
                    "published",
                    format!(
                        "{} of {} planned ({}) in {:.2} s, {} requests",
                        self.published,
                        self.planned,
                        pct(self.published, self.planned),
                        self.publish_s,
                        self.publish_requests
                    ),
                ),
                ("publisher", self.publisher()),
                (
                    "publish delay",
                    format!(
                        "due → sent p50 {}, p99 {}, max {}",
                        us(self.publish_delay_us.p50),
                        us(self.publish_delay_us.p99),
                        us(self.publish_delay_us.max)
                    ),
                ),
            ]);
            for (why, n) in self.publish_errors.iter().take(5) {
                rows.push(("  publish failure", format!("{n} events × {why}")));
            }
            rows.extend([
                (
                    "delivered",
                    format!(
                        "{} of {} expected, {:.0} deliveries/s",
                        self.delivered, self.expected_deliveries, self.deliveries_per_s
                    ),
                ),
                (
                    "loss",
                    format!(
                        "{} missing ({}), {} duplicated, {} out of order, {} wrong topic; \
                         {} streams lost events (at most {} each), {} got duplicates \
                         (at most {} each)",
                        self.missing,
                        pct(self.missing, self.expected_deliveries),
                        self.duplicated,
                        self.out_of_order,
                        self.wrong_topic,
                        self.streams_with_loss,
                        self.max_missing_per_stream,
                        self.streams_with_duplicates,
                        self.max_duplicated_per_stream
                    ),
                ),
                (
                    "latency",
                    if self.latency_us.count == 0 {
                        "-".to_owned()
                    } else {
                        format!(
                            "p50 {}  p99 {}  p99.9 {}  max {}  (mean {})",
                            us(self.latency_us.p50),
                            us(self.latency_us.p99),
                            us(self.latency_us.p999),
                            us(self.latency_us.max),
                            us(self.latency_us.mean as u64)
                        )
                    },
                ),
            ]);
        }
        if self.delivered_unconfirmed + self.holes_forgotten > 0 {
            rows.push((
                "  uncertain",
                format!(
                    "{} deliveries of events whose publish failed; {} lost events \
                     in holes no longer tracked",
                    self.delivered_unconfirmed, self.holes_forgotten
                ),
            ));
        }
        rows.push(("streams ended early", format!("{}", self.streams_ended)));
        for (why, n) in self.stream_end_reasons.iter().take(5) {
            rows.push(("  ended", format!("{n} × {why}")));
        }
        rows.push((
            "reconnects",
            format!(
                "{} by {} streams (at most {} each); time without a stream: {}",
                self.reconnects,
                self.streams_reconnected,
                self.max_reconnects_per_stream,
                if self.stream_gap_us.count == 0 {
                    "-".to_owned()
                } else {
                    format!(
                        "p50 {}  p99 {}  max {}",
                        us(self.stream_gap_us.p50),
                        us(self.stream_gap_us.p99),
                        us(self.stream_gap_us.max)
                    )
                }
            ),
        ));
        for (why, n) in self.reconnect_failures.iter().take(5) {
            rows.push(("  retried", format!("{n} × {why}")));
        }
        rows.push(("fatal", format!("{} streams gave up", self.fatal)));
        for (why, n) in self.fatal_reasons.iter().take(5) {
            rows.push(("  gave up", format!("{n} × {why}")));
        }
        let drains: Vec<String> = self
            .drains
            .iter()
            .map(|d| {
                format!(
                    "{} at {:.1} s: {} reconnects from +{:.1} to +{:.1} s, \
                     peak {}/s, mean {:.0}/s (peak/mean {:.2})",
                    d.label,
                    d.at_s,
                    d.reconnects,
                    d.first_s,
                    d.last_s,
                    d.peak_per_s,
                    d.mean_per_s,
                    d.ratio()
                )
            })
            .collect();
        for d in &drains {
            rows.push(("drain", d.clone()));
        }
        if let Some(pid) = self.server_pid {
            let who = match self.servers.len() {
                0 | 1 => format!("pid {pid}"),
                n => format!("{n} replicas together"),
            };
            rows.extend([
                (
                    "server RSS",
                    format!(
                        "{who}: {} before, {} idle, {} at the end",
                        opt(self.rss_before_kib, " KiB"),
                        opt(self.rss_idle_kib, " KiB"),
                        opt(self.rss_end_kib, " KiB")
                    ),
                ),
                (
                    "RSS per idle stream",
                    opt(
                        self.rss_per_idle_stream_kib.map(|v| format!("{v:.2}")),
                        " KiB",
                    ),
                ),
            ]);
            if !self.idle_only {
                rows.push((
                    "server CPU",
                    opt(self.server_cpu_s.map(|v| format!("{v:.2}")), " s"),
                ));
            }
        }
        for p in &self.servers {
            rows.push(("  replica", p.row(self.idle_only)));
        }
        if let Some(p) = &self.bus {
            rows.push(("bus", p.row(self.idle_only)));
        }
        if !self.idle_only {
            let by = if self.workers > 0 {
                format!(" (parent and {} workers)", self.workers)
            } else {
                String::new()
            };
            rows.push(("bench CPU", format!("{:.2} s{by}", self.bench_cpu_s)));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<width$}  {v}\n"));
        }
        out
    }
}

/// The side-by-side table of several runs.
pub fn compare(reports: &[Report]) -> String {
    let header = [
        "peer",
        "publisher",
        "published/planned",
        "deliveries/s",
        "loss",
        "p50",
        "p99",
        "p99.9",
        "max",
        "RSS/idle stream",
        "CPU s",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in reports {
        let name = if r.label.is_empty() {
            r.url.clone()
        } else {
            r.label.clone()
        };
        let lat = |v: u64| {
            if r.latency_us.count == 0 {
                "-".to_owned()
            } else {
                us(v)
            }
        };
        rows.push(vec![
            name,
            r.publisher(),
            format!("{}/{}", r.published, r.planned),
            format!("{:.0}", r.deliveries_per_s),
            r.loss(),
            lat(r.latency_us.p50),
            lat(r.latency_us.p99),
            lat(r.latency_us.p999),
            lat(r.latency_us.max),
            opt(r.rss_per_idle_stream_kib.map(|v| format!("{v:.1}")), " KiB"),
            opt(r.server_cpu_s.map(|v| format!("{v:.2}")), ""),
        ]);
    }
    render_rows(&rows)
}

/// Whether a run kept up: every planned event published, none lost, p99
/// within `p99_us`.
fn kept_up(r: &Report, p99_us: u64) -> bool {
    r.planned > 0
        && r.published >= r.planned
        && r.missing == 0
        && r.fatal == 0
        && r.latency_us.count > 0
        && r.latency_us.p99 <= p99_us
}

/// A rate sweep side by side: one row per rate, one column per label (runs
/// in file order; a label's runs at increasing rates), then each label's
/// knee: the highest deliveries/s of a run that kept up ([`kept_up`]).
pub fn knees(reports: &[Report], p99_us: u64) -> String {
    let mut labels: Vec<String> = Vec::new();
    let mut rates: Vec<f64> = Vec::new();
    for r in reports {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
        if !rates.contains(&r.rate) {
            rates.push(r.rate);
        }
    }
    rates.sort_by(f64::total_cmp);
    let mut header = vec!["events/s".to_owned()];
    header.extend(labels.iter().cloned());
    let mut rows = vec![header];
    let cell = |r: &Report| {
        format!(
            "{:.0}/s p99 {} {}{}",
            r.deliveries_per_s,
            us(r.latency_us.p99),
            if r.published >= r.planned {
                String::new()
            } else {
                format!("pub {}% ", r.published * 100 / r.planned.max(1))
            },
            if r.missing == 0 {
                "ok".to_owned()
            } else {
                format!("lost {}", pct(r.missing, r.expected_deliveries))
            }
        )
    };
    for rate in &rates {
        let mut row = vec![format!("{rate}")];
        for l in &labels {
            let runs: Vec<String> = reports
                .iter()
                .filter(|r| &r.label == l && r.rate == *rate)
                .map(cell)
                .collect();
            row.push(if runs.is_empty() {
                "-".into()
            } else {
                runs.join("; ")
            });
        }
        rows.push(row);
    }
    let mut knee_row = vec![format!("knee (p99 ≤ {})", us(p99_us))];
    for l in &labels {
        let best = reports
            .iter()
            .filter(|r| &r.label == l && kept_up(r, p99_us))
            .max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
        knee_row.push(best.map_or("none kept up".into(), |r| {
            format!(
                "{:.0} deliveries/s (at {} events/s)",
                r.deliveries_per_s, r.rate
            )
        }));
    }
    rows.push(knee_row);
    render_rows(&rows)
}

/// A Markdown table of `rows` (the first is the header).
fn render_rows(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&format!("| {} |\n", rule.join(" | ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knee_is_the_most_deliveries_that_kept_up() {
        let run = |label: &str, rate: f64, dps: f64, p99_ms: u64, missing: u64| Report {
            label: label.into(),
            rate,
            planned: 100,
            published: 100,
            missing,
            deliveries_per_s: dps,
            latency_us: Latency {
                count: 1,
                p99: p99_ms * 1000,
                ..Latency::default()
            },
            ..Report::default()
        };
        let runs = vec![
            run("a", 100.0, 1000.0, 5, 0),
            run("a", 200.0, 2000.0, 50, 0),
            run("a", 400.0, 4000.0, 150, 0),
            run("b", 100.0, 1000.0, 20, 0),
            run("b", 200.0, 2000.0, 30, 7),
            run("c", 100.0, 1000.0, 500, 0),
        ];
        let t = knees(&runs, 100_000);
        let knee = t.lines().last().unwrap_or_default();
        assert!(knee.contains("2000 deliveries/s (at 200 events/s)"), "{t}");
        assert!(knee.contains("1000 deliveries/s (at 100 events/s)"), "{t}");
        assert!(knee.contains("none kept up"), "{t}");
        assert_eq!(t.lines().count(), 2 + 3 + 1, "{t}");
    }

    #[test]
    fn drain_windows_peak_and_mean() {
        let marks = vec![(1.0, "restart a".to_owned()), (4.0, "restart b".to_owned())];
        // Before the first mark: no window. Then 30 reconnects spread over
        // 3 s (the last made after the next mark: still the first window's);
        // then 30 at once.
        let mut times: Vec<(u32, u32)> = vec![(400, 500)];
        times.extend((0..30).map(|i| (1000 + i * 100, 3000 + i * 100)));
        times.extend(std::iter::repeat_n((11_000, 12_000), 30));
        let d = Drain::windows(&marks, &times, 3.0);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].reconnects, d[0].peak_per_s), (30, 10));
        assert_eq!(d[0].mean_per_s, 10.0);
        assert_eq!(d[0].ratio(), 1.0);
        assert!((d[0].first_s - 2.0).abs() < 1e-9 && (d[0].last_s - 4.9).abs() < 1e-9);
        assert_eq!((d[1].reconnects, d[1].peak_per_s), (30, 30));
        assert_eq!(d[1].ratio(), 3.0);
        assert_eq!(Drain::windows(&marks[..1], &[], 3.0)[0].ratio(), 0.0);
    }
}
