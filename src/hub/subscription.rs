//! A subscription: one stream's reader over its topics' rings, yielding the
//! bytes to write in order — preamble, resume notices, events, heartbeats
//! and, last, a close notice.
//!
//! It is polled by the stream plane's response body, on the connection's own
//! task: there is no per-stream task, queue or timer. Dropping it removes the
//! client from the hub at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::client::{Client, ClientMeta};
use super::ring::{Read, Resume, Ring};
use super::slow::{self, Verdict};
use super::{CatchUp, StoredEvent};
use super::{Hub, HubError};
use crate::id::{Cursor, Position};
use crate::sse::{self, CloseReason, GapReason};

/// Decides, per event, whether a stream writes it: what the event's
/// encoder kept beside its frame ([`sse::Frame::tag`]) against what the
/// stream asked for and may see. Runs on the stream's task.
pub trait Filter: Send + Sync + 'static {
    fn admits(&self, frame: &sse::Frame) -> bool;
}

/// The cursor a topic shows publishers while it is read back from the bus:
/// no lag, so a catching-up stream is never judged slow by the ring.
const CATCHING_UP: u64 = u64::MAX;

struct Sub {
    ring: Arc<Ring>,
    key: usize,
    /// Position of the last event written (or where the stream started).
    last: Position,
    /// With a bus: the client has seen up to here, further than this
    /// replica's ring has got; ring events up to it are skipped.
    skip_upto: Option<Position>,
    /// With a bus: reading history older than the ring back from the bus
    /// (or checking whether the bus's log was reset, [`Bus::probe`]).
    ///
    /// [`Bus::probe`]: super::Bus::probe
    catch_up: Option<CatchUpReader>,
    /// The ring's reset count this stream has caught up with.
    resets: u64,
}

struct CatchUpReader {
    rx: mpsc::Receiver<CatchUp>,
    buf: VecDeque<StoredEvent>,
}

/// What one topic has for the stream now.
enum Step {
    Chunk(Chunk),
    Nothing,
}

/// What to write next. A multi-topic stream writes its own id line before
/// the event's shared body.
#[derive(Debug)]
pub enum Chunk {
    One(Bytes),
    Two(Bytes, Bytes),
}

pub struct Subscription {
    hub: Arc<Hub>,
    client: Arc<Client>,
    subs: Box<[Sub]>,
    next: usize,
    heartbeat_seen: u64,
    /// The heartbeat tick at which the token's expiry was last checked.
    expiry_seen: u64,
    pending: VecDeque<Bytes>,
    ended: bool,
    /// Only the events it admits are written; no gap notices either.
    filter: Option<Arc<dyn Filter>>,
}

