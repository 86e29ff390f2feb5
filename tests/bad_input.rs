//! Every bad input gets a specific status or close code and a JSON error; the server never
//! panics and other clients are unaffected. One test per case, against the real binary.
//!
//! Abusive tests end with [`Bystander::still_served`]: the process is alive, `/health` answers
//! 200, and a well-behaved client that connected before the abuse still gets its UPDATE.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

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

// ---------------------------------------------------------------------------------------------
// WebSocket: frame-level violations close the socket with an error frame
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws_malformed_json() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for text in ["{", "not json", r#"{"type":"hello","uaids":[}"#, "", "{}}"] {
        violation_text(&server, text, 400, "malformed_json", 4400).await;
    }
    // After hello too.
    let (mut c, _, _) = greeted(&server).await;
    c.send_raw(Message::Text(r#"{"type":"ping""#.into())).await;
    c.expect_error_close(400, "malformed_json", 4400).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_missing_type() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for frame in [
        json!({"uaids": []}),
        json!([1, 2]),
        json!("hello"),
        json!(5),
        json!({"type": 5}),
        json!({"type": null}),
    ] {
        violation(&server, &[frame], 400, "missing_type", 4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_unknown_type() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    violation(&server, &[json!({"type": "bogus"})], 400, "unknown_type", 4400).await;
    violation(
        &server,
        &[json!({"type": "HELLO", "uaids": []})],
        400,
        "unknown_type",
        4400,
    )
    .await;
    let (mut c, _, _) = greeted(&server).await;
    c.send(json!({"type": "update", "updates": {}})).await;
    c.expect_error_close(400, "unknown_type", 4400).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_unknown_fields_are_ignored() {
    let (_dir, server) = start(&[]).await;
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [{"extra": 1}], "future": true}))
        .await;
    let v = c.expect("hello").await;
    let uaid = v["uaids"][0]["uaid"].as_str().unwrap().to_owned();
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    c.send(json!({"type": "ping", "extra": 1})).await;
    c.expect("pong").await;
    c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid(), "x": [1]}))
        .await;
    assert_eq!(c.expect("register").await["status"], 200);
    c.send(json!({"type": "ack", "uaids": [uaid], "updates": {}}))
        .await;
    c.barrier().await;
}

