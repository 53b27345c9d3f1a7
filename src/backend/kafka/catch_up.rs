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
use crate::backend::{CatchUp, StoredEvent};
use crate::id::Position;

/// Events per page sent to the stream.
const PAGE: usize = 500;

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
            // A resume point no longer in the log is a gap, never a silent
            // jump.
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

    async fn read(
        &self,
        consumer: &Arc<StreamConsumer<Context>>,
        after: Position,
        until: Position,
        tx: &mpsc::Sender<CatchUp>,
    ) -> Option<CatchUp> {
        let (topic, partition, timeout) = (self.topic, self.partition, self.opts.timeout);
        let c = consumer.clone();
        let owned = topic.to_owned();
        let low =
            tokio::task::spawn_blocking(move || c.fetch_watermarks(&owned, partition, timeout))
                .await;
        match low {
            Ok(Ok((low, _))) if (after.lo as i64) < low => return Some(CatchUp::Gap),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Some(CatchUp::Failed(e.to_string())),
            Err(e) => return Some(CatchUp::Failed(e.to_string())),
        }
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl
            .add_partition_offset(topic, partition, Offset::Offset(after.lo as i64))
            .and_then(|()| consumer.assign(&tpl))
        {
            return Some(CatchUp::Failed(e.to_string()));
        }
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
                        return None; // the client left
                    }
                    let wait = timeout.saturating_sub(last_progress.elapsed());
                    tokio::select! {
                        m = tokio::time::timeout(wait.max(Duration::from_millis(1)), consumer.recv()) => match m {
                            Ok(m) => m,
                            Err(_) => return Some(CatchUp::Failed(format!(
                                "Kafka gave no records within {timeout:?}"
                            ))),
                        },
                        _ = tx.closed() => return None,
                    }
                }
            };
            let m = match next {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => break,
                Err(e) if is_out_of_range(&e) => return Some(CatchUp::Gap),
                // Stop fetching before the broker comes back: it may no
                // longer know the topic (see the module doc of `kafka`).
                Err(e) if super::brokers_lost(&e) => return Some(CatchUp::Failed(e.to_string())),
                Err(e) => {
                    tracing::debug!(error = %e, "kafka catch-up consumer error");
                    if last_progress.elapsed() >= timeout {
                        return Some(CatchUp::Failed(e.to_string()));
                    }
                    continue;
                }
            };
            last_progress = tokio::time::Instant::now();
            let pos = position(m.partition(), m.offset());
            if pos > until {
                break;
            }
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
                return None;
            }
        }
        if !page.is_empty() && tx.send(CatchUp::Events(page)).await.is_err() {
            return None;
        }
        None
    }
}

fn is_out_of_range(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
    )
}
