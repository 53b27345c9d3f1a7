//! Keeps the documentation true to the code: the OpenAPI routes, README's
//! configuration, endpoint and metrics lists, the `//!` line on every module,
//! PROTOCOL.md's wire examples, notice reasons and error table (checked
//! against the source and provoked one by one).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use clap::CommandFactory;
use futures_util::future::BoxFuture;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use streamline::auth::{Credentials, JwtOptions, Secret, Verifier};
use streamline::control::serve::BodyDeadline;
use streamline::hub::{Bus, BusError, CatchUp, NewEvent};
use streamline::hub::{Hub, HubConfig, HubError, SlowClientPolicy};
use streamline::id::Position;
use streamline::lifecycle::Lifecycle;
use streamline::metrics::Metrics;
use streamline::sse::{self, CloseReason, GapReason};
use streamline::stream::StreamOptions;
use streamline::{Config, control, stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of the section that starts with the heading line `heading`, up to
/// the next heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let level = heading.bytes().take_while(|&b| b == b'#').count();
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"))
        + 1;
    let body = &doc[start + heading.len()..];
    let end = body
        .match_indices("\n#")
        .find(|(i, _)| {
            let hashes = body[i + 1..].bytes().take_while(|&b| b == b'#').count();
            hashes <= level && body[i + 1 + hashes..].starts_with(' ')
        })
        .map_or(body.len(), |(i, _)| i);
    &body[..end]
}

/// The cells of every row of the Markdown tables in `text`, header and
/// separator rows excluded, with surrounding backticks removed.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines().map(str::trim) {
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_owned())
            .collect();
        let separator = cells.iter().all(|c| c.chars().all(|ch| ch == '-'));
        if in_table && !separator {
            rows.push(cells);
        }
        in_table = true;
    }
    rows
}

fn set<T: Ord + Clone>(items: impl IntoIterator<Item = T>) -> BTreeSet<T> {
    items.into_iter().collect()
}

// ----- (a) OpenAPI and README against the control plane's route table -----

fn served_routes() -> BTreeSet<(String, String)> {
    control::route_table()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect()
}

fn openapi() -> Value {
    serde_json::from_str(&read("proto-docs/openapi.json")).expect("openapi.json is valid JSON")
}

#[test]
fn openapi_documents_exactly_the_control_routes() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.0.3");
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for key in item.as_object().expect("path item").keys() {
            if METHODS.contains(&key.as_str()) {
                documented.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    let served = served_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && not_served.is_empty(),
        "served but not in openapi.json: {undocumented:?}; in openapi.json but not served: {not_served:?}"
    );
}

#[test]
fn openapi_references_resolve() {
    fn walk(v: &Value, root: &Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    let pointer = r.strip_prefix('#').expect("local $ref");
                    assert!(root.pointer(pointer).is_some(), "dangling $ref {r}");
                }
                map.values().for_each(|v| walk(v, root));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, root)),
            _ => {}
        }
    }
    let doc = openapi();
    walk(&doc, &doc);
}

#[test]
fn readme_lists_every_control_route() {
    let endpoints = section(&read("README.md"), "## Endpoints").to_owned();
    for (method, path) in served_routes() {
        assert!(
            endpoints.contains(&format!("`{method} {path}")),
            "README's Endpoints section does not list `{method} {path}`"
        );
    }
}

// ----- (b) README's configuration table against `Config` -----

#[test]
fn readme_configuration_table_matches_config() {
    let readme = read("README.md");
    let rows = table_rows(section(&readme, "## Configuration"));
    let mut cmd = Config::command();
    cmd.build();
    let args: Vec<_> = cmd
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();

    let documented: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
    let defined: Vec<String> = args
        .iter()
        .map(|a| format!("--{}", a.get_long().expect("every flag is long")))
        .collect();
    assert_eq!(
        documented, defined,
        "README's table must list exactly the flags of src/config.rs, in the same order"
    );

    for (row, arg) in rows.iter().zip(&args) {
        assert_eq!(
            row.len(),
            4,
            "{}: Flag | Env var | Default | Meaning",
            row[0]
        );
        let env = arg
            .get_env()
            .and_then(|e| e.to_str())
            .expect("every flag has an env var");
        assert_eq!(row[1], env, "env var of {}", row[0]);
        let default: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        assert_eq!(row[2], default.join(","), "default of {}", row[0]);
        if arg.get_action().takes_values() {
            for value in arg.get_possible_values() {
                assert!(
                    row[3].contains(&format!("`{}`", value.get_name())),
                    "meaning of {} should name the value `{}`",
                    row[0],
                    value.get_name()
                );
            }
        }
    }
}

