//! The control plane: the REST API for operators and services (axum).
//!
//! Routes are declared once, in [`routes`], which records each (method, path)
//! as it adds it; a test compares that table with `proto-docs/openapi.json`,
//! so an undocumented route fails the build.

pub mod events;

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::ApiError;
use crate::hub::{Client, Hub};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::sse::CloseReason;

#[derive(Debug, Clone)]
pub struct ControlState {
    pub hub: Arc<Hub>,
    pub life: Lifecycle,
    pub metrics: Arc<Metrics>,
}

struct Routes {
    router: Router<ControlState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, ControlState>,
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
    .add(Method::GET, "/health", health)
    .add(Method::GET, "/ready", ready)
    .add(Method::GET, "/clients", list_clients)
    .add(Method::GET, "/clients/{id}", get_client)
    .add(Method::DELETE, "/clients/{id}", delete_client)
    .add(Method::GET, "/topics", list_topics)
    .add(Method::GET, "/metrics", metrics)
    .add(Method::PATCH, "/events", patch_events)
}

/// Every (method, path) the control plane serves.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table
}

/// The control plane's router, with request bodies capped at `max_body` bytes.
pub fn router(state: ControlState, max_body: usize) -> Router {
    routes()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serves the control plane until the lifecycle stops; requests in flight
/// then finish before this returns.
pub async fn serve(listener: TcpListener, router: Router, life: Lifecycle) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { life.stopped().await })
        .await
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

async fn ready(State(s): State<ControlState>) -> Response {
    if s.life.shutting_down() {
        let body = json!({"status": "shutting_down"});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

#[derive(Serialize)]
struct ClientView<'a> {
    id: &'a str,
    remote_addr: String,
    topics: &'a [Arc<str>],
    connected_at: String,
    events_sent: u64,
    bytes_sent: u64,
    user_agent: Option<&'a str>,
    protocol: &'a str,
}

impl<'a> ClientView<'a> {
    fn new(c: &'a Client) -> Self {
        let connected = humantime::format_rfc3339_millis(c.connected_at()).to_string();
        ClientView {
            id: c.id(),
            remote_addr: c.meta().remote_addr.to_string(),
            topics: c.topics(),
            connected_at: connected,
            events_sent: c.events_sent(),
            bytes_sent: c.bytes_sent(),
            user_agent: c.meta().user_agent.as_deref(),
            protocol: c.meta().protocol,
        }
    }
}

async fn list_clients(
    State(s): State<ControlState>,
    RawQuery(q): RawQuery,
) -> Json<serde_json::Value> {
    let topic = form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "topic")
        .map(|(_, v)| v.into_owned());
    let mut clients = s.hub.clients();
    clients.retain(|c| {
        topic
            .as_ref()
            .is_none_or(|t| c.topics().iter().any(|ct| **ct == **t))
    });
    clients.sort_by_key(|c| c.connected_at());
    let views: Vec<ClientView> = clients.iter().map(|c| ClientView::new(c)).collect();
    Json(json!({ "clients": views }))
}

async fn get_client(
    State(s): State<ControlState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let client = s.hub.client(&id).ok_or_else(|| unknown_client(&id))?;
    Ok(Json(ClientView::new(&client)).into_response())
}

async fn delete_client(
    State(s): State<ControlState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.hub.close_client(&id, CloseReason::Kicked) {
        tracing::info!(client = %id, "stream ended by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown_client(&id))
    }
}

fn unknown_client(id: &str) -> ApiError {
    ApiError::not_found(format!("no connected client has id {id:?}"))
}

async fn list_topics(State(s): State<ControlState>) -> Json<serde_json::Value> {
    Json(json!({ "topics": s.hub.topics() }))
}

async fn metrics(State(s): State<ControlState>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], s.metrics.render()).into_response()
}

async fn patch_events(
    State(s): State<ControlState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let result = publish(&s, &headers, body);
    s.metrics
        .patch_latency
        .observe(start.elapsed().as_secs_f64());
    result
}

fn publish(
    s: &ControlState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !is_json(headers.get(header::CONTENT_TYPE)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the events as Content-Type: application/json",
        ));
    }
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, e.body_text())
    })?;
    let events = events::parse_batch(&body)?;
    s.hub
        .ensure_topics(events.iter().map(|e| e.topic.as_str()))?;
    let mut ids = Vec::with_capacity(events.len());
    for ev in &events {
        ids.push(s.hub.publish(&ev.topic, ev.event.as_deref(), &ev.data)?);
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "ids": ids }))).into_response())
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
