//! The browser client (`/edition.js`) and the demo page (`/demo`) in a real browser: Debian's
//! headless chromium, driven over the DevTools protocol on one WebSocket, against the real
//! editiond binary (restarted mid-test). Also the web routes and the CORS policy over plain HTTP.
//!
//! Without /usr/bin/chromium the browser tests are skipped with a loud message, except in CI
//! (`CI` set), where `.ci/run` installs it and they must run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CHROMIUM: &str = "/usr/bin/chromium";

/// How long the page may take to show something the test waits for (a generous bound on a
/// shared machine, not a timing assertion: the wait ends as soon as it shows).
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// Whether to run the browser tests: chromium present, or CI (where its absence is a failure).
fn have_chromium() -> bool {
    if Path::new(CHROMIUM).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{CHROMIUM} is missing in CI: .ci/run installs the chromium package");
    }
    eprintln!(
        "\n\n!!!!!!!! SKIPPED: browser test: {CHROMIUM} is not installed \
         (apt-get install chromium); with CI set this is a failure !!!!!!!!\n\n"
    );
    false
}

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Answers = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless chromium with its own fresh profile, killed on drop.
struct Browser {
    child: Child,
    cdp: Arc<Cdp>,
    _profile: tempfile::TempDir,
}

/// The browser-wide DevTools connection; pages are reached through flattened sessions on it.
struct Cdp {
    sink: tokio::sync::Mutex<Sink>,
    answers: Answers,
    next_id: AtomicU64,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // Background tabs run their timers and sockets like the front one.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--remote-debugging-port=0",
                // A second name for the loopback server: an origin that is no secure context.
                "--host-resolver-rules=MAP insecure.test 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Chromium prints its DevTools address on stderr; the rest is drained (shown with TEST_LOG).
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let show = std::env::var_os("TEST_LOG").is_some();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                } else if show {
                    eprintln!("chromium: {line}");
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium did not print its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("DevTools socket");
        let (sink, mut stream) = ws.split();
        let answers: Answers = Arc::default();
        let routed = answers.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(id) = v["id"].as_u64() {
                    if let Some(tx) = routed.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else {
                    log_page_event(&v);
                }
            }
        });
        let cdp = Arc::new(Cdp {
            sink: tokio::sync::Mutex::new(sink),
            answers,
            next_id: AtomicU64::new(1),
        });
        Browser {
            child,
            cdp,
            _profile: profile,
        }
    }

    /// A new tab showing `url`, with its console and exceptions logged (shown if the test fails).
    async fn open(&self, url: &str) -> Tab {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await["targetId"]
            .as_str()
            .unwrap()
            .to_owned();
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        let tab = Tab {
            cdp: self.cdp.clone(),
            target,
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        };
        tab.call("Runtime.enable", json!({})).await;
        tab.call("Page.navigate", json!({"url": url})).await;
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Page console output and uncaught exceptions, for the test's captured output.
fn log_page_event(v: &Value) {
    match v["method"].as_str() {
        Some("Runtime.consoleAPICalled") => {
            let args: Vec<String> = v["params"]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.get("value").unwrap_or(&a["description"]).to_string())
                .collect();
            eprintln!("page console.{}: {}", v["params"]["type"], args.join(" "));
        }
        Some("Runtime.exceptionThrown") => {
            eprintln!("page exception: {}", v["params"]["exceptionDetails"]);
        }
        _ => {}
    }
}

impl Cdp {
    /// Sends a command (to a page when `session` is given) and returns its `result`.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.answers.lock().unwrap().insert(id, tx);
        self.sink
            .lock()
            .await
            .send(Message::text(command.to_string()))
            .await
            .expect("DevTools send");
        let answer = tokio::time::timeout(PAGE_WAIT, rx)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method}"))
            .expect("DevTools socket closed");
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }
}

/// One page.
struct Tab {
    cdp: Arc<Cdp>,
    target: String,
    session: String,
}