// ----- (c) every module says what it owns -----

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The sources under `dir` (relative to the repository).
fn source_files_in(dir: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    rs_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no source files in {dir}");
    files
}

/// The gateway's sources.
fn source_files() -> Vec<PathBuf> {
    let files = source_files_in("src");
    assert!(files.len() > 10, "found only {files:?}");
    files
}

#[test]
fn every_source_file_starts_with_a_module_doc_line() {
    // Both crates: the gateway's and the bench's.
    let missing: Vec<_> = source_files()
        .into_iter()
        .chain(source_files_in("bench/src"))
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "no leading `//!` line: {missing:?}");
}

// ----- (d) error codes: PROTOCOL.md's table, the source, openapi.json -----

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ErrorRow {
    plane: String,
    status: u16,
    code: String,
    retry_after: Option<u64>,
}

fn documented_errors() -> Vec<ErrorRow> {
    let rows = table_rows(section(&read("proto-docs/PROTOCOL.md"), "## Errors"));
    assert!(!rows.is_empty(), "PROTOCOL.md has no error table");
    rows.iter()
        .map(|r| ErrorRow {
            status: r[0].parse().expect("a status"),
            code: r[1].clone(),
            plane: r[2].clone(),
            retry_after: (!r[3].is_empty()).then(|| r[3].parse().expect("seconds")),
        })
        .collect()
}

/// The contents of every string literal in `text` (escapes dropped).
fn string_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut lit = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                c => lit.push(c),
            }
        }
        out.push(lit);
    }
    out
}

/// `text` (which starts with `(`) up to its matching `)`, skipping string
/// literals.
fn balanced(text: &str) -> &str {
    let (mut depth, mut in_str, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..=i];
                }
            }
            _ => {}
        }
    }
    text
}

fn looks_like_code(s: &str) -> bool {
    let mut words = s.split('_');
    words.all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The error codes the source can produce: the snake_case string literals in
/// `ApiError::…(…)` calls, in `Self::…(…)` calls inside `error.rs`, and in
/// `let code = …;` bindings, outside `#[cfg(test)]` code.
fn codes_in_source() -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    for file in source_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap();
        let mut markers = vec!["ApiError::"];
        if file.ends_with("error.rs") {
            markers.push("Self::");
        }
        let mut regions = Vec::new();
        for marker in markers {
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                let name_len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(0);
                if rest[name_len..].starts_with('(') {
                    regions.push(balanced(&rest[name_len..]));
                }
            }
        }
        for (at, _) in text.match_indices("let code =") {
            let rest = &text[at..];
            regions.push(&rest[..rest.find(';').unwrap_or(rest.len())]);
        }
        for region in regions {
            codes.extend(
                string_literals(region)
                    .into_iter()
                    .filter(|s| looks_like_code(s)),
            );
        }
    }
    codes
}

#[test]
fn error_codes_in_the_source_are_the_documented_ones() {
    let in_source = codes_in_source();
    assert!(in_source.len() >= 10, "scanner found only {in_source:?}");
    let documented = set(documented_errors().into_iter().map(|r| r.code));
    let undocumented: Vec<_> = in_source.difference(&documented).collect();
    let not_in_source: Vec<_> = documented.difference(&in_source).collect();
    assert!(
        undocumented.is_empty() && not_in_source.is_empty(),
        "codes in src/ missing from PROTOCOL.md's error table: {undocumented:?}; \
         documented but not in src/: {not_in_source:?}"
    );
}

#[test]
fn openapi_error_codes_are_the_documented_control_plane_codes() {
    let doc = openapi();
    let listed = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
        .as_array()
        .expect("Error.error.enum")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned());
    let documented = documented_errors()
        .into_iter()
        .filter(|r| r.plane == "control")
        .map(|r| r.code);
    assert_eq!(set(listed), set(documented));
}

