//! Event ids and resume cursors: what an event's `id:` field carries and what a
//! client sends back in `Last-Event-ID` (or `?lastEventId=`) to resume.
//!
//! A cursor is a comma-separated list of `topic:position` entries, one for each
//! topic of the stream it came from (for a Kafka topic with several
//! partitions, one per partition: the partition is the position's `hi`). A position is `<hi>-<lo>`, two unsigned
//! decimal integers compared in that order. The in-memory hub uses
//! (run epoch, hub-wide sequence); the same shape carries a Redis stream entry
//! id (`<ms>-<seq>`) or a Kafka (partition, offset), so every replica can give
//! the same event the same id. Clients treat ids as opaque.

use std::fmt;
use std::str::FromStr;

use crate::topic::{self, TopicError};

/// Longest cursor we accept; well above 64 topics with long names.
pub const MAX_CURSOR_LEN: usize = 16 * 1024;

/// A point in one topic's event sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub hi: u64,
    pub lo: u64,
}

impl Position {
    pub const fn new(hi: u64, lo: u64) -> Self {
        Position { hi, lo }
    }

    /// The event id `topic:hi-lo`, in one allocation of the right size.
    pub fn id_in(self, topic: &str) -> String {
        use fmt::Write;
        // Two u64s in decimal and the separators: at most 20 + 1 + 20 + 1.
        let mut id = String::with_capacity(topic.len() + 42);
        write!(id, "{topic}:{self}").expect("writing to a String cannot fail");
        id
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hi, self.lo)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("the id is empty")]
    Empty,
    #[error("the id is longer than {MAX_CURSOR_LEN} bytes")]
    TooLong,
    #[error("entry {0:?} is not of the form topic:hi-lo")]
    Entry(String),
    #[error("position {0:?} is not of the form hi-lo (two unsigned integers)")]
    Position(String),
    #[error("topic {0:?} appears twice with the same hi")]
    Duplicate(String),
    #[error(transparent)]
    Topic(#[from] TopicError),
}

impl FromStr for Position {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CursorError::Position(s.to_owned());
        let (hi, lo) = s.split_once('-').ok_or_else(bad)?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(hi) || !digits(lo) {
            return Err(bad());
        }
        Ok(Position {
            hi: hi.parse().map_err(|_| bad())?,
            lo: lo.parse().map_err(|_| bad())?,
        })
    }
}

/// A parsed resume cursor: the last position seen on each topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    entries: Vec<(String, Position)>,
}

impl Cursor {
    pub fn new() -> Self {
        Cursor::default()
    }

    /// Parses a cursor as sent in `Last-Event-ID`.
    pub fn parse(s: &str) -> Result<Cursor, CursorError> {
        if s.is_empty() {
            return Err(CursorError::Empty);
        }
        if s.len() > MAX_CURSOR_LEN {
            return Err(CursorError::TooLong);
        }
        let mut cursor = Cursor::new();
        for entry in s.split(',') {
            let (name, pos) = entry
                .split_once(':')
                .ok_or_else(|| CursorError::Entry(entry.to_owned()))?;
            topic::validate(name, topic::MAX_TOPIC_LEN)?;
            let pos: Position = pos.parse()?;
            // One entry per topic, or per (topic, partition): two entries
            // of one topic must differ in `hi`.
            if cursor.get_at(name, pos.hi).is_some() {
                return Err(CursorError::Duplicate(name.to_owned()));
            }
            cursor.entries.push((name.to_owned(), pos));
        }
        Ok(cursor)
    }

    pub fn push(&mut self, topic: &str, pos: Position) {
        self.entries.push((topic.to_owned(), pos));
    }

    pub fn get(&self, topic: &str) -> Option<Position> {
        self.entries
            .iter()
            .find(|(t, _)| t == topic)
            .map(|&(_, pos)| pos)
    }

    /// The entry of `topic` whose `hi` is `hi` (a Kafka partition).
    pub fn get_at(&self, topic: &str, hi: u64) -> Option<Position> {
        self.entries
            .iter()
            .find(|(t, pos)| t == topic && pos.hi == hi)
            .map(|&(_, pos)| pos)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Position)> {
        self.entries.iter().map(|(t, p)| (t.as_str(), *p))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (topic, pos)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{topic}:{pos}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_single_and_multi_topic_cursors() {
        let c = Cursor::parse("chat:1700000000000-42").unwrap();
        assert_eq!(c.get("chat"), Some(Position::new(1_700_000_000_000, 42)));
        let c = Cursor::parse("a:1-2,b.c_d-e:3-4").unwrap();
        assert_eq!(c.get("a"), Some(Position::new(1, 2)));
        assert_eq!(c.get("b.c_d-e"), Some(Position::new(3, 4)));
        assert_eq!(c.to_string(), "a:1-2,b.c_d-e:3-4");
    }

    #[test]
    fn ids_name_topic_and_position() {
        let id = Position::new(u64::MAX, u64::MAX).id_in("chat");
        assert_eq!(id, format!("chat:{}-{}", u64::MAX, u64::MAX));
        assert!(
            id.len() <= "chat".len() + 42,
            "the longest id fits what is reserved"
        );
        let c = Cursor::parse(&Position::new(3, 9).id_in("a.b")).unwrap();
        assert_eq!(c.get("a.b"), Some(Position::new(3, 9)));
    }

    #[test]
    fn rejects_malformed_cursors() {
        for bad in [
            "",
            "chat",
            "chat:",
            "chat:1",
            "chat:1-",
            "chat:-1",
            "chat:1-2-3",
            "chat:+1-2",
            "chat:1-x",
            ":1-2",
            "a b:1-2",
            "a:1-2,",
            "a:1-2,a:1-3",
            "a:0-2,b:1-1,a:0-9",
            "a:18446744073709551616-0",
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            Cursor::parse(&"a".repeat(MAX_CURSOR_LEN + 1)),
            Err(CursorError::TooLong)
        );
    }

    #[test]
    fn a_partitioned_topic_has_one_entry_per_partition() {
        let c = Cursor::parse("t:0-15,t:1-7,u:3-3").unwrap();
        assert_eq!(c.get_at("t", 0), Some(Position::new(0, 15)));
        assert_eq!(c.get_at("t", 1), Some(Position::new(1, 7)));
        assert_eq!(c.get_at("t", 2), None);
        assert_eq!(c.get("t"), Some(Position::new(0, 15)), "the first entry");
        assert_eq!(c.to_string(), "t:0-15,t:1-7,u:3-3");
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(
            entries in proptest::collection::btree_map("[A-Za-z0-9_.-]{1,20}", (any::<u64>(), any::<u64>()), 1..8)
        ) {
            let mut c = Cursor::new();
            for (t, (hi, lo)) in &entries {
                c.push(t, Position::new(*hi, *lo));
            }
            prop_assert_eq!(Cursor::parse(&c.to_string()).unwrap(), c);
        }

        #[test]
        fn never_panics_on_any_input(s in "\\PC{0,64}") {
            let _ = Cursor::parse(&s);
        }
    }
}
