//! Cross-origin streams (CORS): lets a page served from another origin open
//! `new EventSource(url, {withCredentials: true})` on the stream plane.
//!
//! Only origins listed with `--cors-allow-origin` are allowed, each matched
//! exactly (no wildcards: a credentialed response must name one origin). An
//! allowed origin's responses carry `Access-Control-Allow-Origin: <origin>`,
//! `Access-Control-Allow-Credentials: true` and `Vary: Origin`; its
//! `OPTIONS /stream` preflight gets 204 with the allowed method and headers.
//! Any other origin gets no CORS headers, so the browser hides the response
//! from the page, and its preflight gets 403 `origin_not_allowed`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Uri, header};
use http_body_util::Full;

use crate::error::ApiError;

/// The origins whose pages may open streams cross-origin.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    /// Serialized as browsers send them: `scheme://host[:port]`, lower case,
    /// without a default port.
    origins: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("--cors-allow-origin {0:?} is not an origin: give scheme://host[:port], without a path")]
pub struct InvalidOrigin(pub String);

/// How long a browser may cache a preflight's answer, in seconds.
const MAX_AGE: &str = "600";

impl Cors {
    /// Checks and normalizes each origin (`https://app.example.com`,
    /// `http://localhost:3000`).
    pub fn new<S: AsRef<str>>(origins: &[S]) -> Result<Cors, InvalidOrigin> {
        let origins = origins
            .iter()
            .map(|o| normalize(o.as_ref()).ok_or_else(|| InvalidOrigin(o.as_ref().to_owned())))
            .collect::<Result<_, _>>()?;
        Ok(Cors { origins })
    }

    /// The default without `--cors-allow-origin` when the control plane
    /// listens on loopback (the quick start): its own origins, so the
    /// operators' page it serves can open its stream on this plane. Only
    /// that page is served there, and only local processes reach it; a
    /// control plane on any other address gets nothing by default.
    pub fn operators_page(control: std::net::SocketAddr) -> Option<Cors> {
        if !control.ip().is_loopback() {
            return None;
        }
        let origins = [
            format!("http://{control}"),
            format!("http://localhost:{}", control.port()),
        ];
        Cors::new(&origins).ok()
    }

    /// The request's `Origin` when it is an allowed one.
    pub fn allowed<'a>(&self, request: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let origin = request.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(text))
            .then_some(origin)
    }

    /// Adds the CORS headers for `origin` (an allowed one) to a response.
    pub fn allow(origin: &HeaderValue, response: &mut HeaderMap) {
        response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        response.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        response.append(header::VARY, HeaderValue::from_static("origin"));
    }

    /// Answers an `OPTIONS /stream` preflight: 204 for an allowed origin
    /// (its CORS headers are added by the caller), else 403.
    pub fn preflight(&self, request: &HeaderMap) -> Result<Response<Full<Bytes>>, ApiError> {
        if self.allowed(request).is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this origin may not open streams here; see --cors-allow-origin",
            ));
        }
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Last-Event-ID, Authorization"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE),
        );
        Ok(res)
    }
}

/// `scheme://host[:port]` as a browser serializes it, or `None` when `text`
/// is not an http(s) origin.
fn normalize(text: &str) -> Option<String> {
    let text = text.trim();
    let uri: Uri = text.strip_suffix('/').unwrap_or(text).parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    let bare = uri.path().is_empty() || uri.path() == "/";
    if !bare || uri.query().is_some() || authority.as_str().contains('@') {
        return None;
    }
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h
    }

    #[test]
    fn origins_are_normalized_as_browsers_send_them() {
        let cors = Cors::new(&[
            "HTTPS://App.Example.com/",
            "http://localhost:3000",
            "http://a.example:80",
        ])
        .unwrap();
        assert_eq!(
            cors.origins,
            [
                "https://app.example.com",
                "http://localhost:3000",
                "http://a.example"
            ]
        );
        for bad in [
            "*",
            "app.example.com",
            "ftp://a.example",
            "https://a.example/app",
            "https://a.example?x",
            "https://u@a.example",
            "",
        ] {
            assert!(Cors::new(&[bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        let cors = Cors::new(&["https://app.example.com"]).unwrap();
        assert!(cors.allowed(&request("https://app.example.com")).is_some());
        assert!(cors.allowed(&request("https://evil.example.com")).is_none());
        assert!(cors.allowed(&request("http://app.example.com")).is_none());
        assert!(cors.allowed(&request("null")).is_none());
        assert!(cors.allowed(&HeaderMap::new()).is_none());
        assert!(
            Cors::default()
                .allowed(&request("https://app.example.com"))
                .is_none()
        );
    }

    #[test]
    fn preflight_answers_204_or_403() {
        let cors = Cors::new(&["https://app.example.com"]).unwrap();
        let ok = cors.preflight(&request("https://app.example.com")).unwrap();
        assert_eq!(ok.status(), 204);
        assert_eq!(ok.headers()[header::ACCESS_CONTROL_ALLOW_METHODS], "GET");
        let err = cors
            .preflight(&request("https://evil.example.com"))
            .unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (403, "origin_not_allowed"));
    }
}
