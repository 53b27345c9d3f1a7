//! Safe retries of `PATCH /events`: the `Idempotency-Key` request header.
//!
//! A publisher that got no answer, or `504 publish_outcome_unknown`, cannot
//! know whether its events were published; it retries with the same key,
//! and every replica answers the retry with the ids of the first publish
//! instead of publishing again, for `--idempotency-window`. Where the key
//! is remembered depends on the bus: in Redis, atomically with the events
//! (a Lua script); with Kafka, in a header of every record, remembered by
//! every replica's consumer; in memory, in a [`Table`] of the hub.
//!
//! A key is tied to its request by a [`fingerprint`] of the checked events,
//! so the same key with a different batch is refused (422) rather than
//! answered with ids of other events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::hub::NewEvent;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A checked key and the fingerprint of the batch it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// 1 to [`MAX_KEY_LEN`] visible ASCII characters, without `"` or `\`
    /// (so it fits a Redis key, a Kafka header and a log line as it is).
    pub key: String,
    /// [`fingerprint`] of the batch.
    pub fingerprint: String,
}

impl IdempotencyKey {
    pub fn new(key: String, events: &[NewEvent]) -> Self {
        IdempotencyKey {
            key,
            fingerprint: fingerprint(events),
        }
    }
}

/// Reads the header: `None` when absent; 400 `invalid_idempotency_key` when
/// it is not 1–255 visible ASCII characters. The IETF draft's form, a
/// structured-field string (`"…"`), is accepted too and means its contents.
pub fn parse_header(value: Option<&HeaderValue>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key {why}: give 1 to {MAX_KEY_LEN} visible ASCII characters \
                 (no spaces, quotes or backslashes), e.g. a UUID"
            ),
        )
    };
    let raw = value.as_bytes();
    let raw = match raw {
        [b'"', inner @ .., b'"'] => inner,
        _ => raw,
    };
    if raw.is_empty() {
        return Err(bad("is empty"));
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(bad("is too long"));
    }
    if !raw
        .iter()
        .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(bad("has a character that is not allowed"));
    }
    // Checked above: ASCII.
    Ok(Some(String::from_utf8_lossy(raw).into_owned()))
}

/// A stable digest of a checked batch (the same on every replica and
/// version): SHA-256 over each event's topic, name and data, each
/// length-prefixed; the first 16 bytes, in hex.
pub fn fingerprint(events: &[NewEvent]) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for ev in events {
        field(ev.topic.as_bytes());
        match &ev.event {
            Some(name) => {
                field(b"1");
                field(name.as_bytes());
            }
            None => field(b"0"),
        }
        field(ev.data.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A key's answer: the fingerprint of its batch and the ids it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub fingerprint: String,
    pub ids: Vec<String>,
}

/// A bounded, expiring map from key to `V`: entries live `window` after
/// they were inserted, and past `capacity` the oldest go first (so the
/// guarantee is "the window, or the last `capacity` keys, whichever is
/// shorter"; sized for the expected keyed-publish rate times the window).
#[derive(Debug)]
pub struct Table<V> {
    window: Duration,
    capacity: usize,
    inner: Mutex<Entries<V>>,
}

#[derive(Debug)]
pub struct Entries<V> {
    window: Duration,
    capacity: usize,
    map: HashMap<String, V>,
    /// Insertion order; each key in `map` appears here exactly once (a key
    /// is inserted only while absent, and leaves the map only from here).
    order: VecDeque<(Instant, String)>,
    /// Entries dropped before their window ended, for the log.
    evicted_early: u64,
}

impl<V> Table<V> {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Table {
            window,
            capacity: capacity.max(1),
            inner: Mutex::new(Entries {
                window,
                capacity: capacity.max(1),
                map: HashMap::new(),
                order: VecDeque::new(),
                evicted_early: 0,
            }),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The table, locked, with expired entries gone. Hold it only in
    /// synchronous code (never across an await).
    pub fn lock(&self) -> MutexGuard<'_, Entries<V>> {
        let mut entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        entries.expire(Instant::now());
        entries
    }
}

impl<V> Entries<V> {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.window {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.map.remove(&key);
        }
    }

    /// Drops the oldest entries, before their window ends, until one more
    /// fits.
    fn make_room(&mut self) {
        while self.order.len() >= self.capacity {
            self.pop_oldest();
            self.evicted_early += 1;
            if self.evicted_early.is_power_of_two() {
                tracing::warn!(
                    capacity = self.capacity,
                    evicted = self.evicted_early,
                    "idempotency keys are forgotten before --idempotency-window ends; \
                     raise --idempotency-capacity"
                );
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.map.get(key)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    /// Inserts `value` under `key` unless the key is there already; returns
    /// the entry.
    pub fn get_or_insert_with(&mut self, key: &str, value: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(key) {
            self.make_room();
            self.order.push_back((Instant::now(), key.to_owned()));
        }
        self.map.entry(key.to_owned()).or_insert_with(value)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(topic: &str, event: Option<&str>, data: &str) -> NewEvent {
        NewEvent {
            topic: topic.into(),
            event: event.map(Into::into),
            data: data.into(),
        }
    }

    #[test]
    fn keys_are_checked() {
        let parse = |v: &'static [u8]| parse_header(Some(&HeaderValue::from_bytes(v).unwrap()));
        assert_eq!(parse_header(None).unwrap(), None);
        assert_eq!(parse(b"abc-123").unwrap().as_deref(), Some("abc-123"));
        assert_eq!(parse(b"\"abc\"").unwrap().as_deref(), Some("abc"));
        for bad in [&b""[..], b"\"\"", b"a b", b"a\\b", b"a\"b", b"\xc3\xa9"] {
            let e = parse_header(Some(&HeaderValue::from_bytes(bad).unwrap())).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.code),
                (400, "invalid_idempotency_key")
            );
        }
        let long = HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN + 1)).unwrap();
        assert!(parse_header(Some(&long)).is_err());
        let longest = HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN)).unwrap();
        assert!(parse_header(Some(&longest)).is_ok());
    }

    #[test]
    fn fingerprints_tell_batches_apart() {
        let a = fingerprint(&[ev("t", None, "1")]);
        assert_eq!(a.len(), 32);
        assert_eq!(a, fingerprint(&[ev("t", None, "1")]));
        for other in [
            vec![ev("t", None, "2")],
            vec![ev("u", None, "1")],
            vec![ev("t", Some("x"), "1")],
            vec![ev("t", None, "1"), ev("t", None, "1")],
            // Length prefixes: no ambiguity between fields.
            vec![ev("t", Some("1"), "")],
        ] {
            assert_ne!(a, fingerprint(&other), "{other:?}");
        }
    }

    #[test]
    fn entries_expire_and_the_table_is_bounded() {
        let table: Table<u32> = Table::new(Duration::from_secs(60), 2);
        {
            let mut t = table.lock();
            *t.get_or_insert_with("a", || 1) += 10;
            assert_eq!(*t.get_or_insert_with("a", || 99), 11);
            t.get_or_insert_with("b", || 2);
            t.get_or_insert_with("c", || 3);
            assert_eq!((t.len(), t.get("a")), (2, None), "the oldest goes first");
        }
        let short: Table<u32> = Table::new(Duration::ZERO, 10);
        short.lock().get_or_insert_with("a", || 1);
        assert!(short.lock().is_empty(), "expired");
    }
}
