//! The control plane: the REST API for operators and services (axum).
//!
//! Routes are declared once, in [`routes`], which records each (method, path)
//! as it adds it; a test compares that table with `proto-docs/openapi.json`,
//! so an undocumented route fails the build. Who may call which route, and
//! how often a publisher may publish, is decided in [`auth`], a middleware
//! in front of every route.

pub mod auth;
pub mod events;
pub mod operator;
pub mod serve;

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, RawQuery, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use serde_json::json;
use tokio::net::TcpListener;

#[cfg(feature = "redis")]
use crate::backend::redis::clients::ClusterClients;
use crate::error::ApiError;
use crate::hub::BusError;
use crate::hub::{Hub, HubError};
use crate::idempotency::{self, IdempotencyKey};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::sse::CloseReason;

#[derive(Debug, Clone)]
pub struct ControlState {
    pub hub: Arc<Hub>,
    pub life: Lifecycle,
    pub metrics: Arc<Metrics>,
    /// The cluster-wide client registry (with Redis).
    #[cfg(feature = "redis")]
    pub cluster: Option<Arc<ClusterClients>>,
    /// This replica's name.
    pub replica: Arc<str>,
    /// Who may call which route; [`auth::Access::open`] for none.
    pub access: Arc<auth::Access>,
    /// This control plane's and the stream plane's addresses, when both
    /// are served together: `GET /stats` names their ports so the
    /// operators' page, opened on the control port, can find the stream
    /// plane.
    pub addrs: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
}

struct Routes {
    router: Router<Shared>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Shared>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

fn routes() -> Routes {
    Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .add(Method::GET, "/", operator::page)
    .add(Method::GET, "/health", health)
    .add(Method::GET, "/ready", ready)
    .add(Method::GET, "/clients", list_clients)
    .add(Method::GET, "/clients/{id}", get_client)
    .add(Method::DELETE, "/clients/{id}", delete_client)
    .add(Method::GET, "/topics", list_topics)
    .add(Method::GET, "/stats", stats)
    .add(Method::GET, "/metrics", metrics)
    .add(Method::PATCH, "/events", patch_events)
    .add(
        Method::POST,
        crate::mercure::PATH,
        crate::mercure::publish::publish,
    )
}

/// Every (method, path) the control plane serves.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table
}

/// The control plane's router, with request bodies capped at `max_body` bytes.
pub fn router(state: ControlState, max_body: usize) -> Router {
    let access = state.access.clone();
    let router = routes()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(access, auth::guard));
    // Its span and line are DEBUG: with DEBUG off everywhere (the filter
    // is set before this and never reloaded), the layer would still read
    // the clock twice and wrap every response body, for nothing (measured:
    // 0.6-2 µs of a PATCH's 9-11).
    let router = if tracing::level_filters::LevelFilter::current()
        >= tracing::level_filters::LevelFilter::DEBUG
    {
        router.layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(request_answered)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
    } else {
        router
    };
    router.with_state(Arc::new(state))
}

/// The router's trace layer (left out unless DEBUG is on for some target):
/// a DEBUG span per request (method, path, matched route) and one DEBUG
/// line when it is answered (status, latency), both in this crate's target so
/// `RUST_LOG=streamline=debug` shows them. Nothing at INFO: publishers may
/// send thousands of PATCHes a second. No failure line either: a 5xx is in
/// the answered line already, and a backend outage would otherwise log an
/// ERROR per request.
fn request_span(req: &http::Request<axum::body::Body>) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| tracing::field::display(p.as_str()));
    tracing::debug_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        route,
    )
}

/// The trace layer's line for an answered request (see [`request_span`]).
fn request_answered(res: &Response, latency: std::time::Duration, _: &tracing::Span) {
    tracing::debug!(
        status = res.status().as_u16(),
        latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        "answered"
    );
}

/// What handlers get: axum clones the state for every request, and one
/// reference count is cheaper than one per field (each an atomic that both
/// control threads write).
type Shared = Arc<ControlState>;

/// The control plane's worker threads: two, so that `PATCH` parsing is not
/// bound to one core (measured: 18,000 -> 29,000 single-event requests/s,
/// 500,000 -> 800,000 events/s in batches, on 2 cores shared with `wrk`).
pub const THREADS: usize = 2;