/// Checks one error response against its row in PROTOCOL.md's table and
/// returns that row.
fn expect_documented(
    plane: &str,
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
) -> ErrorRow {
    let what = format!("{plane} {status} {}", String::from_utf8_lossy(body));
    assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
    let v: Value = serde_json::from_slice(body).expect("a JSON error body");
    let keys = set(v.as_object().expect("an object").keys().map(String::as_str));
    assert_eq!(keys, set(["detail", "error"]), "{what}");
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .map(|h| h.to_str().unwrap().parse().unwrap());
    if status == StatusCode::METHOD_NOT_ALLOWED {
        assert!(headers.contains_key(header::ALLOW), "{what}: no Allow");
    }
    let got = ErrorRow {
        plane: plane.to_owned(),
        status: status.as_u16(),
        code: v["error"].as_str().unwrap().to_owned(),
        retry_after,
    };
    assert!(
        documented_errors().contains(&got),
        "{what} is not a row of PROTOCOL.md's error table: {got:?}"
    );
    got
}

/// A bus that is down for topic `down` and for publishing, and claims to
/// follow every other topic without ever creating it in the hub.
struct BrokenBus;

fn down() -> BusError {
    BusError::Unavailable {
        backend: "test",
        reason: "down".into(),
    }
}

impl Bus for BrokenBus {
    fn name(&self) -> &'static str {
        "test"
    }

    fn publish<'a>(
        &'a self,
        events: &'a [NewEvent],
    ) -> BoxFuture<'a, Result<Vec<String>, BusError>> {
        Box::pin(async move {
            // Topic `hung`: the request went out and no answer came back.
            if events[0].topic == "hung" {
                return Err(BusError::OutcomeUnknown {
                    backend: "test",
                    reason: "no answer".into(),
                });
            }
            Err(down())
        })
    }

    fn follow<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            if topic == "down" {
                Err(down().into())
            } else {
                Ok(())
            }
        })
    }

    fn catch_up(&self, _: &str, _: Position, _: Position) -> mpsc::Receiver<CatchUp> {
        mpsc::channel(1).1
    }

    fn is_up(&self) -> bool {
        false
    }
}

const JWT_SECRET: &str = "docs-test-secret-of-at-least-32-bytes";

fn verifier() -> Arc<Verifier> {
    let options = JwtOptions {
        secret: Some(Secret::new(JWT_SECRET)),
        ..JwtOptions::default()
    };
    Arc::new(Verifier::new(&options).unwrap().unwrap())
}

/// An HS256 token with `claims` and an `exp` a minute away.
fn token(mut claims: Value) -> String {
    claims["exp"] = (jsonwebtoken::get_current_timestamp() + 60).into();
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

fn hub_with_broken_bus() -> Arc<Hub> {
    let hub = Hub::new(HubConfig::default());
    assert!(hub.set_bus(Arc::new(BrokenBus)).is_ok());
    hub
}

/// Serves the stream plane for `hub` on a free port until `life` stops.
async fn stream_plane(
    hub: &Arc<Hub>,
    options: StreamOptions,
    life: &Lifecycle,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(stream::serve(listener, hub.clone(), options, life.clone()));
    (base, server)
}

async fn check_stream(seen: &mut BTreeSet<ErrorRow>, res: reqwest::Response) {
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.bytes().await.unwrap();
    seen.insert(expect_documented("stream", status, &headers, &body));
}

/// Sends `request` as it is on a connection of its own and reads the answer
/// until the server closes it.
async fn raw_request(addr: &str, request: &str) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let (k, v) = line.split_once(':').unwrap();
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
            v.trim().parse().unwrap(),
        );
    }
    (
        StatusCode::from_u16(status).unwrap(),
        headers,
        answer[end + 4..].to_vec(),
    )
}

