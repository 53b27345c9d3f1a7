//! The publish side: `L` publishers, each with one keep-alive HTTP/1.1
//! connection, paced against the clock.
//!
//! Event `s` (0-based, global to the run) is due at `start + s / rate`, goes
//! to topic `s % K` and is sent by publisher `s % L`. A publisher sends its
//! events strictly one after another, so their order on the server is known
//! (the subscriber side checks it). One that falls behind sends what is due
//! back to back (or as one JSON array with `--pub-batch`) until it has caught
//! up; what is still unsent `--publish-grace` after the end of the phase
//! counts as not published. With `--churn` the end of the phase is known
//! only once the churn is over ([`Plan::end_at`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::payload;
use crate::target::topic_name;

/// A string with `{topic}` and `{payload}` holes, taken apart once.
#[derive(Debug, Clone)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Topic,
    Payload,
}

impl Template {
    pub fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = s;
        loop {
            let next = [("{topic}", Part::Topic), ("{payload}", Part::Payload)]
                .into_iter()
                .filter_map(|(hole, part)| rest.find(hole).map(|at| (at, hole.len(), part)))
                .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, len, part)) => {
                    if at > 0 {
                        parts.push(Part::Lit(rest[..at].to_owned()));
                    }
                    parts.push(part);
                    rest = &rest[at + len..];
                }
                None => {
                    if !rest.is_empty() {
                        parts.push(Part::Lit(rest.to_owned()));
                    }
                    return Template(parts);
                }
            }
        }
    }

    /// Appends the template to `out`, filling the holes.
    pub fn render(&self, out: &mut String, topic: &str, payload: impl Fn(&mut String)) {
        for p in &self.0 {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Topic => out.push_str(topic),
                Part::Payload => payload(out),
            }
        }
    }
}

/// Everything the publishers share.
#[derive(Debug)]
pub struct Plan {
    pub method: reqwest::Method,
    pub url: Template,
    pub body: Template,
    pub content_type: String,
    pub rate: f64,
    pub size: usize,
    pub topics: usize,
    pub publishers: usize,
    pub batch: usize,
    pub stamp: Stamp,
    /// When the phase ends, in µs after its start (`u64::MAX`: not known
    /// yet; publish until it is).
    pub end_us: AtomicU64,
    pub grace: Duration,
    /// `--keyed-retries`: resends of a request whose outcome is unknown.
    pub keyed_retries: u32,
    /// Makes this run's idempotency keys its own.
    pub run_id: u64,
    /// Events accepted so far (for the progress line).
    pub published: AtomicU64,
}

/// What one publisher did.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// Events accepted (2xx), per topic.
    pub per_topic: Vec<u64>,
    pub requests: u64,
    /// Events whose request failed, by reason.
    pub errors: HashMap<String, u64>,
    /// The sequence numbers of those events (at most [`MAX_FAILED`]): a
    /// failed request may still have published them, so a stream that
    /// receives one has not received something unplanned.
    pub failed: Vec<u64>,
    /// Due → sent, per event, µs: how long events waited in the publisher.
    pub delay: Option<Histogram<u64>>,
    /// Most requests in flight at once (pool mode: connections in use).
    pub max_in_flight: u64,
}

/// Most failed sequence numbers remembered.
pub const MAX_FAILED: usize = 1 << 20;

impl Sent {
    pub fn published(&self) -> u64 {
        self.per_topic.iter().sum()
    }

    pub fn merge(&mut self, o: Sent) {
        if self.per_topic.len() < o.per_topic.len() {
            self.per_topic.resize(o.per_topic.len(), 0);
        }
        for (a, b) in self.per_topic.iter_mut().zip(&o.per_topic) {
            *a += b;
        }
        self.requests += o.requests;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        let room = MAX_FAILED.saturating_sub(self.failed.len());
        self.failed.extend(o.failed.into_iter().take(room));
        match (&mut self.delay, o.delay) {
            (Some(a), Some(b)) => {
                let _ = a.add(&b);
            }
            (a @ None, b) => *a = b,
            (Some(_), None) => {}
        }
        self.max_in_flight += o.max_in_flight;
    }
}

impl Plan {
    fn due(&self, start: Instant, seq: u64) -> Instant {
        start + Duration::from_secs_f64(seq as f64 / self.rate)
    }

    /// Ends the phase `after` its start.
    pub fn end_at(&self, after: Duration) {
        self.end_us.store(after.as_micros() as u64, Relaxed);
    }

    /// Events the phase plans to send (`u64::MAX` while its end is not
    /// known).
    pub fn planned(&self) -> u64 {
        match self.end_us.load(Relaxed) {
            u64::MAX => u64::MAX,
            us => (self.rate * us as f64 / 1e6).floor() as u64,
        }
    }

