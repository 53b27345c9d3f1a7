//! Who may call the control plane, and how often a publisher may publish.
//!
//! With `--control-token` (or `--control-token-file`) every route but
//! `GET /`, `/health`, `/ready` and `/metrics` needs `Authorization: Bearer
//! <control token>`; so do unknown paths, so nothing is learned without it.
//! `PATCH /events` also takes a publisher's JWT when `--jwt-secret` or
//! `--jwt-public-key` is set: its `publish` claim lists the topics it may
//! publish to, checked per event once the batch is parsed
//! ([`Caller::may_publish`]). `/metrics` needs `--metrics-token` (or the
//! control token) when that is set. Tokens are compared in constant time; a
//! refusal is 401 `unauthorized` with `WWW-Authenticate: Bearer`.
//!
//! `PATCH /events` is rate-limited per publisher (`--publish-rate`): per JWT
//! subject, else per client address. The check runs before the body is
//! read, so a flood is refused cheaply and does not slow the publishes that
//! are accepted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::Method;

use crate::auth::{self, AuthError, Credentials, Secret, TopicPatterns, Verifier};
use crate::client_ip::TrustedProxies;
use crate::error::ApiError;
use crate::limits::rate::retry_after_secs;
use crate::limits::{RateLimiter, ip_key};

/// The control plane's access policy.
#[derive(Debug, Default)]
pub struct Access {
    control_token: Option<Secret>,
    metrics_token: Option<Secret>,
    jwt: Option<Arc<Verifier>>,
    proxies: TrustedProxies,
    publish_rate: Option<RateLimiter<PublisherKey>>,
}

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No control token is configured, or the route is open.
    Anyone,
    /// Presented the control token.
    Operator,
    /// Presented a publisher JWT: may publish to these topics only.
    Publisher(Arc<TopicPatterns>),
}

impl Caller {
    /// Checks that the caller may publish to every one of `topics`.
    pub fn may_publish<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ApiError> {
        match self {
            Caller::Publisher(allowed) => match allowed.first_denied(topics) {
                Some(topic) => Err(ApiError::topic_not_allowed(topic, "publishing to")),
                None => Ok(()),
            },
            Caller::Anyone | Caller::Operator => Ok(()),
        }
    }
}

/// Whom a publisher's rate is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PublisherKey {
    Address(IpAddr),
    Subject(Box<str>),
}

/// What a route needs.
enum Need {
    Nothing,
    Metrics,
    Operator,
    Publisher,
    /// Checks its own JWT (src/mercure/publish.rs); only the rate is ours.
    MercurePublisher,
}

fn need(method: &Method, path: &str) -> Need {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        "/" | "/health" | "/ready" if read => Need::Nothing,
        "/metrics" if read => Need::Metrics,
        "/events" if method == Method::PATCH => Need::Publisher,
        crate::mercure::PATH if method == Method::POST => Need::MercurePublisher,
        _ => Need::Operator,
    }
}

impl Access {
    pub fn new(credentials: &Credentials, proxies: TrustedProxies, publish_rate: u32) -> Self {
        Access {
            control_token: credentials.control_token.clone(),
            metrics_token: credentials.metrics_token.clone(),
            jwt: credentials.jwt.clone(),
            proxies,
            publish_rate: RateLimiter::new(publish_rate, publish_rate),
        }
    }

    /// No authentication and no limits (the default).
    pub fn open() -> Self {
        Access::default()
    }

    fn check(&self, req: &Request) -> Result<Caller, ApiError> {
        let headers = req.headers();
        let presented = auth::bearer(headers).transpose()?;
        let is = |secret: &Option<Secret>| matches!((secret, presented), (Some(s), Some(p)) if s.matches(p));
        match need(req.method(), req.uri().path()) {
            Need::Nothing => Ok(Caller::Anyone),
            Need::Metrics => match &self.metrics_token {
                Some(_) if is(&self.metrics_token) || is(&self.control_token) => {
                    Ok(Caller::Operator)
                }
                Some(_) => Err(refused(
                    presented,
                    "send `Authorization: Bearer <metrics token>`",
                )),
                None => Ok(Caller::Anyone),
            },
            Need::Operator => match &self.control_token {
                None => Ok(Caller::Anyone),
                Some(_) if is(&self.control_token) => Ok(Caller::Operator),
                Some(_) => Err(refused(
                    presented,
                    "send `Authorization: Bearer <control token>`",
                )),
            },
            // Counted by address: its token is the handler's to read.
            Need::MercurePublisher => {
                self.rate(self.address(req))?;
                Ok(Caller::Anyone)
            }
            Need::Publisher => {
                let address = self.address(req);
                let (caller, key) = match (&self.control_token, presented) {
                    (None, _) => (Caller::Anyone, address),
                    (Some(_), _) if is(&self.control_token) => (Caller::Operator, address),
                    (Some(_), Some(token)) if self.jwt.is_some() => {
                        let verifier = self.jwt.as_ref().expect("checked above");
                        let grant = verifier.verify(token).map_err(|e| {
                            ApiError::unauthorized(
                                true,
                                format!("not the control token, nor a valid publisher JWT: {e}"),
                            )
                        })?;
                        let key = grant
                            .subject
                            .map_or(address, |s| PublisherKey::Subject(s.into()));
                        (Caller::Publisher(Arc::new(grant.publish)), key)
                    }
                    (Some(_), _) => {
                        let how = match self.jwt {
                            Some(_) => {
                                "send `Authorization: Bearer <control token or publisher JWT>`"
                            }
                            None => "send `Authorization: Bearer <control token>`",
                        };
                        return Err(refused(presented, how));
                    }
                };
                self.rate(key)?;
                Ok(caller)
            }
        }
    }

    /// The caller's address (behind trusted proxies, the client's) as a
    /// rate key.
    fn address(&self, req: &Request) -> PublisherKey {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        PublisherKey::Address(ip_key(self.proxies.client_ip(peer, req.headers())))
    }

    fn rate(&self, key: PublisherKey) -> Result<(), ApiError> {
        let Some(limiter) = &self.publish_rate else {
            return Ok(());
        };
        limiter.check(key).map_err(|wait| {
            ApiError::too_many_requests(
                "rate_limited",
                "too many publish requests from this publisher; slow down (or batch events)",
                retry_after_secs(wait),
            )
        })
    }
}

/// 401 for a missing token (`how` says what to send) or a wrong one.
fn refused(presented: Option<&str>, how: &str) -> ApiError {
    match presented {
        None => AuthError::Missing(how.to_owned()).into(),
        Some(_) => ApiError::unauthorized(true, "the token is not valid here"),
    }
}

/// Middleware: identifies the caller (or refuses the request) and hands
/// the handlers a [`Caller`].
pub async fn guard(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    match access.check(&req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            tracing::debug!(
                code = e.code,
                path = req.uri().path(),
                "control request refused"
            );
            IntoResponse::into_response(e)
        }
    }
}