async fn provoke_stream_errors(seen: &mut BTreeSet<ErrorRow>) {
    let hub = Hub::new(HubConfig {
        max_clients: 1,
        max_topics: 1,
        ..HubConfig::default()
    });
    hub.publish("a", None, "x").unwrap(); // topic `a` takes the only slot
    let life = Lifecycle::new(CancellationToken::new());
    let options = StreamOptions {
        max_stream_topics: 1,
        ..StreamOptions::default()
    };
    let (base, server) = stream_plane(&hub, options, &life).await;
    let http = reqwest::Client::new();

    for path_query in [
        "/nope",
        "/stream",
        "/stream?topic=a%20b",
        "/stream?topic=a&topic=b",
        "/stream?topic=a&lastEventId=zzz",
        "/stream?topic=b",
    ] {
        let res = http
            .get(format!("{base}{path_query}"))
            .send()
            .await
            .unwrap();
        check_stream(seen, res).await;
    }
    let url = format!("{base}/stream?topic=a");
    check_stream(seen, http.post(&url).send().await.unwrap()).await;
    // Content-Length and Transfer-Encoding both (a smuggling attempt).
    let addr = base.trim_start_matches("http://");
    let answer = raw_request(
        addr,
        "GET /stream?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    seen.insert(expect_documented("stream", answer.0, &answer.1, &answer.2));
    // A CORS preflight from an origin not in --cors-allow-origin.
    let preflight = http
        .request(Method::OPTIONS, &url)
        .header("origin", "https://foreign.example")
        .header("access-control-request-method", "GET");
    check_stream(seen, preflight.send().await.unwrap()).await;

    let open = http.get(&url).send().await.unwrap();
    assert_eq!(open.status(), 200);
    check_stream(seen, http.get(&url).send().await.unwrap()).await;
    drop(open);

    hub.stop_accepting();
    check_stream(seen, http.get(&url).send().await.unwrap()).await;

    // Authentication and per-client limits.
    let secured = StreamOptions {
        auth: Some(Arc::new(streamline::stream::auth::StreamAuth {
            verifier: verifier(),
            cookie: None,
            end_at_expiry: true,
            leeway: Duration::ZERO,
        })),
        max_streams_per_ip: 1,
        ..StreamOptions::default()
    };
    let open_hub = Hub::new(HubConfig::default());
    let (secured_base, secured_server) = stream_plane(&open_hub, secured, &life).await;
    let reader = token(serde_json::json!({"topics": ["a"]}));
    let with_token =
        |topic: &str| format!("{secured_base}/stream?topic={topic}&access_token={reader}");
    let no_token = format!("{secured_base}/stream?topic=a");
    check_stream(seen, http.get(&no_token).send().await.unwrap()).await;
    check_stream(seen, http.get(with_token("b")).send().await.unwrap()).await;
    let open = http.get(with_token("a")).send().await.unwrap();
    assert_eq!(open.status(), 200);
    check_stream(seen, http.get(with_token("a")).send().await.unwrap()).await;
    drop(open);
    // One new connection a second, then one connection at most: each
    // request on a connection of its own.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let rate = StreamOptions {
        max_conn_rate_per_ip: 1,
        ..StreamOptions::default()
    };
    let (rate_base, rate_server) = stream_plane(&open_hub, rate, &life).await;
    let url = format!("{rate_base}/stream?topic=a");
    let open = fresh().get(&url).send().await.unwrap();
    assert_eq!(open.status(), 200);
    check_stream(seen, fresh().get(&url).send().await.unwrap()).await;
    drop(open);
    let full = StreamOptions {
        max_connections: 1,
        ..StreamOptions::default()
    };
    let (full_base, full_server) = stream_plane(&open_hub, full, &life).await;
    let url = format!("{full_base}/stream?topic=a");
    let open = fresh().get(&url).send().await.unwrap();
    assert_eq!(open.status(), 200);
    check_stream(seen, fresh().get(&url).send().await.unwrap()).await;
    drop(open);

    // A bus that cannot follow a topic, or loses it before the stream joins.
    let bus_hub = hub_with_broken_bus();
    let (bus_base, bus_server) = stream_plane(&bus_hub, StreamOptions::default(), &life).await;
    for topic in ["down", "ghost"] {
        let url = format!("{bus_base}/stream?topic={topic}");
        check_stream(seen, http.get(url).send().await.unwrap()).await;
    }

    life.stop();
    for server in [server, bus_server, secured_server, rate_server, full_server] {
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("stream plane stops")
            .unwrap();
    }
}