impl Tab {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp.call(Some(&self.session), method, params).await
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value as JSON.
    async fn eval(&self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{js}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `js` is truthy and returns its value; exceptions count as not yet (the page
    /// may still be loading).
    async fn wait(&self, js: &str, what: &str) -> Value {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let r = self
                .call(
                    "Runtime.evaluate",
                    json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
                )
                .await;
            let v = &r["result"]["value"];
            let truthy = !matches!(v, Value::Null | Value::Bool(false))
                && v.as_str() != Some("")
                && v.as_f64() != Some(0.0);
            if r.get("exceptionDetails").is_none() && truthy {
                return v.clone();
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body?.innerText ?? ''").await;
                panic!(
                    "page never showed {what} ({js}); the page reads:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn close(self) {
        self.cdp
            .call(None, "Target.closeTarget", json!({"targetId": self.target}))
            .await;
    }

    /// The demo page's two endpoints (A, B), once registered.
    async fn endpoints(&self) -> (String, String) {
        let v = self
            .wait(
                "(() => { const e = [...document.querySelectorAll('[data-endpoint]')]
                    .map(c => c.dataset.endpoint);
                  return e.length === 2 && e.every(Boolean) && e; })()",
                "both endpoints",
            )
            .await;
        (
            v[0].as_str().unwrap().to_owned(),
            v[1].as_str().unwrap().to_owned(),
        )
    }

    /// Waits until the demo lists the event (app, version).
    async fn shows_event(&self, app: &str, version: u64) {
        let js =
            format!("!!document.querySelector('#events tr[data-app=\"{app}\"][data-version=\"{version}\"]')");
        self.wait(&js, &format!("the event {app} = {version}")).await;
    }

    /// The events the demo lists, oldest first, as "A=5".
    async fn events(&self) -> Vec<String> {
        let v = self
            .eval("[...document.querySelectorAll('#events tbody tr')].reverse().map(r => r.dataset.app + '=' + r.dataset.version)")
            .await;
        serde_json::from_value(v).unwrap()
    }

    async fn uaid(&self) -> String {
        let v = self
            .wait(
                "window.edition?.state === 'open' && edition.uaid",
                "an open connection with a UAID",
            )
            .await;
        v.as_str().unwrap().to_owned()
    }

    async fn is_leader(&self) -> bool {
        self.eval("edition.leader").await.as_bool().unwrap()
    }

    /// A screenshot at `width` × `height` CSS pixels, as PNG bytes.
    async fn screenshot(&self, width: u32, height: u32, mobile: bool) -> Vec<u8> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
        // A layout at the new width before the capture.
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
            .await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

/// A gauge or counter from the `/metrics` text (0 when absent).
async fn metric(server: &Server, http: &reqwest::Client, name: &str) -> f64 {
    let text = server.metrics(http).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the server counts `n` open WebSocket connections.
async fn wait_connections(server: &Server, http: &reqwest::Client, n: f64) {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let now = metric(server, http, "editiond_connections").await;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "editiond_connections stayed {now}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn put(http: &reqwest::Client, endpoint: &str, version: u64) {
    assert_eq!(
        put_version(http, endpoint, version).await,
        202,
        "PUT {version} to {endpoint}"
    );
}

/// What the screenshot holds, measured by the browser itself (it decodes PNG; the test need not).
async fn measure_png(browser: &Browser, png: &[u8]) -> Value {
    let tab = browser.open("about:blank").await;
    let data = base64::engine::general_purpose::STANDARD.encode(png);
    let js = format!(
        "(async () => {{
            const img = new Image();
            img.src = 'data:image/png;base64,{data}';
            await img.decode();
            const c = document.createElement('canvas');
            c.width = img.width; c.height = img.height;
            const g = c.getContext('2d');
            g.drawImage(img, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data;
            const colors = new Set();
            let inked = 0;
            for (let i = 0; i < d.length; i += 4) {{
                colors.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
                if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 48) inked++;
            }}
            return {{ width: c.width, height: c.height, colors: colors.size, inked: inked / (d.length / 4) }};
        }})()"
    );
    let v = tab.eval(&js).await;
    tab.close().await;
    v
}

/// Saves a screenshot under target/ and checks it shows a page, not a blank.
async fn check_screenshot(
    browser: &Browser,
    tab: &Tab,
    name: &str,
    width: u32,
    height: u32,
    mobile: bool,
) -> PathBuf {
    let png = tab.screenshot(width, height, mobile).await;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-demo-{name}.png"));
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());
    let m = measure_png(browser, &png).await;
    assert_eq!(m["width"], width, "{name}: {m}");
    let (colors, inked) = (m["colors"].as_f64().unwrap(), m["inked"].as_f64().unwrap());
    assert!(colors >= 16.0, "{name} screenshot is blank or flat: {m}");
    assert!(
        (0.02..0.9).contains(&inked),
        "{name} screenshot shows (almost) nothing: {m}"
    );
    // Clean at this width: nothing sticks out sideways.
    let overflow = tab
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        overflow.as_f64().unwrap() <= 0.0,
        "{name}: the page is wider than the screen by {overflow} px"
    );
    path
}

