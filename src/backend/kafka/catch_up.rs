//! A catch-up reader: one stream's short-lived consumer that reads one
//! partition back from Kafka, from a resume point older than the ring up to
//! where the ring starts, and hands pages to the stream through its bounded
//! channel. It ends when done, when the stream leaves (the channel closes),
//! or when Kafka gives nothing for `--kafka-timeout`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::idempotency::Dedup;
use super::{Apply, Context, KafkaOptions, KafkaStats, decode, first_copy, position};
use crate::hub::{CatchUp, StoredEvent};
use crate::id::Position;

/// Events per page sent to the stream.
const PAGE: usize = 500;
/// Times a read goes on from the log's new start when the retention passes
/// it while it reads, before it gives up with a gap.
const RETRIMS: usize = 3;

/// How a read from one point ended.
enum Read {
    /// With this final message, if any.
    Done(Option<CatchUp>),
    /// The log no longer holds the record after this position.
    OutOfRange(Position),
}

/// Where the records deleted from the partition end, when that is past
/// `after`: the position of the log's first record less one (its low
/// watermark), at most `until`.
fn trimmed(after: Position, until: Position, low: i64) -> Option<Position> {
    let low = low.max(0) as u64;
    (after.lo < low).then(|| Position::new(after.hi, low.min(until.lo)))
}

pub(super) struct Reader<'a> {
    pub opts: &'a KafkaOptions,
    pub stats: &'a KafkaStats,
    /// Copies of keyed records are dropped here as in the live consumer.
    pub dedup: &'a Dedup,
    pub topic: &'a str,
    /// The SSE topic the Kafka topic feeds (event ids carry it).
    pub sse: &'a str,
    pub partition: i32,
}

