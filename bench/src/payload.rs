//! The payload of a bench event: `<seq> <unix-micros> ` padded with `x` to
//! the requested size. Digits, spaces and `x` only, so it can go into a JSON
//! string, a URL-free body or an SSE `data:` line as it is; the stream side
//! reads it back with [`crate::scan::Scanner`].

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the clock publishers stamp events
/// with and subscribers compare against (same machine, same clock).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Appends the payload of event `seq`, sent at `micros`, to `out`.
pub fn write(out: &mut String, seq: u64, micros: u64, size: usize) {
    let start = out.len();
    let _ = write!(out, "{seq} {micros} ");
    let len = out.len() - start;
    out.extend(std::iter::repeat_n('x', size.saturating_sub(len)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::Scanner;

    #[test]
    fn padded_and_read_back() {
        let mut p = String::new();
        write(&mut p, 42, 1_700_000_000_123_456, 100);
        assert_eq!(p.len(), 100);
        assert!(p.starts_with("42 1700000000123456 xx"));
        let mut short = String::new();
        write(&mut short, 1, 2, 0);
        assert_eq!(short, "1 2 ");

        let line = format!("data: {p}\n\n");
        let mut got = Vec::new();
        Scanner::default()
            .feed(line.as_bytes(), |s, m| got.push((s, m)))
            .unwrap();
        assert_eq!(got, [(42, 1_700_000_000_123_456)]);
    }
}
