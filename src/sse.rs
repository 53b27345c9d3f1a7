//! The SSE wire format (WHATWG EventSource): how an event, a comment or a
//! notice becomes bytes.
//!
//! An event's frame is built once, when it is published, and shared by every
//! subscriber as a reference-counted [`Bytes`]. The frame starts with its `id:`
//! line; [`Frame::body`] is the rest, so a multi-topic stream can write its own
//! composite id line followed by the shared body, still without copying it.
//!
//! Payload line breaks (LF, CR or CRLF) become separate `data:` lines, so no
//! payload can inject a field or end an event early. Ids and event names never
//! contain CR or LF (the callers validate them, event names from outside with
//! [`check_event_name`]; [`encode_event`] asserts it in debug builds).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// The event name of the notices Streamline itself sends.
pub const GAP_EVENT: &str = "streamline.gap";
pub const CLOSE_EVENT: &str = "streamline.close";

/// Longest event name a publisher (or a bus record) may give, in bytes.
pub const MAX_EVENT_NAME: usize = 128;

/// Event names of this prefix are the gateway's own ([`GAP_EVENT`], …), so
/// a publisher cannot forge a notice.
pub const RESERVED_PREFIX: &str = "streamline.";

/// Why an event name from outside cannot go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("longer than {MAX_EVENT_NAME} bytes")]
    TooLong,
    #[error("must not contain CR or LF")]
    LineBreak,
    #[error("names starting with {RESERVED_PREFIX:?} are reserved for the gateway's notices")]
    Reserved,
}

/// The one check of an event name that comes from outside the gateway (a
/// `PATCH /events` event, a Kafka record's header): at most
/// [`MAX_EVENT_NAME`] bytes, no CR or LF, not [`RESERVED_PREFIX`]. An empty
/// name passes: it means no name (the event is a `message`).
pub fn check_event_name(name: &str) -> Result<(), EventNameError> {
    if name.len() > MAX_EVENT_NAME {
        Err(EventNameError::TooLong)
    } else if has_line_break(name) {
        Err(EventNameError::LineBreak)
    } else if name.starts_with(RESERVED_PREFIX) {
        Err(EventNameError::Reserved)
    } else {
        Ok(())
    }
}

/// A heartbeat: an SSE comment, ignored by EventSource, that keeps proxies
/// from timing out an idle stream.
pub const HEARTBEAT: Bytes = Bytes::from_static(b":\n\n");

/// An encoded event: `id: …\n` followed by the event's fields and the blank
/// line that ends it.
///
/// It is kept as one HTTP/1.1 chunk too ([`Frame::chunk`]): the chunk-size
/// line, the frame, CRLF, in one buffer of which [`Frame::bytes`] is a
/// slice. An HTTP/1.1 stream then writes an event as one contiguous buffer,
/// framed once per event instead of once per stream.
#[derive(Clone)]
pub struct Frame {
    /// `<size in hex>\r\n<bytes>\r\n`.
    chunk: Bytes,
    bytes: Bytes,
    body_start: usize,
    /// What the encoder kept beside the bytes for filtering streams
    /// (Mercure: an update's topics and whether it is private), decoded
    /// once with the frame instead of once per stream.
    tag: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("bytes", &self.bytes)
            .field("tagged", &self.tag.is_some())
            .finish()
    }
}

impl Frame {
    /// The whole frame, id line included: what a single-topic stream writes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The frame as one HTTP/1.1 chunk (`Transfer-Encoding: chunked`):
    /// its size in hex, CRLF, the frame, CRLF.
    pub fn chunk(&self) -> &Bytes {
        &self.chunk
    }

    /// The frame without its id line.
    pub fn body(&self) -> Bytes {
        self.bytes.slice(self.body_start..)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The frame with `tag` kept beside it (see [`Frame::tag`]).
    pub fn with_tag(mut self, tag: Arc<dyn Any + Send + Sync>) -> Self {
        self.tag = Some(tag);
        self
    }

    /// What its encoder kept beside the bytes, if anything.
    pub fn tag(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.tag.as_ref()
    }
}

fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| b == b'\n' || b == b'\r')
}

/// Encodes one event. `id` and `event` must not contain CR or LF.
pub fn encode_event(id: &str, event: Option<&str>, data: &str) -> Frame {
    encode_event_with_retry(id, event, None, data)
}

