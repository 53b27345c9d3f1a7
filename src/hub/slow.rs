//! The slow-client policy, in one place: how far behind a stream is, when
//! that is too far, what happens then, and the counting of it.
//!
//! A stream's *lag* on one ring is the number of the ring's events after
//! the last one it wrote, up to a reference ordinal ([`events_behind`]).
//! Two readings use that one formula with different ends:
//!
//! - what `/clients`, `/stats` and `/metrics` show (`Hub::lag_of`): up to
//!   the ring's head, from the stream's cursor — everything unwritten now,
//!   resumed history included;
//! - what the rule judges ([`SlowClients::judge`]): up to the ring's *lag
//!   mark* (its head at the previous lag sample, so every event counted has
//!   waited at least one [`LAG_SAMPLE`]), from the stream's lag base (its
//!   cursor, or where it joined while it still reads older history). A
//!   burst of any size written within an interval is never lag, and a
//!   resume from deep in the history is not judged slow before it could
//!   read anything.
//!
//! A stream more than `max_lag` events behind by the second reading — or,
//! in memory, one whose unread events were evicted — is *slow*: under
//! [`SlowClientPolicy::Disconnect`] it is closed (reason `slow`), by the lag
//! sampler (a stream that stopped reading is never polled, so it cannot
//! notice its own lag) or by the stream itself, whichever comes first;
//! under [`SlowClientPolicy::Skip`] it jumps to live with a gap notice when
//! it next reads. Each is counted once, here.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Totals;
use super::client::Client;
use crate::sse::CloseReason;

/// How often each ring's head is sampled for the lag rule.
pub const LAG_SAMPLE: Duration = Duration::from_secs(1);

/// What a stream does when it falls more than `max_lag` events behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowClientPolicy {
    /// End the stream with a `streamline.close` notice (reason `slow`); the
    /// client resumes from history when it reconnects.
    Disconnect,
    /// Jump to the live position with a `streamline.gap` notice (reason `slow`).
    Skip,
}

/// The lag formula: how many of a ring's events after ordinal `written`
/// (the last one a stream wrote) are at or before ordinal `upto`.
pub fn events_behind(upto: u64, written: u64) -> u64 {
    upto.saturating_sub(written)
}

/// What the rule decides for one stream on one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not behind: it goes on (and pins what it still has to write).
    Keep,
    /// Behind, under `skip`: it jumps to live when it next reads.
    Skip,
    /// Behind, under `disconnect`: it is closed.
    Disconnect,
}

/// The rule as configured (`--slow-client-policy`, `--max-lag`).
#[derive(Debug, Clone, Copy)]
pub struct SlowClients {
    pub policy: SlowClientPolicy,
    pub max_lag: u64,
}

impl SlowClients {
    /// The policy's verdict on a stream that is slow.
    pub fn slow(&self) -> Verdict {
        match self.policy {
            SlowClientPolicy::Disconnect => Verdict::Disconnect,
            SlowClientPolicy::Skip => Verdict::Skip,
        }
    }

    /// Judges a stream whose lag is measured from `base` (see
    /// [`Client::lag_base`]) on a ring whose lag mark is `mark`.
    pub fn judge(&self, mark: u64, base: u64) -> Verdict {
        if events_behind(mark, base) > self.max_lag {
            self.slow()
        } else {
            Verdict::Keep
        }
    }
}

/// Closes a slow stream (reason `slow`) and counts it, unless it was
/// closing already. True when this call closed it.
pub fn disconnect(client: &Client, totals: &Totals) -> bool {
    let closed = client.close(CloseReason::Slow);
    if closed {
        totals.slow_disconnected.fetch_add(1, Relaxed);
    }
    closed
}

/// Counts a slow stream that jumps to live (the stream writes the gap
/// notice itself).
pub fn count_skip(totals: &Totals) {
    totals.slow_skipped.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_more_than_max_lag_events_before_the_mark_are_slow() {
        let rule = SlowClients {
            policy: SlowClientPolicy::Disconnect,
            max_lag: 9,
        };
        assert_eq!(rule.judge(10, 0), Verdict::Disconnect);
        assert_eq!(rule.judge(9, 0), Verdict::Keep);
        // A base past the mark (a stream that wrote events published since
        // the sample) is not behind at all.
        assert_eq!(rule.judge(10, 12), Verdict::Keep);
        let skip = SlowClients {
            policy: SlowClientPolicy::Skip,
            ..rule
        };
        assert_eq!(skip.judge(10, 0), Verdict::Skip);
        assert_eq!(events_behind(5, 7), 0);
    }
}
