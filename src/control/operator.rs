//! The operators' page, `GET /` on the control plane: one self-contained
//! HTML file (inline CSS and JS, nothing fetched from elsewhere) built into
//! the binary.
//!
//! It polls `GET /clients?scope=cluster` and `GET /topics` every second,
//! kicks clients with `DELETE /clients/{id}`, publishes test events with
//! `PATCH /events` and watches them arrive on its own `EventSource`. That
//! stream is at `/stream` on the page's origin (through a reverse proxy that
//! routes both planes, as deploy/nginx does), or at the stream plane named by
//! `?stream=http://host:8081`, which must then allow the page's origin with
//! `--cors-allow-origin`.

use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};

const PAGE: &str = include_str!("operator.html");

/// Inline script and style only; fetches and streams may go anywhere (the
/// stream plane is usually another origin); no framing.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src *; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn page() -> Response {
    let mut res = Html(PAGE).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}
