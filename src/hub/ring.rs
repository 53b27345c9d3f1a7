//! One ring's state: a bounded ring of encoded events that is both the
//! resume history and the live buffer, and the list of its subscribers. A
//! topic has one ring, or (Kafka) one per partition.
//!
//! Subscribers do not own queues: each holds an *ordinal* (the per-topic
//! sequence number of the last event it wrote) and reads the ring from there.
//! Resume and live delivery read the same ring, so there is no seam between
//! history and live where an event could be lost or repeated.
//!
//! Architecture invariant: the ring and subscriber locks are never held across
//! an await, and never both at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use slab::Slab;

use super::client::Client;
use crate::id::Position;
use crate::sse::Frame;

/// One retained event.
struct Stored {
    pos: Position,
    at: Instant,
    frame: Frame,
}

struct Ring {
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
    /// position it started after (see [`Topic::reset`]).
    reset_at: u64,
    reset_pos: Position,
}

impl Ring {
    fn head(&self) -> u64 {
        self.first + self.events.len() as u64 - 1
    }

    fn evict(&mut self, max_len: usize, ttl: Duration, now: Instant) {
        while let Some(front) = self.events.front() {
            if self.events.len() <= max_len && now.duration_since(front.at) < ttl {
                break;
            }
            self.floor_pos = front.pos;
            self.events.pop_front();
            self.first += 1;
        }
    }
}

/// What a subscriber finds when it reads after its ordinal.
pub enum Read {
    /// The next event, and its ordinal.
    Event(u64, Position, Frame),
    /// Nothing newer yet.
    Empty,
    /// Events after the ordinal were evicted before the subscriber read them.
    Overrun,
    /// More than `max_lag` events are waiting.
    Lagging,
}

/// Where a resume point falls in a topic's retained history.
pub enum Resume {
    /// Start after this ordinal (position known).
    At(u64, Position),
    /// The point is older than what is retained, which starts after `floor`.
    Expired { floor: Position },
    /// The point is newer than anything published here.
    Unknown,
}

pub struct Topic {
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
    ring: RwLock<Ring>,
    subscribers: Mutex<Slab<(Arc<Client>, usize)>>,
    /// How many times the ring was reset: streams compare it with the count
    /// they last saw, without taking the ring's lock.
    resets: AtomicU64,
}

impl Topic {
    /// A topic's only ring, keyed by its name.
    pub fn new(name: Arc<str>, start: Position) -> Self {
        Self::ring(name.clone(), name, None, start)
    }

    /// A ring with its own key (see [`Topic::part`]).
    pub fn ring(key: Arc<str>, name: Arc<str>, part: Option<u64>, start: Position) -> Self {
        Topic {
            key,
            name,
            part,
            touched_ms: AtomicU64::new(0),
            ring: RwLock::new(Ring {
                events: VecDeque::new(),
                first: 1,
                head_pos: start,
                floor_pos: start,
                published: 0,
                reset_at: 0,
                reset_pos: start,
            }),
            subscribers: Mutex::new(Slab::new()),
            resets: AtomicU64::new(0),
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
        max_len: usize,
        ttl: Duration,
    ) -> Option<(u64, Position)> {
        let now = Instant::now();
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        let (pos, frame) = make(ring.head_pos)?;
        ring.events.push_back(Stored {
            pos,
            at: now,
            frame,
        });
        ring.head_pos = pos;
        ring.published += 1;
        ring.evict(max_len.max(1), ttl, now);
        Some((ring.head(), pos))
    }

    /// Starts the ring again after `start`, forgetting every event: the bus's
    /// log behind it restarted (a Kafka topic re-created, or a broker that
    /// lost it), so its positions start again below the ring's. Ordinals go
    /// on; each subscriber learns it from [`Topic::resets`] and continues
    /// from [`Topic::reset_point`]. Wakes them.
    pub fn reset(&self, start: Position) {
        let head = {
            let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
            let head = ring.head();
            ring.events.clear();
            ring.first = head + 1;
            ring.head_pos = start;
            ring.floor_pos = start;
            ring.reset_at = head;
            ring.reset_pos = start;
            self.resets.fetch_add(1, Relaxed);
            head
        };
        self.notify(head, None);
    }

    /// How many times the ring was reset.
    pub fn resets(&self) -> u64 {
        self.resets.load(Relaxed)
    }

    /// Where a subscriber goes on after a reset: the reset count, the
    /// ordinal after which the new log's events are, and its position.
    pub fn reset_point(&self) -> (u64, u64, Position) {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        // Read under the lock, so it matches `reset_at`.
        let resets = self.resets.load(Relaxed);
        (resets, ring.reset_at, ring.reset_pos)
    }

    /// Drops expired events; true when the topic is empty and unsubscribed,
    /// so the hub may forget it.
    pub fn sweep(&self, max_len: usize, ttl: Duration) -> bool {
        let empty = {
            let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
            ring.evict(max_len.max(1), ttl, Instant::now());
            ring.events.is_empty()
        };
        empty && self.subscriber_count() == 0
    }

    /// The newest ordinal and position.
    pub fn head(&self) -> (u64, Position) {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        (ring.head(), ring.head_pos)
    }

    pub fn stats(&self) -> (u64, Option<Position>) {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        let last = (ring.published > 0).then_some(ring.head_pos);
        (ring.published, last)
    }

    /// The event after ordinal `after`, if the subscriber may have it.
    pub fn read(&self, after: u64, max_lag: u64) -> Read {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        let head = ring.head();
        if after >= head {
            return Read::Empty;
        }
        if after + 1 < ring.first {
            return Read::Overrun;
        }
        if head - after > max_lag {
            return Read::Lagging;
        }
        let ev = &ring.events[(after + 1 - ring.first) as usize];
        Read::Event(after + 1, ev.pos, ev.frame.clone())
    }

    /// Finds where a client that last saw `pos` should resume.
    pub fn locate(&self, pos: Position) -> Resume {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        if pos > ring.head_pos {
            return Resume::Unknown;
        }
        if pos < ring.floor_pos {
            return Resume::Expired {
                floor: ring.floor_pos,
            };
        }
        let idx = ring.events.partition_point(|ev| ev.pos <= pos);
        Resume::At(ring.first + idx as u64 - 1, pos)
    }

    pub fn subscribe(&self, client: Arc<Client>, index: usize) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((client, index))
    }