impl Reader<'_> {
    /// Sends pages of the records in `(after, until]` (positions: the offset
    /// after each record); returns a final message, if any.
    pub async fn run(
        &self,
        after: Position,
        until: Position,
        tx: &mpsc::Sender<CatchUp>,
    ) -> Option<CatchUp> {
        if after.lo >= until.lo {
            return None;
        }
        let consumer: Arc<StreamConsumer<Context>> = match self
            .opts
            .client_config()
            .set(
                "group.id",
                format!("streamline-{}-catch-up", self.opts.replica_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A point no longer in the log is told (`Read::OutOfRange`),
            // never jumped over in silence.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            .apply(&self.opts.config)
            .create_with_context(Context::default())
        {
            Ok(c) => Arc::new(c),
            Err(e) => return Some(CatchUp::Failed(e.to_string())),
        };
        let result = self.read(&consumer, after, until, tx).await;
        // Closing a consumer blocks briefly: not on the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        result
    }

    /// Reads from `after`; when the retention passes the point being read
    /// while reading, from the new start of the log (a few times at most).
    async fn read(
        &self,
        consumer: &Arc<StreamConsumer<Context>>,
        mut after: Position,
        until: Position,
        tx: &mpsc::Sender<CatchUp>,
    ) -> Option<CatchUp> {
        for _ in 0..RETRIMS {
            match self.read_from(consumer, after, until, tx).await {
                Read::Done(last) => return last,
                Read::OutOfRange(at) => after = at,
            }
        }
        Some(CatchUp::Gap)
    }

    async fn read_from(
        &self,
        consumer: &Arc<StreamConsumer<Context>>,
        after: Position,
        until: Position,
        tx: &mpsc::Sender<CatchUp>,
    ) -> Read {
        use Read::Done;
        let (topic, partition, timeout) = (self.topic, self.partition, self.opts.timeout);
        let c = consumer.clone();
        let owned = topic.to_owned();
        let low =
            tokio::task::spawn_blocking(move || c.fetch_watermarks(&owned, partition, timeout))
                .await;
        let from = match low {
            Ok(Ok((low, _))) => match trimmed(after, until, low) {
                None => after,
                Some(upto) => {
                    // Retention passed the resume point: the notice, then
                    // every record Kafka still has (none when it passed the
                    // ring's start too: the ring follows).
                    if tx.send(CatchUp::Trimmed(upto)).await.is_err() || upto >= until {
                        return Done(None);
                    }
                    upto
                }
            },
            Ok(Err(e)) => return Done(Some(CatchUp::Failed(e.to_string()))),
            Err(e) => return Done(Some(CatchUp::Failed(e.to_string()))),
        };
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl
            .add_partition_offset(topic, partition, Offset::Offset(from.lo as i64))
            .and_then(|()| consumer.assign(&tpl))
        {
            return Done(Some(CatchUp::Failed(e.to_string())));
        }
        // The last position sent (or about to be), to go on from.
        let mut last = from;
        let mut page = Vec::new();
        let mut last_progress = tokio::time::Instant::now();
        loop {
            // Take what is ready; send the page before waiting for more.
            let next = match consumer.recv().now_or_never() {
                Some(m) => m,
                None => {
                    if !page.is_empty()
                        && tx
                            .send(CatchUp::Events(std::mem::take(&mut page)))
                            .await
                            .is_err()
                    {
                        return Done(None); // the client left
                    }
                    let wait = timeout.saturating_sub(last_progress.elapsed());
                    tokio::select! {
                        m = tokio::time::timeout(wait.max(Duration::from_millis(1)), consumer.recv()) => match m {
                            Ok(m) => m,
                            Err(_) => return Done(Some(CatchUp::Failed(format!(
                                "Kafka gave no records within {timeout:?}"
                            )))),
                        },
                        _ = tx.closed() => return Done(None),
                    }
                }
            };
            let m = match next {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => break,
                // Retention passed the point being read: go on from the
                // log's new start, after the records already paged.
                Err(e) if is_out_of_range(&e) => {
                    if !page.is_empty() && tx.send(CatchUp::Events(page)).await.is_err() {
                        return Done(None);
                    }
                    return Read::OutOfRange(last);
                }
                // Stop fetching before the broker comes back: it may no
                // longer know the topic (see the module doc of `kafka`).
                Err(e) if super::brokers_lost(&e) => {
                    return Done(Some(CatchUp::Failed(e.to_string())));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "kafka catch-up consumer error");
                    if last_progress.elapsed() >= timeout {
                        return Done(Some(CatchUp::Failed(e.to_string())));
                    }
                    continue;
                }
            };
            last_progress = tokio::time::Instant::now();
            let pos = position(m.partition(), m.offset());
            if pos > until {
                break;
            }
            last = pos;
            if !first_copy(self.dedup, &m, &pos.id_in(self.sse)) {
                self.stats.duplicates_dropped.fetch_add(1, Relaxed);
            } else if let Some((event, data)) = decode(&m, &self.opts.event_header) {
                // A record that is not an event is skipped here too, but
                // counted only by the shared consumer, which reads every
                // record once.
                page.push(StoredEvent {
                    pos,
                    event: event.map(str::to_owned),
                    data: data.to_owned(),
                });
            }
            if pos == until {
                break;
            }
            if page.len() >= PAGE
                && tx
                    .send(CatchUp::Events(std::mem::take(&mut page)))
                    .await
                    .is_err()
            {
                return Done(None);
            }
        }
        if !page.is_empty() && tx.send(CatchUp::Events(page)).await.is_err() {
            return Done(None);
        }
        Done(None)
    }
}

fn is_out_of_range(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Decided here, not against a broker: Tansu 0.6.0 (the tests' broker)
    // applies no retention, and its DeleteRecords handler panics and drops
    // the connection, so its low watermark never moves.
    #[test]
    fn a_resume_point_below_the_low_watermark_is_trimmed_up_to_it() {
        let (after, until) = (Position::new(2, 10), Position::new(2, 50));
        // Offsets 0..20 deleted: records from offset 20 (position 21) on.
        assert_eq!(trimmed(after, until, 20), Some(Position::new(2, 20)));
        // Nothing deleted past the resume point.
        assert_eq!(trimmed(after, until, 10), None);
        assert_eq!(trimmed(after, until, 0), None);
        assert_eq!(trimmed(after, until, -1), None);
        // Deleted past the ring's start too: nothing left to read back.
        assert_eq!(trimmed(after, until, 70), Some(until));
    }
}
