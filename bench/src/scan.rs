//! Reading an SSE response straight off the socket's bytes: the HTTP/1.1
//! response head, the chunked transfer coding, and the bench's events in the
//! `data:` lines.
//!
//! Both decoders are byte-level state machines: they keep a few integers
//! between reads, allocate nothing per event, and accept any split of a line
//! or a chunk across reads. Lines end at LF (CRLF works too; a bare CR does
//! not end a line here).

/// The parsed head of an HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub chunked: bool,
    /// `Content-Type: text/event-stream` (parameters allowed).
    pub event_stream: bool,
    /// Length of the head, blank line included: the body starts here.
    pub len: usize,
}

/// Longest response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Parses a response head from the start of `buf`: `Ok(None)` until the
/// blank line that ends it has arrived.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut chunked, mut event_stream) = (false, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let (name, value) = (name.trim(), value.trim().to_ascii_lowercase());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked |= value.contains("chunked");
        } else if name.eq_ignore_ascii_case("content-type") {
            event_stream = value
                .split(';')
                .next()
                .is_some_and(|t| t.trim() == "text/event-stream");
        }
    }
    Ok(Some(Head {
        status,
        chunked,
        event_stream,
        len: end + 4,
    }))
}

/// The chunked transfer coding, undone a slice at a time.
#[derive(Debug, Clone)]
pub struct Dechunk {
    state: Chunk,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size {
        value: u64,
        digits: u8,
    },
    /// Skipping a chunk extension, up to the LF.
    Ext {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    Done,
}

impl Default for Dechunk {
    fn default() -> Self {
        Dechunk {
            state: Chunk::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl Dechunk {
    /// Feeds `input`, handing each run of body bytes to `out`. Returns true
    /// once the last chunk has been read.
    pub fn feed<'a>(
        &mut self,
        input: &'a [u8],
        mut out: impl FnMut(&'a [u8]),
    ) -> Result<bool, String> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match &mut self.state {
                Chunk::Size { value, digits } => {
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if *digits >= 15 {
                                return Err("chunk size too large".into());
                            }
                            *value = *value * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
                            *digits += 1;
                        }
                        _ if *digits == 0 => return Err(format!("bad chunk size byte {b:#04x}")),
                        b'\n' => self.state = end_of_size(*value),
                        _ => self.state = Chunk::Ext { value: *value },
                    }
                    i += 1;
                }
                Chunk::Ext { value } => match input[i..].iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        self.state = end_of_size(*value);
                        i += p + 1;
                    }
                    None => i = input.len(),
                },
                Chunk::Data { left } => {
                    let n = (*left).min((input.len() - i) as u64) as usize;
                    out(&input[i..i + n]);
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = Chunk::DataCr;
                    }
                    i += n;
                }
                Chunk::DataCr => {
                    self.state = match b {
                        b'\r' => Chunk::DataLf,
                        b'\n' => Chunk::Size {
                            value: 0,
                            digits: 0,
                        },
                        _ => return Err("chunk not followed by CRLF".into()),
                    };
                    i += 1;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err("chunk not followed by CRLF".into());
                    }
                    self.state = Chunk::Size {
                        value: 0,
                        digits: 0,
                    };
                    i += 1;
                }
                Chunk::Done => return Ok(true),
            }
        }
        Ok(matches!(self.state, Chunk::Done))
    }
}

fn end_of_size(value: u64) -> Chunk {
    if value == 0 {
        // Trailers, if any, are not read: the stream is over.
        Chunk::Done
    } else {
        Chunk::Data { left: value }
    }
}

/// Longest `id:` value kept (the gateway's ids are a few dozen bytes).
pub const MAX_ID: usize = 1024;

