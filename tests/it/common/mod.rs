//! Test harness: starts the real `editiond` binary on 127.0.0.1 and speaks to it with a real
//! WebSocket client and real HTTP requests.
#![allow(dead_code)]

pub mod receivers;
pub mod redis_harness;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A running server process. Killed (SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
    /// The subcommand and its own flags: `serve`, or `relay --upstream …`.
    command: Vec<String>,
}

/// A free loopback port (released before the server binds it; tokio binds with SO_REUSEADDR).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server with its own data dir under `dir`.
    pub async fn start(dir: &Path) -> Server {
        Server::start_with(dir, &[]).await
    }

    /// Starts a server with extra `EDITIOND_*` environment overrides.
    pub async fn start_with(dir: &Path, env: &[(&str, &str)]) -> Server {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Server::start_command(dir, addr, &["serve"], env).await
    }

    /// Starts `editiond <command…>` on `addr` (e.g. `relay --upstream ws://…`).
    pub async fn start_command(
        dir: &Path,
        addr: SocketAddr,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut server = Server {
            child: None,
            addr,
            data_dir: dir.join("data"),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            command: command.iter().map(|c| c.to_string()).collect(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_editiond"));
        cmd.args(&self.command)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--config")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start editiond"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(self.url("/health")).await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("editiond exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "editiond did not become healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        let r = http.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_term();
        self.wait_exit()
    }

    /// SIGTERM, without waiting.
    pub fn send_term(&self) {
        let child = self.child.as_ref().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }

    /// Waits (at most 30 s) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                // Killed, or the panic would leave it running (holding the test's stderr).
                let _ = child.kill();
                let _ = child.wait();
                panic!("editiond did not stop in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the same server again on the same port and data dir.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A WebSocket client speaking the JSON protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a client read: a JSON frame, a close with its code, or nothing in time.
#[derive(Debug)]
pub enum Read {
    Frame(Value),
    Closed(Option<u16>),
    Timeout,
}

pub const WAIT: Duration = Duration::from_secs(10);

impl Client {
    pub async fn connect(server: &Server) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(server.ws_url())
            .await
            .expect("connect");
        Client { ws }
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// The next JSON frame, a close, or a timeout.
    pub async fn read(&mut self, wait: Duration) -> Read {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return Read::Timeout,
                Ok(None) | Ok(Some(Err(_))) => return Read::Closed(None),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Read::Frame(serde_json::from_str(t.as_str()).expect("server sent JSON"))
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Read::Closed(frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame; panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        match self.read(WAIT).await {
            Read::Frame(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame of `kind`, skipping none: panics if another type arrives.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], kind, "unexpected frame {v}");
        v
    }

    /// Expects an error frame with `status` and `slug`, then a close with `code`.
    pub async fn expect_error_close(&mut self, status: u16, slug: &str, code: u16) {
        let v = self.expect("error").await;
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["error"], slug, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        self.expect_close(code).await;
    }

    pub async fn expect_close(&mut self, code: u16) {
        match self.read(WAIT).await {
            Read::Closed(c) => assert_eq!(c, Some(code)),
            other => panic!("expected close {code}, got {other:?}"),
        }
    }

    /// Nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.read(wait).await {
            Read::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// hello with fresh UAIDs; returns (uaid, secret) pairs.
    pub async fn hello_new(&mut self, n: usize) -> Vec<(String, String)> {
        let entries: Vec<Value> = (0..n).map(|_| json!({})).collect();
        self.send(json!({"type": "hello", "uaids": entries})).await;
        let v = self.expect("hello").await;
        assert_eq!(v["status"], 200);
        v["uaids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["status"], 200, "{e}");
                (
                    e["uaid"].as_str().unwrap().to_owned(),
                    e["secret"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// hello with known credentials; returns the reply.
    pub async fn hello(&mut self, creds: &[(String, String)]) -> Value {
        let entries: Vec<Value> = creds
            .iter()
            .map(|(u, s)| json!({"uaid": u, "secret": s}))
            .collect();
        self.send(json!({"type": "hello", "uaids": entries})).await;
        self.expect("hello").await
    }

    /// register; returns the endpoint.
    pub async fn register(&mut self, uaid: &str, appid: &str) -> String {
        self.send(json!({"type": "register", "uaid": uaid, "appid": appid}))
            .await;
        let v = self.expect("register").await;
        assert_eq!(v["status"], 200, "{v}");
        v["endpoint"].as_str().unwrap().to_owned()
    }

    pub async fn ack(&mut self, uaids: &[&str]) {
        self.send(json!({"type": "ack", "uaids": uaids})).await;
    }

    /// ping/pong round trip: every frame sent before it has been handled (ACKs are durable).
    pub async fn barrier(&mut self) {
        self.send(json!({"type": "ping"})).await;
        self.expect("pong").await;
    }
}

pub fn new_appid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A connected client with a new UAID and one registration.
pub struct Enrolled {
    pub c: Client,
    pub creds: Vec<(String, String)>,
    pub uaid: String,
    pub appid: String,
    pub endpoint: String,
}

impl Enrolled {
    /// PUTs `version` (expecting 202) and reads the UPDATE that carries it.
    pub async fn put_and_receive(&mut self, http: &reqwest::Client, version: u64) {
        assert_eq!(put_version(http, &self.endpoint, version).await, 202);
        let update = self.c.expect("update").await;
        assert_eq!(update["updates"][&self.uaid][&self.appid], version, "{update}");
    }
}

/// Connects, says hello for a new UAID and registers one new APPID.
pub async fn enroll(server: &Server) -> Enrolled {
    let mut c = Client::connect(server).await;
    let creds = c.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    Enrolled {
        c,
        creds,
        uaid,
        appid,
        endpoint,
    }
}

/// PUT a form body `version=N`; returns the status.
pub async fn put_version(http: &reqwest::Client, endpoint: &str, version: u64) -> u16 {
    http.put(endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("version={version}"))
        .send()
        .await
        .expect("PUT")
        .status()
        .as_u16()
}

/// The close codes tungstenite knows by name, as numbers.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}
