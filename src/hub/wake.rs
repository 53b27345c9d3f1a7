//! Coalesced wake-ups: the streams of the rings published to during one
//! pass of a runtime worker are woken once, after the pass, rather than once
//! per publish.
//!
//! Why: the control plane publishes on a runtime of its own, so waking a
//! stream crosses to the stream runtime, whose worker has usually parked by
//! the next `PATCH`: one futex wake (and a context switch on each side) per
//! request, which cost a third of single-event ingest. Deferred to the end
//! of the worker's pass (`yield_now` runs after the tasks already ready, or
//! after at most tokio's event interval of them), the `PATCH`es answered in
//! one pass wake a topic's streams once, and each stream writes their events
//! in one `writev`. An idle control plane flushes at once: a lone publish is
//! not delayed.
//!
//! Off unless [`super::Hub::coalesce_wakes`] was called, and a publish made
//! outside a tokio runtime wakes at once.

use std::sync::atomic::{
    AtomicBool,
    Ordering::{AcqRel, Relaxed},
};
use std::sync::{Arc, Mutex};

use super::ring::Ring;

/// Rings published to whose streams are not woken yet.
#[derive(Default)]
pub(super) struct Wakes {
    enabled: AtomicBool,
    /// Each ring at most once (its `wake_queued` flag), so the list is
    /// bounded by the number of topics.
    pending: Mutex<Vec<Arc<Ring>>>,
    /// A flush task is spawned and has not taken `pending` yet.
    scheduled: AtomicBool,
}

impl Wakes {
    pub(super) fn enable(&self) {
        self.enabled.store(true, Relaxed);
    }

    /// Wakes `ring`'s streams: at once, or after this worker's pass.
    pub(super) fn wake(self: &Arc<Self>, ring: Arc<Ring>) {
        // Set before serving: nothing to order with it.
        if !self.enabled.load(Relaxed) {
            return ring.notify();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return ring.notify();
        };
        // Queued already, and not yet taken by a flush (which clears the
        // flag with a swap, so it sees this publish's event).
        if ring.wake_queued.swap(true, AcqRel) {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ring);
        if !self.scheduled.swap(true, AcqRel) {
            let flush = Flush(Arc::clone(self));
            runtime.spawn(async move {
                tokio::task::yield_now().await;
                drop(flush);
            });
        }
    }

    fn flush(&self) {
        // Cleared before the take: a ring queued after it schedules a flush
        // of its own.
        self.scheduled.swap(false, AcqRel);
        let rings = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for ring in rings {
            ring.wake_queued.swap(false, AcqRel);
            ring.notify();
        }
    }
}

/// Flushes when dropped: after the yield, or when the runtime drops the
/// task unrun (shutting down), so no publish is left unwoken and no later
/// one finds a flush scheduled that never comes.
struct Flush(Arc<Wakes>);

impl Drop for Flush {
    fn drop(&mut self) {
        self.0.flush();
    }
}