/// [`encode_event`] with a `retry:` field (milliseconds) after the event
/// name, for protocols whose events carry one (Mercure).
pub fn encode_event_with_retry(
    id: &str,
    event: Option<&str>,
    retry: Option<u64>,
    data: &str,
) -> Frame {
    debug_assert!(!has_line_break(id));
    debug_assert!(!event.is_some_and(has_line_break));
    // Room before the frame for its chunk-size line, written once the
    // frame's length is known.
    let mut buf = BytesMut::with_capacity(MAX_SIZE_LINE + id.len() + data.len() + 50);
    buf.put_bytes(0, MAX_SIZE_LINE);
    buf.put_slice(b"id: ");
    buf.put_slice(id.as_bytes());
    buf.put_u8(b'\n');
    let body_start = buf.len() - MAX_SIZE_LINE;
    if let Some(event) = event.filter(|e| !e.is_empty()) {
        buf.put_slice(b"event: ");
        buf.put_slice(event.as_bytes());
        buf.put_u8(b'\n');
    }
    if let Some(ms) = retry {
        buf.put_slice(format!("retry: {ms}\n").as_bytes());
    }
    put_data(&mut buf, data);
    buf.put_u8(b'\n');
    let len = buf.len() - MAX_SIZE_LINE;
    buf.put_slice(b"\r\n");
    let mut line = [0; MAX_SIZE_LINE];
    let line = size_line(len, &mut line);
    let start = MAX_SIZE_LINE - line.len();
    buf[start..MAX_SIZE_LINE].copy_from_slice(line);
    let all = buf.freeze();
    Frame {
        chunk: all.slice(start..),
        bytes: all.slice(MAX_SIZE_LINE..MAX_SIZE_LINE + len),
        body_start,
        tag: None,
    }
}

/// The longest chunk-size line: the hex digits of a `usize`, and CRLF.
pub const MAX_SIZE_LINE: usize = 2 * std::mem::size_of::<usize>() + 2;

/// The chunk-size line of an HTTP/1.1 chunk of `len` bytes (`len` in
/// upper-case hex without leading zeros, then CRLF), written into `out`.
pub fn size_line(len: usize, out: &mut [u8; MAX_SIZE_LINE]) -> &[u8] {
    // By hand: `write!` with `{:X}` cost about 150 instructions per chunk
    // (callgrind), a tenth of a write's user-space cost.
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, d) in out[..digits].iter_mut().enumerate() {
        *d = b"0123456789ABCDEF"[(len >> (4 * (digits - 1 - i))) & 0xF];
    }
    out[digits..digits + 2].copy_from_slice(b"\r\n");
    &out[..digits + 2]
}

/// Writes `data` as `data:` lines, splitting on LF, CR and CRLF.
fn put_data(buf: &mut BytesMut, data: &str) {
    let mut rest = data.as_bytes();
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        buf.put_slice(b"data: ");
        buf.put_slice(&rest[..end]);
        buf.put_u8(b'\n');
        if end == rest.len() {
            return;
        }
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
}

/// The `id:` line a multi-topic stream writes before a shared [`Frame::body`].
pub fn id_line(id: &str) -> Bytes {
    debug_assert!(!has_line_break(id));
    let mut buf = BytesMut::with_capacity(id.len() + 5);
    buf.put_slice(b"id: ");
    buf.put_slice(id.as_bytes());
    buf.put_u8(b'\n');
    buf.freeze()
}

/// The first bytes of every stream: the reconnection delay and a comment
/// carrying the client id (so a user can find their stream in `/clients`).
pub fn preamble(retry: Duration, client_id: &str) -> Bytes {
    Bytes::from(format!(
        "retry: {}\n: client {client_id}\n\n",
        retry.as_millis()
    ))
}

/// Why a stream missed events: the body of a [`GAP_EVENT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The resume point is older than the retained history.
    Expired,
    /// The resume point is not one this gateway knows: a position not yet
    /// reached (with a bus, such a point is skipped to instead).
    Unknown,
    /// In-memory only: the resume point was minted by another replica or an
    /// earlier run of this one. Without a shared bus (`--redis-url`,
    /// `--kafka-brokers`) replicas share no events, so the client missed
    /// whatever was published meanwhile.
    UnknownOrigin,
    /// The client fell too far behind and skipped ahead (`skip` policy).
    Slow,
    /// The bus's log behind the topic started again (a Kafka topic deleted
    /// and created again, or a broker that lost it): ids restart lower, and
    /// the stream goes on from the start of the new log.
    Reset,
}