async fn provoke_control_errors(seen: &mut BTreeSet<ErrorRow>) {
    let hub = Hub::new(HubConfig {
        max_topics: 1,
        ..HubConfig::default()
    });
    hub.publish("a", None, "x").unwrap(); // topic `a` takes the only slot
    let router = |hub: Arc<Hub>| {
        let state = control::ControlState {
            hub: hub.clone(),
            life: Lifecycle::new(CancellationToken::new()),
            metrics: Arc::new(Metrics::new(hub)),
            #[cfg(feature = "redis")]
            cluster: None,
            replica: "test".into(),
            access: Arc::new(control::auth::Access::open()),
            addrs: None,
        };
        control::router(state, 64)
    };
    let (local, with_bus) = (router(hub.clone()), router(hub_with_broken_bus()));
    // A control token, publisher JWTs and one PATCH a second.
    let secured = {
        let credentials = Credentials {
            jwt: Some(verifier()),
            control_token: Some(Secret::new("control-secret")),
            metrics_token: None,
        };
        let state = control::ControlState {
            hub: hub.clone(),
            life: Lifecycle::new(CancellationToken::new()),
            metrics: Arc::new(Metrics::new(hub)),
            #[cfg(feature = "redis")]
            cluster: None,
            replica: "test".into(),
            access: Arc::new(control::auth::Access::new(
                &credentials,
                Default::default(),
                1,
            )),
            addrs: None,
        };
        control::router(state, 64)
    };

    let req = |method: Method, uri: &str, content_type: Option<&str>, body: Body| {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req.body(body).unwrap()
    };
    let get = |uri: &str| req(Method::GET, uri, None, Body::empty());
    let patch =
        |content_type: &str, body: Body| req(Method::PATCH, "/events", Some(content_type), body);
    let json = "application/json";
    let broken = futures_util::stream::once(async {
        Err::<bytes::Bytes, _>(std::io::Error::other("connection reset"))
    });
    let too_big = format!(r#"{{"topic":"a","data":"{}"}}"#, "x".repeat(100));
    let publisher = format!("Bearer {}", token(serde_json::json!({"publish": ["p"]})));
    let publish_as = |auth: &str| {
        let mut req = patch("application/json", Body::from(r#"{"topic":"a","data":1}"#));
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
        req
    };
    let keyed = |key: &str, body: &'static str| {
        let mut req = patch(json, Body::from(body));
        req.headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        req
    };
    let requests = [
        (&local, get("/nope")),
        (&local, get("/clients/nobody")),
        (&local, get("/clients?scope=everywhere")),
        (&local, req(Method::POST, "/health", None, Body::empty())),
        (
            &local,
            patch("text/plain", Body::from(r#"{"topic":"a","data":1}"#)),
        ),
        (&local, patch(json, Body::from(too_big))),
        (&local, patch(json, Body::from("42"))),
        (&local, patch(json, Body::from("[]"))),
        (&local, patch(json, Body::from_stream(broken))),
        (&local, patch(json, Body::from(r#"{"topic":"b","data":1}"#))),
        (
            &with_bus,
            patch(json, Body::from(r#"{"topic":"a","data":1}"#)),
        ),
        (
            &with_bus,
            patch(json, Body::from(r#"{"topic":"hung","data":1}"#)),
        ),
        (&local, keyed("k 1", r#"{"topic":"a","data":1}"#)),
        (&local, keyed("k1", r#"{"topic":"a","data":1}"#)),
        (&local, keyed("k1", r#"{"topic":"a","data":2}"#)),
        // A body that never arrives, past its deadline.
        (
            &local,
            patch(
                json,
                Body::new(BodyDeadline::new(
                    http_body_util::StreamBody::new(futures_util::stream::pending::<
                        Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
                    >()),
                    Duration::from_millis(10),
                )),
            ),
        ),
        (&secured, get("/clients")),
        // Topic `a` is not in the JWT's `publish` claim...
        (&secured, publish_as(&publisher)),
        // ... and that took this publisher's one request of the second.
        (&secured, publish_as(&publisher)),
    ];
    for (router, req) in requests {
        let res = router.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        if parts.status == StatusCode::ACCEPTED {
            continue; // the first use of an Idempotency-Key
        }
        let body = body.collect().await.unwrap().to_bytes();
        seen.insert(expect_documented(
            "control",
            parts.status,
            &parts.headers,
            &body,
        ));
    }
}

#[tokio::test]
async fn every_documented_error_is_produced_as_documented() {
    let mut seen = BTreeSet::new();
    provoke_stream_errors(&mut seen).await;
    provoke_control_errors(&mut seen).await;
    let documented = set(documented_errors());
    let never_produced: Vec<_> = documented.difference(&seen).collect();
    assert!(
        never_produced.is_empty(),
        "rows of PROTOCOL.md's error table this test does not provoke \
         (add a request that does): {never_produced:?}"
    );
}

// ----- PROTOCOL.md's wire examples, notices and policies -----

#[test]
fn protocol_wire_examples_are_what_the_encoder_writes() {
    let doc = read("proto-docs/PROTOCOL.md");
    let epoch: u64 = 1_732_390_000_000;
    let event = sse::encode_event(&format!("chat:{epoch}-42"), Some("greet"), "hello\nworld");
    let multi = [
        sse::id_line(&format!("chat:{epoch}-42,news:{epoch}-40")),
        event.body(),
    ]
    .concat();
    let examples = [
        sse::preamble(Duration::from_secs(2), "930a84a5-7").to_vec(),
        event.bytes().to_vec(),
        multi,
        sse::HEARTBEAT.to_vec(),
        sse::gap_notice(&format!("chat:{epoch}-57"), "chat", GapReason::Expired).to_vec(),
        sse::close_notice(CloseReason::Shutdown, Duration::from_secs(2)).to_vec(),
    ];
    for bytes in &examples {
        let block = format!("```text\n{}```", String::from_utf8_lossy(bytes));
        assert!(doc.contains(&block), "PROTOCOL.md lacks the block\n{block}");
    }
    assert_eq!(
        doc.matches("```text\n").count(),
        examples.len(),
        "every ```text block in PROTOCOL.md is wire output and must be checked here"
    );
}

fn serialized<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn protocol_lists_every_notice_reason_and_policy() {
    // Exhaustive on purpose: a new variant stops this compiling until it is
    // added to the lists below (and so to PROTOCOL.md).
    fn _gap(r: GapReason) {
        match r {
            GapReason::Expired
            | GapReason::Unknown
            | GapReason::UnknownOrigin
            | GapReason::Slow
            | GapReason::Reset => {}
        }
    }
    fn _close(r: CloseReason) {
        match r {
            CloseReason::Shutdown
            | CloseReason::Slow
            | CloseReason::Kicked
            | CloseReason::Unavailable
            | CloseReason::TokenExpired => {}
        }
    }
    fn _policy(p: SlowClientPolicy) {
        match p {
            SlowClientPolicy::Disconnect | SlowClientPolicy::Skip => {}
        }
    }
    let doc = read("proto-docs/PROTOCOL.md");
    let reasons = |heading: &str| {
        set(table_rows(section(&doc, heading))
            .into_iter()
            .map(|r| r[0].clone()))
    };
    let gaps = [
        GapReason::Expired,
        GapReason::Unknown,
        GapReason::UnknownOrigin,
        GapReason::Slow,
        GapReason::Reset,
    ];
    assert_eq!(
        reasons("### `streamline.gap`"),
        set(gaps.map(serialized)),
        "gap reasons"
    );
    let closes = [
        CloseReason::Shutdown,
        CloseReason::Slow,
        CloseReason::Kicked,
        CloseReason::Unavailable,
        CloseReason::TokenExpired,
    ];
    assert_eq!(
        reasons("### `streamline.close`"),
        set(closes.map(serialized)),
        "close reasons"
    );
    assert_eq!(sse::GAP_EVENT, "streamline.gap");
    assert_eq!(sse::CLOSE_EVENT, "streamline.close");
    let slow = section(&doc, "## Slow clients");
    for p in [SlowClientPolicy::Disconnect, SlowClientPolicy::Skip] {
        let name = serialized(p);
        assert!(slow.contains(&format!("- **`{name}`**")), "policy {name}");
    }
}

// ----- README's metrics table -----

#[test]
fn readme_lists_exactly_the_exported_metrics() {
    let mut metrics = Metrics::new(Hub::new(HubConfig::default()));
    metrics.register_lifecycle(Lifecycle::new(CancellationToken::new()));
    // A build without a bus (its feature off) exports none of its metrics.
    #[cfg(feature = "redis")]
    metrics.register_redis(Arc::new(streamline::backend::redis::RedisStats::default()));
    #[cfg(feature = "kafka")]
    metrics.register_kafka(Arc::new(streamline::backend::kafka::KafkaStats::default()));
    let text = metrics.render();
    let exported = set(text.lines().filter_map(|l| {
        let (name, kind) = l.strip_prefix("# TYPE ")?.split_once(' ')?;
        let suffix = if kind == "counter" { "_total" } else { "" };
        Some((format!("{name}{suffix}"), kind.to_owned()))
    }));
    let readme = read("README.md");
    let documented = set(table_rows(section(&readme, "## Operations"))
        .into_iter()
        .filter(|r| r[0].starts_with("streamline_"))
        .filter(|r| cfg!(feature = "redis") || !r[0].starts_with("streamline_redis_"))
        .filter(|r| cfg!(feature = "kafka") || !r[0].starts_with("streamline_kafka_"))
        .map(|r| (r[0].clone(), r[1].clone())));
    assert_eq!(documented, exported, "README's metrics table vs /metrics");
}
