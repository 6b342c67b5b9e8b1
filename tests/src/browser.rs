//! A real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: JSON commands on the browser's WebSocket, one page target,
//! attached with a flat session. Enough for the dashboard's tests to
//! navigate, read the DOM, type, click and take screenshots.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page open.
pub struct Browser {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// Where Chromium is: `chromium` on PATH (`scripts/deps.sh test` installs
/// Debian's package). Its absence is an error, never a skip.
pub fn chromium() -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("chromium");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("chromium is not installed: run scripts/deps.sh test (apt-get install chromium)")
}

impl Browser {
    /// Starts Chromium headless with a fresh profile and opens a blank page
    /// of `width`×`height` CSS pixels.
    pub async fn launch(width: u32, height: u32) -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let child = tokio::process::Command::new(chromium()?)
            .args([
                "--headless",
                // The tests run as root, where Chromium's own sandbox cannot
                // start; the pages it loads are our own.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium")?;
        // Chromium writes its port and the browser target's path here once
        // it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some((port, path)) = text.split_once('\n')
                && !path.trim().is_empty()
            {
                break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
            ensure!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .context("connecting to chromium's DevTools")?;
        let mut b = Self {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = b
            .browser_call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .context("no target id")?
            .to_owned();
        let attached = b
            .browser_call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        b.session = attached["sessionId"]
            .as_str()
            .context("no session id")?
            .to_owned();
        b.call("Page.enable", json!({})).await?;
        b.call("Runtime.enable", json!({})).await?;
        b.viewport(width, height, false).await?;
        Ok(b)
    }

    async fn browser_call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.send(method, params, None).await
    }

    /// One command to the page; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.send(method, params, Some(session)).await
    }

    async fn send(
        &mut self,
        method: &str,
        params: Value,
        session: Option<String>,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        let wait = async {
            while let Some(m) = self.ws.next().await {
                let Message::Text(text) = m? else { continue };
                let v: Value = serde_json::from_str(&text)?;
                // Events (no id) and other answers are not ours.
                if v["id"].as_u64() != Some(id) {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            bail!("chromium closed its DevTools connection")
        };
        tokio::time::timeout(COMMAND_TIMEOUT, wait)
            .await
            .with_context(|| format!("{method}: no answer in {COMMAND_TIMEOUT:?}"))?
    }

    /// The page's size, and whether it is a phone's (touch, mobile layout).
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        )
        .await?;
        Ok(())
    }

    /// Evaluates `js` in the page (awaiting a promise); its value as JSON.
    pub async fn eval(&mut self, js: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!(
                "{js}: {}",
                e["exception"]["description"]
                    .as_str()
                    .unwrap_or(&e.to_string())
            );
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `js` is truthy (errors while a page loads count as not
    /// yet); its last value.
    pub async fn wait_for(&mut self, what: &str, js: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.eval(js).await {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => v,
                Err(e) => Value::String(e.to_string()),
            };
            if Instant::now() >= deadline {
                bail!("{what}: not within {timeout:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens `url` and waits for it to load.
    pub async fn goto(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = r["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("{url}: {e}");
        }
        self.loaded().await
    }

    /// Waits for the current navigation to finish loading.
    pub async fn loaded(&mut self) -> Result<()> {
        self.wait_for(
            "the page loads",
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(30),
        )
        .await?;
        Ok(())
    }

    /// Types `text` into the element `selector` finds, as a keyboard would.
    pub async fn type_into(&mut self, selector: &str, text: &str) -> Result<()> {
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; e.focus(); return true; }})()",
                json!(selector)
            ))
            .await?;
        ensure!(truthy(&found), "no {selector} on the page");
        self.call("Input.insertText", json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// Clicks the element `selector` finds (a DOM click: the browser then
    /// does what a person's click does, submitting its form with the page's
    /// cookies and origin). One call, so a page that updates itself cannot
    /// swap the element between finding and clicking it.
    pub async fn click(&mut self, selector: &str) -> Result<()> {
        let clicked = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; \
                 e.scrollIntoView({{block: 'center'}}); e.click(); return true; }})()",
                json!(selector)
            ))
            .await?;
        ensure!(truthy(&clicked), "no {selector} on the page");
        Ok(())
    }

    /// Writes a PNG of the whole page to `path`.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("no screenshot data")?)?;
        ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// The last navigation's load time (request start to the load event), ms.
    pub async fn load_ms(&mut self) -> Result<f64> {
        let v = self
            .eval(
                "(() => { const n = performance.getEntriesByType('navigation')[0]; \
                 return n ? n.loadEventEnd - n.startTime : null; })()",
            )
            .await?;
        v.as_f64().context("no navigation timing")
    }

    /// Closes the browser.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.browser_call("Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        Ok(())
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}