/// Serves the control plane on a tokio runtime of its own ([`THREADS`]
/// threads), tracked by the lifecycle like any task, until it stops.
///
/// Why not a task beside the streams: one event to a topic with thousands
/// of subscribers wakes thousands of stream tasks at once, and a `PATCH`
/// queued behind them in the runtime's run queue waits for the whole
/// fan-out, so publishers (and probes) slow down exactly when the gateway
/// is busiest. On threads of its own, the OS scheduler serves it at once.
pub fn spawn_dedicated(
    listener: TcpListener,
    router: Router,
    options: serve::ControlOptions,
    life: Lifecycle,
) {
    let tracker = life.tracker().clone();
    let requests = life.requests().clone();
    let served = tracker.track_future(requests.track_future(async move {
        // Re-registered with this runtime, which then does all of the
        // control plane's I/O.
        let listener = match listener.into_std().and_then(TcpListener::from_std) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "control plane failed");
                return;
            }
        };
        if let Err(e) = serve::serve(listener, router, options, life).await {
            tracing::error!(error = %e, "control plane failed");
        }
    }));
    let span = tracing::Span::current();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .thread_name("streamline-control")
        .build();
    let spawned = runtime.and_then(|runtime| {
        std::thread::Builder::new()
            .name("streamline-control".into())
            .spawn(move || {
                let _span = span.entered();
                runtime.block_on(served);
            })
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the control plane thread");
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see proto-docs/openapi.json")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here; see the Allow header"),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(s): State<Shared>) -> Response {
    let mut backends = serde_json::Map::new();
    if let Some(bus) = s.hub.bus() {
        let state = if bus.is_up() { "up" } else { "down" };
        backends.insert(bus.name().into(), state.into());
    }
    let backends_up = backends.values().all(|v| v == "up");
    let (status, code) = if s.life.shutting_down() {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else if !backends_up {
        ("backend_unavailable", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ready", StatusCode::OK)
    };
    let body = json!({"status": status, "replica": &*s.replica, "backends": backends});
    (code, Json(body)).into_response()
}

/// `GET /clients[?topic=NAME][&scope=cluster]`.
async fn list_clients(
    State(s): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let (mut topic, mut cluster) = (None, false);
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match &*k {
            "topic" => topic = Some(v.into_owned()),
            "scope" if v == "cluster" => cluster = true,
            "scope" if v == "local" => cluster = false,
            "scope" => {
                return Err(ApiError::bad_request(
                    "invalid_scope",
                    format!("scope must be local or cluster, not {v:?}"),
                ));
            }
            _ => {}
        }
    }
    let wanted = |topics: &[Arc<str>]| {
        topic
            .as_ref()
            .is_none_or(|t| topics.iter().any(|ct| **ct == **t))
    };
    #[cfg(feature = "redis")]
    if let (true, Some(registry)) = (cluster, &s.cluster) {
        let mut all = registry.list().await?;
        all.retain(|c| wanted(&c.topics));
        return Ok(Json(json!({ "clients": all })).into_response());
    }
    let mut clients = s.hub.clients();
    clients.retain(|c| wanted(c.topics()));
    clients.sort_by_key(|c| c.connected_at());
    let mut views: Vec<serde_json::Value> = Vec::with_capacity(clients.len());
    for c in &clients {
        let mut v = serde_json::to_value(s.hub.client_info(c)).unwrap_or_default();
        if cluster {
            // One replica without Redis is the whole cluster.
            v["replica"] = json!(&*s.replica);
        }
        views.push(v);
    }
    Ok(Json(json!({ "clients": views })).into_response())
}

async fn get_client(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let client = s.hub.client(&id).ok_or_else(|| unknown_client(&id))?;
    Ok(Json(s.hub.client_info(&client)).into_response())
}

/// Ends a stream on this replica or, with Redis, on whichever holds it.
async fn delete_client(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.hub.close_client(&id, CloseReason::Kicked) {
        tracing::info!(client = %id, "stream ended by an operator");
        return Ok(StatusCode::NO_CONTENT);
    }
    #[cfg(feature = "redis")]
    if let Some(registry) = &s.cluster
        && registry.kick(&id).await?
    {
        tracing::info!(client = %id, "asked another replica to end a stream");
        return Ok(StatusCode::NO_CONTENT);
    }
    Err(unknown_client(&id))
}

fn unknown_client(id: &str) -> ApiError {
    ApiError::not_found(format!("no connected client has id {id:?}"))
}

async fn list_topics(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({ "topics": s.hub.topics() }))
}

