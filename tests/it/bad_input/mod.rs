//! Every bad input gets a specific status or close code and a JSON error; the server never
//! panics and other clients are unaffected. One test per case, against the real binary.
//!
//! Abusive tests end with [`Bystander::still_served`]: the process is alive, `/health` answers
//! 200, and a well-behaved client that connected before the abuse still gets its UPDATE.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

mod abuse;
mod garbage_storm;
mod http_conn;
mod http_poll;
mod http_put;
mod ops;
mod slow_clients;
mod ws_credentials;
mod ws_frames;
mod ws_limits;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Starts a server with `env` overrides in a fresh temporary directory.
async fn start(env: &[(&str, &str)]) -> (TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), env).await;
    (dir, server)
}

/// A well-behaved client that connects before the abuse and must still be served after it.
struct Bystander {
    client: Client,
    uaid: String,
    appid: String,
    endpoint: String,
    version: u64,
}

impl Bystander {
    async fn join(server: &Server) -> Bystander {
        let mut client = Client::connect(server).await;
        let uaid = client.hello_new(1).await.remove(0).0;
        let appid = new_appid();
        let endpoint = client.register(&uaid, &appid).await;
        Bystander {
            client,
            uaid,
            appid,
            endpoint,
            version: 0,
        }
    }

    /// The process runs, `/health` is 200, and a new PUT reaches this client as an UPDATE.
    async fn still_served(&mut self, server: &mut Server) {
        assert_healthy(server).await;
        let http = reqwest::Client::new();
        self.version += 1;
        assert_eq!(put_version(&http, &self.endpoint, self.version).await, 202);
        let update = self.client.expect("update").await;
        assert_eq!(
            update["updates"][&self.uaid][&self.appid], self.version,
            "{update}"
        );
        self.client.ack(&[&self.uaid]).await;
        self.client.barrier().await;
    }
}

/// The server process is still running (no panic) and `/health` answers 200.
async fn assert_healthy(server: &mut Server) {
    assert!(server.is_running(), "editiond exited");
    let r = reqwest::get(server.url("/health")).await.expect("GET /health");
    assert_eq!(r.status(), 200);
}

/// Sends `frames` on a fresh connection and expects an error frame, then a close.
async fn violation(server: &Server, frames: &[Value], status: u16, slug: &str, code: u16) {
    let mut c = Client::connect(server).await;
    for f in frames {
        c.send(f.clone()).await;
    }
    c.expect_error_close(status, slug, code).await;
}

/// Like [`violation`] with a raw text frame that need not be JSON.
async fn violation_text(server: &Server, text: &str, status: u16, slug: &str, code: u16) {
    let mut c = Client::connect(server).await;
    c.send_raw(Message::Text(text.into())).await;
    c.expect_error_close(status, slug, code).await;
}

/// A connected client that has sent hello with one fresh UAID.
async fn greeted(server: &Server) -> (Client, String, String) {
    let mut c = Client::connect(server).await;
    let (uaid, secret) = c.hello_new(1).await.remove(0);
    (c, uaid, secret)
}

/// Checks an HTTP error answer: `status`, a JSON content type, and `{status, error, message}`.
async fn assert_http_error(r: reqwest::Response, status: u16, slug: &str) {
    let got = r.status().as_u16();
    let json_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let text = r.text().await.expect("body");
    assert_eq!(got, status, "{text}");
    assert!(json_type, "error without a JSON content type: {text}");
    check_error_body(&text, status, slug);
}

fn check_error_body(text: &str, status: u16, slug: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["error"], slug, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// Sends `head` (request line and headers, without the blank line) and `body` over a raw TCP
/// connection, then returns the answer's status and body. For requests reqwest cannot make.
async fn raw_http(server: &Server, head: &str, body: &[u8]) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut request = format!("{head}\r\nHost: {}\r\nConnection: close\r\n\r\n", server.addr).into_bytes();
    request.extend_from_slice(body);
    // The server may answer (and close) before it has read everything; that is its right.
    let _ = tcp.write_all(&request).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    (status, body.to_owned())
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Open sockets as `/health` reports them.
async fn open_sockets(server: &Server) -> u64 {
    let r = reqwest::get(server.url("/health")).await.expect("GET /health");
    r.json::<Value>().await.unwrap()["connections"].as_u64().unwrap()
}

/// Waits up to the harness WAIT for `/health` to report `n` open sockets.
async fn wait_for_sockets(server: &Server, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let open = open_sockets(server).await;
        if open == n {
            return;
        }
        assert!(Instant::now() < deadline, "{open} sockets open, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw data frame: lets tests send what the client library would refuse to build.
fn raw_frame(opcode: OpCode, payload: Vec<u8>) -> Message {
    Message::Frame(Frame::message(payload, opcode, true))
}

/// A UUID that is well formed but version 1.
const NOT_V4: &str = "6f2a3c1e-9b4d-1e8f-a1b2-c3d4e5f60718";

/// A server, a registered endpoint, and a client connected for it.
async fn endpoint_setup(env: &[(&str, &str)]) -> (TempDir, Server, Bystander) {
    let (dir, server) = start(env).await;
    let b = Bystander::join(&server).await;
    (dir, server, b)
}
