//! A [`Ring`]: one ring of a topic (its only one, or with Kafka one per
//! partition), holding a bounded [`Buffer`] of encoded events that is both
//! the resume history and the live buffer, and the list of its subscribers.
//!
//! Subscribers do not own queues: each holds an *ordinal* (the per-ring
//! sequence number of the last event it wrote) and reads the ring from there.
//! Resume and live delivery read the same ring, so there is no seam between
//! history and live where an event could be lost or repeated.
//!
//! The ring holds its *history* (the newest `history_size` events, none
//! older than `history_ttl`: what a resume may replay) and, beyond it, the
//! events a stream that keeps up still has to write (it is *pinned*), up to
//! a hard cap in bytes. So a batch larger than the history reaches every
//! stream that reads it promptly, and memory stays bounded.
//!
//! Lag is sampled, not counted on every publish: every
//! [`LAG_SAMPLE`](super::slow::LAG_SAMPLE) the hub calls [`Ring::sample`],
//! which records the head and judges each subscriber by the rule in
//! [`super::slow`] (where lag is defined).
//!
//! Architecture invariant: the buffer and subscriber locks are never held
//! across an await, and never both at once.

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use slab::Slab;

use super::client::Client;
use super::slow::{SlowClients, Verdict};
use crate::id::Position;
use crate::sse::Frame;

/// What one retained event costs besides its frame, for the byte cap.
const STORED_OVERHEAD: usize = 64;

/// A ring's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Events of history (`--history-size`).
    pub history: usize,
    /// Age of history (`--history-ttl`).
    pub ttl: Duration,
    /// Bytes a ring may keep beyond its history for streams still reading
    /// them.
    pub pinned_bytes: usize,
}

/// One retained event.
struct Stored {
    pos: Position,
    at: Instant,
    frame: Frame,
}

impl Stored {
    fn cost(&self) -> usize {
        self.frame.len() + STORED_OVERHEAD
    }
}

/// A ring's events, under its lock.
struct Buffer {
    events: VecDeque<Stored>,
    /// Ordinal of `events[0]` (ordinals start at 1 and never repeat).
    first: u64,
    /// Position of the newest event, or where the topic started.
    head_pos: Position,
    /// Position of the newest evicted event, or where the topic started:
    /// a resume point before it may have missed events.
    floor_pos: Position,
    published: u64,
    /// The ordinal after which the bus's log last started again, and the
    /// position it started after (see [`Ring::reset`]).
    reset_at: u64,
    reset_pos: Position,
    /// Cost of the events older than the newest `history` (kept only while
    /// pinned): `events[..len - history]`.
    extra_bytes: usize,
}

impl Buffer {
    fn head(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }

    fn push(&mut self, ev: Stored, history: usize) {
        self.events.push_back(ev);
        if self.events.len() > history {
            let moved = self.events.len() - 1 - history;
            self.extra_bytes += self.events[moved].cost();
        }
    }

    /// Drops events outside the history unless a stream that keeps up
    /// still has to write them (ordinal after `pin`), within the byte cap.
    fn evict(&mut self, b: &Bounds, now: Instant, pin: u64) {
        while let Some(front) = self.events.front() {
            let in_history = self.events.len() <= b.history && now.duration_since(front.at) < b.ttl;
            if in_history || (self.first > pin && self.extra_bytes <= b.pinned_bytes) {
                break;
            }
            let extra = self.events.len() > b.history;
            if let Some(front) = self.events.pop_front() {
                if extra {
                    self.extra_bytes -= front.cost();
                }
                self.floor_pos = front.pos;
                self.first += 1;
            }
        }
    }

    /// Where the history starts now: the index of its oldest event, and the
    /// position just before it (a resume point before that missed events).
    fn history_start(&self, b: &Bounds, now: Instant) -> (usize, Position) {
        let by_size = self.events.len().saturating_sub(b.history);
        let by_age = self
            .events
            .partition_point(|ev| now.duration_since(ev.at) >= b.ttl);
        let idx = by_size.max(by_age);
        let floor = match idx {
            0 => self.floor_pos,
            i => self.events[i - 1].pos,
        };
        (idx, floor)
    }
}

