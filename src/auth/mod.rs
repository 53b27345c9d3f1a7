//! Who may subscribe and who may publish: JSON Web Tokens, verified the same
//! way for both planes, and the secrets the gateway is configured with.
//!
//! - [`jwt`] — the [`Verifier`]: one key and one algorithm pinned at
//!   start-up (`--jwt-secret` → HS256, `--jwt-public-key` → RS256 or
//!   ES256), expiry, issuer and audience checks, and the claims read into a
//!   [`Grant`].
//! - [`grant`] — what a token allows: the topics it may read (`topics`
//!   claim) and publish to (`publish` claim), as exact names or `prefix*`
//!   patterns, and when it expires.
//!
//! Where a token is found is each plane's business: the stream plane takes
//! it from `Authorization`, a cookie or the `access_token` parameter
//! (`stream::auth`), the control plane from `Authorization`
//! (`control::auth`). Nothing here logs or returns a token.

pub mod grant;
pub mod jwt;

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use subtle::ConstantTimeEq;

pub use grant::{Grant, PatternError, TopicPatterns};
pub use jwt::{AuthError, JwtOptions, KeyError, Verifier};

/// A configured secret (a token or an HMAC key): never printed, compared in
/// constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: &str) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret. Constant-time in the contents
    /// (only a length difference returns early).
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

/// The verifier and secrets built from the configuration at start-up
/// (by `Config::build`, which reads the key and token files once).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Set by `--jwt-secret` or `--jwt-public-key`.
    pub jwt: Option<Arc<Verifier>>,
    /// `--control-token` or the contents of `--control-token-file`.
    pub control_token: Option<Secret>,
    pub metrics_token: Option<Secret>,
}

/// The token of an `Authorization: Bearer <token>` header: `None` without
/// the header, an error when it is not a bearer token.
pub fn bearer(headers: &HeaderMap) -> Option<Result<&str, AuthError>> {
    let value = headers.get(http::header::AUTHORIZATION)?;
    let token = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    Some(token.filter(|t| !t.is_empty()).ok_or(AuthError::NotBearer))
}

/// Logs, once at start-up, who may use each plane: an info line when a
/// plane has no authentication, a warning when such a plane listens on a
/// non-loopback address.
pub fn log_posture(jwt: bool, control_token: bool, stream: SocketAddr, control: SocketAddr) {
    if jwt {
        tracing::info!("stream plane: subscribers need a JWT");
    } else if stream.ip().is_loopback() {
        tracing::info!(
            "stream plane authentication is off: whoever reaches the stream port can read \
             every topic (see --jwt-secret, --jwt-public-key)"
        );
    } else {
        tracing::warn!(
            stream_addr = %stream,
            "the stream plane listens on a non-loopback address WITHOUT authentication: \
             anyone who reaches it can read every topic; set --jwt-secret or --jwt-public-key"
        );
    }
    if control_token {
        tracing::info!(
            "control plane: requests other than /health, /ready, /metrics need the control token"
        );
    } else if control.ip().is_loopback() {
        tracing::info!(
            "control plane authentication is off: whoever reaches the control port can publish \
             and end streams (see --control-token)"
        );
    } else {
        tracing::warn!(
            control_addr = %control,
            "the control plane listens on a non-loopback address WITHOUT authentication: \
             anyone who reaches it can publish and end streams; set --control-token"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn secrets_are_never_printed() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter22"));
        assert!(!s.matches(""));
    }

    #[test]
    fn reads_bearer_tokens_only() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_none());
        h.insert("authorization", HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer(&h).unwrap().unwrap(), "abc.def");
        h.insert("authorization", HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h).unwrap().unwrap(), "abc");
        for bad in ["Basic dXNlcjpwdw==", "Bearer", "Bearer ", "abc"] {
            h.insert("authorization", HeaderValue::from_static(bad));
            assert!(bearer(&h).unwrap().is_err(), "{bad:?}");
        }
    }
}
