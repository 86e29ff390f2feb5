//! Slow and stalled clients.

use super::*;
use futures_util::StreamExt;

/// A WebSocket client whose receive buffer is small, so that a server it does not read from
/// blocks soon. (Its send buffer stays as the kernel sizes it: a tiny one too made loopback TCP
/// stall in retransmission backoff on a busy machine, with nobody at fault.)
async fn connect_small_buffers(server: &Server) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
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
///
/// A server blocked on a write drops the client within `send_timeout_secs` (1 s here). Sends
/// stalled far longer mean the kernel stalled instead (loopback TCP in retransmission backoff
/// after drops on a starved machine; seen with `ss` as the server idle, its receive queue empty,
/// the client's segment unacknowledged): then one short read lets the server's queued replies
/// and their acknowledgements flow, and the flood goes on, still never reading otherwise.
async fn flood(c: &mut Client, frame: &str, until_blocked: bool) -> Flood {
    let deadline = Instant::now() + 4 * WAIT;
    let mut sent = 0u64;
    let mut progress = Instant::now();
    while Instant::now() < deadline {
        let send = c.ws.send(Message::Text(frame.into()));
        match tokio::time::timeout(Duration::from_millis(200), send).await {
            Ok(Ok(())) => {
                sent += 1;
                progress = Instant::now();
            }
            Ok(Err(_)) => return Flood::Dropped,
            Err(_) if until_blocked => return Flood::Blocked,
            Err(_) if progress.elapsed() > Duration::from_secs(5) => {
                eprintln!("flood: sends stalled 5 s after {sent} frames; reading once");
                if let Ok(None | Some(Err(_))) =
                    tokio::time::timeout(Duration::from_millis(100), c.ws.next()).await
                {
                    return Flood::Dropped;
                }
                progress = Instant::now();
            }
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
