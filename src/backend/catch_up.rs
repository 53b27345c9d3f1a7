//! A bus's history readers (`Bus::catch_up`), the part the backends
//! share.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;

use crate::hub::CatchUp;

/// A bus's history readers (`Bus::catch_up`), the part every backend
/// shares: each reader is a tracked task owned by one stream, reading at
/// most `--max-catch-up` at once, and handing pages over a bounded channel.
/// A reader waiting for its turn ends, unstarted, when its stream leaves.
pub(crate) struct CatchUpReaders {
    permits: Arc<Semaphore>,
    running: Arc<AtomicI64>,
    tracker: TaskTracker,
}

impl CatchUpReaders {
    /// At most `max` readers at once (at least one), spawned on `tracker`.
    pub(crate) fn new(max: usize, tracker: TaskTracker) -> Self {
        CatchUpReaders {
            permits: Arc::new(Semaphore::new(max.max(1))),
            running: Arc::default(),
            tracker,
        }
    }

    /// Starts one stream's reader and returns the stream's end of its
    /// channel. Once it is the reader's turn, `read` (the backend's own read
    /// call) sends pages on the sender it is given and returns a final
    /// message, if any, which is sent last. The reader ends when `read`
    /// does, and `read` should stop when a send fails (the stream left).
    pub(crate) fn spawn<R, F>(&self, read: R) -> mpsc::Receiver<CatchUp>
    where
        R: FnOnce(mpsc::Sender<CatchUp>) -> F + Send + 'static,
        F: Future<Output = Option<CatchUp>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let permits = self.permits.clone();
        let running = self.running.clone();
        self.tracker.spawn(async move {
            let Some(_permit) = turn(permits, &tx).await else {
                return;
            };
            running.fetch_add(1, Relaxed);
            let last = read(tx.clone()).await;
            running.fetch_sub(1, Relaxed);
            if let Some(last) = last {
                let _ = tx.send(last).await;
            }
        });
        rx
    }

    /// A turn among the readers for other reads a stream waits on (Kafka's
    /// `probe`), not counted as running; `None` if the stream leaves first.
    #[cfg(feature = "kafka")]
    pub(crate) async fn permit(&self, tx: &mpsc::Sender<CatchUp>) -> Option<OwnedSemaphorePermit> {
        turn(self.permits.clone(), tx).await
    }

    /// Readers reading now (not those waiting), for `/metrics`.
    pub(crate) fn running(&self) -> i64 {
        self.running.load(Relaxed)
    }
}

/// Waits for a permit, or for the receiver of `tx` to be dropped.
async fn turn(permits: Arc<Semaphore>, tx: &mpsc::Sender<CatchUp>) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        // A stream that left is never read for, even if a turn is free.
        biased;
        _ = tx.closed() => None,
        p = permits.acquire_owned() => p.ok(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[tokio::test]
    async fn readers_take_turns_and_one_whose_stream_left_never_reads() {
        let readers = CatchUpReaders::new(1, TaskTracker::new());
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        let mut first = readers.spawn(move |tx| async move {
            let _ = tx.send(CatchUp::Events(Vec::new())).await;
            let _ = hold.await;
            Some(CatchUp::Gap)
        });
        assert!(matches!(first.recv().await, Some(CatchUp::Events(_))));
        assert_eq!(readers.running(), 1);

        // Both wait for the only turn; the second's stream leaves first.
        let read = Arc::new(AtomicBool::new(false));
        let r = read.clone();
        drop(readers.spawn(move |_| async move {
            r.store(true, Relaxed);
            None
        }));
        let mut third = readers.spawn(|_| async { Some(CatchUp::Reset) });

        release.send(()).unwrap();
        assert!(matches!(first.recv().await, Some(CatchUp::Gap)));
        assert!(first.recv().await.is_none());
        assert!(matches!(third.recv().await, Some(CatchUp::Reset)));
        assert!(third.recv().await.is_none());
        readers.tracker.close();
        readers.tracker.wait().await;
        assert!(!read.load(Relaxed));
        assert_eq!(readers.running(), 0);
    }
}
