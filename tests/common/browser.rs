//! A real headless Chromium per test, driven over the Chrome DevTools
//! Protocol (a WebSocket speaking JSON): open a page, evaluate JavaScript in
//! it, wait until an expression holds. Started in its own process group with
//! a temp profile; the group is killed by id when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::WAIT;
use super::nginx::temp_dir;

type Call = (Value, oneshot::Sender<Value>);

pub struct Browser {
    child: Child,
    pid: u32,
    dir: PathBuf,
    calls: mpsc::UnboundedSender<Call>,
    next_id: AtomicU64,
}

/// One tab, attached with its own CDP session.
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Browser {
    pub async fn launch() -> Browser {
        let dir = temp_dir("chromium");
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.display()))
            .arg("about:blank")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium is installed (bash .ci/test installs it)");
        let pid = child.id().expect("running");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = tokio::time::timeout(WAIT, async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("chromium exited before listening for DevTools");
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
        })
        .await
        .expect("chromium starts in time");
        // Keep reading, so chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("DevTools WebSocket");
        let (calls, rx) = mpsc::unbounded_channel();
        tokio::spawn(pump(ws, rx));
        Browser {
            child,
            pid,
            dir,
            calls,
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends one CDP command and returns its `result`, or its `error`.
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((msg, tx))
            .expect("DevTools connection open");
        let reply = tokio::time::timeout(WAIT, rx)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} in time"))
            .expect("DevTools connection open");
        match reply.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(reply["result"].clone()),
        }
    }

    /// Opens `url` in a new tab and waits until it has loaded.
    pub async fn open(&self, url: &str) -> Page<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": url}))
            .await
            .expect("Target.createTarget");
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await
            .expect("Target.attachToTarget");
        let page = Page {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        };
        let loaded = format!(
            "location.href === {} && document.readyState === 'complete'",
            json!(url)
        );
        page.wait_for(&format!("{url} loaded"), &loaded).await;
        page
    }
}

impl Page<'_> {
    /// Lays the page out as on a `width` × `height` screen.
    pub async fn set_viewport(&self, width: u32, height: u32) {
        let params =
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false});
        self.browser
            .call(
                Some(&self.session),
                "Emulation.setDeviceMetricsOverride",
                params,
            )
            .await
            .expect("Emulation.setDeviceMetricsOverride");
    }

    /// Saves what the tab shows now as a PNG at `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self
            .browser
            .call(
                Some(&self.session),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await
            .expect("Page.captureScreenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Evaluates `expr` (awaiting a promise) and returns its value as JSON;
    /// `Err` with the exception when it throws.
    pub async fn try_eval(&self, expr: &str) -> Result<Value, Value> {
        let params = json!({"expression": expr, "returnByValue": true, "awaitPromise": true});
        let r = self
            .browser
            .call(Some(&self.session), "Runtime.evaluate", params)
            .await?;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    pub async fn eval(&self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("{expr} threw: {e}"))
    }

    /// Polls `expr` until it evaluates to a truthy value, and returns that
    /// value; fails the test after [`WAIT`].
    pub async fn wait_for(&self, what: &str, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let last = self.try_eval(expr).await;
            if let Ok(v) = &last {
                let truthy = !matches!(v, Value::Null | Value::Bool(false))
                    && v != &json!(0)
                    && v != &json!("");
                if truthy {
                    return v.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what} ({expr} gave {last:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers (zygote, renderers) share its process group.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Owns the WebSocket: sends calls, routes each reply to its caller by id,
/// and drops CDP events (nothing here subscribes to any).
async fn pump<S>(ws: S, mut calls: mpsc::UnboundedReceiver<Call>)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut waiting: std::collections::HashMap<u64, oneshot::Sender<Value>> = Default::default();
    loop {
        tokio::select! {
            call = calls.recv() => {
                let Some((msg, reply)) = call else { return };
                waiting.insert(msg["id"].as_u64().unwrap(), reply);
                if sink.send(Message::text(msg.to_string())).await.is_err() {
                    return;
                }
            }
            msg = stream.next() => {
                let Some(Ok(Message::Text(text))) = msg else {
                    if matches!(msg, Some(Ok(_))) { continue; }
                    return;
                };
                let v: Value = serde_json::from_str(&text).unwrap_or_default();
                if let Some(reply) = v["id"].as_u64().and_then(|id| waiting.remove(&id)) {
                    let _ = reply.send(v);
                }
            }
        }
    }
}
