//! `Idempotency-Key` with Kafka: the key travels with the records, and
//! every replica's consumers drop a copy of a record they have already
//! delivered.
//!
//! - A keyed batch is produced with the key as every record's Kafka key
//!   (so a retry lands on the same partition as the first attempt, after
//!   it in the log) and a [`HEADER`] carrying `<index>/<count>
//!   <fingerprint> <key>`.
//! - Every consumer of this replica (the live one and catch-up readers)
//!   asks [`Dedup::first_copy`] before delivering a tagged record: the
//!   first copy of each (key, index) seen within the window is delivered,
//!   a later copy at another offset is dropped. Partition order makes
//!   "first" the same on every replica that saw both.
//! - A retry is answered from the same table when this replica's consumer
//!   has seen every event of the key's batch; otherwise it is produced
//!   again, and once the consumer has passed the new records the answer
//!   names the first copies' ids when there were any.
//!
//! What is guaranteed: a subscriber never gets two copies of a keyed event
//! from a replica whose consumer saw the first copy within
//! `--idempotency-window` and `--idempotency-capacity` keys. Not
//! guaranteed: across a replica restart (the table is memory; a replica
//! starts consuming at the end, so it does not see old copies live, but a
//! catch-up reader reading both copies back drops the second), and for
//! records produced outside Streamline.

use std::time::Duration;

use crate::hub::BusError;
use crate::idempotency::{IdempotencyKey, Table};

/// The record header carrying the key.
pub const HEADER: &str = "streamline-idempotency";

/// Most events of one batch a tag may claim (a bound on what a record read
/// from Kafka can make this replica allocate).
const MAX_COUNT: usize = 100_000;

/// One record's tag: its place in the keyed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag<'a> {
    pub index: usize,
    pub count: usize,
    pub fingerprint: &'a str,
    pub key: &'a str,
}

impl Tag<'_> {
    pub fn encode(index: usize, count: usize, key: &IdempotencyKey) -> String {
        format!("{index}/{count} {} {}", key.fingerprint, key.key)
    }

    /// Reads a header value; `None` when it is not a tag.
    pub fn parse(value: &[u8]) -> Option<Tag<'_>> {
        let value = std::str::from_utf8(value).ok()?;
        let (place, rest) = value.split_once(' ')?;
        let (fingerprint, key) = rest.split_once(' ')?;
        let (index, count) = place.split_once('/')?;
        let (index, count): (usize, usize) = (index.parse().ok()?, count.parse().ok()?);
        let ok = index < count && count <= MAX_COUNT && !key.is_empty();
        ok.then_some(Tag {
            index,
            count,
            fingerprint,
            key,
        })
    }
}

/// What this replica saw of one key: its batch's fingerprint and, per
/// event, the id of the first copy delivered.
#[derive(Debug)]
struct Seen {
    fingerprint: String,
    ids: Vec<Option<String>>,
}

/// The per-replica table of keys seen by its consumers.
#[derive(Debug)]
pub struct Dedup {
    table: Table<Seen>,
}

impl Dedup {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Dedup {
            table: Table::new(window, capacity),
        }
    }

    /// Whether the record `tag` is on, with id `id`, is to be delivered:
    /// yes for the first copy of its (key, index), and for that same record
    /// read again; no for another copy.
    pub fn first_copy(&self, tag: &Tag<'_>, id: &str) -> bool {
        let mut table = self.table.lock();
        let seen = table.get_or_insert_with(tag.key, || Seen {
            fingerprint: tag.fingerprint.to_owned(),
            ids: vec![None; tag.count],
        });
        if seen.fingerprint != tag.fingerprint {
            // Another batch under the same key (sent by a replica that did
            // not know the key, or from outside): not a copy.
            return true;
        }
        match seen.ids.get_mut(tag.index) {
            Some(slot @ None) => {
                *slot = Some(id.to_owned());
                true
            }
            Some(Some(first)) => first == id,
            None => true,
        }
    }

    /// The answer to `key` from what the consumers saw: its batch's ids
    /// when every event of it was seen, `None` when not (yet);
    /// [`BusError::KeyReused`] when it was seen with another batch.
    pub fn answer(&self, key: &IdempotencyKey) -> Result<Option<Vec<String>>, BusError> {
        let table = self.table.lock();
        let Some(seen) = table.get(&key.key) else {
            return Ok(None);
        };
        if seen.fingerprint != key.fingerprint {
            return Err(BusError::key_reused(&key.key));
        }
        Ok(seen.ids.iter().cloned().collect())
    }

    /// The first copy's id of event `index` of `key`, if seen.
    pub fn first_id(&self, key: &IdempotencyKey, index: usize) -> Option<String> {
        let table = self.table.lock();
        let seen = table.get(&key.key)?;
        if seen.fingerprint != key.fingerprint {
            return None;
        }
        seen.ids.get(index)?.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, fp: &str) -> IdempotencyKey {
        IdempotencyKey {
            key: k.into(),
            fingerprint: fp.into(),
        }
    }

    #[test]
    fn tags_round_trip_and_bad_ones_are_ignored() {
        let k = key("a/b c", "f00");
        let v = Tag::encode(1, 2, &k);
        let t = Tag::parse(v.as_bytes()).unwrap();
        assert_eq!(
            (t.index, t.count, t.fingerprint, t.key),
            (1, 2, "f00", "a/b c")
        );
        for bad in ["", "1/2 f", "2/2 f k", "x/2 f k", "0/1000000 f k", "0/1 f "] {
            assert_eq!(Tag::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn the_first_copy_wins_and_answers_retries() {
        let d = Dedup::new(Duration::from_secs(60), 100);
        let k = key("k", "fp");
        let tag = |index| Tag {
            index,
            count: 2,
            fingerprint: "fp",
            key: "k",
        };
        assert_eq!(d.answer(&k).unwrap(), None);
        assert!(d.first_copy(&tag(0), "t:0-1"));
        assert_eq!(d.answer(&k).unwrap(), None, "one of two seen");
        assert!(d.first_copy(&tag(1), "t:0-2"));
        assert!(d.first_copy(&tag(1), "t:0-2"), "the same record again");
        assert!(!d.first_copy(&tag(0), "t:0-3"), "a copy");
        assert!(!d.first_copy(&tag(1), "t:0-4"), "a copy");
        assert_eq!(
            d.answer(&k).unwrap(),
            Some(vec!["t:0-1".to_string(), "t:0-2".to_string()])
        );
        assert_eq!(d.first_id(&k, 1).as_deref(), Some("t:0-2"));
        assert!(matches!(
            d.answer(&key("k", "other")),
            Err(BusError::KeyReused(_))
        ));
    }
}
