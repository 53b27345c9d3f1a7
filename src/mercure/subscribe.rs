//! `GET /.well-known/mercure` on the stream plane: a Mercure subscription
//! is a stream of the Mercure hub topic through a [`MercureFilter`], so it
//! shares the stream plane's machinery (limits, hand-over, drain, heartbeats,
//! expiry) and the hub's (resume, history, bus).
//!
//! Resume: `Last-Event-ID` (header, else the `lastEventID` parameter) is an
//! update's id, `earliest`, or unknown (then live); see [`Mercure::resume`].
//! When the request names one, the response carries `Last-Event-ID` as the
//! draft requires.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Method, Request};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use super::selector::{Selector, any_match};
use super::{Mercure, Update, UpdateMeta, auth};
use crate::error::ApiError;
use crate::hub::NewEvent;
use crate::hub::{Filter, Hub};
use crate::sse::Frame;
use crate::stream::{Plane, StreamResponse};

/// What a Mercure stream writes: updates one of its selectors matches and,
/// when private, that one of its `mercure.subscribe` selectors matches too.
#[derive(Debug)]
pub struct MercureFilter {
    pub selectors: Vec<Selector>,
    /// The token's `mercure.subscribe` selectors (none: anonymous).
    pub allowed: Vec<Selector>,
    /// With `--mercure-subscriptions`: announces the end when the stream
    /// (which owns the filter) ends.
    pub announcer: Option<Announcer>,
}

impl Drop for MercureFilter {
    fn drop(&mut self) {
        if let Some(a) = &self.announcer {
            a.announce(&self.selectors, false);
        }
    }
}

/// Publishes the draft's subscription events: one private update per
/// selector when a subscription starts and when it ends, on topic
/// `/.well-known/mercure/subscriptions/{topic}/{subscriber}`, through the
/// bus like any update (so every replica's watchers see it).
#[derive(Debug)]
pub struct Announcer {
    hub: Arc<Hub>,
    /// The Mercure hub topic.
    topic: String,
    payload: Option<serde_json::Value>,
    /// Set once the stream is open (its client id names it); nothing is
    /// announced for a stream that never opened.
    subscriber: OnceLock<String>,
}

impl Announcer {
    pub fn new(hub: Arc<Hub>, topic: String, payload: Option<serde_json::Value>) -> Self {
        Announcer {
            hub,
            topic,
            payload,
            subscriber: OnceLock::new(),
        }
    }

    /// Announces the opened stream `client` (its subscriber IRI is
    /// `urn:streamline:<client id>`, as `GET /clients` lists it).
    pub fn opened(&self, selectors: &[Selector], client: &str) {
        if self
            .subscriber
            .set(format!("urn:streamline:{client}"))
            .is_ok()
        {
            self.announce(selectors, true);
        }
    }

    /// The subscription events of `selectors`, published on a task of
    /// their own (a stream never waits for them; a failure is logged).
    fn announce(&self, selectors: &[Selector], active: bool) {
        let Some(subscriber) = self.subscriber.get() else {
            return;
        };
        let events: Vec<NewEvent> = selectors
            .iter()
            .map(|s| {
                let id = format!(
                    "/.well-known/mercure/subscriptions/{}/{}",
                    expand(s.as_str()),
                    expand(subscriber)
                );
                let mut doc = serde_json::json!({
                    "@context": "https://mercure.rocks/",
                    "id": id,
                    "type": "Subscription",
                    "topic": s.as_str(),
                    "subscriber": subscriber,
                    "active": active,
                });
                if let Some(p) = &self.payload {
                    doc["payload"] = p.clone();
                }
                let update = Update {
                    topics: vec![id],
                    private: true,
                    id: None,
                    kind: None,
                    retry: None,
                    data: doc.to_string(),
                };
                NewEvent {
                    topic: self.topic.clone(),
                    event: None,
                    data: serde_json::to_string(&update).unwrap_or_default(),
                }
            })
            .collect();
        let hub = self.hub.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = hub.publish_batch(&events).await {
                    tracing::warn!(error = %e, "a Mercure subscription event was not published");
                }
            });
        }
    }
}

