//! An ACK is durable before any frame that follows it, whatever that frame is. The server runs
//! with an `LD_PRELOAD` shim (tests/support/slowsync.c, compiled here with `cc`) that makes
//! `pwrite`/`fsync` sleep while a flag file exists, so the ACK's commit is slow; the client kills
//! the server (SIGKILL) as soon as a frame that followed the ACK arrives, restarts it and checks
//! that the ACKed version does not come back. (Found by review: a WebSocket pong, `released`,
//! and error frames used to leave before the ACK's commit.)

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// The shim, built once per test run, in cargo's scratch dir for integration tests (not /tmp,
/// where one file per run would pile up).
fn shim() -> &'static str {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join(format!("editiond-slowsync-{}.so", std::process::id()));
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/slowsync.c");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(source)
            .arg("-ldl")
            .status()
            .expect("cc (gcc) is needed to build the test shim");
        assert!(status.success(), "building {source} failed");
        out
    })
    .to_str()
    .unwrap()
}

struct Setup {
    server: Server,
    _dir: tempfile::TempDir,
    flag: std::path::PathBuf,
    c: Client,
    creds: Vec<(String, String)>,
    uaid: String,
    appid: String,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("slow");
    let flag_s = flag.to_str().unwrap().to_owned();
    let mut env = vec![
        ("LD_PRELOAD", shim()),
        ("SLOW_SYNC_MS", "1500"),
        ("SLOW_SYNC_FLAG", flag_s.as_str()),
    ];
    env.extend_from_slice(extra);
    let server = Server::start_with(dir.path(), &env).await;
    let http = reqwest::Client::new();
    let mut enrolled = enroll(&server).await;
    enrolled.put_and_receive(&http, 1).await;
    let Enrolled {
        mut c,
        creds,
        uaid,
        appid,
        ..
    } = enrolled;
    // Let sled's own periodic flush pass, then make writes slow and ACK.
    tokio::time::sleep(Duration::from_millis(700)).await;
    std::fs::write(&flag, b"").unwrap();
    c.ack(&[&uaid]).await;
    Setup {
        server,
        _dir: dir,
        flag,
        c,
        creds,
        uaid,
        appid,
    }
}

/// Kills the server, restarts it with fast writes and reports whether version 1 comes back.
async fn ack_survived(s: &mut Setup) -> bool {
    s.server.kill();
    std::fs::remove_file(&s.flag).unwrap();
    s.server.restart().await;
    let mut c = Client::connect(&s.server).await;
    c.hello(&s.creds).await;
    match c.read(Duration::from_millis(1000)).await {
        Read::Timeout => true,
        Read::Frame(v) => {
            assert_eq!(v["updates"][&s.uaid][&s.appid], 1, "{v}");
            false
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn json_pong_after_ack_proves_it_durable() {
    let mut s = setup(&[]).await;
    let t = Instant::now();
    s.c.send(json!({"type": "ping"})).await;
    s.c.expect("pong").await;
    eprintln!("control: JSON pong after {:?}", t.elapsed());
    let survived = ack_survived(&mut s).await;
    assert!(survived, "a pong left after the ACK, yet the ACK was lost");
}

#[tokio::test]
async fn websocket_pong_after_ack_proves_it_durable() {
    let mut s = setup(&[]).await;
    let t = Instant::now();
    s.c.ws.send(Message::Ping(b"x".to_vec().into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), s.c.ws.next()).await;
    assert!(matches!(reply, Ok(Some(Ok(Message::Pong(_))))), "{reply:?}");
    eprintln!("ws pong after {:?}", t.elapsed());
    let survived = ack_survived(&mut s).await;
    eprintln!("ws pong: ACK survived the kill: {survived}");
    assert!(
        survived,
        "a WebSocket pong left after the ACK, yet the ACK was lost"
    );
}

#[tokio::test]
async fn released_after_ack_proves_it_durable() {
    let mut s = setup(&[]).await;
    let t = Instant::now();
    let mut other = Client::connect(&s.server).await;
    other.hello(&s.creds).await;
    let v = s.c.expect("released").await;
    eprintln!("released after {:?}: {v}", t.elapsed());
    let survived = ack_survived(&mut s).await;
    eprintln!("released: ACK survived the kill: {survived}");
    assert!(survived, "`released` left after the ACK, yet the ACK was lost");
}

#[tokio::test]
async fn no_pong_after_an_ack_whose_commit_timed_out() {
    let mut s = setup(&[("EDITIOND_STORE__WRITE_TIMEOUT_MS", "300")]).await;
    let t = Instant::now();
    s.c.send(json!({"type": "ping"})).await;
    let first = s.c.recv().await;
    let second = s.c.read(Duration::from_secs(5)).await;
    eprintln!("timeout: after {:?}: {first} then {second:?}", t.elapsed());
    let survived = ack_survived(&mut s).await;
    eprintln!("timeout: ACK survived the kill: {survived}");
    assert!(
        first["type"] != "pong" || survived,
        "a pong left after the ACK, yet the ACK was lost"
    );
}

#[tokio::test]
async fn error_frame_after_ack_proves_it_durable() {
    let mut s = setup(&[]).await;
    let t = Instant::now();
    s.c.ws.send(Message::Binary(b"x".to_vec().into())).await.unwrap();
    let v = s.c.expect("error").await;
    eprintln!("error after {:?}: {v}", t.elapsed());
    let survived = ack_survived(&mut s).await;
    eprintln!("error frame: ACK survived the kill: {survived}");
    assert!(
        survived,
        "an error frame left after the ACK, yet the ACK was lost"
    );
}

/// An ACK whose commit times out, then a WebSocket ping: tungstenite queues the pong when it
/// reads the ping, and would send it with whatever the server writes next, so the server drops
/// the connection instead of closing it. No pong may prove an ACK that is not durable.
#[tokio::test]
async fn no_websocket_pong_after_an_ack_whose_commit_failed() {
    let mut s = setup(&[("EDITIOND_STORE__WRITE_TIMEOUT_MS", "300")]).await;
    s.c.ws.send(Message::Ping(b"x".to_vec().into())).await.unwrap();
    let mut seen = Vec::new();
    let mut got_pong = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), s.c.ws.next()).await {
        if matches!(m, Message::Pong(_)) {
            got_pong = true;
            // Kill at once: the ACK's commit is still sleeping in the shim.
            s.server.kill();
        }
        let closed = matches!(m, Message::Close(_));
        seen.push(format!("{m:?}"));
        if closed {
            break;
        }
    }
    let survived = ack_survived(&mut s).await;
    assert!(
        !got_pong || survived,
        "a pong left after an ACK whose commit failed, and the ACK was lost: {seen:?}"
    );
}
