//! `PATCH /events`: reading and checking a batch of events to publish.
//!
//! A batch is checked whole before any of it is published: one bad event
//! rejects the request and publishes nothing.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
pub use crate::hub::NewEvent;
use crate::{sse, topic};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    topic: String,
    #[serde(default)]
    event: Option<String>,
    data: Box<RawValue>,
}

/// Parses a request body: one event object or an array of them. A JSON
/// string `data` is sent verbatim, any other JSON value as compact JSON.
pub fn parse_batch(body: &[u8]) -> Result<Vec<NewEvent>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raw: Vec<EventIn> = match first {
        Some(b'[') => deserialize(body)?,
        Some(b'{') => vec![deserialize(body)?],
        _ => {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the body must be a JSON object or an array of objects",
            ));
        }
    };
    if raw.is_empty() {
        return Err(ApiError::bad_request("invalid_event", "the batch is empty"));
    }
    let single = first == Some(&b'{');
    raw.into_iter()
        .enumerate()
        .map(|(i, ev)| {
            let at = |field: &str| {
                if single {
                    field.to_owned()
                } else {
                    format!("[{i}].{field}")
                }
            };
            check(ev).map_err(|(field, why)| {
                ApiError::bad_request("invalid_event", format!("{}: {why}", at(field)))
            })
        })
        .collect()
}

/// Parses `body`; only a body that fails is parsed again, tracking the
/// path, to say where it failed (tracking it costs on every field of every
/// accepted request otherwise).
fn deserialize<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| explain::<T>(body, e))
}

/// What is wrong with a body that `serde_json` refused with `plain`.
fn explain<'de, T: Deserialize<'de>>(body: &'de [u8], plain: serde_json::Error) -> ApiError {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let Err(e) = serde_path_to_error::deserialize::<_, T>(de) else {
        // The value parsed: what follows it did not.
        return ApiError::bad_request("invalid_json", plain.to_string());
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    let code = if inner.is_data() {
        "invalid_event"
    } else {
        "invalid_json"
    };
    let detail = if path == "." || path.is_empty() {
        inner.to_string()
    } else {
        format!("{path}: {inner}")
    };
    ApiError::bad_request(code, detail)
}

fn check(ev: EventIn) -> Result<NewEvent, (&'static str, String)> {
    topic::validate(&ev.topic, topic::MAX_TOPIC_LEN).map_err(|e| ("topic", e.to_string()))?;
    if let Some(name) = &ev.event {
        sse::check_event_name(name).map_err(|e| ("event", e.to_string()))?;
    }
    Ok(NewEvent {
        topic: ev.topic,
        event: ev.event.filter(|e| !e.is_empty()),
        data: payload(&ev.data).map_err(|e| ("data", e.to_string()))?,
    })
}

fn payload(raw: &RawValue) -> Result<String, serde_json::Error> {
    let text = raw.get();
    if text.starts_with('"') {
        return serde_json::from_str::<String>(text);
    }
    Ok(compact(text))
}

/// Drops the whitespace outside strings of already-valid JSON. Unlike a
/// round trip through `serde_json::Value`, this keeps key order, duplicate
/// keys and every digit of numbers that do not fit an f64 exactly.
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn detail(body: &str) -> String {
        parse_batch(body.as_bytes()).unwrap_err().detail
    }

    #[test]
    fn one_event_or_a_batch() {
        let one = parse_batch(br#"{"topic":"a","data":"hi"}"#).unwrap();
        assert_eq!(
            one,
            [NewEvent {
                topic: "a".into(),
                event: None,
                data: "hi".into()
            }]
        );
        let many = parse_batch(
            br#" [{"topic":"a","event":"x","data":1},{"topic":"b","data":{"k": [1, 2]}}]"#,
        )
        .unwrap();
        assert_eq!(many[0].event.as_deref(), Some("x"));
        assert_eq!(many[0].data, "1");
        assert_eq!(many[1].data, r#"{"k":[1,2]}"#);
    }

    #[test]
    fn strings_are_sent_verbatim() {
        let ev = parse_batch(br#"{"topic":"a","data":"line1\nline2 \"q\" \u00e9"}"#).unwrap();
        assert_eq!(ev[0].data, "line1\nline2 \"q\" é");
        let ev = parse_batch(br#"{"topic":"a","data":null}"#).unwrap();
        assert_eq!(ev[0].data, "null");
        let ev = parse_batch(br#"{"topic":"a","data":{"s":"has space"}}"#).unwrap();
        assert_eq!(ev[0].data, r#"{"s":"has space"}"#);
        let ev = parse_batch(br#"{"topic":"a","data":{ "z" : 1, "a": ["\" ,", 1e400] }}"#).unwrap();
        assert_eq!(ev[0].data, r#"{"z":1,"a":["\" ,",1e400]}"#);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(detail(r#"{"topic":5,"data":1}"#).starts_with("topic: invalid type"));
        assert!(detail(r#"[{"topic":"a","data":1},{"data":1}]"#).contains("missing field `topic`"));
        assert!(
            detail(r#"[{"topic":"a","data":1},{"topic":"a b","data":1}]"#)
                .starts_with("[1].topic:")
        );
        assert!(detail(r#"{"topic":"a","event":"x\ny","data":1}"#).starts_with("event:"));
        assert!(
            detail(r#"{"topic":"a","event":"streamline.close","data":1}"#).contains("reserved")
        );
        assert!(detail(r#"{"topic":"a"}"#).contains("missing field `data`"));
        assert!(detail(r#"{"topic":"a","data":1,"extra":2}"#).contains("unknown field `extra`"));
        assert_eq!(parse_batch(b"[]").unwrap_err().code, "invalid_event");
        assert_eq!(
            parse_batch(b"{\"topic\":").unwrap_err().code,
            "invalid_json"
        );
        assert_eq!(parse_batch(b"42").unwrap_err().code, "invalid_json");
        let trailing = parse_batch(br#"{"topic":"a","data":1} {}"#).unwrap_err();
        assert_eq!(trailing.code, "invalid_json");
        assert!(
            trailing.detail.contains("trailing characters"),
            "{}",
            trailing.detail
        );
        assert_eq!(parse_batch(b"").unwrap_err().code, "invalid_json");
    }

    proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_batch(&body);
        }

        #[test]
        fn any_string_payload_is_kept(data in "\\PC*") {
            let body = serde_json::json!({"topic": "t", "data": data}).to_string();
            prop_assert_eq!(&parse_batch(body.as_bytes()).unwrap()[0].data, &data);
        }
    }
}