/// RFC 6570 simple expansion of one value: everything but unreserved
/// characters percent-encoded.
fn expand(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl MercureFilter {
    /// The decision, on an update's metadata.
    pub fn admits_update(&self, meta: &UpdateMeta) -> bool {
        let topics = meta.topics.iter().map(|t| &**t);
        any_match(&self.selectors, topics.clone())
            && (!meta.private || any_match(&self.allowed, topics))
    }
}

impl Filter for MercureFilter {
    fn admits(&self, frame: &Frame) -> bool {
        frame
            .tag()
            .and_then(|t| t.downcast_ref::<UpdateMeta>())
            .is_some_and(|meta| self.admits_update(meta))
    }
}

/// A subscription request, read.
#[derive(Debug)]
pub struct SubscribeRequest {
    pub selectors: Vec<Selector>,
    pub last_event_id: Option<String>,
}

/// Reads `topic` selectors (at most `max_selectors` distinct ones) and the
/// resume point: the `Last-Event-ID` header, else `lastEventID`.
pub fn parse(
    method: &Method,
    query: Option<&str>,
    headers: &http::HeaderMap,
    max_selectors: usize,
) -> Result<SubscribeRequest, ApiError> {
    if method != Method::GET {
        return Err(ApiError::method_not_allowed("GET"));
    }
    let mut selectors: Vec<Selector> = Vec::new();
    let mut query_id = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "topic" => {
                if selectors.iter().any(|s| s.as_str() == value) {
                    continue;
                }
                if selectors.len() == max_selectors {
                    return Err(ApiError::bad_request(
                        "too_many_stream_topics",
                        format!("a subscription may have at most {max_selectors} topic selectors"),
                    ));
                }
                let s = Selector::parse(&value).map_err(|e| {
                    ApiError::bad_request("invalid_topic", format!("topic selector {e}"))
                })?;
                selectors.push(s);
            }
            "lastEventID" => query_id = Some(value.into_owned()),
            _ => {}
        }
    }
    if selectors.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "give at least one `topic` selector: an IRI, a URI template or `*`",
        ));
    }
    let last_event_id =
        crate::stream::request::last_event_id(headers, query_id.as_deref())?.map(str::to_owned);
    Ok(SubscribeRequest {
        selectors,
        last_event_id,
    })
}

