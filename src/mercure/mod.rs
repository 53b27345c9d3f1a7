//! Mercure: the hub speaks the Mercure protocol (IETF Internet-Draft "The
//! Mercure Protocol", as the reference hub and client libraries deploy it)
//! beside its own API. See `proto-docs/MERCURE.md`.
//!
//! Mercure topics are IRIs, which are not Streamline topic names, and a
//! subscriber asks for them with selectors (URI templates, `*`). So every
//! Mercure update goes to one hub topic (`--mercure-topic`), as one event
//! whose payload is the update (its topics, `private`, `id`, `type`,
//! `retry` and `data`), and each Mercure stream reads that topic through a
//! filter ([`subscribe::MercureFilter`]) that writes only the updates its
//! selectors match and it may see. Resume, history, the bus (Redis, Kafka)
//! and so fan-out across replicas are the hub's, unchanged.
//!
//! Encode once still holds: the hub's [`Encoder`] hook turns the stored
//! update into its Mercure SSE frame (`id` = the update's id, `event` =
//! its type, `retry`, `data`) once, when it enters the ring, and keeps the
//! update's topics and `private` flag beside the frame ([`UpdateMeta`]);
//! a stream's filter reads those, never the bytes.
//!
//! Ids: an update's id is the publisher's `id` when it gave one, else one
//! made from the event's position on the bus, `#<hi>-<lo>` (the draft
//! reserves ids starting with `#` for the hub; every replica makes the same
//! one). A generated id resumes on any replica, as deep as the bus keeps
//! history. A publisher's id is mapped to its position by an index each
//! replica keeps of the updates it has seen ([`ID_INDEX_CAPACITY`] most
//! recent), so resuming by it works on a replica that followed the topic
//! when that update was published; otherwise the stream starts live and
//! the `Last-Event-ID` response header says `earliest` (the draft's
//! answer for an id the hub does not know).

pub mod auth;
pub mod publish;
pub mod selector;
pub mod subscribe;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::auth::Verifier;
use crate::hub::{Encoder, Hub};
use crate::id::{Cursor, Position};
use crate::sse::{self, Frame};

/// Where Mercure is served: subscriptions on the stream plane, publishing
/// on the control plane (one origin behind the proxy).
pub const PATH: &str = "/.well-known/mercure";

/// The reserved `Last-Event-ID` that asks for all the history there is.
pub const EARLIEST: &str = "earliest";

/// Publisher-chosen ids remembered for resume, per replica.
pub const ID_INDEX_CAPACITY: usize = 65_536;

/// Longest publisher `id` and `type` accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Most topics one update may have.
pub const MAX_UPDATE_TOPICS: usize = 64;

/// Mercure's settings (from `--mercure-*`).
#[derive(Debug, Clone)]
pub struct MercureOptions {
    /// The hub topic that carries every Mercure update.
    pub topic: String,
    /// Subscribers without a token may receive public updates.
    pub anonymous: bool,
    /// The cookie that may carry a token (`mercureAuthorization`).
    pub cookie: String,
    /// Verifies publishers' tokens; `None`: nobody may publish.
    pub publisher: Option<Arc<Verifier>>,
    /// Verifies subscribers' tokens; `None`: tokens are refused.
    pub subscriber: Option<Arc<Verifier>>,
    /// Most selectors per subscription (`--max-stream-topics`).
    pub max_selectors: usize,
    /// End a stream when its token expires.
    pub end_at_expiry: bool,
    /// Allowed clock skew on `exp`.
    pub leeway: std::time::Duration,
    /// Publish the draft's subscription events.
    pub subscriptions: bool,
}

/// The Mercure side of a gateway, shared by both planes.
#[derive(Debug)]
pub struct Mercure {
    pub options: MercureOptions,
    topics: [String; 1],
    index: Arc<IdIndex>,
}

impl Mercure {
    /// Builds it and has `hub` encode the Mercure topic's events.
    pub fn install(options: MercureOptions, hub: &Hub) -> Arc<Mercure> {
        let index = Arc::new(IdIndex::default());
        hub.set_encoder(
            &options.topic,
            Arc::new(MercureEncoder {
                index: index.clone(),
            }),
        );
        Arc::new(Mercure {
            topics: [options.topic.clone()],
            options,
            index,
        })
    }

    /// With a bus: follows the Mercure topic from start-up (retrying until
    /// the bus answers or the gateway stops), so this replica sees, and
    /// indexes the ids of, every update published while it runs.
    pub async fn follow(self: Arc<Self>, hub: Arc<Hub>, life: crate::lifecycle::Lifecycle) {
        if hub.bus().is_none() {
            return;
        }
        loop {
            match hub.prepare(self.topics()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow the Mercure topic yet; retrying")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                _ = life.stopped() => return,
            }
        }
    }

    /// The hub topic, as a stream's topic list.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// Where a stream that last saw `last_event_id` resumes, and what its
    /// `Last-Event-ID` response header says.
    pub fn resume(&self, hub: &Hub, last_event_id: &str) -> (Option<Cursor>, String) {
        let at = |pos| {
            let mut c = Cursor::new();
            c.push(&self.options.topic, pos);
            Some(c)
        };
        if last_event_id == EARLIEST {
            // With a bus, position zero is before everything it keeps; in
            // memory, before everything this run published.
            let start = match hub.bus() {
                Some(_) => Position::new(0, 0),
                None => Position::new(hub.epoch(), 0),
            };
            return (at(start), EARLIEST.into());
        }
        let pos = parse_generated(last_event_id).or_else(|| self.index.get(last_event_id));
        match pos {
            Some(pos) => (at(pos), last_event_id.to_owned()),
            None => (None, EARLIEST.into()),
        }
    }
}