/// `GET /stats[?scope=cluster]`: this replica's counters now (with Redis
/// and `scope=cluster`, also every other live replica's, as of its last
/// registry refresh), for the operators' page to chart.
async fn stats(State(s): State<Shared>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let mut cluster = false;
    for (k, v) in form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes()) {
        match (&*k, &*v) {
            ("scope", "cluster") => cluster = true,
            ("scope", "local") => cluster = false,
            ("scope", _) => {
                return Err(ApiError::bad_request(
                    "invalid_scope",
                    format!("scope must be local or cluster, not {v:?}"),
                ));
            }
            _ => {}
        }
    }
    let mut me = serde_json::to_value(s.hub.replica_stats(s.life.phase())).unwrap_or_default();
    me["replica"] = json!(&*s.replica);
    #[cfg_attr(
        not(feature = "redis"),
        expect(unused_mut, reason = "no registry in this build")
    )]
    let mut replicas = vec![me];
    if cluster {
        // Without a registry (Redis), this replica is the whole cluster.
        #[cfg(feature = "redis")]
        if let Some(registry) = &s.cluster {
            replicas.extend(registry.other_stats().await?);
        }
    }
    let body = json!({
        "replica": &*s.replica,
        "control_port": s.addrs.map(|(control, _)| control.port()),
        "stream_port": s.addrs.map(|(_, stream)| stream.port()),
        "replicas": replicas,
    });
    Ok(Json(body).into_response())
}

async fn metrics(State(s): State<Shared>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], s.metrics.render()).into_response()
}

async fn patch_events(
    State(s): State<Shared>,
    caller: Option<Extension<auth::Caller>>,
    json: Result<JsonContent, ApiError>,
    key: Result<IdempotencyHeader, ApiError>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let caller = caller.map_or(auth::Caller::Anyone, |Extension(c)| c);
    let result = publish(&s, &caller, json, key, body).await;
    s.metrics
        .patch_latency
        .observe(start.elapsed().as_secs_f64());
    result
}

/// `PATCH /events`'s answer.
#[derive(serde::Serialize)]
struct Published {
    ids: Vec<String>,
}

async fn publish(
    s: &ControlState,
    caller: &auth::Caller,
    json: Result<JsonContent, ApiError>,
    key: Result<IdempotencyHeader, ApiError>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let JsonContent = json?;
    let IdempotencyHeader(key) = key?;
    let body = body.map_err(body_error)?;
    let events = events::parse_batch(&body)?;
    // Mercure's topic takes only Mercure updates (POST /.well-known/mercure).
    if let Some(e) = events
        .iter()
        .find(|e| s.hub.encoder_for(&e.topic).is_some())
    {
        return Err(ApiError::bad_request(
            "invalid_event",
            format!("topic: {:?} is reserved for Mercure updates", e.topic),
        ));
    }
    caller.may_publish(events.iter().map(|e| e.topic.as_str()))?;
    let published = match key {
        Some(key) => {
            let key = IdempotencyKey::new(key, &events);
            s.hub.publish_batch_once(&events, &key).await
        }
        None => s.hub.publish_batch(&events).await,
    };
    let ids = published.map_err(|e| match e {
        // With Kafka: an event whose topic no Kafka topic is mapped to.
        HubError::Bus(BusError::NoSuchTopic(detail)) => {
            ApiError::bad_request("invalid_event", detail)
        }
        e => e.into(),
    })?;
    Ok((StatusCode::ACCEPTED, Json(Published { ids })).into_response())
}

/// Why a request body could not be read: too large (413), not sent in
/// time (408, see [`serve::BodyDeadline`]), or broken off (400).
fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "payload_too_large", e.body_text());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(late) = err.downcast_ref::<serve::BodyTimedOut>() {
            return ApiError {
                close: true,
                ..ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    late.to_string(),
                )
            };
        }
        source = err.source();
    }
    ApiError::new(status, "invalid_body", e.body_text())
}

/// The `Idempotency-Key` header, checked (400 `invalid_idempotency_key`).
struct IdempotencyHeader(Option<String>);

impl<S: Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        idempotency::parse_header(parts.headers.get(idempotency::HEADER)).map(IdempotencyHeader)
    }
}

/// A request whose `Content-Type` is JSON, checked by reference (the
/// `HeaderMap` extractor would copy every header to read one).
struct JsonContent;

impl<S: Sync> FromRequestParts<S> for JsonContent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        if is_json(parts.headers.get(header::CONTENT_TYPE)) {
            Ok(JsonContent)
        } else {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the events as Content-Type: application/json",
            ))
        }
    }
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_must_be_json() {
        assert!(is_json(Some(&HeaderValue::from_static("application/json"))));
        assert!(is_json(Some(&HeaderValue::from_static(
            "Application/JSON; charset=utf-8"
        ))));
        assert!(!is_json(Some(&HeaderValue::from_static("text/plain"))));
        assert!(!is_json(None));
    }

    #[test]
    fn route_table_has_no_duplicates() {
        let table = route_table();
        for (i, r) in table.iter().enumerate() {
            assert!(!table[i + 1..].contains(r), "{r:?} declared twice");
        }
    }
}