    pub fn unsubscribe(&self, key: usize) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if subs.contains(key) {
            subs.remove(key);
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Wakes every subscriber after a push. With `lag_limit`, also closes
    /// those further behind than that: a client that has stopped reading
    /// is never polled, so it cannot notice its own lag.
    pub fn notify(&self, head: u64, lag_limit: Option<u64>) -> usize {
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let mut slow = 0;
        for (_, (client, index)) in subs.iter() {
            if let Some(limit) = lag_limit
                && head.saturating_sub(client.lag_base(*index)) > limit
                && client.close(crate::sse::CloseReason::Slow)
            {
                slow += 1;
            }
            client.wake();
        }
        slow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::encode_event;

    fn topic() -> Topic {
        Topic::new("t".into(), Position::new(7, 0))
    }

    fn push(t: &Topic, lo: u64, max_len: usize) -> u64 {
        let pos = Position::new(7, lo);
        let make = |_| Some((pos, encode_event(&format!("t:{pos}"), None, "x")));
        t.push(make, max_len, Duration::from_secs(60)).unwrap().0
    }

    #[test]
    fn reads_in_order_then_empty() {
        let t = topic();
        assert!(matches!(t.read(0, 100), Read::Empty));
        push(&t, 3, 10);
        push(&t, 5, 10);
        let Read::Event(1, p, _) = t.read(0, 100) else {
            panic!()
        };
        assert_eq!(p, Position::new(7, 3));
        let Read::Event(2, p, _) = t.read(1, 100) else {
            panic!()
        };
        assert_eq!(p, Position::new(7, 5));
        assert!(matches!(t.read(2, 100), Read::Empty));
    }

    #[test]
    fn eviction_is_reported_as_overrun_and_expired() {
        let t = topic();
        for lo in 1..=5 {
            push(&t, lo, 3);
        }
        assert!(matches!(t.read(0, 100), Read::Overrun));
        assert!(matches!(t.read(1, 100), Read::Overrun));
        assert!(matches!(t.read(2, 100), Read::Event(3, _, _)));
        assert!(matches!(
            t.locate(Position::new(7, 1)),
            Resume::Expired { .. }
        ));
        assert!(matches!(t.locate(Position::new(7, 2)), Resume::At(2, _)));
        assert!(matches!(t.locate(Position::new(7, 5)), Resume::At(5, _)));
        assert!(matches!(t.locate(Position::new(7, 6)), Resume::Unknown));
        assert!(matches!(
            t.locate(Position::new(6, 9)),
            Resume::Expired { .. }
        ));
    }

    #[test]
    fn lag_is_measured_in_events() {
        let t = topic();
        for lo in 1..=10 {
            push(&t, lo, 100);
        }
        assert!(matches!(t.read(0, 9), Read::Lagging));
        assert!(matches!(t.read(0, 10), Read::Event(1, _, _)));
    }

    #[test]
    fn resume_from_the_start_of_an_empty_topic() {
        let t = topic();
        assert!(matches!(t.locate(Position::new(7, 0)), Resume::At(0, _)));
        push(&t, 1, 10);
        assert!(matches!(t.locate(Position::new(7, 0)), Resume::At(0, _)));
    }

    #[test]
    fn ttl_evicts_old_events() {
        let t = topic();
        let make = |_| Some((Position::new(7, 1), encode_event("t:7-1", None, "x")));
        t.push(make, 10, Duration::ZERO);
        assert!(t.sweep(10, Duration::ZERO));
        assert!(matches!(t.read(0, 100), Read::Overrun));
    }
}