/// The id the hub gives an update published without one.
pub fn generated_id(pos: Position) -> String {
    format!("#{pos}")
}

fn parse_generated(id: &str) -> Option<Position> {
    id.strip_prefix('#')?.parse().ok()
}

/// An update as stored on the bus (short keys: it is stored per event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    #[serde(rename = "t")]
    pub topics: Vec<String>,
    #[serde(rename = "p", default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "y", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
    #[serde(rename = "d", default)]
    pub data: String,
}

/// What a stream's filter needs of an update, kept beside its frame.
#[derive(Debug)]
pub struct UpdateMeta {
    pub topics: Box<[Box<str>]>,
    pub private: bool,
}

struct MercureEncoder {
    index: Arc<IdIndex>,
}

fn has_line_break(s: &str) -> bool {
    s.contains(['\r', '\n'])
}

impl Encoder for MercureEncoder {
    fn encode(&self, pos: Position, _event: Option<&str>, data: &str, live: bool) -> Frame {
        let Ok(update) = serde_json::from_str::<Update>(data) else {
            // Not an update (written to the bus by something else): a frame
            // without metadata, which no Mercure filter admits.
            return sse::encode_event(&generated_id(pos), None, "");
        };
        // Checked when published; checked again as the bus is not ours alone.
        let own = update
            .id
            .as_deref()
            .filter(|id| !id.is_empty() && !id.starts_with('#') && !has_line_break(id));
        let id = match own {
            Some(id) => {
                if live {
                    self.index.insert(id, pos);
                }
                id.to_owned()
            }
            None => generated_id(pos),
        };
        let kind = update
            .kind
            .as_deref()
            .filter(|k| !k.is_empty() && !has_line_break(k));
        let meta = UpdateMeta {
            topics: update.topics.iter().map(|t| t.as_str().into()).collect(),
            private: update.private,
        };
        sse::encode_event_with_retry(&id, kind, update.retry, &update.data).with_tag(Arc::new(meta))
    }
}

/// Publisher-chosen id → position, for the most recent updates seen.
#[derive(Debug, Default)]
struct IdIndex {
    inner: Mutex<IdIndexInner>,
}

#[derive(Debug, Default)]
struct IdIndexInner {
    by_id: HashMap<Box<str>, Position>,
    order: VecDeque<Box<str>>,
}

impl IdIndex {
    fn insert(&self, id: &str, pos: Position) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.insert(id.into(), pos).is_none() {
            inner.order.push_back(id.into());
        }
        while inner.order.len() > ID_INDEX_CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    fn get(&self, id: &str) -> Option<Position> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::tests::parse_stream;

    #[test]
    fn generated_ids_carry_the_position() {
        let id = generated_id(Position::new(1733, 5));
        assert_eq!(id, "#1733-5");
        assert_eq!(parse_generated(&id), Some(Position::new(1733, 5)));
        assert_eq!(parse_generated("urn:uuid:x"), None);
        assert_eq!(parse_generated("#x"), None);
    }

    #[test]
    fn encodes_an_update_as_mercure_sse_with_its_topics_beside() {
        let enc = MercureEncoder {
            index: Arc::new(IdIndex::default()),
        };
        let update = Update {
            topics: vec!["https://example.com/a".into(), "b".into()],
            private: true,
            id: Some("urn:uuid:1".into()),
            kind: Some("greet".into()),
            retry: Some(1500),
            data: "line 1\nline 2".into(),
        };
        let data = serde_json::to_string(&update).unwrap();
        let frame = enc.encode(Position::new(1, 2), None, &data, true);
        let text = std::str::from_utf8(frame.bytes()).unwrap();
        assert_eq!(
            text,
            "id: urn:uuid:1\nevent: greet\nretry: 1500\ndata: line 1\ndata: line 2\n\n"
        );
        let (events, retry) = parse_stream(text);
        assert_eq!(events[0].data, "line 1\nline 2");
        assert_eq!(retry, Some(1500));
        let meta = frame.tag().unwrap().downcast_ref::<UpdateMeta>().unwrap();
        assert!(meta.private);
        assert_eq!(&*meta.topics[1], "b");
        assert_eq!(enc.index.get("urn:uuid:1"), Some(Position::new(1, 2)));

        // Without an id: the generated one; not an update: no metadata.
        let plain = serde_json::to_string(&Update {
            topics: vec!["a".into()],
            private: false,
            id: None,
            kind: None,
            retry: None,
            data: "x".into(),
        })
        .unwrap();
        let frame = enc.encode(Position::new(3, 4), None, &plain, false);
        assert_eq!(&frame.bytes()[..], b"id: #3-4\ndata: x\n\n");
        assert!(
            enc.encode(Position::new(3, 5), None, "{", true)
                .tag()
                .is_none()
        );
    }

    #[test]
    fn the_id_index_is_bounded() {
        let index = IdIndex::default();
        for n in 0..(ID_INDEX_CAPACITY as u64 + 10) {
            index.insert(&format!("id-{n}"), Position::new(1, n));
        }
        assert_eq!(index.get("id-0"), None);
        assert_eq!(index.get("id-9"), None);
        assert_eq!(index.get("id-10"), Some(Position::new(1, 10)));
        let inner = index.inner.lock().unwrap();
        assert_eq!(inner.by_id.len(), ID_INDEX_CAPACITY);
        assert_eq!(inner.order.len(), ID_INDEX_CAPACITY);
    }
}