/// Opens a Mercure stream.
pub(crate) async fn open(
    req: &Request<Incoming>,
    remote: SocketAddr,
    plane: &Plane,
    ended: &CancellationToken,
    mercure: &Mercure,
) -> Result<StreamResponse, ApiError> {
    let (hub, options) = (&plane.hub, &mercure.options);
    let uri = req.uri();
    let parsed = parse(
        req.method(),
        uri.query(),
        req.headers(),
        options.max_selectors,
    )?;
    crate::stream::check_accepting(hub, req)?;
    let client_ip = plane.limits.client_ip(remote.ip(), req.headers());
    plane.limits.check_rate(remote.ip(), client_ip)?;
    let token = auth::find_token(req.headers(), uri.query(), &options.cookie)
        .map_err(auth::unauthorized)?;
    let claims = match (token, &options.subscriber) {
        (Some(token), Some(verifier)) => {
            auth::verify(verifier, &token).map_err(auth::unauthorized)?
        }
        (Some(_), None) => {
            return Err(ApiError::unauthorized(
                true,
                "no subscriber key is configured; subscribe without a token",
            ));
        }
        (None, _) if options.anonymous => auth::Claims::default(),
        (None, _) => {
            return Err(ApiError::unauthorized(
                false,
                "send a JWT: `Authorization: Bearer`, the cookie, or `?authorization=`",
            ));
        }
    };
    let slot = plane.limits.stream_slot(client_ip)?;
    hub.prepare(mercure.topics()).await?;
    let (resume, header_id) = match &parsed.last_event_id {
        Some(id) => {
            let (cursor, header) = mercure.resume(hub, id);
            (cursor, Some(header))
        }
        None => (None, None),
    };
    let expires_at = claims
        .stream_end(options.leeway)
        .filter(|_| options.end_at_expiry);
    let meta = crate::stream::client_meta(req, remote, ended, client_ip, expires_at);
    let announcer = options
        .subscriptions
        .then(|| Announcer::new(hub.clone(), options.topic.clone(), claims.payload.clone()));
    let filter = Arc::new(MercureFilter {
        selectors: parsed.selectors,
        allowed: claims.subscribe,
        announcer,
    });
    let sub = hub.subscribe_filtered(mercure.topics(), resume.as_ref(), meta, filter.clone())?;
    if let Some(a) = &filter.announcer {
        // The subscriber is known once the hub has named the stream.
        a.opened(&filter.selectors, sub.client().id());
    }
    let selectors: Vec<&str> = filter.selectors.iter().map(|s| s.as_str()).collect();
    crate::stream::record_stream(sub.client().id(), &selectors);
    drop(filter);
    tracing::debug!(
        %client_ip,
        "mercure subscription opened"
    );
    let mut res = crate::stream::sse_response(sub, slot);
    let h = res.headers_mut();
    if let Some(id) = header_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
        h.insert("last-event-id", id);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(selectors: &[&str], allowed: &[&str]) -> MercureFilter {
        let p = |v: &[&str]| v.iter().map(|s| Selector::parse(s).unwrap()).collect();
        MercureFilter {
            selectors: p(selectors),
            allowed: p(allowed),
            announcer: None,
        }
    }

    fn update(topics: &[&str], private: bool) -> UpdateMeta {
        UpdateMeta {
            topics: topics.iter().map(|t| (*t).into()).collect(),
            private,
        }
    }

    #[test]
    fn public_updates_reach_matching_selectors() {
        let f = filter(&["https://example.com/books/{id}", "bar"], &[]);
        assert!(f.admits_update(&update(&["https://example.com/books/1"], false)));
        assert!(
            f.admits_update(&update(&["x", "bar"], false)),
            "an alternate topic"
        );
        assert!(!f.admits_update(&update(&["https://example.com/authors/1"], false)));
        assert!(filter(&["*"], &[]).admits_update(&update(&["anything"], false)));
    }

    #[test]
    fn private_updates_need_a_matching_subscribe_claim() {
        let book = "https://example.com/books/1";
        let alt = "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1";
        let anonymous = filter(&["https://example.com/books/{id}"], &[]);
        assert!(!anonymous.admits_update(&update(&[book, alt], true)));
        // The draft's example: the claim matches only the alternate topic.
        let foo = filter(
            &["https://example.com/books/{id}"],
            &["https://example.com/users/foo/{?topic}"],
        );
        assert!(foo.admits_update(&update(&[book, alt], true)));
        let bar = filter(
            &["https://example.com/books/{id}"],
            &["https://example.com/users/bar/{?topic}"],
        );
        assert!(!bar.admits_update(&update(&[book, alt], true)));
        // The claim alone does not subscribe.
        let unsubscribed = filter(&["https://example.com/authors/{id}"], &["*"]);
        assert!(!unsubscribed.admits_update(&update(&[book], true)));
    }

    #[test]
    fn expansion_encodes_all_but_unreserved() {
        assert_eq!(
            expand("https://example.com/{id}"),
            "https%3A%2F%2Fexample.com%2F%7Bid%7D"
        );
        assert_eq!(expand("urn:streamline:ab-1"), "urn%3Astreamline%3Aab-1");
    }

    #[test]
    fn parses_selectors_and_resume_point() {
        let h = http::HeaderMap::new();
        let r = parse(
            &Method::GET,
            Some("topic=a&topic=https%3A%2F%2Fexample.com%2F%7Bid%7D&topic=a&lastEventID=%231-2"),
            &h,
            4,
        )
        .unwrap();
        assert_eq!(r.selectors.len(), 2);
        assert!(r.selectors[1].is_template());
        assert_eq!(r.last_event_id.as_deref(), Some("#1-2"));
        let mut h = http::HeaderMap::new();
        h.insert("last-event-id", HeaderValue::from_static("urn:x"));
        let r = parse(&Method::GET, Some("topic=a&lastEventID=earliest"), &h, 4).unwrap();
        assert_eq!(r.last_event_id.as_deref(), Some("urn:x"));
        let err = |q: &str| parse(&Method::GET, Some(q), &http::HeaderMap::new(), 2).unwrap_err();
        assert_eq!(err("").code, "missing_topic");
        assert_eq!(err("topic=").code, "invalid_topic");
        assert_eq!(
            err("topic=a&topic=b&topic=c").code,
            "too_many_stream_topics"
        );
        let e = parse(&Method::POST, Some("topic=a"), &http::HeaderMap::new(), 2).unwrap_err();
        assert_eq!(e.status.as_u16(), 405);
    }
}
