//! Just enough of the Chrome DevTools Protocol to drive one page of Debian's headless
//! Chromium from a test: navigate, evaluate, click and type with real input events,
//! take screenshots, and record console errors, exceptions and JavaScript dialogs.
//! (A CDP crate such as chromiumoxide compiles the whole generated protocol, minutes
//! of CPU on every clean build; the test needs a dozen methods.)

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sluice_e2e::process::{Child, spawn};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

pub const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(20);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// What the page reported that a user would count as a failure.
#[derive(Default, Debug, Clone)]
pub struct Problems {
    /// console.error calls, uncaught exceptions, and browser log errors (CSP violations…).
    pub errors: Vec<String>,
    /// alert/confirm/prompt dialogs that opened.
    pub dialogs: Vec<String>,
}

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    session: String,
    problems: Arc<Mutex<Problems>>,
}

impl Browser {
    /// Starts headless Chromium with a fresh profile and opens one page of `width`×`height`.
    /// Network log errors for URLs under `api_prefix` are the API's deliberate answers
    /// (401 for a wrong token, 400 for a bad field), which the page handles: not counted.
    pub async fn launch(api_prefix: &str, width: u32, height: u32) -> Self {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: `apt-get install -y chromium` (e2e/test-all.sh does)"
        );
        let profile = tempfile::tempdir().unwrap();
        let child = spawn(
            CHROMIUM,
            [
                "--headless".to_owned(),
                "--no-sandbox".to_owned(),
                "--disable-gpu".to_owned(),
                "--disable-quic".to_owned(),
                "--no-first-run".to_owned(),
                "--disable-background-networking".to_owned(),
                "--disable-component-update".to_owned(),
                "--disable-sync".to_owned(),
                "--disable-dev-shm-usage".to_owned(),
                "--remote-debugging-address=127.0.0.1".to_owned(),
                "--remote-debugging-port=0".to_owned(),
                format!("--user-data-dir={}", profile.path().display()),
                "about:blank".to_owned(),
            ],
            std::iter::empty::<(&str, &str)>(),
        )
        .unwrap();
        let ws_url = child
            .wait_for_line("DevTools listening on", WAIT, |line| {
                line.split_once("DevTools listening on ")
                    .map(|(_, url)| url.trim().to_owned())
            })
            .await
            .unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        let (mut sink, mut stream) = socket.split();
        let (out, mut outgoing) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outgoing.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });

        let pending: Pending = Arc::default();
        let problems: Arc<Mutex<Problems>> = Arc::default();
        let next_id = Arc::new(AtomicU64::new(1));
        {
            let (pending, problems, out, next_id, api_prefix) = (
                pending.clone(),
                problems.clone(),
                out.clone(),
                next_id.clone(),
                api_prefix.to_owned(),
            );
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = value["id"].as_u64() {
                        let result = match value.get("error") {
                            Some(error) => Err(error.to_string()),
                            None => Ok(value["result"].clone()),
                        };
                        if let Some(tx) = pending.lock().unwrap().remove(&id) {
                            let _ = tx.send(result);
                        }
                        continue;
                    }
                    let params = &value["params"];
                    let mut p = problems.lock().unwrap();
                    match value["method"].as_str().unwrap_or("") {
                        "Runtime.consoleAPICalled"
                            if matches!(params["type"].as_str(), Some("error" | "assert")) =>
                        {
                            let args: Vec<String> = params["args"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(|a| {
                                    a["value"]
                                        .as_str()
                                        .map(str::to_owned)
                                        .unwrap_or_else(|| a["description"].to_string())
                                })
                                .collect();
                            p.errors.push(format!("console.error: {}", args.join(" ")));
                        }
                        "Runtime.exceptionThrown" => {
                            let d = &params["exceptionDetails"];
                            p.errors.push(format!(
                                "uncaught: {} {}",
                                d["text"].as_str().unwrap_or(""),
                                d["exception"]["description"].as_str().unwrap_or("")
                            ));
                        }
                        "Log.entryAdded" => {
                            let e = &params["entry"];
                            let api_answer = e["source"] == "network"
                                && e["url"]
                                    .as_str()
                                    .is_some_and(|u| u.starts_with(&api_prefix));
                            if e["level"] == "error" && !api_answer {
                                p.errors.push(format!(
                                    "log ({}): {} {}",
                                    e["source"].as_str().unwrap_or(""),
                                    e["text"].as_str().unwrap_or(""),
                                    e["url"].as_str().unwrap_or("")
                                ));
                            }
                        }
                        "Page.javascriptDialogOpening" => {
                            p.dialogs.push(format!(
                                "{}: {}",
                                params["type"].as_str().unwrap_or(""),
                                params["message"].as_str().unwrap_or("")
                            ));
                            // Dismiss it so the page does not hang.
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            let _ = out.send(Message::text(
                                json!({"id": id, "method": "Page.handleJavaScriptDialog",
                                       "params": {"accept": false},
                                       "sessionId": value["sessionId"]})
                                .to_string(),
                            ));
                        }
                        _ => {}
                    }
                }
            });
        }

        let mut browser = Self {
            child,
            _profile: profile,
            out,
            pending,
            next_id,
            session: String::new(),
            problems,
        };
        let target = browser
            .command(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .command(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            browser.send(domain, json!({})).await;
        }
        browser.resize(width, height).await;
        browser
    }

    async fn command(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.out.send(Message::text(message.to_string())).unwrap();
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(error))) => panic!("{method} failed: {error}"),
            _ => panic!("{method}: no answer from Chromium within {WAIT:?}"),
        }
    }

    /// Changes the viewport's size.
    pub async fn resize(&self, width: u32, height: u32) {
        self.send(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
    }

    /// A command to the page.
    pub async fn send(&self, method: &str, params: Value) -> Value {
        self.command(Some(&self.session.clone()), method, params)
            .await
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .send(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(details) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `condition` (a JS expression) until it is true; `what` names it in the failure.
    pub async fn wait_for(&self, condition: &str, what: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.eval(&format!("Boolean({condition})")).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let body = self.eval("document.body.innerText").await;
                panic!("timed out waiting for {what} ({condition}); the page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn goto(&self, url: &str) {
        self.send("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                json!(url)
            ),
            "the page to load",
        )
        .await;
    }

    /// Clicks the middle of the first element matching `selector`, as a mouse would.
    pub async fn click(&self, selector: &str) {
        let sel = json!(selector);
        self.wait_for(
            &format!(
                "(() => {{ const e = document.querySelector({sel}); \
                 return e && e.getClientRects().length > 0 && !e.disabled; }})()"
            ),
            &format!("{selector} to be visible and enabled"),
        )
        .await;
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.send(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// Replaces the value of the input matching `selector` by typing `text`.
    pub async fn type_into(&self, selector: &str, text: &str) {
        self.click(selector).await;
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.value = ''; }})()",
            json!(selector)
        ))
        .await;
        self.send("Input.insertText", json!({"text": text})).await;
    }

    pub async fn text(&self, selector: &str) -> String {
        let value = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); return e ? e.textContent : null; }})()",
                json!(selector)
            ))
            .await;
        value
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}"))
            .to_owned()
    }

    /// A PNG of the whole page (beyond the viewport when it is taller).
    pub async fn screenshot(&self, path: &Path) {
        let metrics = self.send("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let shot = self
            .send(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Proves the recorder sees what the final assertions rely on: a console error and
    /// a dialog are provoked on a blank page, seen, and then forgotten.
    pub async fn self_check(&self) {
        self.eval("console.error('cdp self-check'); alert('cdp self-check'); 1")
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let p = self.problems();
            if p.errors.iter().any(|e| e.contains("cdp self-check"))
                && p.dialogs.iter().any(|d| d.contains("cdp self-check"))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the recorder missed the provoked error or dialog: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *self.problems.lock().unwrap() = Problems::default();
    }

    pub fn problems(&self) -> Problems {
        self.problems.lock().unwrap().clone()
    }

    /// Closes the browser and waits for it to exit (its helpers go with it).
    pub async fn close(mut self) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.out.send(Message::text(
            json!({"id": id, "method": "Browser.close"}).to_string(),
        ));
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