impl Subscription {
    pub(super) fn open(
        hub: Arc<Hub>,
        topics: &[String],
        resume: Option<&Cursor>,
        meta: ClientMeta,
        filter: Option<Arc<dyn Filter>>,
    ) -> Result<Subscription, HubError> {
        let bus = hub.bus().cloned();
        // With a bus, the rings of followed topics exist (`Hub::prepare`):
        // one per topic, or one per partition. In-memory, each topic's one
        // ring is created below, once the client is registered.
        let rings: Vec<Vec<Arc<Ring>>> = match &bus {
            None => Vec::new(),
            Some(_) => topics.iter().map(|name| hub.rings(name)).collect(),
        };
        let ring_count = match &bus {
            None => topics.len(),
            Some(_) => rings.iter().map(Vec::len).sum(),
        };
        let names: Box<[Arc<str>]> = topics.iter().map(|t| Arc::from(t.as_str())).collect();
        let client = Arc::new(Client::new(hub.new_client_id(), names, ring_count, meta));
        hub.register_client(client.clone())?;
        let mut pending = VecDeque::new();
        pending.push_back(sse::preamble(hub.config.retry, client.id()));
        let mut subs = Vec::with_capacity(ring_count);
        let mut gaps = Vec::new();
        let mut sub = Subscription {
            heartbeat_seen: hub.heartbeat_tick(),
            expiry_seen: hub.heartbeat_tick(),
            hub,
            client,
            subs: Box::new([]),
            next: 0,
            pending: VecDeque::new(),
            ended: false,
            filter,
        };
        for (t, name) in topics.iter().enumerate() {
            // Dropping `sub` on error deregisters the client and the topics
            // joined so far.
            let found = match &bus {
                None => sub.hub.topic_or_create(name).map(|t| vec![t]),
                Some(_) if rings[t].is_empty() => Err(HubError::NotFollowed(name.clone())),
                Some(_) => Ok(rings[t].clone()),
            };
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    sub.subs = subs.into_boxed_slice();
                    return Err(e);
                }
            };
            for ring in found {
                let index = subs.len();
                let (head, head_pos) = ring.head();
                let resets = ring.resets();
                let mut s = Sub {
                    ring,
                    key: 0,
                    last: head_pos,
                    skip_upto: None,
                    catch_up: None,
                    resets,
                };
                let mut ordinal = head;
                // A partition's entry is the one with its `hi`; a partition
                // missing from the cursor starts live.
                let seen = resume.and_then(|c| match s.ring.part() {
                    Some(part) => c.get_at(name, part),
                    None => c.get(name),
                });
                match seen {
                    None => {}
                    Some(pos) if bus.is_none() && pos.hi != sub.hub.epoch => {
                        sub.hub.note_unknown_origin();
                        gaps.push((index, GapReason::UnknownOrigin))
                    }
                    Some(pos) => match s.ring.locate(pos, &sub.hub.bounds()) {
                        Resume::At(o, p) => (ordinal, s.last) = (o, p),
                        Resume::Expired { floor, after } => match &bus {
                            Some(bus) => {
                                s.last = pos;
                                let rx = bus.catch_up(s.ring.key(), pos, floor);
                                s.catch_up = Some(CatchUpReader::new(rx));
                                ordinal = CATCHING_UP;
                            }
                            // The notice, then every event still retained.
                            None => {
                                (ordinal, s.last) = (after, floor);
                                gaps.push((index, GapReason::Expired));
                            }
                        },
                        Resume::Unknown => match &bus {
                            Some(bus) => {
                                // Not reached here yet — or from before the
                                // bus's log started again: the bus can tell.
                                (s.last, s.skip_upto) = (pos, Some(pos));
                                if let Some(rx) = bus.probe(s.ring.key(), pos) {
                                    s.catch_up = Some(CatchUpReader::new(rx));
                                    ordinal = CATCHING_UP;
                                }
                            }
                            None => gaps.push((index, GapReason::Unknown)),
                        },
                    },
                }
                // The cursor is set before the topic can see this subscriber, so
                // a publisher never judges its lag from a stale cursor.
                sub.client.set_cursor(index, ordinal);
                sub.client.set_joined_at(index, head);
                s.key = {
                    // Held so a sweep cannot forget the topic before we join it.
                    let _topics = sub.hub.read_topics();
                    s.ring.subscribe(sub.client.clone(), index)
                };
                subs.push(s);
            }
        }
        sub.subs = subs.into_boxed_slice();
        if sub.filter.is_some() {
            gaps.clear();
        }
        for (index, reason) in gaps {
            let id = sub.cursor_id();
            pending.push_back(sse::gap_notice(
                &id,
                &sub.subs[index].ring.name()[..],
                reason,
            ));
        }
        sub.pending = pending;
        Ok(sub)
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The stream's cursor: what its next `id:` line would carry.
    fn cursor_id(&self) -> String {
        let mut c = Cursor::new();
        for s in self.subs.iter() {
            c.push(s.ring.name(), s.last);
        }
        c.to_string()
    }

    /// The next thing to write, `None` once the stream has ended.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let mut registered = false;
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                self.client.count(0, bytes.len());
                return Poll::Ready(Some(Chunk::One(bytes)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            self.check_expiry();
            if let Some(reason) = self.client.close_reason() {
                self.ended = true;
                self.pending
                    .push_back(sse::close_notice(reason, self.hub.config.retry));
                continue;
            }
            if let Some(chunk) = self.next_event(cx) {
                return Poll::Ready(Some(chunk));
            }
            if !self.pending.is_empty() || self.client.close_reason().is_some() {
                continue;
            }
            let tick = self.hub.heartbeat_tick();
            if tick != self.heartbeat_seen {
                self.heartbeat_seen = tick;
                // Only idle streams need one: at 100,000 streams each
                // comment is a write, and every stream writing at the same
                // tick delayed the events behind them (PERFORMANCE.md).
                if self.client.idle_at(tick) {
                    self.client.count(0, sse::HEARTBEAT.len());
                    return Poll::Ready(Some(Chunk::One(sse::HEARTBEAT)));
                }
            }
            if registered {
                return Poll::Pending;
            }
            // Register, then look once more: a publish between the first
            // look and the registration would otherwise go unnoticed.
            self.client.register(cx.waker());
            registered = true;
        }
    }

    /// What [`poll_next`](Self::poll_next) would return next, one event at
    /// a time, for a stream of one ring that keeps up: up to `max` events
    /// ready now, read under one lock of the ring instead of one per event.
    /// Adds their bytes to `out` (with `chunks`, each one as an HTTP/1.1
    /// chunk of its own, [`sse::Frame::chunk`], framed when it was
    /// published) and returns how many. 0 when nothing is
    /// ready or something else comes first (a notice, the end, a reset,
    /// catch-up, history, lag): `poll_next` does that. Call `poll_next`
    /// after this in any case; only it registers the waker.
    pub fn take_ready(&mut self, max: usize, chunks: bool, out: &mut impl Extend<Bytes>) -> usize {
        let [sub] = &mut self.subs[..] else {
            return 0;
        };
        if !self.pending.is_empty()
            || self.ended
            || self.filter.is_some()
            || sub.catch_up.is_some()
            || sub.skip_upto.is_some()
            || sub.ring.resets() != sub.resets
            || self.client.close_reason().is_some()
        {
            return 0;
        }
        let after = self.client.cursor(0);
        let rule = self.hub.config.slow_clients();
        if after < self.client.joined_at(0)
            || rule.judge(sub.ring.lag_mark(), self.client.lag_base(0)) != Verdict::Keep
        {
            return 0;
        }
        let (mut n, mut bytes, mut last) = (0, 0, sub.last);
        let read = sub.ring.read_many(after, max, |pos, frame| {
            n += 1;
            bytes += frame.len();
            last = pos;
            let wire = if chunks { frame.chunk() } else { frame.bytes() };
            out.extend(Some(wire.clone()));
        });
        if let Some(ordinal) = read {
            self.client.set_cursor(0, ordinal);
            sub.last = last;
            self.wrote(n as u64, bytes);
        }
        n
    }

    /// Counts `events` events of `bytes` written, and marks the stream as
    /// not idle for the current heartbeat tick ([`Client::idle_at`]).
    fn wrote(&mut self, events: u64, bytes: usize) {
        self.client.count(events, bytes);
        self.client.evented_at(self.hub.heartbeat_tick());
    }

    /// Ends the stream once its token has expired. Checked once per
    /// heartbeat tick, which wakes every stream with an expiry (and every
    /// idle one): no timer per stream.
    fn check_expiry(&mut self) {
        let Some(at) = self.client.meta().expires_at else {
            return;
        };
        let tick = self.hub.heartbeat_tick();
        if tick != self.expiry_seen {
            self.expiry_seen = tick;
            if std::time::SystemTime::now() >= at {
                self.client.close(CloseReason::TokenExpired);
            }
        }
    }

    /// Reads the next event of any topic, rotating so no topic starves the
    /// others. Applies the slow-client policy when a topic has run ahead.
    fn next_event(&mut self, cx: &mut Context<'_>) -> Option<Chunk> {
        let n = self.subs.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if let Step::Chunk(chunk) = self.step(i, cx) {
                self.next = (i + 1) % n;
                let len = match &chunk {
                    Chunk::One(b) => b.len(),
                    Chunk::Two(a, b) => a.len() + b.len(),
                };
                self.wrote(1, len);
                return Some(chunk);
            }
            if !self.pending.is_empty() || self.client.close_reason().is_some() {
                return None;
            }
        }
        None
    }

    fn step(&mut self, i: usize, cx: &mut Context<'_>) -> Step {
        if self.subs[i].ring.resets() != self.subs[i].resets {
            self.after_reset(i);
            return Step::Nothing;
        }
        let rule = self.hub.config.slow_clients();
        let in_memory = self.hub.bus().is_none();
        loop {
            if self.subs[i].catch_up.is_some() {
                // `None`: handed over to the ring, read on below.
                if let Some(step) = self.step_catch_up(i, cx) {
                    return step;
                }
            }
            let after = self.client.cursor(i);
            let sub = &mut self.subs[i];
            let verdict = rule.judge(sub.ring.lag_mark(), self.client.lag_base(i));
            if verdict != Verdict::Keep {
                self.fall_behind(i, verdict);
                return Step::Nothing;
            }
            // Replaying history (what was published before the stream
            // joined): never an event past the history's size or age, even
            // if the ring still holds it.
            let replaying = after < self.client.joined_at(i);
            if in_memory && replaying {
                let (start, _) = sub.ring.history_start(&self.hub.bounds());
                if after < start {
                    self.skip_expired(i);
                    return Step::Nothing;
                }
            }
            match sub.ring.read(after) {
                Read::Empty => return Step::Nothing,
                Read::Event(ordinal, pos, frame) => {
                    self.client.set_cursor(i, ordinal);
                    if sub.skip_upto.is_some_and(|seen| pos <= seen) {
                        continue;
                    }
                    sub.skip_upto = None;
                    sub.last = pos;
                    if self.filter.as_ref().is_some_and(|f| !f.admits(&frame)) {
                        continue;
                    }
                    // A filtered stream's events keep their own ids (their
                    // protocol's), however many rings it reads.
                    return Step::Chunk(if self.subs.len() == 1 || self.filter.is_some() {
                        Chunk::One(frame.bytes().clone())
                    } else {
                        Chunk::Two(sse::id_line(&self.cursor_id()), frame.body())
                    });
                }
                // With a bus, what the ring no longer holds is read back
                // from the bus: the ring's size never judges a stream.
                Read::Overrun { floor } if !in_memory => {
                    if let Some(bus) = self.hub.bus() {
                        let rx = bus.catch_up(sub.ring.key(), sub.last, floor);
                        sub.catch_up = Some(CatchUpReader::new(rx));
                        self.client.set_cursor(i, CATCHING_UP);
                    }
                }
                Read::Overrun { .. } if replaying => {
                    self.skip_expired(i);
                    return Step::Nothing;
                }
                // In memory, unread events evicted (past the pinned cap)
                // make a stream slow whatever its lag.
                Read::Overrun { .. } => {
                    self.fall_behind(i, rule.slow());
                    return Step::Nothing;
                }
            }
        }
    }

    /// Serves topic `i` from its catch-up reader; `None` once the reader has
    /// reached the ring and the topic reads from the ring again.
    fn step_catch_up(&mut self, i: usize, cx: &mut Context<'_>) -> Option<Step> {
        let bounds = self.hub.bounds();
        loop {
            let sub = &mut self.subs[i];
            let reader = sub.catch_up.as_mut()?;
            if let Some(ev) = reader.buf.pop_front() {
                sub.last = ev.pos;
                let name = sub.ring.name().clone();
                if let Some(encoder) = self.hub.encoder_for(&name) {
                    let frame = encoder.encode(ev.pos, ev.event.as_deref(), &ev.data, false);
                    if self.filter.as_ref().is_some_and(|f| !f.admits(&frame)) {
                        continue;
                    }
                    return Some(Step::Chunk(Chunk::One(frame.bytes().clone())));
                }
                let id = if self.subs.len() == 1 {
                    ev.pos.id_in(&name)
                } else {
                    self.cursor_id()
                };
                let frame = sse::encode_event(&id, ev.event.as_deref(), &ev.data);
                if self.filter.as_ref().is_some_and(|f| !f.admits(&frame)) {
                    continue;
                }
                return Some(Step::Chunk(Chunk::One(frame.bytes().clone())));
            }
            match reader.rx.poll_recv(cx) {
                Poll::Pending => return Some(Step::Nothing),
                Poll::Ready(Some(CatchUp::Events(events))) => reader.buf.extend(events),
                Poll::Ready(Some(CatchUp::Trimmed(upto))) => {
                    // The notice, then every event the bus still has.
                    sub.last = sub.last.max(upto);
                    let id = self.cursor_id();
                    let name = self.subs[i].ring.name().clone();
                    self.push_gap(sse::gap_notice(&id, &name, GapReason::Expired));
                    return Some(Step::Nothing);
                }
                Poll::Ready(Some(CatchUp::Gap)) => {
                    // The bus lost events after the resume point too: the
                    // notice, then what the ring retains, then live.
                    sub.catch_up = None;
                    self.skip_expired(i);
                    return Some(Step::Nothing);
                }
                Poll::Ready(Some(CatchUp::Reset)) => {
                    sub.catch_up = None;
                    self.resume_new_log(i);
                    return Some(Step::Nothing);
                }
                Poll::Ready(Some(CatchUp::Failed(reason))) => {
                    tracing::warn!(client = %self.client.id(), %reason, "catch-up failed; closing the stream");
                    self.client.close(CloseReason::Unavailable);
                    return Some(Step::Nothing);
                }
                Poll::Ready(None) => match sub.ring.locate(sub.last, &bounds) {
                    Resume::At(ordinal, _) => {
                        sub.catch_up = None;
                        self.client.set_cursor(i, ordinal);
                        sub.ring.hold(self.client.lag_base(i));
                        return None;
                    }
                    // The ring moved on while we read: read up to its new start.
                    Resume::Expired { floor, .. } => {
                        let rx = match self.hub.bus() {
                            Some(bus) => bus.catch_up(sub.ring.key(), sub.last, floor),
                            None => return Some(Step::Nothing),
                        };
                        sub.catch_up = Some(CatchUpReader::new(rx));
                    }
                    Resume::Unknown => {
                        let (head, _) = sub.ring.head();
                        sub.skip_upto = Some(sub.last);
                        sub.catch_up = None;
                        self.client.set_cursor(i, head);
                        return None;
                    }
                },
            }
        }
    }

    /// The ring was reset under the stream: a gap notice (reason `reset`),
    /// then the new log's events from the ring.
    fn after_reset(&mut self, i: usize) {
        let (resets, ordinal, start) = self.subs[i].ring.reset_point();
        self.client.set_cursor(i, ordinal);
        let sub = &mut self.subs[i];
        sub.resets = resets;
        sub.catch_up = None;
        sub.skip_upto = None;
        sub.last = start;
        let id = self.cursor_id();
        let name = self.subs[i].ring.name().clone();
        self.pending
            .push_back(sse::gap_notice(&id, &name, GapReason::Reset));
    }

    /// The stream's resume point is from before the bus's log started
    /// again: a gap notice (reason `reset`), then the new log from its
    /// start — from the ring, or read back from the bus first.
    fn resume_new_log(&mut self, i: usize) {
        let start = Position::new(self.subs[i].last.hi, 0);
        self.subs[i].last = start;
        self.subs[i].skip_upto = None;
        let id = self.cursor_id();
        let name = self.subs[i].ring.name().clone();
        self.pending
            .push_back(sse::gap_notice(&id, &name, GapReason::Reset));
        let sub = &mut self.subs[i];
        match sub.ring.locate(start, &self.hub.bounds()) {
            Resume::At(ordinal, _) => self.client.set_cursor(i, ordinal),
            Resume::Expired { floor, .. } => {
                if let Some(bus) = self.hub.bus() {
                    let rx = bus.catch_up(sub.ring.key(), start, floor);
                    sub.catch_up = Some(CatchUpReader::new(rx));
                }
            }
            // The ring is at the very start too.
            Resume::Unknown => {
                let (head, _) = sub.ring.head();
                self.client.set_cursor(i, head);
            }
        }
    }

    /// Skips what is older than topic `i`'s history with a gap notice
    /// (reason `expired`), then reads every event the history still holds.
    fn skip_expired(&mut self, i: usize) {
        let (after, floor) = self.subs[i].ring.history_start(&self.hub.bounds());
        self.client.set_cursor(i, after);
        let sub = &mut self.subs[i];
        sub.last = floor;
        sub.skip_upto = None;
        sub.ring.hold(self.client.lag_base(i));
        let id = self.cursor_id();
        let name = self.subs[i].ring.name().clone();
        self.push_gap(sse::gap_notice(&id, &name, GapReason::Expired));
    }

    /// Queues a gap notice, unless the stream speaks another protocol.
    fn push_gap(&mut self, notice: Bytes) {
        if self.filter.is_none() {
            self.pending.push_back(notice);
        }
    }

    fn jump_to_live(&mut self, i: usize, reason: GapReason) {
        let (head, head_pos) = self.subs[i].ring.head();
        self.client.set_cursor(i, head);
        self.subs[i].last = head_pos;
        self.subs[i].skip_upto = None;
        let id = self.cursor_id();
        let name = self.subs[i].ring.name().clone();
        self.push_gap(sse::gap_notice(&id, &name, reason));
    }

    /// Applies the slow-client rule's verdict on ring `i` (see [`slow`]).
    fn fall_behind(&mut self, i: usize, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Disconnect => {
                slow::disconnect(&self.client, &self.hub.totals);
            }
            Verdict::Skip => {
                slow::count_skip(&self.hub.totals);
                self.jump_to_live(i, GapReason::Slow);
            }
        }
    }
}

impl CatchUpReader {
    fn new(rx: mpsc::Receiver<CatchUp>) -> Self {
        CatchUpReader {
            rx,
            buf: VecDeque::new(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for s in self.subs.iter() {
            s.ring.unsubscribe(s.key);
        }
        self.hub.deregister_client(&self.client);
    }
}
