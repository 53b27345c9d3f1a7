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

impl From<crate::backend::BusError> for ApiError {
    fn from(e: crate::backend::BusError) -> Self {
        ApiError::unavailable("backend_unavailable", e.to_string(), 2)
    }
}

impl From<crate::hub::HubError> for ApiError {
    fn from(e: crate::hub::HubError) -> Self {
        use crate::hub::HubError::*;
        match e {
            TooManyClients(_) => ApiError::unavailable("too_many_clients", e.to_string(), 5),
            TooManyTopics(_) => ApiError::unavailable("too_many_topics", e.to_string(), 30),
            Bus(_) => ApiError::unavailable("backend_unavailable", e.to_string(), 2),
            NotFollowed(_) => ApiError::unavailable("backend_unavailable", e.to_string(), 1),
        }
    }
}