#[tokio::test]
async fn demo_page_in_a_real_browser() {
    if !have_chromium() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let browser = Browser::launch().await;
    let demo = server.url("/demo");

    // The page registers two apps and lists what is PUT to them.
    let tab = browser.open(&demo).await;
    let (a, b) = tab.endpoints().await;
    assert!(
        a.starts_with(&server.url("/v1/e/")) && b.starts_with(&server.url("/v1/e/")),
        "{a} {b}"
    );
    assert_ne!(a, b);
    let uaid = tab.uaid().await;
    assert_eq!(uaid.len(), 36, "{uaid}");
    assert_eq!(
        tab.eval("JSON.parse(localStorage.editiond).uaid").await,
        json!(uaid)
    );
    put(&http, &a, 5).await;
    put(&http, &b, 7).await;
    tab.shows_event("A", 5).await;
    tab.shows_event("B", 7).await;
    let curl = tab
        .eval("document.querySelector('#app-a .curl').textContent")
        .await;
    assert_eq!(curl, json!(format!("curl -X PUT -d version=6 {a}")));

    // A restart: the page reconnects by itself and receives what is PUT after it. A register
    // made while the server is down waits for it instead of failing.
    server.kill();
    tab.wait("edition.state === 'connecting'", "the lost connection")
        .await;
    tab.eval(
        "window.late = edition.register(crypto.randomUUID()).then(r => r.endpoint, e => 'failed: ' + e); true",
    )
    .await;
    server.restart().await;
    tab.wait("edition.state === 'open'", "a reconnection").await;
    let late = tab.eval("late").await;
    assert!(
        late.as_str().unwrap().starts_with(&server.url("/v1/e/")),
        "{late}"
    );
    wait_connections(&server, &http, 1.0).await;
    put(&http, &a, 6).await;
    tab.shows_event("A", 6).await;
    assert_eq!(tab.uaid().await, uaid);

    // Closed page, PUT, page reopened: the same UAID, and the event arrives.
    tab.close().await;
    wait_connections(&server, &http, 0.0).await;
    put(&http, &b, 9).await;
    let first = browser.open(&demo).await;
    first.shows_event("B", 9).await;
    assert_eq!(first.uaid().await, uaid);
    assert_eq!(first.endpoints().await, (a.clone(), b.clone()));
    // Only the new event: the page ACKed the earlier ones.
    assert_eq!(first.events().await, ["B=9"]);

    // Two tabs of one origin: one socket, both tabs get every event.
    let second = browser.open(&demo).await;
    assert_eq!(second.endpoints().await, (a.clone(), b.clone()));
    assert_eq!(second.uaid().await, uaid);
    assert!(first.is_leader().await && !second.is_leader().await);
    put(&http, &a, 10).await;
    first.shows_event("A", 10).await;
    second.shows_event("A", 10).await;
    assert_eq!(metric(&server, &http, "editiond_connections").await, 1.0);
    // ... and never two sockets trading the UAID (each trade closes one with 4410).
    let replaced = metric(&server, &http, "editiond_ws_closes_total{code=\"4410\"}").await;
    assert_eq!(replaced, 0.0);

    // Closing the leader's tab leaves the other one receiving, on a socket of its own.
    first.close().await;
    put(&http, &b, 11).await;
    second.shows_event("B", 11).await;
    second
        .wait(
            "edition.leader && edition.state === 'open'",
            "the second tab leading",
        )
        .await;
    wait_connections(&server, &http, 1.0).await;
    put(&http, &a, 12).await;
    second.shows_event("A", 12).await;
    assert_eq!(second.events().await, ["A=10", "B=11", "A=12"]);

    // Screenshots at laptop and phone widths, kept under target/.
    check_screenshot(&browser, &second, "laptop", 1280, 800, false).await;
    check_screenshot(&browser, &second, "phone", 390, 844, true).await;
}