/// Reads an event stream as `EventSource` does, as far as the bench needs:
/// finds the bench's events, the first `<seq> <unix-micros>` in a `data:`
/// line, and hands each over when its event is dispatched (the blank line
/// that ends it: an event cut off by a lost connection does not count, as
/// in a browser); keeps the last event id (`id:`, committed at dispatch,
/// resent as `Last-Event-ID` on reconnect) and the reconnection delay
/// (`retry:`).
///
/// The payload may stand alone (`data: 7 1700000000000000 xxx`) or sit
/// inside what the server made of it: a JSON string (`data: "7 1700… xxx"`)
/// or a JSON object wrapping the published event. Other fields and data
/// lines without a bench event (a server's notices) are skipped.
#[derive(Debug, Clone, Default)]
pub struct Scanner {
    state: Line,
    name: [u8; 8],
    name_len: u8,
    seq: u64,
    micros: u64,
    digits: u8,
    /// The bench event of the event being read, until its blank line.
    pending: Option<(u64, u64)>,
    /// The last `id:` value read, and whether it is newer than `last_id`.
    id_buf: Vec<u8>,
    id_dirty: bool,
    /// The last event id string: what a reconnect sends as `Last-Event-ID`.
    pub last_id: Vec<u8>,
    retry_value: u64,
    retry_ok: bool,
    /// The reconnection delay the server asked for, in milliseconds.
    pub retry_ms: Option<u64>,
    /// Data lines without a bench event (a server's notices, say).
    pub foreign: u64,
}

#[derive(Debug, Clone, Copy, Default)]
enum Line {
    /// At the start of a line.
    #[default]
    Start,
    /// After a CR at the start of a line (a CRLF blank line).
    StartCr,
    /// Reading a field name.
    Name,
    /// In a data line, looking for the first digit of a sequence number.
    Seek,
    Seq,
    Micros,
    /// In an `id:` value (`first`: a leading space is still to be dropped).
    Id {
        first: bool,
    },
    /// In a `retry:` value.
    Retry {
        first: bool,
    },
    /// Skipping to the end of the line.
    Skip,
}

/// Fewer digits than this cannot be a Unix time in microseconds (1970 plus
/// three hours); it keeps stray numbers from passing for an event.
const MIN_MICROS_DIGITS: u8 = 10;

impl Scanner {
    /// Starts reading a new connection's body: what was half read is
    /// dropped; the last event id and the reconnection delay are kept.
    pub fn reconnected(&mut self) {
        self.state = Line::Start;
        self.pending = None;
        self.id_dirty = false;
    }

