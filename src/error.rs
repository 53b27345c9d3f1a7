//! The one place errors become HTTP responses, for both planes: a status and
//! a JSON body `{"error": "<code>", "detail": "<what was wrong>"}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable code (documented in proto-docs).
    pub code: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    pub allow: Option<&'static str>,
    /// Ask an HTTP/1 client to close the connection after this response.
    pub close: bool,
    /// A `WWW-Authenticate` challenge (401 responses).
    pub challenge: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    detail: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            allow: None,
            close: false,
            challenge: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        ApiError {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("allowed: {allow}"),
            )
        }
    }

    pub fn unavailable(code: &'static str, detail: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
        }
    }

    /// 401: no credentials, or credentials that were refused. `presented`:
    /// a token was sent (the challenge then says `invalid_token`, RFC 6750).
    pub fn unauthorized(presented: bool, detail: impl Into<String>) -> Self {
        ApiError {
            challenge: Some(if presented {
                r#"Bearer realm="streamline", error="invalid_token""#
            } else {
                r#"Bearer realm="streamline""#
            }),
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
        }
    }

    /// 403: the credentials are good but do not cover `topic`.
    pub fn topic_not_allowed(topic: &str, action: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "topic_not_allowed",
            format!("the token does not allow {action} topic {topic:?}"),
        )
    }

    /// 429: this client is over one of its limits; others are unaffected.
    pub fn too_many_requests(
        code: &'static str,
        detail: impl Into<String>,
        retry_after: u64,
    ) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, detail)
        }
    }

    /// The JSON body, for planes that build responses by hand.
    pub fn body(&self) -> Bytes {
        let body = Body {
            error: self.code,
            detail: &self.detail,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(self.body()));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(allow) = self.allow {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(challenge) = self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        res
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl std::error::Error for ApiError {}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        ApiError::into_response(self).map(axum::body::Body::new)
    }
}

impl From<crate::hub::BusError> for ApiError {
    fn from(e: crate::hub::BusError) -> Self {
        match e {
            // A stream on a topic the bus has no source for (Kafka).
            crate::hub::BusError::NoSuchTopic(detail) => {
                ApiError::bad_request("invalid_topic", detail)
            }
            // Not "unavailable": the events may be published already, and a
            // blind retry may publish them twice.
            crate::hub::BusError::OutcomeUnknown { .. } => ApiError {
                retry_after: Some(2),
                ..ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "publish_outcome_unknown",
                    format!(
                        "{e}; the events may or may not have been published: retry with \
                         the same Idempotency-Key to publish them exactly once"
                    ),
                )
            },
            crate::hub::BusError::KeyReused(detail) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                detail,
            ),
            e => ApiError::unavailable("backend_unavailable", e.to_string(), 2),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        ApiError::unauthorized(e.token_presented(), e.to_string())
    }
}

impl From<crate::hub::HubError> for ApiError {
    fn from(e: crate::hub::HubError) -> Self {
        use crate::hub::HubError::*;
        match e {
            TooManyClients(_) => ApiError::unavailable("too_many_clients", e.to_string(), 5),
            TooManyTopics(_) => ApiError::unavailable("too_many_topics", e.to_string(), 30),
            Bus(e) => e.into(),
            NotFollowed(_) => ApiError::unavailable("backend_unavailable", e.to_string(), 1),
        }
    }
}