/// Keeps what it holds off the cache lines of its neighbours (128 bytes:
/// adjacent-line prefetching pairs 64-byte lines).
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// What a subscriber finds when it reads after its ordinal.
pub enum Read {
    /// The next event, and its ordinal.
    Event(u64, Position, Frame),
    /// Nothing newer yet.
    Empty,
    /// Events after the ordinal were evicted before the subscriber read
    /// them; `floor` is the newest evicted event's position.
    Overrun { floor: Position },
}

/// Where a resume point falls in a topic's retained history.
pub enum Resume {
    /// Start after this ordinal (position known).
    At(u64, Position),
    /// The point is older than the history, which starts after `floor`
    /// (ordinal `after`): events between them are gone.
    Expired { floor: Position, after: u64 },
    /// The point is newer than anything published here.
    Unknown,
}

pub struct Ring {
    /// The hub's key for this ring: the topic name, or for one partition of
    /// a partitioned topic `<name>#<partition>` (`#` is never in a name).
    key: Arc<str>,
    /// The topic name subscribers use and ids carry.
    name: Arc<str>,
    /// For a partition's ring: the partition, which is the `hi` of every
    /// position in it (a cursor has one entry per partition).
    part: Option<u64>,
    /// When a stream last asked for this topic (ms on the hub's clock); a
    /// followed topic is kept at least a linger period after that.
    touched_ms: AtomicU64,
    /// The head at the previous lag sample (lag is measured against it),
    /// and at the latest one.
    lag_mark: AtomicU64,
    sampled: AtomicU64,
    /// The lowest ordinal a stream that is not behind has read up to: events
    /// after it are pinned. Lowered when a stream joins, recomputed at each
    /// lag sample (under the subscriber lock, so a join is never missed).
    pin: AtomicU64,
    /// The ring's head ordinal, stored after each push (under the write
    /// lock, before the push's wake-up): a stream that has read everything
    /// finds that out without the lock, which both stream threads share.
    head: AtomicU64,
    /// On cache lines of its own: every stream's read writes the lock's
    /// count, and the atomics above are read on every wake-up.
    buffer: Padded<RwLock<Buffer>>,
    subscribers: Mutex<Slab<(Arc<Client>, usize)>>,
    /// How many times the ring was reset: streams compare it with the count
    /// they last saw, without taking the ring's lock.
    resets: AtomicU64,
    /// Queued for a coalesced wake-up (see [`super::wake`]).
    pub(super) wake_queued: AtomicBool,
}

impl Ring {
    /// A topic's only ring, keyed by its name.
    pub fn new(name: Arc<str>, start: Position) -> Self {
        Self::keyed(name.clone(), name, None, start)
    }

    /// The ring of partition `part` of topic `name`, keyed `key` (see
    /// [`Ring::part`]).
    pub fn partition(key: Arc<str>, name: Arc<str>, part: u64, start: Position) -> Self {
        Self::keyed(key, name, Some(part), start)
    }

