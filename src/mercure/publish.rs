//! `POST /.well-known/mercure` on the control plane: an
//! `application/x-www-form-urlencoded` update (`topic` repeatable, `data`,
//! `private`, `id`, `type`, `retry`), checked whole, authorized by the
//! publisher's `mercure.publish` selectors, and published as one event of
//! the Mercure hub topic (through the bus when there is one). Answers
//! `200 text/plain` with the update's id.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::selector::{self, any_match};
use super::{MAX_ID_LEN, MAX_UPDATE_TOPICS, Mercure, Update, auth, generated_id};
use crate::control::ControlState;
use crate::error::ApiError;
use crate::hub::HubError;
use crate::hub::{BusError, NewEvent};
use crate::id::Position;

/// The route's handler.
pub async fn publish(
    State(s): State<Arc<ControlState>>,
    mercure: Option<Extension<Arc<Mercure>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(Extension(mercure)) = mercure else {
        return Err(ApiError::not_found(
            "Mercure is not enabled on this gateway (--mercure)",
        ));
    };
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the update as application/x-www-form-urlencoded",
        ));
    }
    let claims = authorize(&mercure, &headers, query.as_deref())?;
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, e.body_text())
    })?;
    let update = parse(&body)?;
    if let Some(topic) = update
        .topics
        .iter()
        .find(|t| !any_match(&claims.publish, [t.as_str()]))
    {
        return Err(ApiError::topic_not_allowed(topic, "publishing to"));
    }
    let event = NewEvent {
        topic: mercure.options.topic.clone(),
        event: None,
        data: serde_json::to_string(&update).unwrap_or_default(),
    };
    let ids = s
        .hub
        .publish_batch(std::slice::from_ref(&event))
        .await
        .map_err(|e| match e {
            HubError::Bus(BusError::NoSuchTopic(detail)) => ApiError::unavailable(
                "backend_unavailable",
                format!("the Mercure hub topic has no source on the bus: {detail}"),
                2,
            ),
            e => e.into(),
        })?;
    let id = match update.id {
        Some(id) => id,
        None => {
            let pos = ids
                .first()
                .and_then(|id| id.rsplit_once(':'))
                .and_then(|(_, pos)| pos.parse::<Position>().ok())
                .ok_or_else(|| {
                    ApiError::unavailable("backend_unavailable", "the bus gave no position", 2)
                })?;
            generated_id(pos)
        }
    };
    let mut res = (StatusCode::OK, id).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(res)
}

fn authorize(
    mercure: &Mercure,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<auth::Claims, ApiError> {
    let token = auth::find_token(headers, query, &mercure.options.cookie)
        .map_err(auth::unauthorized)?
        .ok_or_else(|| {
            auth::unauthorized(crate::auth::AuthError::Missing(
                "publishing needs a JWT with a `mercure.publish` claim: send `Authorization: Bearer <token>`"
                    .into(),
            ))
        })?;
    let verifier = mercure.options.publisher.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "topic_not_allowed",
            "no publisher key is configured (--mercure-publisher-jwt-secret or --mercure-publisher-jwt-public-key)",
        )
    })?;
    let claims = auth::verify(verifier, &token).map_err(auth::unauthorized)?;
    if claims.publish.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "topic_not_allowed",
            "the token's `mercure.publish` claim allows no topic",
        ));
    }
    Ok(claims)
}

/// Reads and checks an update's form.
pub fn parse(body: &[u8]) -> Result<Update, ApiError> {
    // One code for every bad field, as `PATCH /events` does; the detail
    // names the field.
    let bad = |_field: &str, detail: String| ApiError::bad_request("invalid_event", detail);
    let mut update = Update {
        topics: Vec::new(),
        private: false,
        id: None,
        kind: None,
        retry: None,
        data: String::new(),
    };
    for (key, value) in form_urlencoded::parse(body) {
        match &*key {
            "topic" => {
                selector::check(&value).map_err(|e| bad("topic", format!("topic: {e}")))?;
                if update.topics.len() == MAX_UPDATE_TOPICS {
                    return Err(bad(
                        "topic",
                        format!("topic: an update may have at most {MAX_UPDATE_TOPICS} topics"),
                    ));
                }
                if !update.topics.iter().any(|t| *t == value) {
                    update.topics.push(value.into_owned());
                }
            }
            "data" => update.data = value.into_owned(),
            "private" => update.private = true,
            "id" => {
                if value.starts_with('#') {
                    return Err(bad(
                        "id",
                        "id: must not start with `#` (reserved for ids the hub makes)".into(),
                    ));
                }
                if value.is_empty() || value.len() > MAX_ID_LEN || value.contains(['\r', '\n']) {
                    return Err(bad(
                        "id",
                        format!("id: must be 1 to {MAX_ID_LEN} bytes without line breaks"),
                    ));
                }
                if value == super::EARLIEST {
                    return Err(bad(
                        "id",
                        "id: `earliest` is reserved by the protocol".into(),
                    ));
                }
                update.id = Some(value.into_owned());
            }
            "type" => {
                if value.len() > MAX_ID_LEN || value.contains(['\r', '\n']) {
                    return Err(bad(
                        "type",
                        format!("type: must be at most {MAX_ID_LEN} bytes without line breaks"),
                    ));
                }
                update.kind = Some(value.into_owned()).filter(|k| !k.is_empty());
            }
            "retry" => {
                let ms = value.parse::<u64>().map_err(|_| {
                    bad(
                        "retry",
                        "retry: must be a whole number of milliseconds".into(),
                    )
                })?;
                update.retry = Some(ms);
            }
            _ => {}
        }
    }
    if update.topics.is_empty() {
        return Err(bad("topic", "topic: give at least one (an IRI)".into()));
    }
    Ok(update)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_field() {
        let u = parse(b"topic=https%3A%2F%2Fexample.com%2Fa&topic=b&topic=b&data=x%0Ay&private=on&id=urn%3Auuid%3A1&type=t&retry=500").unwrap();
        assert_eq!(u.topics, ["https://example.com/a", "b"]);
        assert_eq!(u.data, "x\ny");
        assert!(u.private);
        assert_eq!(u.id.as_deref(), Some("urn:uuid:1"));
        assert_eq!(u.kind.as_deref(), Some("t"));
        assert_eq!(u.retry, Some(500));
        let u = parse(b"topic=a&private=").unwrap();
        assert!(u.private && u.id.is_none() && u.data.is_empty());
    }

    #[test]
    fn refuses_bad_updates() {
        // The detail names the field.
        let field = |b: &[u8]| {
            let e = parse(b).unwrap_err();
            assert_eq!(e.code, "invalid_event");
            e.detail.split(':').next().unwrap().to_owned()
        };
        assert_eq!(field(b"data=x"), "topic");
        assert_eq!(field(b"topic="), "topic");
        assert_eq!(field(b"topic=a%0Ab"), "topic");
        assert_eq!(field(b"topic=a&id=%23x"), "id");
        assert_eq!(field(b"topic=a&id=a%0Ab"), "id");
        assert_eq!(field(b"topic=a&id=earliest"), "id");
        assert_eq!(field(b"topic=a&type=a%0Db"), "type");
        assert_eq!(field(b"topic=a&retry=soon"), "retry");
        let many: String = (0..=MAX_UPDATE_TOPICS)
            .map(|i| format!("topic=t{i}&"))
            .collect();
        assert_eq!(field(many.as_bytes()), "topic");
    }
}