    /// Feeds a run of body bytes; calls `event(seq, sent_micros)` for each
    /// bench event dispatched. Fails on an `id:` longer than [`MAX_ID`].
    pub fn feed(&mut self, input: &[u8], mut event: impl FnMut(u64, u64)) -> Result<(), String> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Line::Start => match b {
                    b'\n' => {
                        self.dispatch(&mut event);
                        i += 1;
                    }
                    b'\r' => {
                        self.state = Line::StartCr;
                        i += 1;
                    }
                    b':' => self.state = Line::Skip,
                    _ => {
                        self.name_len = 0;
                        self.state = Line::Name;
                    }
                },
                Line::StartCr => {
                    if b == b'\n' {
                        self.dispatch(&mut event);
                        i += 1;
                    }
                    self.state = Line::Start;
                }
                Line::Name => {
                    match b {
                        b':' => {
                            self.state = match &self.name[..self.name_len as usize] {
                                b"data" => Line::Seek,
                                b"id" => {
                                    self.id_buf.clear();
                                    Line::Id { first: true }
                                }
                                b"retry" => {
                                    self.retry_value = 0;
                                    self.retry_ok = true;
                                    self.digits = 0;
                                    Line::Retry { first: true }
                                }
                                _ => Line::Skip,
                            }
                        }
                        // A field without a value: nothing the bench uses.
                        b'\n' => self.state = Line::Start,
                        _ if (self.name_len as usize) < self.name.len() => {
                            self.name[self.name_len as usize] = b;
                            self.name_len += 1;
                        }
                        _ => self.state = Line::Skip,
                    }
                    i += 1;
                }
                Line::Id { first } => {
                    let rest = &input[i..];
                    let end = rest.iter().position(|&b| b == b'\n');
                    let mut value = &rest[..end.unwrap_or(rest.len())];
                    if first && !value.is_empty() {
                        value = value.strip_prefix(b" ").unwrap_or(value);
                        self.state = Line::Id { first: false };
                    }
                    if self.id_buf.len() + value.len() > MAX_ID {
                        return Err(format!("an id: longer than {MAX_ID} bytes"));
                    }
                    self.id_buf.extend_from_slice(value);
                    match end {
                        Some(p) => {
                            if self.id_buf.last() == Some(&b'\r') {
                                self.id_buf.pop();
                            }
                            self.id_dirty = true;
                            self.state = Line::Start;
                            i += p + 1;
                        }
                        None => i = input.len(),
                    }
                }
                Line::Retry { first } => {
                    match b {
                        b' ' if first => {}
                        b'0'..=b'9' => {
                            self.digits = self.digits.saturating_add(1);
                            self.retry_value = self
                                .retry_value
                                .saturating_mul(10)
                                .saturating_add((b - b'0') as u64);
                        }
                        b'\r' => {}
                        b'\n' => {
                            if self.retry_ok && self.digits > 0 {
                                self.retry_ms = Some(self.retry_value);
                            }
                            self.state = Line::Start;
                            i += 1;
                            continue;
                        }
                        _ => self.retry_ok = false,
                    }
                    self.state = Line::Retry { first: false };
                    i += 1;
                }
                Line::Seek => {
                    match input[i..]
                        .iter()
                        .position(|&b| b.is_ascii_digit() || b == b'\n')
                    {
                        Some(p) if input[i + p] == b'\n' => {
                            self.foreign += 1;
                            self.state = Line::Start;
                            i += p + 1;
                        }
                        Some(p) => {
                            self.seq = 0;
                            self.digits = 0;
                            self.state = Line::Seq;
                            i += p;
                        }
                        None => i = input.len(),
                    }
                }
                Line::Seq => match b {
                    b'0'..=b'9' if self.digits < 19 => {
                        self.seq = self.seq * 10 + (b - b'0') as u64;
                        self.digits += 1;
                        i += 1;
                    }
                    b' ' => {
                        self.micros = 0;
                        self.digits = 0;
                        self.state = Line::Micros;
                        i += 1;
                    }
                    _ => self.state = Line::Seek,
                },
                Line::Micros => match b {
                    b'0'..=b'9' if self.digits < 19 => {
                        self.micros = self.micros * 10 + (b - b'0') as u64;
                        self.digits += 1;
                        i += 1;
                    }
                    b' ' | b'"' | b'\r' | b'\n' | b',' | b'}'
                        if self.digits >= MIN_MICROS_DIGITS =>
                    {
                        if self.pending.is_none() {
                            self.pending = Some((self.seq, self.micros));
                        }
                        self.state = Line::Skip;
                    }
                    _ => self.state = Line::Seek,
                },
                Line::Skip => match input[i..].iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        self.state = Line::Start;
                        i += p + 1;
                    }
                    None => i = input.len(),
                },
            }
        }
        Ok(())
    }

    /// The blank line that ends an event: the id read becomes the last
    /// event id, and the event's bench payload (if any) is handed over.
    fn dispatch(&mut self, event: &mut impl FnMut(u64, u64)) {
        if self.id_dirty {
            // The buffer's old contents are never read: it is cleared at
            // the next `id:`, and committed only after one.
            std::mem::swap(&mut self.last_id, &mut self.id_buf);
            self.id_dirty = false;
        }
        if let Some((seq, micros)) = self.pending.take() {
            event(seq, micros);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events, foreign lines, last id and retry after feeding `parts`.
    fn scan_all(parts: &[&[u8]]) -> (Vec<(u64, u64)>, u64, String, Option<u64>) {
        let mut s = Scanner::default();
        let mut got = Vec::new();
        for p in parts {
            s.feed(p, |a, b| got.push((a, b))).unwrap();
        }
        let id = String::from_utf8(s.last_id.clone()).unwrap();
        (got, s.foreign, id, s.retry_ms)
    }

    const STREAM: &[u8] = b"retry: 2000\n: client x\n\nid: a:1\ndata: 7 1700000000000001 xxxx\n\n\
        event: streamline.close\ndata: {\"reason\":\"slow\"}\n\n:\n\ndata:8 1700000000000002\n\n\
        id:a:2\r\ndata: \"9 1700000000000003 xx\"\r\n\r\ndata: 10\n\ndata: 11 17 x\n\n\
        data: {\"topic\": \"bench-0\", \"data\": \"12 1700000000000004 xx\"}\n\nretry: 2x\n\n";

    #[test]
    fn finds_events_ids_and_retry_in_any_split() {
        let events = vec![
            (7, 1_700_000_000_000_001),
            (8, 1_700_000_000_000_002),
            (9, 1_700_000_000_000_003),
            (12, 1_700_000_000_000_004),
        ];
        let want = (events, 3, "a:2".to_owned(), Some(2000));
        assert_eq!(scan_all(&[STREAM]), want);
        for cut in 0..STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(scan_all(&[a, b]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(scan_all(&bytes), want);
    }

    #[test]
    fn an_event_cut_off_is_not_dispatched() {
        let mut s = Scanner::default();
        let mut got = Vec::new();
        let wire = b"id: t:1\ndata: 1 1700000000000001\n\nid: t:2\ndata: 2 1700000000000002\n";
        s.feed(wire, |a, _| got.push(a)).unwrap();
        assert_eq!(
            (got.as_slice(), s.last_id.as_slice()),
            (&[1][..], &b"t:1"[..])
        );
        // The connection is lost; the next one replays event 2.
        s.reconnected();
        s.feed(
            b"retry: 50\n\nid: t:2\ndata: 2 1700000000000002\n\n",
            |a, _| got.push(a),
        )
        .unwrap();
        assert_eq!(got, [1, 2]);
        assert_eq!((s.last_id.as_slice(), s.retry_ms), (&b"t:2"[..], Some(50)));
        // An empty id clears the last id.
        s.feed(b"id\nid:\n\n", |_, _| {}).unwrap();
        assert!(s.last_id.is_empty());
        let long = format!("id: {}\n", "x".repeat(MAX_ID + 1));
        assert!(s.feed(long.as_bytes(), |_, _| {}).is_err());
    }

    #[test]
    fn head_status_and_coding() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        assert_eq!(parse_head(&raw[..20]).unwrap(), None);
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!(
            (h.status, h.chunked, h.event_stream, &raw[h.len..]),
            (200, true, true, &b"rest"[..])
        );
        let h = parse_head(b"HTTP/1.0 503 Service Unavailable\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.chunked, h.event_stream), (503, false, false));
        let h = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(h.event_stream);
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.event_stream);
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn dechunks_across_any_split() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n1\r\n!\r\n0\r\n\r\n";
        for cut in 0..body.len() {
            let mut d = Dechunk::default();
            let mut out = Vec::new();
            let (a, b) = body.split_at(cut);
            let mut done = d.feed(a, |s| out.extend_from_slice(s)).unwrap();
            done |= d.feed(b, |s| out.extend_from_slice(s)).unwrap();
            assert!(done, "cut at {cut}");
            assert_eq!(out, b"hello, world!", "cut at {cut}");
        }
        assert!(Dechunk::default().feed(b"zz\r\n", |_| {}).is_err());
    }

    #[test]
    fn chunked_events_split_mid_line() {
        let mut d = Dechunk::default();
        let mut s = Scanner::default();
        let mut got = Vec::new();
        let wire = b"9\r\ndata: 3 1\r\n14\r\n700000000000000 xx\n\n\r\n";
        let done = d
            .feed(wire, |part| {
                s.feed(part, |a, b| got.push((a, b))).unwrap();
            })
            .unwrap();
        assert!(!done);
        assert_eq!(got, [(3, 1_700_000_000_000_000)]);
    }
}
