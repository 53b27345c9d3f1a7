//! A subscription: one stream's reader over its topics' rings, yielding the
//! bytes to write in order — preamble, resume notices, events, heartbeats
//! and, last, a close notice.
//!
//! It is polled by the stream plane's response body, on the connection's own
//! task: there is no per-stream task, queue or timer. Dropping it removes the
//! client from the hub at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::client::{Client, ClientMeta};
use super::ring::{Read, Resume, Topic};
use super::{Hub, HubError, SlowClientPolicy};
use crate::id::{Cursor, Position};
use crate::sse::{self, CloseReason, GapReason};

struct Sub {
    topic: Arc<Topic>,
    key: usize,
    /// Position of the last event written (or where the stream started).
    last: Position,
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
    pending: VecDeque<Bytes>,
    ended: bool,
}

impl Subscription {
    pub(super) fn open(
        hub: Arc<Hub>,
        topics: &[String],
        resume: Option<&Cursor>,
        meta: ClientMeta,
    ) -> Result<Subscription, HubError> {
        let names: Box<[Arc<str>]> = topics.iter().map(|t| Arc::from(t.as_str())).collect();
        let client = Arc::new(Client::new(hub.new_client_id(), names, meta));
        hub.register_client(client.clone())?;
        let mut pending = VecDeque::new();
        pending.push_back(sse::preamble(hub.config.retry, client.id()));
        let mut subs = Vec::with_capacity(topics.len());
        let mut gaps = Vec::new();
        let mut sub = Subscription {
            heartbeat_seen: hub.heartbeat_tick(),
            hub,
            client,
            subs: Box::new([]),
            next: 0,
            pending: VecDeque::new(),
            ended: false,
        };
        for (index, name) in topics.iter().enumerate() {
            // Dropping `sub` on error deregisters the client and the topics
            // joined so far.
            let topic = match sub.hub.topic_or_create(name) {
                Ok(t) => t,
                Err(e) => {
                    sub.subs = subs.into_boxed_slice();
                    return Err(e);
                }
            };
            let (head, head_pos) = topic.head();
            let (ordinal, last) = match resume.and_then(|c| c.get(name)) {
                None => (head, head_pos),
                Some(pos) if pos.hi != sub.hub.epoch => {
                    gaps.push((index, GapReason::Unknown));
                    (head, head_pos)
                }
                Some(pos) => match topic.locate(pos) {
                    Resume::At(ordinal, pos) => (ordinal, pos),
                    Resume::Expired => {
                        gaps.push((index, GapReason::Expired));
                        (head, head_pos)
                    }
                    Resume::Unknown => {
                        gaps.push((index, GapReason::Unknown));
                        (head, head_pos)
                    }
                },
            };
            // The cursor is set before the topic can see this subscriber, so
            // a publisher never judges its lag from a stale cursor.
            sub.client.set_cursor(index, ordinal);
            let key = {
                // Held so a sweep cannot forget the topic before we join it.
                let _topics = sub.hub.read_topics();
                topic.subscribe(sub.client.clone(), index)
            };
            subs.push(Sub { topic, key, last });
        }
        sub.subs = subs.into_boxed_slice();
        for (index, reason) in gaps {
            let id = sub.cursor_id();
            pending.push_back(sse::gap_notice(
                &id,
                &sub.subs[index].topic.name()[..],
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
            c.push(s.topic.name(), s.last);
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
            if let Some(reason) = self.client.close_reason() {
                self.ended = true;
                self.pending
                    .push_back(sse::close_notice(reason, self.hub.config.retry));
                continue;
            }
            if let Some(chunk) = self.next_event() {
                return Poll::Ready(Some(chunk));
            }
            if !self.pending.is_empty() || self.client.close_reason().is_some() {
                continue;
            }
            let tick = self.hub.heartbeat_tick();
            if tick != self.heartbeat_seen {
                self.heartbeat_seen = tick;
                self.client.count(0, sse::HEARTBEAT.len());
                return Poll::Ready(Some(Chunk::One(sse::HEARTBEAT)));
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

    /// Reads the next event of any topic, rotating so no topic starves the
    /// others. Applies the slow-client policy when a topic has run ahead.
    fn next_event(&mut self) -> Option<Chunk> {
        let n = self.subs.len();
        let max_lag = self.hub.config.max_lag;
        for k in 0..n {
            let i = (self.next + k) % n;
            let after = self.client.cursor(i);
            match self.subs[i].topic.read(after, max_lag) {
                Read::Empty => continue,
                Read::Event(ordinal, pos, frame) => {
                    self.client.set_cursor(i, ordinal);
                    self.subs[i].last = pos;
                    self.next = (i + 1) % n;
                    let chunk = if n == 1 {
                        Chunk::One(frame.bytes().clone())
                    } else {
                        Chunk::Two(sse::id_line(&self.cursor_id()), frame.body())
                    };
                    let len = match &chunk {
                        Chunk::One(b) => b.len(),
                        Chunk::Two(a, b) => a.len() + b.len(),
                    };
                    self.client.count(1, len);
                    return Some(chunk);
                }
                Read::Overrun | Read::Lagging => {
                    self.fall_behind(i);
                    return None;
                }
            }
        }
        None
    }

    fn fall_behind(&mut self, i: usize) {
        match self.hub.config.slow_client_policy {
            SlowClientPolicy::Disconnect => {
                if self.client.close(CloseReason::Slow) {
                    self.hub.totals.slow_disconnected.fetch_add(1, Relaxed);
                }
            }
            SlowClientPolicy::Skip => {
                let (head, head_pos) = self.subs[i].topic.head();
                self.client.set_cursor(i, head);
                self.subs[i].last = head_pos;
                self.hub.totals.slow_skipped.fetch_add(1, Relaxed);
                let id = self.cursor_id();
                let name = self.subs[i].topic.name().clone();
                self.pending
                    .push_back(sse::gap_notice(&id, &name, GapReason::Slow));
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for s in self.subs.iter() {
            s.topic.unsubscribe(s.key);
        }
        self.hub.deregister_client(&self.client);
    }
}