    /// When a publisher that fell behind stops trying.
    fn give_up(&self, start: Instant) -> Option<Instant> {
        match self.end_us.load(Relaxed) {
            u64::MAX => None,
            us => Some(start + Duration::from_micros(us) + self.grace),
        }
    }
}

/// How events reach the server.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `L` publishers, each sending its share of the events one after
    /// another on one keep-alive connection: a slow answer holds back that
    /// publisher's next events (they are stamped when sent, so the wait is
    /// not in the measured latency).
    #[default]
    Serial,
    /// One dispatcher, as a publishing service with a connection pool: each
    /// event, when due, goes out on an idle keep-alive connection; another
    /// connection is opened (up to `--pool-max`) only when all are busy.
    Pool,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Serial => "serial",
            Mode::Pool => "pool",
        }
    }
}

/// What time an event's payload carries (the start of its measured
/// latency).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stamp {
    /// Just before its request is sent: the latency leaves out how long the
    /// event waited in the publisher for a connection.
    #[default]
    Sent,
    /// When it was due by the schedule: the latency includes that wait
    /// (what a service publishing at that moment would see).
    Due,
}

/// One request's events, rendered.
fn render(plan: &Plan, start: Instant, batch: &[u64], url: &mut String, body: &mut String) {
    url.clear();
    body.clear();
    let topic0 = topic_name(batch[0], plan.topics);
    plan.url.render(url, &topic0, |_| {});
    if batch.len() > 1 {
        body.push('[');
    }
    for (k, &s) in batch.iter().enumerate() {
        if k > 0 {
            body.push(',');
        }
        let mut micros = payload::unix_micros();
        if plan.stamp == Stamp::Due {
            let late = Instant::now().saturating_duration_since(plan.due(start, s));
            micros = micros.saturating_sub(late.as_micros() as u64);
        }
        plan.body.render(body, &topic_name(s, plan.topics), |out| {
            payload::write(out, s, micros, plan.size)
        });
    }
    if batch.len() > 1 {
        body.push(']');
    }
}

/// Sends one request (the batch whose first event is `first`); `Err` says
/// why it failed. With `--keyed-retries`, a request whose outcome is
/// unknown or that published nothing is sent again under the same key.
async fn send(
    plan: &Plan,
    client: &reqwest::Client,
    url: &str,
    body: String,
    first: u64,
) -> Result<(), String> {
    let key = (plan.keyed_retries > 0).then(|| format!("bench-{:x}-{first}", plan.run_id));
    let mut tries = 0;
    loop {
        let mut req = client
            .request(plan.method.clone(), url)
            .header(reqwest::header::CONTENT_TYPE, plan.content_type.as_str());
        if let Some(key) = &key {
            req = req.header("idempotency-key", key.as_str());
        }
        // The failed attempt's status (0: no answer) and why.
        let (status, why) = match req.body(body.clone()).send().await {
            Ok(res) => {
                let status = res.status();
                // Read the answer so the connection can be reused.
                let _ = res.bytes().await;
                if status.is_success() {
                    return Ok(());
                }
                (status.as_u16(), format!("HTTP {}", status.as_u16()))
            }
            Err(e) => (0, describe(&e)),
        };
        let retriable = matches!(status, 0 | 502 | 503 | 504);
        if !retriable || tries >= plan.keyed_retries {
            return Err(why);
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Sent {
    fn new(plan: &Plan) -> Sent {
        Sent {
            per_topic: vec![0; plan.topics],
            delay: Some(new_histogram()),
            ..Sent::default()
        }
    }

    fn account(&mut self, plan: &Plan, batch: &[u64], outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                for &s in batch {
                    self.per_topic[(s % plan.topics as u64) as usize] += 1;
                }
                plan.published.fetch_add(batch.len() as u64, Relaxed);
            }
            Err(why) => {
                *self.errors.entry(why).or_default() += batch.len() as u64;
                let room = MAX_FAILED.saturating_sub(self.failed.len());
                self.failed.extend(batch.iter().take(room));
            }
        }
    }

    /// Records how late the batch's events went out (due → sent).
    fn late(&mut self, plan: &Plan, start: Instant, batch: &[u64], now: Instant) {
        for &s in batch {
            let us = now
                .saturating_duration_since(plan.due(start, s))
                .as_micros() as u64;
            if let Some(h) = &mut self.delay {
                let _ = h.record(us.clamp(1, MAX_DELAY_US));
            }
        }
    }
}

/// Most due → sent delay recorded, µs.
const MAX_DELAY_US: u64 = 600_000_000;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_DELAY_US, 3).expect("valid histogram bounds")
}