/// Why the gateway ended a stream: the body of a [`CLOSE_EVENT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The gateway is shutting down; reconnect (to another replica).
    Shutdown,
    /// The client fell too far behind (`disconnect` policy); reconnect with
    /// `Last-Event-ID` to resume from history.
    Slow,
    /// An operator ended the stream (`DELETE /clients/{id}`).
    Kicked,
    /// History needed to resume could not be read from the backend;
    /// reconnect with the same `Last-Event-ID` to try again.
    Unavailable,
    /// The subscriber's token expired; reconnect with a fresh one.
    TokenExpired,
}

#[derive(Serialize)]
struct GapBody<'a> {
    topic: &'a str,
    reason: GapReason,
}

#[derive(Serialize)]
struct CloseBody {
    reason: CloseReason,
}

/// A `streamline.gap` notice: events on `topic` were missed; the stream goes
/// on from the live position. `id` is the stream's cursor after the jump, so a
/// reconnect does not report the same gap twice.
pub fn gap_notice(id: &str, topic: &str, reason: GapReason) -> Bytes {
    let data = serde_json::to_string(&GapBody { topic, reason }).unwrap_or_default();
    encode_event(id, Some(GAP_EVENT), &data).bytes
}

/// A `streamline.close` notice, with a `retry:` hint for the reconnect.
pub fn close_notice(reason: CloseReason, retry: Duration) -> Bytes {
    let data = serde_json::to_string(&CloseBody { reason }).unwrap_or_default();
    Bytes::from(format!(
        "retry: {}\nevent: {CLOSE_EVENT}\ndata: {data}\n\n",
        retry.as_millis()
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_names_are_checked_once_for_every_source() {
        assert_eq!(check_event_name(""), Ok(()));
        assert_eq!(check_event_name("price.update"), Ok(()));
        assert_eq!(check_event_name(&"x".repeat(MAX_EVENT_NAME)), Ok(()));
        let long = "x".repeat(MAX_EVENT_NAME + 1);
        assert_eq!(check_event_name(&long), Err(EventNameError::TooLong));
        for bad in ["a\nb", "a\rb", "a\r\n"] {
            assert_eq!(check_event_name(bad), Err(EventNameError::LineBreak));
        }
        for notice in [GAP_EVENT, CLOSE_EVENT, "streamline.x"] {
            assert_eq!(check_event_name(notice), Err(EventNameError::Reserved));
        }
    }

    /// One event as a spec-conformant EventSource parser dispatches it.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct Parsed {
        pub id: String,
        pub event: String,
        pub data: String,
    }

    /// The WHATWG "interpret an event stream" algorithm, for tests.
    pub fn parse_stream(input: &str) -> (Vec<Parsed>, Option<u64>) {
        let mut out = Vec::new();
        let (mut data, mut event, mut last_id, mut retry) =
            (String::new(), String::new(), String::new(), None);
        let mut lines = Vec::new();
        let mut rest = input;
        while let Some(i) = rest.find(['\r', '\n']) {
            lines.push(&rest[..i]);
            let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
            rest = &rest[i + skip..];
        }
        for line in lines {
            if line.is_empty() {
                if !data.is_empty() {
                    data.pop();
                    out.push(Parsed {
                        id: last_id.clone(),
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event.clone()
                        },
                        data: std::mem::take(&mut data),
                    });
                }
                data.clear();
                event.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "event" => event = value.to_owned(),
                "id" if !value.contains('\0') => last_id = value.to_owned(),
                "retry" => retry = value.parse().ok(),
                _ => {}
            }
        }
        (out, retry)
    }

    fn round_trip(id: &str, event: Option<&str>, data: &str) -> Vec<Parsed> {
        let frame = encode_event(id, event, data);
        let text = std::str::from_utf8(frame.bytes()).unwrap();
        parse_stream(text).0
    }

    #[test]
    fn encodes_fields_in_order() {
        let f = encode_event("t:1-2", Some("greet"), "hi");
        assert_eq!(&f.bytes()[..], b"id: t:1-2\nevent: greet\ndata: hi\n\n");
        assert_eq!(&f.body()[..], b"event: greet\ndata: hi\n\n");
    }

    /// What an HTTP/1.1 chunk of `frame` is, spelled out.
    fn chunk_of(frame: &[u8]) -> Vec<u8> {
        let mut want = format!("{:X}\r\n", frame.len()).into_bytes();
        want.extend_from_slice(frame);
        want.extend_from_slice(b"\r\n");
        want
    }

    #[test]
    fn a_frame_is_also_one_chunk() {
        let f = encode_event("t:1-2", Some("greet"), "hi");
        assert_eq!(
            &f.chunk()[..],
            b"21\r\nid: t:1-2\nevent: greet\ndata: hi\n\n\r\n"
        );
        // Across the one-, two- and three-digit sizes.
        for n in [0, 1, 4, 5, 200, 239, 240, 4000, 70_000] {
            let f = encode_event("1", None, &"x".repeat(n));
            assert_eq!(f.chunk()[..], chunk_of(f.bytes())[..], "data of {n} bytes");
        }
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let line = |len| size_line(len, &mut [0; MAX_SIZE_LINE]).to_vec();
        assert_eq!(line(1), b"1\r\n");
        assert_eq!(line(0xab), b"AB\r\n");
        assert_eq!(line(4096), b"1000\r\n");
        assert_eq!(line(usize::MAX), b"FFFFFFFFFFFFFFFF\r\n");
        for len in [0, 15, 16, 255, 256, 0xfff, 0x1000, 123_456_789, 1 << 63] {
            assert_eq!(line(len), format!("{len:X}\r\n").as_bytes());
        }
    }

    #[test]
    fn splits_every_kind_of_line_break() {
        let f = encode_event("1", None, "a\nb\rc\r\nd");
        assert_eq!(
            &f.bytes()[..],
            b"id: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        let parsed = round_trip("1", None, "a\nb\rc\r\nd");
        assert_eq!(parsed[0].data, "a\nb\nc\nd");
    }

    #[test]
    fn empty_and_non_ascii_data_survive() {
        assert_eq!(round_trip("1", None, "")[0].data, "");
        assert_eq!(round_trip("1", None, "héllo ✓ 🎉")[0].data, "héllo ✓ 🎉");
        assert_eq!(round_trip("1", None, "\n")[0].data, "\n");
        assert_eq!(round_trip("1", None, "  lead")[0].data, "  lead");
    }

    #[test]
    fn payload_cannot_inject_fields_or_events() {
        let evil = "x\n\nid: forged\nevent: admin\ndata: pwned\n\n";
        let parsed = round_trip("real", Some("msg"), evil);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].id, "real");
        assert_eq!(parsed[0].event, "msg");
        assert_eq!(
            parsed[0].data,
            "x\n\nid: forged\nevent: admin\ndata: pwned\n\n"
        );
    }

    #[test]
    fn notices_parse_as_documented() {
        let gap = gap_notice("a:1-5", "a", GapReason::Expired);
        let (ev, _) = parse_stream(std::str::from_utf8(&gap).unwrap());
        assert_eq!(ev[0].event, GAP_EVENT);
        assert_eq!(ev[0].id, "a:1-5");
        assert_eq!(ev[0].data, r#"{"topic":"a","reason":"expired"}"#);
        let close = close_notice(CloseReason::Shutdown, Duration::from_millis(1500));
        let (ev, retry) = parse_stream(std::str::from_utf8(&close).unwrap());
        assert_eq!(ev[0].event, CLOSE_EVENT);
        assert_eq!(ev[0].data, r#"{"reason":"shutdown"}"#);
        assert_eq!(retry, Some(1500));
        let (ev, retry) =
            parse_stream(std::str::from_utf8(&preamble(Duration::from_secs(2), "c1")).unwrap());
        assert!(ev.is_empty());
        assert_eq!(retry, Some(2000));
    }

    proptest! {
        #[test]
        fn any_payload_round_trips_exactly(
            data in "\\PC*|[a-z\r\n ]*",
            event in proptest::option::of("[a-zA-Z0-9._ -]{1,16}"),
            id in "[a-z]{1,8}:[0-9]{1,5}-[0-9]{1,5}",
        ) {
            let frame = encode_event(&id, event.as_deref(), &data);
            prop_assert_eq!(&frame.chunk()[..], &chunk_of(frame.bytes())[..]);
            let parsed = round_trip(&id, event.as_deref(), &data);
            // Normalise line breaks the way EventSource does.
            let expected = data.replace("\r\n", "\n").replace('\r', "\n");
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(&parsed[0].data, &expected);
            prop_assert_eq!(&parsed[0].id, &id);
            prop_assert_eq!(parsed[0].event.as_str(), event.as_deref().unwrap_or("message"));
        }

        #[test]
        fn notices_are_one_event_each_whatever_their_fields(
            topic in "[A-Za-z0-9._-]{1,20}",
            id in "[A-Za-z0-9._-]{1,10}:[0-9]{1,20}-[0-9]{1,20}",
            gap in prop::sample::select(vec![GapReason::Expired, GapReason::Unknown, GapReason::UnknownOrigin, GapReason::Slow]),
            close in prop::sample::select(vec![
                CloseReason::Shutdown,
                CloseReason::Slow,
                CloseReason::Kicked,
                CloseReason::Unavailable,
                CloseReason::TokenExpired,
            ]),
            retry_ms in 0u64..1_000_000,
        ) {
            let gap_bytes = gap_notice(&id, &topic, gap);
            let (ev, _) = parse_stream(std::str::from_utf8(&gap_bytes).unwrap());
            prop_assert_eq!(ev.len(), 1);
            prop_assert_eq!(&ev[0].id, &id);
            prop_assert_eq!(ev[0].event.as_str(), GAP_EVENT);
            let body: serde_json::Value = serde_json::from_str(&ev[0].data).unwrap();
            prop_assert_eq!(&body["topic"], topic.as_str());
            prop_assert_eq!(body["reason"].clone(), serde_json::to_value(gap).unwrap());

            let close_bytes = close_notice(close, Duration::from_millis(retry_ms));
            let (ev, retry) = parse_stream(std::str::from_utf8(&close_bytes).unwrap());
            prop_assert_eq!(ev.len(), 1);
            prop_assert_eq!(ev[0].id.as_str(), "", "a close notice carries no id");
            prop_assert_eq!(ev[0].event.as_str(), CLOSE_EVENT);
            prop_assert_eq!(retry, Some(retry_ms));
            let body: serde_json::Value = serde_json::from_str(&ev[0].data).unwrap();
            prop_assert_eq!(body, serde_json::json!({"reason": close}));
        }

        #[test]
        fn a_whole_stream_parses_to_exactly_its_events(
            events in proptest::collection::vec(
                ("\\PC{0,30}|[a-z\r\n]{0,10}", proptest::option::of("[a-z.]{1,8}")),
                0..8,
            ),
        ) {
            // Preamble, events with heartbeats between them, a close notice.
            let mut wire = preamble(Duration::from_secs(2), "c-1").to_vec();
            for (i, (data, event)) in events.iter().enumerate() {
                wire.extend_from_slice(encode_event(&format!("t:1-{i}"), event.as_deref(), data).bytes());
                wire.extend_from_slice(&HEARTBEAT);
            }
            wire.extend_from_slice(&close_notice(CloseReason::Shutdown, Duration::from_secs(1)));
            let (parsed, _) = parse_stream(std::str::from_utf8(&wire).unwrap());
            prop_assert_eq!(parsed.len(), events.len() + 1);
            for (i, ((data, event), got)) in events.iter().zip(&parsed).enumerate() {
                prop_assert_eq!(&got.id, &format!("t:1-{i}"));
                prop_assert_eq!(got.event.as_str(), event.as_deref().unwrap_or("message"));
                prop_assert_eq!(&got.data, &data.replace("\r\n", "\n").replace('\r', "\n"));
            }
            prop_assert_eq!(parsed.last().unwrap().event.as_str(), CLOSE_EVENT);
        }

        #[test]
        fn a_checked_event_name_cannot_break_the_frame(name in "(\\PC|\r|\n){0,140}") {
            if check_event_name(&name).is_ok() {
                let (parsed, _) = parse_stream(
                    std::str::from_utf8(encode_event("t:1-1", Some(&name), "x").bytes()).unwrap(),
                );
                prop_assert_eq!(parsed.len(), 1);
                let expected = if name.is_empty() { "message" } else { name.as_str() };
                prop_assert_eq!(parsed[0].event.as_str(), expected);
            }
        }

        #[test]
        fn body_is_the_frame_without_its_id(data in "\\PC{0,40}") {
            let f = encode_event("t:1-1", None, &data);
            let mut joined = id_line("t:1-1").to_vec();
            joined.extend_from_slice(&f.body());
            prop_assert_eq!(&joined[..], &f.bytes()[..]);
        }
    }
}