#[tokio::test]
async fn another_origin_imports_the_client() {
    if !have_chromium() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let browser = Browser::launch().await;
    // localhost and 127.0.0.1 are two origins: the page's is localhost, the server's 127.0.0.1.
    let page = browser
        .open(&format!("http://localhost:{}/health", server.addr.port()))
        .await;
    page.wait("document.readyState === 'complete'", "the page").await;
    let module = server.url("/edition.js");
    let js = format!(
        "(async () => {{
            const {{ Edition }} = await import('{module}');
            window.ed = new Edition();
            window.first = new Promise(r => ed.addEventListener('update', e => r(e.detail), {{ once: true }}));
            const reg = await ed.register();
            return {{ ...reg, uaid: ed.uaid, again: (await ed.register(reg.appid)).endpoint }};
        }})()"
    );
    let reg = page.eval(&js).await;
    let endpoint = reg["endpoint"].as_str().unwrap();
    assert!(endpoint.starts_with(&server.url("/v1/e/")), "{reg}");
    assert_eq!(reg["again"], reg["endpoint"], "register is idempotent");
    put(&http, endpoint, 3).await;
    let update = page.eval("first").await;
    assert_eq!(update, json!({"appid": reg["appid"], "version": 3}));

    // A stored UAID the server refuses: an error event, and a new UAID in that storage.
    let uaid = reg["uaid"].as_str().unwrap();
    let js = format!(
        "(async () => {{
            const {{ Edition }} = await import('{module}');
            const storage = {{ other: JSON.stringify({{ uaid: '{uaid}', secret: 'A'.repeat(43) }}) }};
            const other = new Edition({{ storageKey: 'other', storage }});
            const error = await new Promise(r => other.addEventListener('error', e => r(e.detail)));
            await new Promise(r => other.state === 'open' ? r() : other.addEventListener('state', () => other.state === 'open' && r()));
            other.close();
            return {{ error, uaid: other.uaid, stored: JSON.parse(storage.other).uaid, state: other.state }};
        }})()"
    );
    let other = page.eval(&js).await;
    assert_eq!(other["error"]["error"], "bad_secret", "{other}");
    assert_ne!(other["uaid"], json!(uaid));
    assert_eq!(other["stored"], other["uaid"]);
    assert_eq!(other["state"], "closed");

    // Poll and ack from another origin: the preflight and the answers pass CORS.
    let js = "(async () => {
            ed.close();
            const creds = JSON.parse(localStorage.editiond);
            const post = (path, body) => fetch(new URL(path, new URL(ed_module)), {
                method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
            const poll = await post('/v1/poll', { uaids: [creds] });
            const ack = await post('/v1/ack', { uaids: [creds], updates: {} });
            const bad = await post('/v1/poll', { uaids: [{ uaid: creds.uaid, secret: 'A'.repeat(43) }] });
            return [poll.status, ack.status, bad.status, bad.headers.get('content-type')];
        })()"
        .replace("ed_module", &format!("'{module}'"));
    let statuses = page.eval(&js).await;
    assert_eq!(statuses, json!([204, 200, 401, "application/json"]));
    page.close().await;

    // Plain http on a name other than localhost is no secure context: no Web Locks, no
    // crypto.randomUUID. The demo still works there, on a socket of its own.
    let insecure = browser
        .open(&format!("http://insecure.test:{}/demo", server.addr.port()))
        .await;
    let (a, _) = insecure.endpoints().await;
    assert_eq!(
        insecure
            .eval("[isSecureContext, !!navigator.locks, edition.leader]")
            .await,
        json!([false, false, true])
    );
    assert!(a.starts_with(&server.url("/v1/e/")), "{a}");
    put(&http, &a, 4).await;
    insecure.shows_event("A", 4).await;
}

#[tokio::test]
async fn web_routes_headers_and_cors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let js = http.get(server.url("/edition.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    let h = js.headers().clone();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/javascript"));
    assert_eq!(h["access-control-allow-origin"], "*");
    let body = js.text().await.unwrap();
    assert!(body.contains("export class Edition extends EventTarget"));
    // Revalidation: the same version answers 304.
    let again = http
        .get(server.url("/edition.js"))
        .header("if-none-match", h["etag"].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    let page = http.get(server.url("/demo")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/demo.js"));
    for (path, kind) in [("/demo.js", "text/javascript"), ("/demo.css", "text/css")] {
        let r = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
    }
    let post = http.post(server.url("/edition.js")).send().await.unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.json::<Value>().await.unwrap()["error"], "method_not_allowed");
    let root = http.get(server.url("/")).send().await.unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/demo");

    // Preflight and answers of poll and ack allow any origin; endpoint PUTs and the rest do not.
    for path in ["/v1/poll", "/v1/ack"] {
        let pre = http
            .request(reqwest::Method::OPTIONS, server.url(path))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .unwrap();
        assert_eq!(pre.status(), 204, "{path}");
        assert_eq!(pre.headers()["access-control-allow-origin"], "*");
        assert_eq!(pre.headers()["access-control-allow-methods"], "POST");
        assert_eq!(pre.headers()["access-control-allow-headers"], "content-type");
        let err = http
            .post(server.url(path))
            .header("origin", "https://app.example")
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_eq!(err.status(), 400, "{path}");
        assert_eq!(err.headers()["access-control-allow-origin"], "*", "{path}");
        assert_eq!(err.headers()["access-control-expose-headers"], "retry-after");
    }
    let health = http.get(server.url("/health")).send().await.unwrap();
    assert!(health.headers().get("access-control-allow-origin").is_none());
    let other = http
        .request(reqwest::Method::OPTIONS, server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 405);
}

#[tokio::test]
async fn web_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let off = [("EDITIOND_WEB__CLIENT", "false"), ("EDITIOND_WEB__DEMO", "false")];
    let server = Server::start_with(dir.path(), &off).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/edition.js", "/demo", "/demo.js", "/"] {
        let r = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    // The demo without the client it imports is refused at start.
    let status = Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(["config", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .env("EDITIOND_WEB__CLIENT", "false")
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    // Only the demo off: the client stays.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &[("EDITIOND_WEB__DEMO", "false")]).await;
    assert_eq!(
        http.get(server.url("/edition.js")).send().await.unwrap().status(),
        200
    );
    assert_eq!(http.get(server.url("/demo")).send().await.unwrap().status(), 404);
}
