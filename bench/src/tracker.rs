//! Per-client bookkeeping of the events received, across reconnects:
//! which distinct ones, duplicates, events out of order, events of a topic
//! the client is not on.
//!
//! Sequence numbers are global to a run: event `s` goes to topic `s % K` and
//! is sent by publisher `s % L`, and each publisher sends its events one
//! after another. So on one client, events of one publisher must arrive in
//! increasing order (events of different publishers may interleave). Lost
//! events are counted at the end against what the publishers know they
//! published ([`Tracker::received`] answers for the events whose publish
//! failed).
//!
//! Cost per client: one `u64` per publisher and the set of events received
//! as ranges of the topic's event index: one range while nothing is missing,
//! one more per hole (at most [`MAX_RANGES`]).

/// Most holes remembered per client; beyond, the oldest hole is filled
/// (counted in `Counts::forgotten`) so a server that loses every other
/// event cannot make the bench's memory grow.
pub const MAX_RANGES: usize = 256;

#[derive(Debug, Clone)]
pub struct Tracker {
    topic: u64,
    topics: u64,
    publishers: u64,
    /// Highest sequence number seen from each publisher, plus one (0: none).
    last: Box<[u64]>,
    /// Events received, as sorted, disjoint, non-adjacent half-open ranges
    /// of the topic's event index (`seq / topics`).
    ranges: Vec<(u64, u64)>,
    pub counts: Counts,
}

/// What one client saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct events of the client's topic.
    pub unique: u64,
    pub duplicated: u64,
    /// Events that arrived after a later event of the same publisher.
    pub out_of_order: u64,
    /// Events of another topic.
    pub wrong_topic: u64,
    /// Events of holes filled in to bound memory (see [`MAX_RANGES`]):
    /// counted as lost, and a late arrival among them as a duplicate.
    pub forgotten: u64,
}

impl Tracker {
    pub fn new(topic: usize, topics: usize, publishers: usize) -> Tracker {
        Tracker {
            topic: topic as u64,
            topics: topics.max(1) as u64,
            publishers: publishers.max(1) as u64,
            last: vec![0; publishers.max(1)].into_boxed_slice(),
            ranges: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// Records event `seq`; true when it is a new event of this client.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq % self.topics != self.topic {
            self.counts.wrong_topic += 1;
            return false;
        }
        if !self.insert(seq / self.topics) {
            self.counts.duplicated += 1;
            return false;
        }
        let lane = &mut self.last[(seq % self.publishers) as usize];
        if seq + 1 < *lane {
            self.counts.out_of_order += 1;
        } else {
            *lane = seq + 1;
        }
        self.counts.unique += 1;
        true
    }

    /// Whether event `seq` (of this client's topic) was received.
    pub fn received(&self, seq: u64) -> bool {
        let j = seq / self.topics;
        let k = self.ranges.partition_point(|&(_, end)| end <= j);
        self.ranges.get(k).is_some_and(|&(start, _)| start <= j)
    }

    /// Adds index `j` to the set; false if it was there already.
    fn insert(&mut self, j: u64) -> bool {
        // The usual case: the next event after the last one.
        if let Some(last) = self.ranges.last_mut() {
            if last.1 == j {
                last.1 += 1;
                return true;
            }
            if j > last.1 {
                self.ranges.push((j, j + 1));
                self.bound();
                return true;
            }
        } else {
            self.ranges.push((j, j + 1));
            return true;
        }
        // First range that ends after j.
        let k = self.ranges.partition_point(|&(_, end)| end <= j);
        let (start, _) = self.ranges[k];
        if start <= j {
            return false;
        }
        let joins_prev = k > 0 && self.ranges[k - 1].1 == j;
        let joins_next = start == j + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[k - 1].1 = self.ranges[k].1;
                self.ranges.remove(k);
            }
            (true, false) => self.ranges[k - 1].1 = j + 1,
            (false, true) => self.ranges[k].0 = j,
            (false, false) => {
                self.ranges.insert(k, (j, j + 1));
                self.bound();
            }
        }
        true
    }

    /// Keeps at most `MAX_RANGES` ranges by filling the oldest hole.
    fn bound(&mut self) {
        if self.ranges.len() > MAX_RANGES {
            let (start, end) = self.ranges.remove(1);
            self.counts.forgotten += start - self.ranges[0].1;
            self.ranges[0].1 = end;
        }
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
        assert_eq!(t.ranges, [(0, 5000)]);
        assert!(t.received(1) && t.received(3 * 4999 + 1) && !t.received(3 * 5000 + 1));
    }

    #[test]
    fn duplicates_reordering_and_other_topics() {
        let mut t = Tracker::new(0, 1, 1);
        let c = run(&mut t, &[0, 1, 3, 2, 3, 1, 5]);
        assert_eq!(c.unique, 5);
        assert_eq!(c.duplicated, 2);
        assert_eq!(c.out_of_order, 1);
        assert_eq!(t.ranges, [(0, 4), (5, 6)]);
        assert!(!t.received(4) && t.received(5));
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
    fn duplicates_are_found_however_old() {
        let mut t = Tracker::new(0, 1, 1);
        run(&mut t, &[0, 1, 5000]);
        assert!(!t.record(5000));
        assert!(!t.record(1));
        assert_eq!(t.counts.duplicated, 2);
        // A late event fills its hole.
        assert!(t.record(2));
        assert_eq!(t.counts.out_of_order, 1);
        assert_eq!(t.ranges, [(0, 3), (5000, 5001)]);
    }

    #[test]
    fn holes_are_bounded() {
        let mut t = Tracker::new(0, 1, 1);
        let seqs: Vec<u64> = (0..2 * MAX_RANGES as u64 + 10).map(|i| 2 * i).collect();
        run(&mut t, &seqs);
        assert_eq!(t.ranges.len(), MAX_RANGES);
        let holes = seqs.len() as u64 - MAX_RANGES as u64;
        assert_eq!(t.counts.forgotten, holes);
        assert_eq!(t.counts.unique, seqs.len() as u64);
    }
}
