//! Authenticating a stream request: finding the subscriber's JWT, checking
//! it covers every topic asked for, and when the stream must end.
//!
//! The token is taken from, in this order: `Authorization: Bearer`, the
//! `--jwt-cookie` cookie, or the `access_token` query parameter (browsers'
//! `EventSource` cannot set headers). A URL ends up in proxy and server
//! access logs, so the gateway itself never logs a query without
//! [`redact_query`], and no response ever echoes a token.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use crate::auth::{self, AuthError, Verifier};
use crate::error::ApiError;

/// The query parameter that may carry the token.
pub const TOKEN_PARAM: &str = "access_token";

/// What stands in for a token in anything logged.
pub const REDACTED: &str = "[redacted]";

/// The stream plane's authentication settings.
#[derive(Debug)]
pub struct StreamAuth {
    pub verifier: Arc<Verifier>,
    /// `--jwt-cookie`.
    pub cookie: Option<String>,
    /// End the stream when the token expires (unless
    /// `--jwt-allow-expiry-during-stream`).
    pub end_at_expiry: bool,
    /// `--jwt-leeway`: the stream ends this long after `exp`, as a token
    /// that old is still accepted.
    pub leeway: Duration,
}

impl StreamAuth {
    /// Checks the request's token and that it allows every one of `topics`.
    /// Returns when the stream must end (`None`: never).
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        topics: &[String],
    ) -> Result<Option<SystemTime>, ApiError> {
        let token = find_token(headers, query, self.cookie.as_deref())?.ok_or_else(|| {
            let mut hint = String::from("send `Authorization: Bearer <token>`");
            if let Some(c) = &self.cookie {
                hint.push_str(&format!(", the `{c}` cookie"));
            }
            hint.push_str(&format!(" or `?{TOKEN_PARAM}=<token>`"));
            AuthError::Missing(hint)
        })?;
        let grant = self.verifier.verify(&token)?;
        if let Some(topic) = grant.topics.first_denied(topics.iter().map(String::as_str)) {
            return Err(ApiError::topic_not_allowed(topic, "reading from"));
        }
        Ok(grant
            .expires_at
            .filter(|_| self.end_at_expiry)
            .map(|exp| UNIX_EPOCH + Duration::from_secs(exp) + self.leeway))
    }
}

/// The token of a stream request, if it carries one.
pub fn find_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    cookie: Option<&str>,
) -> Result<Option<Cow<'a, str>>, AuthError> {
    if let Some(bearer) = auth::bearer(headers) {
        return bearer.map(|t| Some(Cow::Borrowed(t)));
    }
    if let Some(name) = cookie
        && let Some(value) = find_cookie(headers, name)
    {
        return Ok(Some(Cow::Borrowed(value)));
    }
    let from_query = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, v)| k == TOKEN_PARAM && !v.is_empty())
        .map(|(_, v)| Cow::Owned(v.into_owned()));
    Ok(from_query)
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The query with the value of every `access_token` (and Mercure's
/// `authorization`) parameter replaced by
/// [`REDACTED`]: what may be logged.
pub fn redact_query(query: &str) -> Cow<'_, str> {
    // Mercure's `authorization` parameter carries a token too.
    const PARAMS: [&str; 2] = [TOKEN_PARAM, crate::mercure::auth::QUERY_PARAM];
    if !PARAMS.iter().any(|p| query.contains(p)) && !query.contains('%') {
        return Cow::Borrowed(query);
    }
    let redacted: Vec<Cow<'_, str>> = query
        .split('&')
        .map(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            // Compare decoded, so `access%5Ftoken` is caught too.
            let decoded: String = form_urlencoded::parse(key.as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect();
            if PARAMS.contains(&decoded.as_str()) {
                Cow::Owned(format!("{key}={REDACTED}"))
            } else {
                Cow::Borrowed(pair)
            }
        })
        .collect();
    Cow::Owned(redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn header_then_cookie_then_query() {
        let q = Some("topic=a&access_token=q.q.q");
        let both = headers(&[("authorization", "Bearer h.h.h"), ("cookie", "sl=c.c.c")]);
        assert_eq!(find_token(&both, q, Some("sl")).unwrap().unwrap(), "h.h.h");
        let cookie = headers(&[("cookie", "a=1; sl=c.c.c; b=2")]);
        assert_eq!(
            find_token(&cookie, q, Some("sl")).unwrap().unwrap(),
            "c.c.c"
        );
        // Without --jwt-cookie the cookie is not read.
        assert_eq!(find_token(&cookie, q, None).unwrap().unwrap(), "q.q.q");
        let quoted = headers(&[("cookie", "x=1"), ("cookie", "sl=\"c.c.c\"")]);
        assert_eq!(
            find_token(&quoted, None, Some("sl")).unwrap().unwrap(),
            "c.c.c"
        );
        assert_eq!(
            find_token(&HeaderMap::new(), Some("topic=a"), Some("sl")).unwrap(),
            None
        );
        assert_eq!(
            find_token(&HeaderMap::new(), Some("access_token="), None).unwrap(),
            None
        );
        let basic = headers(&[("authorization", "Basic x")]);
        assert_eq!(find_token(&basic, q, None), Err(AuthError::NotBearer));
    }

    #[test]
    fn redacts_every_token_parameter() {
        assert_eq!(redact_query("topic=a"), "topic=a");
        assert_eq!(
            redact_query("topic=a&access_token=abc.def&x=1"),
            "topic=a&access_token=[redacted]&x=1"
        );
        assert_eq!(
            redact_query("access_token=1&access%5Ftoken=2&access_token"),
            "access_token=[redacted]&access%5Ftoken=[redacted]&access_token=[redacted]"
        );
        assert_eq!(redact_query("my_access_token=x"), "my_access_token=x");
        assert_eq!(
            redact_query("topic=a&authorization=abc.def"),
            "topic=a&authorization=[redacted]"
        );
    }

    proptest! {
        #[test]
        fn a_token_never_survives_redaction(
            token in "[A-Za-z0-9._-]{8,40}",
            before in "(topic=[a-z]{1,5}&){0,3}",
            after in "(&topic=[a-z]{1,5}){0,3}",
        ) {
            let q = format!("{before}access_token={token}{after}");
            let r = redact_query(&q);
            prop_assert!(!r.contains(&token));
            prop_assert!(r.contains(REDACTED));
        }
    }
}
