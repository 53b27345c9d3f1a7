//! The bodies of Streamline's fuzz targets, as plain functions: cargo-fuzz
//! runs them under libFuzzer (`fuzz_targets/`, nightly), and the main test
//! suite runs them on stable over the corpus and random inputs
//! (`tests/fuzz_smoke.rs` includes this file). Each panics on a broken
//! invariant, not only on a crash.

use http::{HeaderMap, HeaderValue, Method};
use streamline::control::events::parse_batch;
use streamline::id::Cursor;
use streamline::sse;
use streamline::stream::request::{ParseLimits, parse_with};
use streamline::topic;

/// `PATCH /events` bodies: any bytes; an accepted batch holds only valid
/// topics and event names, and no payload can end its SSE frame early.
pub fn patch_body(data: &[u8]) {
    let Ok(events) = parse_batch(data) else {
        return;
    };
    assert!(!events.is_empty());
    for ev in &events {
        topic::validate(&ev.topic, topic::MAX_TOPIC_LEN).expect("a valid topic");
        if let Some(name) = &ev.event {
            assert!(!name.is_empty() && name.len() <= sse::MAX_EVENT_NAME);
            assert!(!name.contains(['\r', '\n']) && !name.starts_with(sse::RESERVED_PREFIX));
        }
        let frame = sse::encode_event("t:1-1", ev.event.as_deref(), &ev.data);
        let bytes = frame.bytes();
        assert!(bytes.ends_with(b"\n\n"));
        let blank_lines = bytes.windows(2).filter(|w| w == b"\n\n").count();
        assert_eq!(blank_lines, 1, "a payload ended its event early");
        assert!(!bytes.contains(&b'\r'));
    }
}

/// `Last-Event-ID` values: whatever parses prints back to an equivalent,
/// never longer cursor.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = Cursor::parse(text) else {
        return;
    };
    let printed = c.to_string();
    assert!(printed.len() <= text.len(), "{printed:?} from {text:?}");
    assert_eq!(Cursor::parse(&printed).as_ref(), Ok(&c));
}

/// Stream requests: the query string up to the first newline, then a
/// `Last-Event-ID` header; an accepted request has 1..=max distinct valid
/// topics of at most the configured length.
pub fn stream_query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (query, id) = text.split_once('\n').unwrap_or((&text, ""));
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(id)
        && !id.is_empty()
    {
        headers.insert("last-event-id", v);
    }
    let limits = ParseLimits {
        max_topics: 4,
        max_topic_len: 16,
    };
    let Ok(req) = parse_with(&Method::GET, "/stream", Some(query), &headers, limits) else {
        return;
    };
    assert!(!req.topics.is_empty() && req.topics.len() <= limits.max_topics);
    for (i, t) in req.topics.iter().enumerate() {
        topic::validate(t, limits.max_topic_len).expect("a valid topic");
        assert!(!req.topics[..i].contains(t), "duplicate topic {t:?}");
    }
    if let Some(resume) = req.resume {
        assert_eq!(Cursor::parse(&resume.to_string()), Ok(resume));
    }
}