#[tokio::test]
async fn ws_known_type_with_invalid_fields() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for hello in [
        json!({"type": "hello"}),
        json!({"type": "hello", "uaids": 5}),
        json!({"type": "hello", "uaids": [5]}),
        json!({"type": "hello", "uaids": [{"uaid": 5}]}),
    ] {
        violation(&server, &[hello], 400, "invalid_frame", 4400).await;
    }
    let uaid = uuid::Uuid::new_v4().to_string();
    for frame in [
        json!({"type": "register", "uaid": uaid}),
        json!({"type": "register", "uaid": uaid, "appid": 7}),
        json!({"type": "unregister", "appid": new_appid()}),
        json!({"type": "ack", "uaids": "all"}),
        json!({"type": "ack"}),
        json!({"type": "claim", "uaids": {}}),
        json!({"type": "release", "uaids": [1]}),
    ] {
        let (mut c, _, _) = greeted(&server).await;
        c.send(frame.clone()).await;
        let v = c.expect("error").await;
        assert_eq!(
            (v["status"].clone(), v["error"].clone()),
            (json!(400), json!("invalid_frame")),
            "{frame}: {v}"
        );
        c.expect_close(4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_frames_before_hello() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let uaid = uuid::Uuid::new_v4().to_string();
    for frame in [
        json!({"type": "ping"}),
        json!({"type": "register", "uaid": uaid, "appid": new_appid()}),
        json!({"type": "ack", "uaids": [uaid]}),
        json!({"type": "claim", "uaids": [{}]}),
    ] {
        violation(&server, &[frame], 401, "hello_required", 4401).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_second_hello() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, secret) = greeted(&server).await;
    c.send(json!({"type": "hello", "uaids": [{"uaid": uaid, "secret": secret}]}))
        .await;
    c.expect_error_close(409, "duplicate_hello", 4409).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_binary_frame() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut c = Client::connect(&server).await;
    let hello = json!({"type": "hello", "uaids": [{}]}).to_string();
    c.send_raw(Message::Binary(hello.into_bytes().into())).await;
    c.expect_error_close(415, "binary_frame", 1003).await;
    let (mut c, _, _) = greeted(&server).await;
    c.send_raw(Message::Binary(vec![0, 1, 2, 255].into())).await;
    c.expect_error_close(415, "binary_frame", 1003).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_oversized_frame_closes_1009() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_FRAME_BYTES", "1024")]).await;
    let mut b = Bystander::join(&server).await;
    let big = json!({"type": "hello", "uaids": [{"uaid": "x".repeat(2000)}]}).to_string();
    violation_text(&server, &big, 413, "frame_too_large", 1009).await;
    // After hello, and as a message split into frames that are each under the limit.
    let (mut c, _, _) = greeted(&server).await;
    let ping = format!(r#"{{"type":"ping","pad":"{}"}}"#, "y".repeat(1500)).into_bytes();
    let (first, rest) = ping.split_at(700);
    c.send_raw(Message::Frame(Frame::message(
        first.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send_raw(Message::Frame(Frame::message(
        rest.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    c.expect_error_close(413, "frame_too_large", 1009).await;
    // A frame just under the limit is fine.
    let (mut c, _, _) = greeted(&server).await;
    let pad = "z".repeat(900);
    c.send(json!({"type": "register", "uaid": pad, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["status"], 400);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_invalid_utf8_text_frame() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut c = Client::connect(&server).await;
    c.send_raw(raw_frame(
        OpCode::Data(Data::Text),
        b"{\"type\":\"p\xffng\"}".to_vec(),
    ))
    .await;
    c.expect_error_close(400, "invalid_utf8", 1007).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_protocol_violations_close_1002() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let reserved_bits = {
        let mut f = Frame::message(b"{\"type\":\"ping\"}".to_vec(), OpCode::Data(Data::Text), true);
        f.header_mut().rsv1 = true;
        Message::Frame(f)
    };
    let reserved_control = {
        let header = FrameHeader {
            opcode: OpCode::Control(
                tokio_tungstenite::tungstenite::protocol::frame::coding::Control::Reserved(11),
            ),
            ..FrameHeader::default()
        };
        Message::Frame(Frame::from_payload(header, Vec::new().into()))
    };
    for bad in [
        raw_frame(OpCode::Data(Data::Reserved(3)), b"{}".to_vec()),
        raw_frame(OpCode::Data(Data::Continue), b"{}".to_vec()),
        reserved_bits,
        reserved_control,
    ] {
        let (mut c, _, _) = greeted(&server).await;
        c.send_raw(bad).await;
        c.expect_error_close(400, "protocol_error", 1002).await;
    }
    b.still_served(&mut server).await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket: identifiers and credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hello_with_invalid_uaids_gets_per_entry_400_and_others_work() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let good = uuid::Uuid::new_v4().to_string();
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [
        {"uaid": "not-a-uuid"},
        {"uaid": NOT_V4},
        {"uaid": good.to_uppercase()},
        {"uaid": good.replace('-', "")},
        {"uaid": "", "secret": "x"},
        {"uaid": good},
    ]}))
    .await;
    let v = c.expect("hello").await;
    let entries = v["uaids"].as_array().unwrap();
    for (i, slug) in ["invalid_uaid", "invalid_uaid", "invalid_uaid", "invalid_uaid"]
        .iter()
        .enumerate()
    {
        assert_eq!(entries[i]["status"], 400, "{v}");
        assert_eq!(entries[i]["error"], *slug, "{v}");
        assert!(entries[i].get("secret").is_none(), "{v}");
    }
    assert_eq!(entries[5]["status"], 200, "{v}");
    // The good entry works; the rejected ones are not held.
    let http = reqwest::Client::new();
    let appid = new_appid();
    let endpoint = c.register(&good, &appid).await;
    assert_eq!(put_version(&http, &endpoint, 3).await, 202);
    assert_eq!(c.expect("update").await["updates"][&good][&appid], 3);
    let upper = good.to_uppercase();
    c.send(json!({"type": "register", "uaid": upper, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["error"], "invalid_uaid");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn register_and_unregister_with_invalid_ids_reply_400() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let appid = new_appid();
    for kind in ["register", "unregister"] {
        for (u, a, slug) in [
            ("bogus", appid.as_str(), "invalid_uaid"),
            (NOT_V4, appid.as_str(), "invalid_uaid"),
            (uaid.as_str(), "bogus", "invalid_appid"),
            (uaid.as_str(), NOT_V4, "invalid_appid"),
            (uaid.as_str(), &appid.to_uppercase(), "invalid_appid"),
            (uaid.as_str(), "", "invalid_appid"),
        ] {
            c.send(json!({"type": kind, "uaid": u, "appid": a})).await;
            let v = c.expect(kind).await;
            assert_eq!(v["status"], 400, "{v}");
            assert_eq!(v["error"], slug, "{v}");
            assert_eq!(
                (v["uaid"].as_str(), v["appid"].as_str()),
                (Some(u), Some(a)),
                "{v}"
            );
            assert!(v.get("endpoint").is_none(), "{v}");
        }
    }
    // The connection still works.
    c.register(&uaid, &appid).await;
    c.barrier().await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ack_with_invalid_uuid_closes() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for bad in ["bogus", NOT_V4] {
        let (mut c, uaid, _) = greeted(&server).await;
        c.send(json!({"type": "ack", "uaids": [uaid, bad]})).await;
        c.expect_error_close(400, "invalid_frame", 4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn wrong_secrets_get_per_entry_401_and_others_work() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut first = Client::connect(&server).await;
    let creds = first.hello_new(3).await;
    let appid = new_appid();
    let endpoint = first.register(&creds[2].0, &appid).await;
    drop(first);
    let other_secret = creds[1].1.clone();
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [
        {"uaid": creds[0].0, "secret": "wrong"},
        {"uaid": creds[0].0, "secret": other_secret},
        {"uaid": creds[1].0},
        {"uaid": creds[1].0, "secret": ""},
        {"uaid": creds[2].0, "secret": creds[2].1},
    ]}))
    .await;
    let v = c.expect("hello").await;
    let statuses: Vec<(Value, Value)> = v["uaids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["status"].clone(), e["error"].clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (json!(401), json!("bad_secret")),
            (json!(401), json!("bad_secret")),
            (json!(401), json!("secret_required")),
            (json!(401), json!("bad_secret")),
            (json!(200), Value::Null),
        ],
        "{v}"
    );
    let http = reqwest::Client::new();
    assert_eq!(put_version(&http, &endpoint, 8).await, 202);
    assert_eq!(c.expect("update").await["updates"][&creds[2].0][&appid], 8);
    c.send(json!({"type": "register", "uaid": creds[0].0, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["status"], 403);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn register_for_a_uaid_not_held_is_403() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    let stranger = uuid::Uuid::new_v4().to_string();
    for kind in ["register", "unregister"] {
        for uaid in [stranger.as_str(), b.uaid.as_str()] {
            c.send(json!({"type": kind, "uaid": uaid, "appid": b.appid}))
                .await;
            let v = c.expect(kind).await;
            assert_eq!(v["status"], 403, "{v}");
            assert_eq!(v["error"], "uaid_not_held", "{v}");
        }
    }
    c.send(json!({"type": "release", "uaids": [stranger, "bogus"]}))
        .await;
    let v = c.expect("release").await;
    assert_eq!(v["uaids"][0]["status"], 403, "{v}");
    assert_eq!(v["uaids"][1]["status"], 400, "{v}");
    // An ACK for a UAID not held changes nothing and keeps the connection.
    c.ack(&[&b.uaid]).await;
    c.barrier().await;
    b.still_served(&mut server).await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket: limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn too_many_uaids_in_hello_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let entries: Vec<Value> = (0..4).map(|_| json!({})).collect();
    violation(
        &server,
        &[json!({"type": "hello", "uaids": entries})],
        413,
        "too_many_uaids_in_frame",
        4413,
    )
    .await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_uaids_in_claim_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    c.send(json!({"type": "claim", "uaids": [{}, {}, {}]})).await;
    assert_eq!(c.expect("claim").await["uaids"].as_array().unwrap().len(), 3);
    c.send(json!({"type": "claim", "uaids": [{}, {}, {}, {}]})).await;
    c.expect_error_close(413, "too_many_uaids_in_frame", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_uaids_per_connection_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_CONNECTION", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, secret) = greeted(&server).await;
    c.send(json!({"type": "claim", "uaids": [{}, {}]})).await;
    c.expect("claim").await;
    // At the limit, naming a held UAID again (twice, even) adds nothing.
    let held = json!({"uaid": uaid, "secret": secret});
    c.send(json!({"type": "claim", "uaids": [held, held]})).await;
    c.expect("claim").await;
    c.send(json!({"type": "claim", "uaids": [{}]})).await;
    c.expect_error_close(413, "too_many_uaids", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_registrations_per_uaid_is_413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_APPIDS_PER_UAID", "2")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let (a1, a2, a3) = (new_appid(), new_appid(), new_appid());
    let e1 = c.register(&uaid, &a1).await;
    c.register(&uaid, &a2).await;
    c.send(json!({"type": "register", "uaid": uaid, "appid": a3}))
        .await;
    let v = c.expect("register").await;
    assert_eq!(v["status"], 413, "{v}");
    assert_eq!(v["error"], "too_many_registrations", "{v}");
    assert!(v.get("endpoint").is_none(), "{v}");
    // Existing registrations are untouched and re-registering one is still idempotent.
    assert_eq!(c.register(&uaid, &a1).await, e1);
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": a2}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    c.register(&uaid, &a3).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn kick_in_register_not_an_object_or_too_large() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_KICK_BYTES", "64")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    for (kick, status, slug) in [
        (json!(5), 400, "invalid_kick"),
        (json!("webhook"), 400, "invalid_kick"),
        (json!([{"url": "x"}]), 400, "invalid_kick"),
        (json!({"url": "x".repeat(100)}), 413, "kick_too_large"),
    ] {
        c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid(), "kick": kick}))
            .await;
        let v = c.expect("register").await;
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["error"], slug, "{v}");
    }
    // A small object (or none) is fine.
    c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid(), "kick": {"url": "x"}}))
        .await;
    assert_eq!(c.expect("register").await["status"], 200);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn kick_in_hello_not_an_object_or_too_large() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_KICK_BYTES", "64")]).await;
    let mut b = Bystander::join(&server).await;
    for kick in [json!(5), json!("webhook"), json!([])] {
        let hello = json!({"type": "hello", "uaids": [{}], "kick": kick});
        violation(&server, &[hello], 400, "invalid_kick", 4400).await;
    }
    let hello = json!({"type": "hello", "uaids": [{}], "kick": {"url": "x".repeat(100)}});
    violation(&server, &[hello], 413, "kick_too_large", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn hello_timeout_closes_4408() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__HELLO_TIMEOUT_SECS", "1")]).await;
    let mut c = Client::connect(&server).await;
    // WebSocket pings do not count as a hello.
    c.send_raw(Message::Ping(b"hi".to_vec().into())).await;
    c.expect_error_close(408, "hello_timeout", 4408).await;
    // A client that sent hello in time stays.
    let mut b = Bystander::join(&server).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn rate_limit_closes_4429() {
    let (_dir, mut server) = start(&[
        ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1"),
        // Enough for the bystander's hello, register, ack and ping.
        ("EDITIOND_LIMITS__WS_FRAMES_BURST", "5"),
    ])
    .await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    const SENT: usize = 30;
    for _ in 0..SENT {
        // The server may close before all are sent.
        let _ = c.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
    }
    let mut pongs = 0;
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["status"], 429, "{v}");
                assert_eq!(v["error"], "rate_limited", "{v}");
                break;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(pongs < SENT, "{pongs} pongs");
    c.expect_close(4429).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn websocket_ping_frames_count_against_the_rate_limit() {
    let (_dir, mut server) = start(&[
        ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1"),
        ("EDITIOND_LIMITS__WS_FRAMES_BURST", "5"),
    ])
    .await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    for _ in 0..30 {
        // The server may close before all are sent.
        let _ = c.ws.send(Message::Ping(b"flood".to_vec().into())).await;
    }
    c.expect_error_close(429, "rate_limited", 4429).await;
    b.still_served(&mut server).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP PUT /v1/e/{token}
// ---------------------------------------------------------------------------------------------

/// A server, a registered endpoint, and a client connected for it.
async fn endpoint_setup(env: &[(&str, &str)]) -> (TempDir, Server, Bystander) {
    let (dir, server) = start(env).await;
    let b = Bystander::join(&server).await;
    (dir, server, b)
}

#[tokio::test]
async fn put_invalid_form_versions_are_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for body in [
        "version=-1",
        "version=abc",
        "version=1.5",
        "version=1e3",
        "version=18446744073709551616",
        "version=99999999999999999999999",
        "version=",
        "version=+1",
        "version=0x10",
        "v=1",
        "garbage",
    ] {
        for content_type in ["application/x-www-form-urlencoded", "text/plain", ""] {
            let mut req = http.put(&b.endpoint).body(body);
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            assert_http_error(req.send().await.unwrap(), 400, "invalid_version").await;
        }
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_invalid_json_versions_are_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for body in [
        r#"{"version":-1}"#,
        r#"{"version":"5"}"#,
        r#"{"version":1.5}"#,
        r#"{"version":1e3}"#,
        r#"{"version":18446744073709551616}"#,
        r#"{"version":null}"#,
        r#"{"version":[1]}"#,
        r#"{}"#,
        r#"{"version":1"#,
        r#"[1]"#,
    ] {
        let r = http
            .put(&b.endpoint)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_http_error(r, 400, "invalid_version").await;
    }
    // JSON is recognised without a content type too.
    let r = http
        .put(&b.endpoint)
        .body(r#"{"version":-1}"#)
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_version").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_unknown_tampered_or_garbage_tokens_are_404() {
    let endpoint_key = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [7u8; 32]);
    let secret_key = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [9u8; 32]);
    let keys = [
        ("EDITIOND_KEYS__ENDPOINT_KEY", endpoint_key.as_str()),
        ("EDITIOND_KEYS__SECRET_KEY", secret_key.as_str()),
    ];
    // A token validly sealed with the same keys but never registered on this server.
    let unknown = {
        let (_other_dir, other) = start(&keys).await;
        let b = Bystander::join(&other).await;
        b.endpoint.rsplit('/').next().unwrap().to_owned()
    };
    let (_dir, mut server, mut b) = endpoint_setup(&keys).await;
    let http = reqwest::Client::new();
    let token = b.endpoint.rsplit('/').next().unwrap().to_owned();
    let tampered = {
        let mut t = token.clone().into_bytes();
        t[10] = if t[10] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).unwrap()
    };
    let base = server.url("/v1/e/");
    for t in [
        unknown.as_str(),
        tampered.as_str(),
        &token[..42],
        &format!("{token}A"),
        "x",
        "%FF%FE",
        &"A".repeat(43),
        &"~".repeat(43),
        &"A".repeat(5000),
    ] {
        let r = http
            .put(format!("{base}{t}"))
            .body("version=1")
            .send()
            .await
            .unwrap();
        assert_http_error(r, 404, "unknown_token").await;
    }
    // A token with a path separator or none at all is no endpoint either.
    for path in ["/v1/e/", &format!("/v1/e/{token}/x")] {
        let r = http.put(server.url(path)).body("version=1").send().await.unwrap();
        assert_eq!(r.status(), 404);
        check_error_body(&r.text().await.unwrap(), 404, "not_found");
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_oversized_body_with_content_length_is_413() {
    let (_dir, mut server, mut b) = endpoint_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let http = reqwest::Client::new();
    let body = format!("version=1&pad={}", "x".repeat(2000));
    let r = http
        .put(&b.endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_http_error(r, 413, "body_too_large").await;
    // The same with a declared length only.
    let path = b.endpoint.trim_start_matches(&server.url(""));
    let (status, body) = raw_http(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nContent-Length: 1000000"),
        b"version=1",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error_body(&body, 413, "body_too_large");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_oversized_chunked_body_is_413() {
    let (_dir, mut server, mut b) = endpoint_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let path = b.endpoint.trim_start_matches(&server.url("")).to_owned();
    let mut chunked = Vec::new();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("200\r\n{}\r\n", "7".repeat(0x200)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = raw_http(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain"),
        &chunked,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error_body(&body, 413, "body_too_large");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_body_shape_decides_not_content_type() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let uaid = c.hello_new(1).await.remove(0).0;
    let endpoint = c.register(&uaid, &new_appid()).await;
    // `curl -d '{"version":5}'` labels JSON as a form; it is still read as JSON.
    for (content_type, body, version) in [
        (
            "application/x-www-form-urlencoded",
            "{\"version\": 10000005}",
            10000005,
        ),
        ("application/json", "version=10000006", 10000006),
        ("image/png", "version=10000007", 10000007),
    ] {
        let r = http
            .put(&endpoint)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{content_type} {body}");
        assert_eq!(r.json::<Value>().await.unwrap()["version"], version);
    }
    let r = http
        .put(&endpoint)
        .header("content-type", "image/png")
        .body(vec![0x89u8, b'P', b'N', b'G'])
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_version").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_invalid_ttl_is_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for ttl in ["-1", "abc", "1.5", "", "99999999999999999999999", "0x10", "1 2"] {
        let r = http
            .put(&b.endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("ttl", ttl)
            .body("version=1")
            .send()
            .await
            .unwrap();
        assert_http_error(r, 400, "invalid_ttl").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_to_unregistered_endpoint_is_410() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    let http = reqwest::Client::new();
    for body in ["version=1", ""] {
        let r = http.put(&endpoint).body(body).send().await.unwrap();
        assert_http_error(r, 410, "gone").await;
    }
    // Unregistering again is 404 on the socket, and the endpoint stays gone.
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 404);
    let r = http.put(&endpoint).body("version=2").send().await.unwrap();
    assert_http_error(r, 410, "gone").await;
    b.still_served(&mut server).await;
}

/// Reads UPDATEs for `uaid`, ACKing each, until every APPID in `want` has reached its version;
/// panics on a version above the one wanted.
async fn receive_until(c: &mut Client, uaid: &str, want: &[(&str, u64)]) {
    let mut seen: std::collections::HashMap<String, u64> = Default::default();
    while want.iter().any(|(a, v)| seen.get(*a) != Some(v)) {
        let update = c.expect("update").await;
        let events = update["updates"][uaid].as_object().expect("events for the UAID");
        for (appid, version) in events {
            let version = version.as_u64().expect("integer version");
            let (_, wanted) = want.iter().find(|(a, _)| a == appid).expect("a wanted APPID");
            assert!(version <= *wanted, "{update}");
            seen.insert(appid.clone(), version);
        }
        c.ack(&[uaid]).await;
    }
    c.barrier().await;
}

/// One registration PUT to faster than `put_rate_per_sec` beyond `put_burst` gets 429 with
/// `Retry-After`; its version is neither stored nor delivered; other registrations (of the same
/// UAID too) are unaffected; after `Retry-After` the same version is accepted as new.
#[tokio::test]
async fn put_beyond_the_rate_limit_is_429_and_stores_nothing() {
    let env = [
        ("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "1"),
        ("EDITIOND_LIMITS__PUT_BURST", "3"),
    ];
    let (_dir, mut server, mut b) = endpoint_setup(&env).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let (appid, other_appid) = (new_appid(), new_appid());
    let endpoint = c.register(&uaid, &appid).await;
    let other = c.register(&uaid, &other_appid).await;
    let http = reqwest::Client::new();

    // PUT until refused: the burst passes (a slow machine may earn a token or two meanwhile).
    let mut accepted = 0;
    let refused = loop {
        let version = accepted + 1;
        let r = http
            .put(&endpoint)
            .body(format!("version={version}"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            break (version, r);
        }
        assert_eq!(r.status(), 202);
        accepted = version;
        assert!(accepted < 50, "no PUT was ever refused");
    };
    let (rejected, r) = refused;
    assert!(accepted >= 3, "the burst of 3 was refused after {accepted}");
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "at 1 PUT/s a token is at most a second away");
    assert_http_error(r, 429, "rate_limited").await;

    // A tampered token is rejected before any bucket is looked at: 404, not 429.
    let (base, token) = endpoint.rsplit_once('/').unwrap();
    let flipped = if token.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{base}/{flipped}{}", &token[1..]);
    let r = http.put(&tampered).body("version=1").send().await.unwrap();
    assert_http_error(r, 404, "unknown_token").await;

    // Another registration of the same UAID, and of another UAID, are served.
    assert_eq!(put_version(&http, &other, 1).await, 202);
    receive_until(&mut c, &uaid, &[(&appid, accepted), (&other_appid, 1)]).await;
    b.still_served(&mut server).await;
    // The refused version never reaches the client.
    c.expect_silence(Duration::from_millis(300)).await;

    // After Retry-After the refused version is new to the store (202, not 200) and delivered.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(put_version(&http, &endpoint, rejected).await, 202);
    receive_until(&mut c, &uaid, &[(&appid, rejected)]).await;

    let metrics = server.metrics(&http).await;
    assert!(
        metrics.contains("editiond_puts_total{status=\"429\"}"),
        "{metrics}"
    );
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn websocket_path_without_a_handshake_gets_a_json_error() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    let r = http
        .get(server.ws_url().replace("ws://", "http://"))
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_upgrade").await;
    let r = http
        .get(server.url("/v1/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_upgrade").await;
    let r = http.post(server.url("/v1/ws")).send().await.unwrap();
    assert_http_error(r, 405, "method_not_allowed").await;
    b.still_served(&mut server).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP POST /v1/poll and /v1/ack
// ---------------------------------------------------------------------------------------------

/// A server, a bystander, and one UAID with a pending event: (uaid, secret, appid).
async fn poll_setup(env: &[(&str, &str)]) -> (TempDir, Server, Bystander, (String, String, String)) {
    let (dir, server, b) = endpoint_setup(env).await;
    let mut c = Client::connect(&server).await;
    let (uaid, secret) = c.hello_new(1).await.remove(0);
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    drop(c);
    let http = reqwest::Client::new();
    assert_eq!(put_version(&http, &endpoint, 5).await, 202);
    (dir, server, b, (uaid, secret, appid))
}

async fn post(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn poll_and_ack_malformed_json_are_400() {
    let (_dir, mut server, mut b, _) = poll_setup(&[]).await;
    for path in ["/v1/poll", "/v1/ack"] {
        for body in [
            "",
            "{",
            "[]",
            "null",
            "5",
            r#"{"uaids": 5}"#,
            r#"{"uaids":[{"uaid":1}]}"#,
            "\u{0}",
        ] {
            assert_http_error(post(&server, path, body).await, 400, "invalid_body").await;
        }
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_invalid_fields_are_400() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let creds = json!([{"uaid": uaid, "secret": secret}]);
    for body in [json!({"uaids": 5}), json!({"uaids": [{"uaid": 5}]}), json!([])] {
        let r = post(&server, "/v1/poll", body.to_string()).await;
        assert_http_error(r, 400, "invalid_body").await;
    }
    for body in [
        json!({"uaids": creds}),
        json!({"uaids": creds, "updates": {uaid.clone(): {appid.clone(): -1}}}),
        json!({"uaids": creds, "updates": {uaid.clone(): {appid.clone(): "5"}}}),
        json!({"uaids": creds, "updates": {uaid.clone(): {"bogus": 5}}}),
        json!({"uaids": creds, "updates": {"bogus": {appid.clone(): 5}}}),
    ] {
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 400, "invalid_body").await;
    }
    // Nothing was cleared: the pending event is still there.
    let r = post(&server, "/v1/poll", json!({"uaids": creds}).to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_oversized_bodies_are_413() {
    let (_dir, mut server, mut b, (uaid, secret, _)) =
        poll_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let pad = "x".repeat(2000);
    let poll = json!({"uaids": [{"uaid": uaid, "secret": secret}], "pad": pad});
    let ack = json!({"uaids": [{"uaid": uaid, "secret": secret}], "updates": {}, "pad": pad});
    for (path, body) in [("/v1/poll", poll), ("/v1/ack", ack)] {
        assert_http_error(post(&server, path, body.to_string()).await, 413, "body_too_large").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_bad_wait_query_is_400() {
    let (_dir, mut server, mut b, (uaid, secret, _)) = poll_setup(&[]).await;
    let body = json!({"uaids": [{"uaid": uaid, "secret": secret}]}).to_string();
    for query in [
        "wait=abc",
        "wait=-1",
        "wait=1.5",
        "wait=99999999999999999999999",
        "wait=1&wait=2",
    ] {
        let r = post(&server, &format!("/v1/poll?{query}"), body.clone()).await;
        assert_http_error(r, 400, "invalid_query").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_too_many_uaids_are_413() {
    let (_dir, mut server, mut b, (uaid, secret, _)) =
        poll_setup(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_CONNECTION", "3")]).await;
    let entry = json!({"uaid": uaid, "secret": secret});
    // A UAID named twice counts once: four copies of one entry are within the limit.
    let same = json!([entry, entry, entry, entry]);
    let r = post(&server, "/v1/poll", json!({"uaids": same}).to_string()).await;
    assert!(r.status().is_success(), "{}", r.status());
    let other = || json!({"uaid": new_appid(), "secret": "s"});
    let four = json!([entry, other(), other(), other()]);
    let r = post(&server, "/v1/poll", json!({"uaids": four}).to_string()).await;
    assert_http_error(r, 413, "too_many_uaids").await;
    let r = post(
        &server,
        "/v1/ack",
        json!({"uaids": four, "updates": {}}).to_string(),
    )
    .await;
    assert_http_error(r, 413, "too_many_uaids").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_missing_secrets_are_401() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let r = post(
        &server,
        "/v1/poll",
        json!({"uaids": [{"uaid": uaid}]}).to_string(),
    )
    .await;
    assert_http_error(r, 401, "secret_required").await;
    let good = json!({"uaid": uaid, "secret": secret});
    for entries in [
        json!([{"uaid": uaid}]),
        json!([good, {"uaid": uaid}]),
        json!([{"secret": secret}]),
        json!([{}]),
    ] {
        let body = json!({"uaids": entries, "updates": {uaid.clone(): {appid.clone(): 5}}});
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 401, "secret_required").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_wrong_secrets_are_401() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let good = json!({"uaid": uaid, "secret": secret});
    let wrong = json!({"uaid": uaid, "secret": format!("{secret}x")});
    let other = json!({"uaid": b.uaid, "secret": secret});
    for entries in [json!([wrong]), json!([good, other])] {
        let r = post(&server, "/v1/poll", json!({"uaids": entries}).to_string()).await;
        assert_http_error(r, 401, "bad_secret").await;
        let body = json!({"uaids": entries, "updates": {uaid.clone(): {appid.clone(): 5}}});
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 401, "bad_secret").await;
    }
    // The pending event was not cleared.
    let r = post(&server, "/v1/poll", json!({"uaids": [good]}).to_string()).await;
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ack_of_a_uaid_not_authenticated_is_403() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let creds = json!([{"uaid": uaid, "secret": secret}]);
    let body = json!({"uaids": creds, "updates": {
        uaid.clone(): {appid.clone(): 5},
        b.uaid.clone(): {b.appid.clone(): 1},
    }});
    let r = post(&server, "/v1/ack", body.to_string()).await;
    assert_http_error(r, 403, "uaid_not_authenticated").await;
    // The whole request was refused: the authenticated UAID's event is still pending.
    let r = post(&server, "/v1/poll", json!({"uaids": creds}).to_string()).await;
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}

// ---------------------------------------------------------------------------------------------
// Slow and stalled clients
// ---------------------------------------------------------------------------------------------

/// A WebSocket client whose socket buffers are small, so that a peer it does not read from
/// blocks soon.
async fn connect_small_buffers(server: &Server) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(tcp))
        .await
        .expect("connect");
    Client { ws }
}

/// Sends `frame` again and again and never reads. Returns `Dropped` once a send fails (the
/// server closed the connection), or `Blocked` when `until_blocked` and a send did not finish
/// soon (the server stopped reading, or is just slow: callers go on flooding until `Dropped`).
/// Panics if neither happens within four times the harness WAIT (generous: CI machines are busy).
async fn flood(c: &mut Client, frame: &str, until_blocked: bool) -> Flood {
    let deadline = Instant::now() + 4 * WAIT;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        let send = c.ws.send(Message::Text(frame.into()));
        match tokio::time::timeout(Duration::from_millis(200), send).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) => return Flood::Dropped,
            Err(_) if until_blocked => return Flood::Blocked,
            Err(_) => {}
        }
    }
    panic!("after {sent} frames the server neither stopped reading nor dropped the client");
}

#[derive(Debug, PartialEq)]
enum Flood {
    Blocked,
    Dropped,
}

const SLOW_ENV: &[(&str, &str)] = &[
    ("EDITIOND_LIMITS__SEND_TIMEOUT_SECS", "1"),
    ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1000000"),
    ("EDITIOND_LIMITS__WS_FRAMES_BURST", "1000000"),
];

const MAX_GROWTH_KIB: u64 = 64 * 1024;

#[tokio::test]
async fn client_that_floods_pings_without_reading_is_dropped() {
    let (_dir, mut server) = start(SLOW_ENV).await;
    let mut b = Bystander::join(&server).await;
    let rss_before = rss_kib(server.pid());

    let mut slow = connect_small_buffers(&server).await;
    let creds = slow.hello_new(1).await;
    let appid = new_appid();
    let slow_endpoint = slow.register(&creds[0].0, &appid).await;
    let ping = r#"{"type":"ping"}"#;
    let first = flood(&mut slow, ping, true).await;
    // While the server cannot write to the stalled client, an event for it is still accepted
    // and stored, and other clients are served; meanwhile the flood goes on until the drop.
    let http = reqwest::Client::new();
    let others = async {
        assert_eq!(put_version(&http, &slow_endpoint, 1).await, 202);
        b.still_served(&mut server).await;
    };
    let rest = async {
        match first {
            Flood::Blocked => flood(&mut slow, ping, false).await,
            dropped => dropped,
        }
    };
    let (end, ()) = tokio::join!(rest, others);
    assert_eq!(end, Flood::Dropped);

    // The bystander is all that is left.
    wait_for_sockets(&server, 1).await;
    assert_healthy(&mut server).await;
    let growth = rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(growth < MAX_GROWTH_KIB, "server grew by {growth} KiB");
    // The dropped client's event waits in the store for its next connection.
    drop(slow);
    let mut again = Client::connect(&server).await;
    again.hello(&creds).await;
    assert_eq!(again.expect("update").await["updates"][&creds[0].0][&appid], 1);
}

#[tokio::test]
async fn client_that_triggers_large_replies_without_reading_is_dropped() {
    let (_dir, mut server) = start(SLOW_ENV).await;
    let mut b = Bystander::join(&server).await;
    let rss_before = rss_kib(server.pid());
    // Each frame makes the server echo a ~60 KB invalid UAID in its reply.
    let frame = json!({"type": "register", "uaid": "u".repeat(60_000), "appid": new_appid()}).to_string();
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut c = connect_small_buffers(&server).await;
        c.hello_new(1).await;
        let first = flood(&mut c, &frame, true).await;
        slow.push((c, first));
    }
    // The server cannot write to any of them (or has dropped them); others are still served.
    b.still_served(&mut server).await;
    for (c, first) in &mut slow {
        if *first == Flood::Blocked {
            assert_eq!(flood(c, &frame, false).await, Flood::Dropped);
        }
    }
    wait_for_sockets(&server, 1).await;
    assert_healthy(&mut server).await;
    let growth = rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(growth < MAX_GROWTH_KIB, "server grew by {growth} KiB");
}

// ---------------------------------------------------------------------------------------------
// Garbage storm
// ---------------------------------------------------------------------------------------------

/// Knuth's MMIX linear congruential generator: deterministic bytes without a dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Valid frames to mutate.
fn templates() -> Vec<Vec<u8>> {
    let u = uuid::Uuid::new_v4().to_string();
    let a = uuid::Uuid::new_v4().to_string();
    [
        json!({"type": "hello", "uaids": [{}, {"uaid": u}]}),
        json!({"type": "hello", "uaids": [{"uaid": u, "secret": "AAAA"}], "kick": {"url": "x"}}),
        json!({"type": "claim", "uaids": [{}]}),
        json!({"type": "release", "uaids": [u]}),
        json!({"type": "register", "uaid": u, "appid": a, "kick": {"k": [1, 2]}}),
        json!({"type": "unregister", "uaid": u, "appid": a}),
        json!({"type": "ack", "uaids": [u]}),
        json!({"type": "ping"}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

/// One garbage message: a mutated template, random bytes, or a pathological JSON shape.
fn garbage(rng: &mut Lcg, templates: &[Vec<u8>]) -> Message {
    let mut bytes = templates[rng.below(templates.len())].clone();
    match rng.below(9) {
        0 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
        }
        1 => bytes.truncate(rng.below(bytes.len())),
        2 => {
            let i = rng.below(bytes.len() + 1);
            let n = 1 + rng.below(8);
            let junk = rng.bytes(n);
            bytes.splice(i..i, junk);
        }
        3 => {
            let n = rng.below(200);
            bytes = rng.bytes(n);
        }
        4 => {
            let depth = 1 + rng.below(100_000);
            bytes = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
        }
        5 => {
            let depth = 1 + rng.below(5_000);
            let kick = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            bytes = format!(r#"{{"type":"hello","uaids":[],"kick":{kick}}}"#).into_bytes();
        }
        6 => {
            // Swap a value for another JSON type.
            let s = String::from_utf8_lossy(&bytes).into_owned();
            let other = [
                "null",
                "true",
                "-1",
                "1e999",
                "\"\"",
                "{}",
                "[]",
                "18446744073709551616",
            ];
            bytes = s
                .replacen('[', &format!("{},[", other[rng.below(other.len())]), 1)
                .into_bytes();
        }
        7 => {
            let opcodes = [
                OpCode::Data(Data::Binary),
                OpCode::Data(Data::Continue),
                OpCode::Data(Data::Reserved(3 + rng.below(5) as u8)),
            ];
            return raw_frame(opcodes[rng.below(opcodes.len())], bytes);
        }
        _ => {}
    }
    raw_frame(OpCode::Data(Data::Text), bytes)
}

#[tokio::test]
async fn garbage_storm_leaves_the_server_healthy() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let templates = templates();
    let mut rng = Lcg(0x5EED_F00D_CAFE_D00D);
    let mut closes = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..300 {
        let mut c = Client::connect(&server).await;
        if round % 2 == 0 {
            c.hello_new(1).await;
        }
        let frames = 1 + rng.below(3);
        for _ in 0..frames {
            let _ = c.ws.send(garbage(&mut rng, &templates)).await;
        }
        // Whatever the server made of it, a ping then either answers or it had closed.
        let _ = c.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
        let mut last_error: Option<Value> = None;
        loop {
            match c.read(WAIT).await {
                Read::Frame(v) if v["type"] == "pong" => break,
                Read::Frame(v) if v["type"] == "error" => {
                    assert!(v["status"].as_u64().is_some(), "{v}");
                    assert!(v["error"].as_str().is_some(), "{v}");
                    assert!(v["message"].as_str().is_some(), "{v}");
                    last_error = Some(v);
                }
                Read::Frame(_) => {}
                Read::Closed(code) => {
                    let code = code.unwrap_or_else(|| panic!("closed without a code after {last_error:?}"));
                    let error = last_error
                        .take()
                        .unwrap_or_else(|| panic!("close {code} without an error frame"));
                    *closes.entry(code).or_default() += 1;
                    if code >= 4000 {
                        assert_eq!(
                            u64::from(code - 4000),
                            error["status"].as_u64().unwrap(),
                            "{error}"
                        );
                    }
                    break;
                }
                Read::Timeout => panic!("no answer in round {round}"),
            }
        }
        if round % 50 == 0 {
            assert_healthy(&mut server).await;
        }
    }
    // The storm reached the error paths it was meant to.
    assert!(closes.len() >= 4, "{closes:?}");
    b.still_served(&mut server).await;
}
