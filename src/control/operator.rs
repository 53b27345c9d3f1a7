//! The operators' page, `GET /` on the control plane: one self-contained
//! HTML file (inline CSS and JS, no library, nothing fetched from elsewhere)
//! built into the binary.
//!
//! Every second it polls `GET /stats?scope=cluster`, `GET /clients` and
//! `GET /topics`, keeps the samples of the last minutes and charts them
//! (inline SVG, one line per replica); rates are taken over a window of
//! samples, never from two consecutive polls (with an event every 2 s that
//! read 0 half the time). It kicks clients with `DELETE /clients/{id}`,
//! publishes test events with `PATCH /events` and watches them arrive on
//! its own `EventSource`: at `?stream=<origin>` when given; else, opened on
//! the control port itself, on the stream port `GET /stats` names (allowed
//! with no flag when the control plane is on loopback, see
//! `stream::cors::Cors::operators_page`); else at `/stream` on the page's
//! origin (a reverse proxy that routes both planes, as deploy/nginx does).
//! When that stream is refused, the page names the `--cors-allow-origin`
//! value to set.

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