    fn keyed(key: Arc<str>, name: Arc<str>, part: Option<u64>, start: Position) -> Self {
        Ring {
            key,
            name,
            part,
            touched_ms: AtomicU64::new(0),
            lag_mark: AtomicU64::new(0),
            sampled: AtomicU64::new(0),
            pin: AtomicU64::new(u64::MAX),
            head: AtomicU64::new(0),
            buffer: Padded(RwLock::new(Buffer {
                events: VecDeque::new(),
                first: 1,
                head_pos: start,
                floor_pos: start,
                published: 0,
                reset_at: 0,
                reset_pos: start,
                extra_bytes: 0,
            })),
            subscribers: Mutex::new(Slab::new()),
            resets: AtomicU64::new(0),
            wake_queued: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn part(&self) -> Option<u64> {
        self.part
    }

    pub fn touch(&self, now_ms: u64) {
        self.touched_ms.store(now_ms, Relaxed);
    }

    pub fn touched_ms(&self) -> u64 {
        self.touched_ms.load(Relaxed)
    }

    /// Appends an event. `make` gets the current head position and returns
    /// the new event's position and frame, or `None` to skip it (a bus
    /// re-delivering what the ring has). It runs under the ring's write lock,
    /// so positions and ring order always agree. Returns the new head ordinal
    /// and the event's position.
    pub fn push(
        &self,
        make: impl FnOnce(Position) -> Option<(Position, Frame)>,
        bounds: &Bounds,
    ) -> Option<(u64, Position)> {
        let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
        // Taken under the lock, so ages in the ring never go backwards.
        let now = Instant::now();
        let (pos, frame) = make(buf.head_pos)?;
        buf.push(
            Stored {
                pos,
                at: now,
                frame,
            },
            bounds.history,
        );
        buf.head_pos = pos;
        buf.published += 1;
        buf.evict(bounds, now, self.pin.load(Relaxed));
        self.head.store(buf.head(), Release);
        Some((buf.head(), pos))
    }

    /// Starts the ring again after `start`, forgetting every event: the bus's
    /// log behind it restarted (a Kafka topic re-created, or a broker that
    /// lost it), so its positions start again below the ring's. Ordinals go
    /// on; each subscriber learns it from [`Ring::resets`] and continues
    /// from [`Ring::reset_point`]. Wakes them.
    pub fn reset(&self, start: Position) {
        {
            let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
            let head = buf.head();
            buf.events.clear();
            buf.extra_bytes = 0;
            buf.first = head + 1;
            buf.head_pos = start;
            buf.floor_pos = start;
            buf.reset_at = head;
            buf.reset_pos = start;
            self.resets.fetch_add(1, Relaxed);
        }
        self.notify();
    }

    /// How many times the ring was reset.
    pub fn resets(&self) -> u64 {
        self.resets.load(Relaxed)
    }

    /// Where a subscriber goes on after a reset: the reset count, the
    /// ordinal after which the new log's events are, and its position.
    pub fn reset_point(&self) -> (u64, u64, Position) {
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        // Read under the lock, so it matches `reset_at`.
        let resets = self.resets.load(Relaxed);
        (resets, buf.reset_at, buf.reset_pos)
    }

    /// Drops expired events; true when the topic is empty and unsubscribed,
    /// so the hub may forget it.
    pub fn sweep(&self, bounds: &Bounds) -> bool {
        let empty = {
            let mut buf = self.buffer.write().unwrap_or_else(|e| e.into_inner());
            buf.evict(bounds, Instant::now(), self.pin.load(Relaxed));
            buf.events.is_empty()
        };
        empty && self.subscriber_count() == 0
    }

    /// The newest ordinal and position.
    pub fn head(&self) -> (u64, Position) {
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        (buf.head(), buf.head_pos)
    }

    pub fn stats(&self) -> (u64, Option<Position>) {
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        let last = (buf.published > 0).then_some(buf.head_pos);
        (buf.published, last)
    }

    /// The event after ordinal `after`.
    pub fn read(&self, after: u64) -> Read {
        // Pairs with the store in `push`. A push not yet seen here is
        // followed by a wake-up, and a stream registers its waker before
        // its last look, so it reads that event on its next poll.
        if after >= self.head.load(Acquire) {
            return Read::Empty;
        }
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        if after >= buf.head() {
            return Read::Empty;
        }
        if after + 1 < buf.first {
            return Read::Overrun {
                floor: buf.floor_pos,
            };
        }
        let ev = &buf.events[(after + 1 - buf.first) as usize];
        Read::Event(after + 1, ev.pos, ev.frame.clone())
    }

    /// Up to `max` events after ordinal `after`, in order, under one read of
    /// the lock (a stream that wakes to several events takes the lock once,
    /// not once per event): `each` gets each one's position and frame.
    /// Returns the ordinal of the last one, or `None` when there is none or
    /// the first was evicted ([`Ring::read`] tells which).
    pub fn read_many(
        &self,
        after: u64,
        max: usize,
        mut each: impl FnMut(Position, &Frame),
    ) -> Option<u64> {
        if after >= self.head.load(Acquire) {
            return None;
        }
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        if after >= buf.head() || after + 1 < buf.first {
            return None;
        }
        let from = (after + 1 - buf.first) as usize;
        let mut last = after;
        for ev in buf.events.range(from..).take(max) {
            each(ev.pos, &ev.frame);
            last += 1;
        }
        Some(last)
    }

    /// Where the history starts now: the ordinal its oldest event follows,
    /// and that ordinal's position. Reading history older than this is
    /// replaying expired events.
    pub fn history_start(&self, bounds: &Bounds) -> (u64, Position) {
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        let (idx, floor) = buf.history_start(bounds, Instant::now());
        (buf.first + idx as u64 - 1, floor)
    }

    /// Finds where a client that last saw `pos` should resume: only the
    /// history counts (pinned events beyond it are not replayed), so its
    /// age is enforced here, not only by the sweep.
    pub fn locate(&self, pos: Position, bounds: &Bounds) -> Resume {
        let buf = self.buffer.read().unwrap_or_else(|e| e.into_inner());
        if pos > buf.head_pos {
            return Resume::Unknown;
        }
        let (start, floor) = buf.history_start(bounds, Instant::now());
        if pos < floor {
            return Resume::Expired {
                floor,
                after: buf.first + start as u64 - 1,
            };
        }
        let idx = buf.events.partition_point(|ev| ev.pos <= pos);
        Resume::At(buf.first + idx as u64 - 1, pos)
    }

    /// Joins a subscriber whose cursor and lag base are set; it pins the
    /// events after its lag base from now on.
    pub fn subscribe(&self, client: Arc<Client>, index: usize) -> usize {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.pin.fetch_min(client.lag_base(index), Relaxed);
        subs.insert((client, index))
    }

    /// Pins the events after `ordinal` for a subscriber that moved back to
    /// the ring (after reading history from its bus).
    pub fn hold(&self, ordinal: u64) {
        let _subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        self.pin.fetch_min(ordinal, Relaxed);
    }

    pub fn unsubscribe(&self, key: usize) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if subs.contains(key) {
            subs.remove(key);
        }
        if subs.is_empty() {
            self.pin.store(u64::MAX, Relaxed);
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Wakes every subscriber after a push.
    pub fn notify(&self) {
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (client, _)) in subs.iter() {
            client.wake();
        }
    }

    /// The head at the previous lag sample: what the slow-client rule
    /// measures lag up to (see [`super::slow`]).
    pub fn lag_mark(&self) -> u64 {
        self.lag_mark.load(Relaxed)
    }

    /// Takes a lag sample: moves the lag mark to the head of the previous
    /// sample, judges each subscriber by `rule`, and re-pins for those that
    /// are not behind. Returns those the rule disconnects, for the caller
    /// to close outside this ring's lock (a stream that stopped reading is
    /// never polled, so it cannot notice its own lag).
    pub fn sample(&self, rule: &SlowClients) -> Vec<Arc<Client>> {
        let (head, _) = self.head();
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let mark = self.sampled.swap(head, Relaxed);
        self.lag_mark.store(mark, Relaxed);
        let mut pin = u64::MAX;
        let mut slow = Vec::new();
        for (_, (client, index)) in subs.iter() {
            let base = client.lag_base(*index);
            match rule.judge(mark, base) {
                Verdict::Keep => pin = pin.min(base),
                // It skips when it next reads.
                Verdict::Skip => {}
                Verdict::Disconnect => slow.push(client.clone()),
            }
        }
        self.pin.store(pin, Relaxed);
        slow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::slow::SlowClientPolicy;
    use crate::sse::encode_event;

    /// A client reading one topic.
    fn reader(id: &str) -> Arc<Client> {
        Arc::new(Client::new(
            id.into(),
            Box::new([]),
            1,
            crate::hub::tests::meta(),
        ))
    }

    fn rule(policy: SlowClientPolicy, max_lag: u64) -> SlowClients {
        SlowClients { policy, max_lag }
    }

    fn ring() -> Ring {
        Ring::new("t".into(), Position::new(7, 0))
    }

    fn bounds(history: usize) -> Bounds {
        Bounds {
            history,
            ttl: Duration::from_secs(60),
            pinned_bytes: 1 << 20,
        }
    }

    fn push_with(t: &Ring, lo: u64, b: &Bounds) -> u64 {
        let pos = Position::new(7, lo);
        let make = |_| Some((pos, encode_event(&format!("t:{pos}"), None, "x")));
        t.push(make, b).unwrap().0
    }

    fn push(t: &Ring, lo: u64, history: usize) -> u64 {
        push_with(t, lo, &bounds(history))
    }

    #[test]
    fn reads_in_order_then_empty() {
        let t = ring();
        assert!(matches!(t.read(0), Read::Empty));
        push(&t, 3, 10);
        push(&t, 5, 10);
        let Read::Event(1, p, _) = t.read(0) else {
            panic!()
        };
        assert_eq!(p, Position::new(7, 3));
        let Read::Event(2, p, _) = t.read(1) else {
            panic!()
        };
        assert_eq!(p, Position::new(7, 5));
        assert!(matches!(t.read(2), Read::Empty));
    }

    #[test]
    fn read_many_takes_up_to_max_in_order_under_one_lock() {
        let t = ring();
        let mut got = Vec::new();
        assert_eq!(t.read_many(0, 8, |p, _| got.push(p.lo)), None);
        for lo in 1..=5 {
            push(&t, lo, 3);
        }
        // 1 and 2 are evicted: the first is gone, so nothing (read() says why).
        assert_eq!(t.read_many(0, 8, |p, _| got.push(p.lo)), None);
        assert!(got.is_empty());
        assert_eq!(t.read_many(2, 2, |p, _| got.push(p.lo)), Some(4));
        assert_eq!(t.read_many(4, 8, |p, _| got.push(p.lo)), Some(5));
        assert_eq!(t.read_many(5, 8, |p, _| got.push(p.lo)), None);
        assert_eq!(got, [3, 4, 5]);
    }

    #[test]
    fn eviction_is_reported_as_overrun_and_expired() {
        let t = ring();
        let b = bounds(3);
        for lo in 1..=5 {
            push(&t, lo, 3);
        }
        assert!(matches!(t.read(0), Read::Overrun { floor } if floor == Position::new(7, 2)));
        assert!(matches!(t.read(1), Read::Overrun { .. }));
        assert!(matches!(t.read(2), Read::Event(3, _, _)));
        assert!(matches!(
            t.locate(Position::new(7, 1), &b),
            Resume::Expired { floor, after: 2 } if floor == Position::new(7, 2)
        ));
        assert!(matches!(
            t.locate(Position::new(7, 2), &b),
            Resume::At(2, _)
        ));
        assert!(matches!(
            t.locate(Position::new(7, 5), &b),
            Resume::At(5, _)
        ));
        assert!(matches!(t.locate(Position::new(7, 6), &b), Resume::Unknown));
        assert!(matches!(
            t.locate(Position::new(6, 9), &b),
            Resume::Expired { .. }
        ));
    }

    #[test]
    fn lag_counts_only_events_from_before_the_previous_sample() {
        let t = ring();
        for lo in 1..=10 {
            push(&t, lo, 100);
        }
        let (lag_3, lag_9, lag_10) = (
            rule(SlowClientPolicy::Skip, 3),
            rule(SlowClientPolicy::Skip, 9),
            rule(SlowClientPolicy::Skip, 10),
        );
        // Published after every sample so far: not lag, however many.
        assert_eq!(lag_3.judge(t.lag_mark(), 0), Verdict::Keep);
        t.sample(&lag_3);
        let verdict = lag_3.judge(t.lag_mark(), 0);
        assert_eq!(verdict, Verdict::Keep, "one sample is not enough");
        t.sample(&lag_3);
        assert_eq!(t.lag_mark(), 10);
        assert_eq!(lag_9.judge(t.lag_mark(), 0), Verdict::Skip);
        assert_eq!(lag_10.judge(t.lag_mark(), 0), Verdict::Keep);
        assert_eq!(lag_3.judge(t.lag_mark(), 7), Verdict::Keep);
    }

    #[test]
    fn resume_from_the_start_of_an_empty_topic() {
        let t = ring();
        let b = bounds(10);
        assert!(matches!(
            t.locate(Position::new(7, 0), &b),
            Resume::At(0, _)
        ));
        push(&t, 1, 10);
        assert!(matches!(
            t.locate(Position::new(7, 0), &b),
            Resume::At(0, _)
        ));
    }

    #[test]
    fn ttl_evicts_old_events() {
        let t = ring();
        let b = Bounds {
            ttl: Duration::ZERO,
            ..bounds(10)
        };
        let make = |_| Some((Position::new(7, 1), encode_event("t:7-1", None, "x")));
        t.push(make, &b);
        assert!(t.sweep(&b));
        assert!(matches!(t.read(0), Read::Overrun { .. }));
    }

    #[test]
    fn history_past_its_age_is_not_resumed_even_before_a_sweep() {
        let t = ring();
        let keep = bounds(10);
        for lo in 1..=3 {
            push(&t, lo, 10);
        }
        let aged = Bounds {
            ttl: Duration::ZERO,
            ..keep
        };
        // Still in the ring (nothing evicted it), but too old to replay.
        assert!(matches!(t.read(0), Read::Event(1, _, _)));
        assert!(matches!(
            t.locate(Position::new(7, 1), &aged),
            Resume::Expired { after: 3, .. }
        ));
        assert!(matches!(
            t.locate(Position::new(7, 3), &aged),
            Resume::At(3, _)
        ));
        assert!(matches!(
            t.locate(Position::new(7, 1), &keep),
            Resume::At(1, _)
        ));
    }

    #[test]
    fn events_a_keeping_up_subscriber_needs_are_pinned_up_to_the_byte_cap() {
        let client = reader("c");
        let t = ring();
        t.subscribe(client.clone(), 0);
        // A batch of 20 with a history of 5: all of it stays for the reader.
        for lo in 1..=20 {
            push(&t, lo, 5);
        }
        assert!(matches!(t.read(0), Read::Event(1, _, _)));
        // A stream that has read it all releases it at the next sample.
        client.set_cursor(0, 20);
        t.sample(&rule(SlowClientPolicy::Skip, 100));
        push(&t, 21, 5);
        assert!(matches!(t.read(15), Read::Overrun { .. }));
        assert!(matches!(t.read(16), Read::Event(17, _, _)));

        // Beyond the byte cap even a pinned event goes.
        let t = ring();
        let cost = encode_event("t:7-1", None, "x").len() + STORED_OVERHEAD;
        let small = Bounds {
            pinned_bytes: 3 * cost,
            ..bounds(5)
        };
        let client = reader("d");
        t.subscribe(client, 0);
        for lo in 1..=9 {
            push_with(&t, lo, &small);
        }
        assert!(matches!(t.read(0), Read::Overrun { .. }));
        assert!(matches!(t.read(1), Read::Event(2, _, _)));
    }

    #[test]
    fn a_stream_that_is_behind_pins_nothing_and_is_handed_back_to_close() {
        let client = reader("c");
        let t = ring();
        t.subscribe(client.clone(), 0);
        for lo in 1..=10 {
            push(&t, lo, 3);
        }
        let disconnect = rule(SlowClientPolicy::Disconnect, 5);
        assert!(t.sample(&disconnect).is_empty());
        let slow = t.sample(&disconnect);
        assert_eq!(slow.len(), 1, "10 unread from before the previous sample");
        assert!(Arc::ptr_eq(&slow[0], &client));
        push(&t, 11, 3);
        assert!(matches!(t.read(0), Read::Overrun { .. }));
    }
}
