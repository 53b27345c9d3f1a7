//! Reading a stream request: the topics and the resume point.
//!
//! Architecture invariant: the stream plane never parses JSON; this is all it
//! reads from a client.

use http::{HeaderMap, Method};

use crate::error::ApiError;
use crate::id::Cursor;
use crate::topic;

/// The only path the stream plane serves.
pub const STREAM_PATH: &str = "/stream";

/// A CORS preflight for a stream: `OPTIONS /stream` with an `Origin` (see
/// [`super::cors`]). Any other `OPTIONS` is refused like other methods.
pub fn is_preflight(method: &Method, path: &str, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && path == STREAM_PATH && headers.contains_key(http::header::ORIGIN)
}

/// Refuses a request that frames a body with `Transfer-Encoding`: a stream
/// request has no body, and one that carries both `Transfer-Encoding` and
/// `Content-Length` is the shape of a smuggling attempt (RFC 9112 §6.1: a
/// server may reject it as invalid). hyper has already dropped the
/// `Content-Length` by then (and will close the connection), so the
/// `Transfer-Encoding` header is what is left to see.
pub fn check_framing(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(ApiError {
            close: true,
            ..ApiError::bad_request(
                "invalid_framing",
                "a stream request has no body: Transfer-Encoding is not allowed (nor with Content-Length)",
            )
        });
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub struct StreamRequest {
    /// Distinct topics, in the order first given.
    pub topics: Vec<String>,
    pub resume: Option<Cursor>,
}

/// Bounds on what one stream request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Distinct topics (`--max-stream-topics`).
    pub max_topics: usize,
    /// Length of a topic name (`--max-topic-len`, at most
    /// [`topic::MAX_TOPIC_LEN`]).
    pub max_topic_len: usize,
}

/// [`parse_with`] at most `max_topics` topics of any valid length.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    max_topics: usize,
) -> Result<StreamRequest, ApiError> {
    let limits = ParseLimits {
        max_topics,
        max_topic_len: topic::MAX_TOPIC_LEN,
    };
    parse_with(method, path, query, headers, limits)
}

/// Checks path and method, then reads `topic` (repeatable) and the resume
/// point: the `Last-Event-ID` header, else the `lastEventId` parameter.
pub fn parse_with(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    limits: ParseLimits,
) -> Result<StreamRequest, ApiError> {
    let ParseLimits {
        max_topics,
        max_topic_len,
    } = limits;
    if path != STREAM_PATH {
        return Err(ApiError::not_found(format!(
            "no such path {path:?}; streams are at {STREAM_PATH}?topic=NAME"
        )));
    }
    if method != Method::GET {
        return Err(ApiError::method_not_allowed("GET"));
    }
    let mut topics: Vec<String> = Vec::new();
    let mut query_id = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "topic" => {
                topic::validate(&value, max_topic_len.min(topic::MAX_TOPIC_LEN))
                    .map_err(|e| ApiError::bad_request("invalid_topic", format!("topic: {e}")))?;
                if !topics.iter().any(|t| *t == value) {
                    if topics.len() == max_topics {
                        return Err(ApiError::bad_request(
                            "too_many_stream_topics",
                            format!("a stream may subscribe to at most {max_topics} topics"),
                        ));
                    }
                    topics.push(value.into_owned());
                }
            }
            "lastEventId" => query_id = Some(value),
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "give at least one topic: /stream?topic=NAME (names match [A-Za-z0-9._-]{1,128})",
        ));
    }
    let resume = last_event_id(headers, query_id.as_deref())?
        .map(|id| {
            Cursor::parse(id).map_err(|e| {
                ApiError::bad_request("invalid_last_event_id", format!("Last-Event-ID: {e}"))
            })
        })
        .transpose()?;
    Ok(StreamRequest { topics, resume })
}

/// The position a subscriber resumes after: the `Last-Event-ID` header, else
/// the query parameter (`query_id`); an empty one means "none".
/// EventSource resends the original URL on reconnect, so the header (the
/// newer position) wins over the parameter.
pub fn last_event_id<'a>(
    headers: &'a HeaderMap,
    query_id: Option<&'a str>,
) -> Result<Option<&'a str>, ApiError> {
    let header_id = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID is not visible ASCII",
            )
        })?),
        None => None,
    };
    Ok(match header_id {
        Some(h) if !h.is_empty() => Some(h),
        _ => query_id.filter(|q| !q.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn get(query: &str) -> Result<StreamRequest, ApiError> {
        parse(&Method::GET, "/stream", Some(query), &HeaderMap::new(), 4)
    }

    #[test]
    fn reads_topics_in_order_without_duplicates() {
        let r = get("topic=b&topic=a&topic=b&x=1").unwrap();
        assert_eq!(r.topics, ["b", "a"]);
        assert_eq!(r.resume, None);
    }

    #[test]
    fn rejects_bad_topics_and_methods() {
        assert_eq!(get("").unwrap_err().code, "missing_topic");
        assert_eq!(get("topic=").unwrap_err().code, "invalid_topic");
        assert_eq!(get("topic=a%20b").unwrap_err().code, "invalid_topic");
        assert_eq!(
            get("topic=a&topic=b&topic=c&topic=d&topic=e")
                .unwrap_err()
                .code,
            "too_many_stream_topics"
        );
        let e = parse(
            &Method::POST,
            "/stream",
            Some("topic=a"),
            &HeaderMap::new(),
            4,
        )
        .unwrap_err();
        assert_eq!((e.status.as_u16(), e.allow), (405, Some("GET")));
        let e = parse(&Method::GET, "/nope", None, &HeaderMap::new(), 4).unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
    }

    #[test]
    fn header_wins_over_query_parameter() {
        let mut h = HeaderMap::new();
        h.insert("last-event-id", HeaderValue::from_static("a:1-9"));
        let r = parse(
            &Method::GET,
            "/stream",
            Some("topic=a&lastEventId=a:1-2"),
            &h,
            4,
        )
        .unwrap();
        assert_eq!(r.resume.unwrap().to_string(), "a:1-9");
        let r = get("topic=a&lastEventId=a%3A1-2").unwrap();
        assert_eq!(r.resume.unwrap().to_string(), "a:1-2");
    }

    #[test]
    fn malformed_ids_are_rejected() {
        assert_eq!(
            get("topic=a&lastEventId=zzz").unwrap_err().code,
            "invalid_last_event_id"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "last-event-id",
            HeaderValue::from_bytes(b"a:1-\xff").unwrap(),
        );
        let e = parse(&Method::GET, "/stream", Some("topic=a"), &h, 4).unwrap_err();
        assert_eq!(e.code, "invalid_last_event_id");
    }

    #[test]
    fn a_body_framed_by_transfer_encoding_is_refused() {
        let mut h = HeaderMap::new();
        assert!(check_framing(&h).is_ok());
        h.insert("content-length", HeaderValue::from_static("0"));
        assert!(check_framing(&h).is_ok());
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let e = check_framing(&h).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code, e.close),
            (400, "invalid_framing", true)
        );
    }

    proptest! {
        #[test]
        fn never_panics(query in "\\PC{0,80}", id in "\\PC{0,40}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&id) {
                h.insert("last-event-id", v);
            }
            let _ = parse(&Method::GET, "/stream", Some(&query), &h, 16);
        }
    }
}
