//! Per-stream bookkeeping of the events received: how many distinct ones,
//! duplicates, events out of order, events of a topic the stream is not on.
//!
//! Sequence numbers are global to a run: event `s` goes to topic `s % K` and
//! is sent by publisher `s % L`, and each publisher sends its events one
//! after another. So on one stream, events of one publisher must arrive in
//! increasing order (events of different publishers may interleave). Missing
//! events are counted at the end: what was published on the stream's topic
//! minus the distinct events received.
//!
//! Cost per stream: one `u64` per publisher and a 1,024-bit window of recent
//! events (for telling duplicates from late arrivals).

const WINDOW_WORDS: usize = 16;
const WINDOW: u64 = (WINDOW_WORDS * 64) as u64;

#[derive(Debug, Clone)]
pub struct Tracker {
    topic: u64,
    topics: u64,
    publishers: u64,
    /// Highest sequence number seen from each publisher, plus one (0: none).
    last: Box<[u64]>,
    /// Seen-bits of the topic's last `WINDOW` events (by `seq / topics`).
    window: [u64; WINDOW_WORDS],
    /// One past the highest per-topic index seen.
    top: u64,
    pub counts: Counts,
}

/// What one stream saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct events of the stream's topic.
    pub unique: u64,
    pub duplicated: u64,
    /// Events that arrived after a later event of the same publisher.
    pub out_of_order: u64,
    /// Events of another topic.
    pub wrong_topic: u64,
}

impl Tracker {
    pub fn new(topic: usize, topics: usize, publishers: usize) -> Tracker {
        Tracker {
            topic: topic as u64,
            topics: topics.max(1) as u64,
            publishers: publishers.max(1) as u64,
            last: vec![0; publishers.max(1)].into_boxed_slice(),
            window: [0; WINDOW_WORDS],
            top: 0,
            counts: Counts::default(),
        }
    }

    /// Records event `seq`; true when it is a new event of this stream.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq % self.topics != self.topic {
            self.counts.wrong_topic += 1;
            return false;
        }
        let j = seq / self.topics;
        if j >= self.top {
            let advance = j + 1 - self.top;
            if advance >= WINDOW {
                self.window = [0; WINDOW_WORDS];
            } else {
                for k in self.top..=j {
                    self.clear(k);
                }
            }
            self.top = j + 1;
            self.set(j);
        } else if self.top - j <= WINDOW {
            if self.bit(j) {
                self.counts.duplicated += 1;
                return false;
            }
            self.set(j);
        }
        // Else older than the window: taken as new, unchecked for duplicates.
        let lane = &mut self.last[(seq % self.publishers) as usize];
        if seq + 1 < *lane {
            self.counts.out_of_order += 1;
        } else {
            *lane = seq + 1;
        }
        self.counts.unique += 1;
        true
    }

    fn bit(&self, j: u64) -> bool {
        let k = j % WINDOW;
        self.window[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    fn set(&mut self, j: u64) {
        let k = j % WINDOW;
        self.window[(k / 64) as usize] |= 1 << (k % 64);
    }

    fn clear(&mut self, j: u64) {
        let k = j % WINDOW;
        self.window[(k / 64) as usize] &= !(1 << (k % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Tracker, seqs: &[u64]) -> Counts {
        for &s in seqs {
            t.record(s);
        }
        t.counts
    }

    #[test]
    fn in_order_is_clean() {
        let mut t = Tracker::new(1, 3, 1);
        let seqs: Vec<u64> = (0..5000).map(|i| 1 + 3 * i).collect();
        let c = run(&mut t, &seqs);
        assert_eq!(
            c,
            Counts {
                unique: 5000,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn duplicates_reordering_and_other_topics() {
        let mut t = Tracker::new(0, 1, 1);
        let c = run(&mut t, &[0, 1, 3, 2, 3, 1, 5]);
        assert_eq!(c.unique, 5);
        assert_eq!(c.duplicated, 2);
        assert_eq!(c.out_of_order, 1);
        let mut t = Tracker::new(0, 2, 1);
        assert!(!t.record(3));
        assert_eq!(t.counts.wrong_topic, 1);
    }

    #[test]
    fn publishers_may_interleave() {
        // Two publishers: even and odd sequence numbers, each in order.
        let mut t = Tracker::new(0, 1, 2);
        let c = run(&mut t, &[1, 3, 5, 0, 2, 7, 4, 6]);
        assert_eq!(
            c,
            Counts {
                unique: 8,
                ..Counts::default()
            }
        );
        let c = run(&mut t, &[8, 9, 11, 10, 13, 12]);
        assert_eq!(c.out_of_order, 0);
        let c = run(&mut t, &[15, 14, 17, 12 + 2 * 1000]);
        assert_eq!(c.out_of_order, 0);
        let before = t.counts.out_of_order;
        t.record(16);
        assert_eq!(
            t.counts.out_of_order,
            before + 1,
            "16 after 2012, same publisher"
        );
    }

    #[test]
    fn a_jump_past_the_window_forgets_it() {
        let mut t = Tracker::new(0, 1, 1);
        run(&mut t, &[0, 1, 5000]);
        assert!(!t.record(5000));
        assert_eq!(t.counts.duplicated, 1);
        // Too old to tell: counted as a late new event.
        assert!(t.record(1));
        assert_eq!(t.counts.out_of_order, 1);
    }
}