fn client(idle: usize) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(idle)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("client: {e}"))
}

/// The events due now, from `seq` on in steps of `stride`, at most
/// `plan.batch`; advances `seq`.
fn take_due(
    plan: &Plan,
    start: Instant,
    now: Instant,
    seq: &mut u64,
    stride: u64,
    batch: &mut Vec<u64>,
) {
    batch.clear();
    while batch.len() < plan.batch && *seq < plan.planned() && plan.due(start, *seq) <= now {
        batch.push(*seq);
        *seq += stride;
    }
}

/// Publisher number `lane` (`--publisher-mode serial`), from `start` until
/// its events are sent or the phase (plus grace) is over.
pub async fn run(plan: Arc<Plan>, lane: usize, start: Instant) -> Sent {
    let mut sent = Sent::new(&plan);
    let client = match client(1) {
        Ok(c) => c,
        Err(e) => {
            sent.errors.insert(e, 1);
            return sent;
        }
    };
    let stride = plan.publishers as u64;
    let mut seq = lane as u64;
    let mut batch = Vec::with_capacity(plan.batch);
    let mut url = String::new();
    let mut body = String::new();
    while seq < plan.planned() {
        tokio::time::sleep_until(plan.due(start, seq)).await;
        let now = Instant::now();
        if plan.give_up(start).is_some_and(|at| now > at) {
            break;
        }
        take_due(&plan, start, now, &mut seq, stride, &mut batch);
        sent.late(&plan, start, &batch, Instant::now());
        render(&plan, start, &batch, &mut url, &mut body);
        sent.requests += 1;
        sent.max_in_flight = 1;
        let outcome = send(&plan, &client, &url, body.clone(), batch[0]).await;
        sent.account(&plan, &batch, outcome);
    }
    sent
}

/// `--publisher-mode pool`: every event in order from one dispatcher, each
/// request on its own task as soon as it is due and a connection is free.
/// At most `pool` requests are in flight, so the client's pool (idle
/// connections kept: `pool`) reuses an idle connection when there is one
/// and opens another only when all are busy. Events on different
/// connections may overtake each other (out-of-order counts are expected).
pub async fn run_pool(plan: Arc<Plan>, pool: usize, start: Instant) -> Sent {
    let mut sent = Sent::new(&plan);
    let client = match client(pool) {
        Ok(c) => c,
        Err(e) => {
            sent.errors.insert(e, 1);
            return sent;
        }
    };
    let free = Arc::new(tokio::sync::Semaphore::new(pool));
    let mut tasks = tokio::task::JoinSet::new();
    let mut seq = 0;
    let mut batch = Vec::with_capacity(plan.batch);
    while seq < plan.planned() {
        tokio::time::sleep_until(plan.due(start, seq)).await;
        // Wait for a free connection: the due events wait here, and go out
        // together (up to --pub-batch) once one is free.
        let Ok(permit) = free.clone().acquire_owned().await else {
            break;
        };
        let now = Instant::now();
        if plan.give_up(start).is_some_and(|at| now > at) {
            break;
        }
        take_due(&plan, start, now, &mut seq, 1, &mut batch);
        if batch.is_empty() {
            continue;
        }
        sent.late(&plan, start, &batch, now);
        sent.max_in_flight = sent
            .max_in_flight
            .max((pool - free.available_permits()) as u64);
        sent.requests += 1;
        let (mut url, mut body) = (String::new(), String::new());
        render(&plan, start, &batch, &mut url, &mut body);
        let (plan2, client, events) = (plan.clone(), client.clone(), batch.clone());
        tasks.spawn(async move {
            let outcome = send(&plan2, &client, &url, body, events[0]).await;
            drop(permit);
            (events, outcome)
        });
        // Collect what finished, so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            if let Ok((events, outcome)) = done {
                sent.account(&plan, &events, outcome);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok((events, outcome)) = done {
            sent.account(&plan, &events, outcome);
        }
    }
    sent
}

fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connect failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_holes() {
        let t = Template::parse(r#"{"topic":"{topic}","data":"{payload}"}"#);
        let mut out = String::new();
        t.render(&mut out, "bench-2", |o| o.push_str("1 2 x"));
        assert_eq!(out, r#"{"topic":"bench-2","data":"1 2 x"}"#);
        let mut out = String::new();
        Template::parse("{payload}").render(&mut out, "t", |o| o.push('p'));
        assert_eq!(out, "p");
        let mut out = String::new();
        Template::parse("http://h/pub/{topic}?a={").render(&mut out, "t", |_| {});
        assert_eq!(out, "http://h/pub/t?a={");
    }
}
