//! Mercure's authorization: the JWT is taken from `Authorization: Bearer`,
//! else the `authorization` query parameter, else the cookie
//! (`mercureAuthorization`), in the draft's order; its `mercure` claim
//! lists the selectors its holder may `publish` to and `subscribe` to
//! (private updates), and may carry a `payload`.
//!
//! Publisher and subscriber tokens are checked with keys of their own
//! (`--mercure-publisher-jwt-*`, `--mercure-subscriber-jwt-*`), each pinned
//! to one algorithm like every verifier here. Errors never echo a token.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use serde_json::Value;

use super::selector::Selector;
use crate::auth::{self, AuthError, Verifier};
use crate::error::ApiError;

/// The query parameter that may carry the token.
pub const QUERY_PARAM: &str = "authorization";

/// What a verified token grants.
#[derive(Debug, Default)]
pub struct Claims {
    pub publish: Vec<Selector>,
    pub subscribe: Vec<Selector>,
    pub payload: Option<Value>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Claims {
    /// When a stream held by these claims must end (with `leeway`).
    pub fn stream_end(&self, leeway: Duration) -> Option<SystemTime> {
        self.expires_at
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp) + leeway)
    }
}

/// The request's token, if it carries one.
pub fn find_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    cookie: &str,
) -> Result<Option<Cow<'a, str>>, AuthError> {
    if let Some(bearer) = auth::bearer(headers) {
        return bearer.map(|t| Some(Cow::Borrowed(t)));
    }
    let from_query = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, v)| k == QUERY_PARAM && !v.is_empty())
        .map(|(_, v)| Cow::Owned(v.into_owned()));
    if from_query.is_some() {
        return Ok(from_query);
    }
    Ok(headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == cookie)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
        .map(Cow::Borrowed))
}

/// Verifies `token` and reads its `mercure` claim.
pub fn verify(verifier: &Verifier, token: &str) -> Result<Claims, AuthError> {
    let claims = verifier.verify_claims(token)?;
    let expires_at = claims.get("exp").and_then(Value::as_u64);
    let Some(mercure) = claims.get("mercure") else {
        return Ok(Claims {
            expires_at,
            ..Claims::default()
        });
    };
    let bad = |why: &str| AuthError::Claim("mercure".into(), why.into());
    let mercure = mercure.as_object().ok_or_else(|| bad("is not an object"))?;
    let selectors = |key: &str| -> Result<Vec<Selector>, AuthError> {
        match mercure.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    let s = v.as_str().ok_or_else(|| bad("selectors must be strings"))?;
                    Selector::parse(s).map_err(|e| bad(&format!("selector {e}")))
                })
                .collect(),
            Some(_) => Err(bad("publish and subscribe must be arrays")),
        }
    };
    Ok(Claims {
        publish: selectors("publish")?,
        subscribe: selectors("subscribe")?,
        payload: mercure.get("payload").cloned(),
        expires_at,
    })
}

/// 401 for a missing or refused token.
pub fn unauthorized(e: AuthError) -> ApiError {
    match e {
        AuthError::Missing(how) => ApiError::unauthorized(false, how),
        e => ApiError::unauthorized(true, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::JwtOptions;
    use crate::auth::jwt::test_support::{hs256_sign, hs256_verifier};
    use http::HeaderValue;
    use serde_json::json;

    const SECRET: &str = "!ChangeThisMercureHubJWTSecretKey!";

    fn verifier() -> Verifier {
        hs256_verifier(
            SECRET,
            JwtOptions {
                require_exp: false,
                ..JwtOptions::default()
            },
        )
    }

    fn sign(claims: Value) -> String {
        hs256_sign(SECRET, &claims)
    }

    #[test]
    fn header_then_query_then_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_static("a=1; mercureAuthorization=c.c.c"),
        );
        let c = "mercureAuthorization";
        assert_eq!(find_token(&h, None, c).unwrap().unwrap(), "c.c.c");
        let q = Some("topic=x&authorization=q.q.q");
        assert_eq!(find_token(&h, q, c).unwrap().unwrap(), "q.q.q");
        h.insert("authorization", HeaderValue::from_static("Bearer h.h.h"));
        assert_eq!(find_token(&h, q, c).unwrap().unwrap(), "h.h.h");
        assert_eq!(find_token(&HeaderMap::new(), None, c).unwrap(), None);
    }

    #[test]
    fn reads_the_mercure_claim_without_requiring_exp() {
        let v = verifier();
        let t = sign(json!({"mercure": {
            "publish": ["https://example.com/{id}"],
            "subscribe": ["*"],
            "payload": {"user": "u1"}
        }}));
        let c = verify(&v, &t).unwrap();
        assert!(c.publish[0].matches("https://example.com/1"));
        assert!(c.subscribe[0].matches("x"));
        assert_eq!(c.payload, Some(json!({"user": "u1"})));
        assert_eq!(c.expires_at, None);
        let none = verify(&v, &sign(json!({"sub": "x"}))).unwrap();
        assert!(none.publish.is_empty() && none.subscribe.is_empty());
        assert!(verify(&v, &sign(json!({"mercure": {"publish": "x"}}))).is_err());
        assert!(verify(&v, &sign(json!({"mercure": [1]}))).is_err());
        let expired = sign(json!({"exp": 1, "mercure": {}}));
        assert_eq!(verify(&v, &expired).unwrap_err(), AuthError::Expired);
    }
}
