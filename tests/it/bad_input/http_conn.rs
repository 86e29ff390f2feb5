//! HTTP connections from hostile or broken clients (issue 9, findings 1, 2 and 7): stalled
//! headers, trickled bodies and idle keep-alive connections are closed by the timeouts; SIGTERM
//! ends within the grace period whatever such clients do, with `/health` answering 503 while it
//! drains; requests the HTTP layer cannot parse get a bare status and a close.

use super::*;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;

/// Waits up to `wait` for the server to close the connection; returns what it sent before, or
/// `None` if the connection was still open.
pub(super) async fn closed_within(
    tcp: &mut (impl AsyncRead + Unpin + ?Sized),
    wait: Duration,
) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status and body of the one answer in `raw`.
fn answer(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// Writes `chunk` every 500 ms until the server closes the connection.
fn trickle(mut w: tokio::net::tcp::OwnedWriteHalf, chunk: &'static [u8]) {
    tokio::spawn(async move {
        while w.write_all(chunk).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

const SHORT_TIMEOUTS: &[(&str, &str)] = &[
    ("EDITIOND_LIMITS__HTTP_IDLE_TIMEOUT_SECS", "1"),
    ("EDITIOND_LIMITS__HTTP_HEADER_TIMEOUT_SECS", "2"),
    ("EDITIOND_LIMITS__HTTP_BODY_TIMEOUT_SECS", "2"),
];

#[tokio::test]
async fn stalled_http_clients_are_closed_by_the_timeouts() {
    let (_dir, mut server) = start(SHORT_TIMEOUTS).await;
    let mut b = Bystander::join(&server).await;
    let connect = || TcpStream::connect(server.addr);

    // Connects and says nothing: the idle timeout.
    let mut silent = connect().await.unwrap();
    // One complete request, then nothing: the keep-alive idle timeout.
    let mut kept = connect().await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Headers that never end, a header line every 500 ms (slowloris): the header timeout.
    let (mut loris, mut w) = connect().await.unwrap().into_split();
    w.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    trickle(w, b"X-Slow: 1\r\n");
    // A declared body that stops after one byte, and one that trickles a byte every 500 ms.
    let poll_head = b"POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                      Content-Length: 100\r\n\r\n{";
    let mut partial = connect().await.unwrap();
    partial.write_all(poll_head).await.unwrap();
    let (mut dribble, mut w) = connect().await.unwrap().into_split();
    w.write_all(poll_head).await.unwrap();
    trickle(w, b" ");

    let silent = closed_within(&mut silent, WAIT)
        .await
        .expect("silent connection still open");
    assert!(silent.is_empty(), "{silent:?}");
    let kept = closed_within(&mut kept, WAIT)
        .await
        .expect("idle keep-alive connection still open");
    assert_eq!(answer(&kept).0, 200);
    let loris = closed_within(&mut loris, WAIT)
        .await
        .expect("slow headers still open");
    assert!(loris.is_empty(), "{:?}", String::from_utf8_lossy(&loris));
    for conn in [&mut partial as &mut (dyn AsyncRead + Unpin + Send), &mut dribble] {
        let got = closed_within(conn, WAIT).await.expect("partial body still open");
        let (status, body) = answer(&got);
        assert_eq!(status, 408, "{body}");
        check_error_body(&body, 408, "body_timeout");
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn sigterm_drains_within_the_grace_period_whatever_http_clients_do() {
    // Timeouts far beyond the test: only the shutdown bound can end these connections.
    let (_dir, mut server) = start(&[
        ("EDITIOND_SERVER__SHUTDOWN_GRACE_SECS", "3"),
        ("EDITIOND_LIMITS__HTTP_IDLE_TIMEOUT_SECS", "600"),
        ("EDITIOND_LIMITS__HTTP_HEADER_TIMEOUT_SECS", "600"),
        ("EDITIOND_LIMITS__HTTP_BODY_TIMEOUT_SECS", "600"),
    ])
    .await;
    // A WebSocket client that never reads (so never answers the close).
    let (_ws, _, _) = greeted(&server).await;
    let connect = || TcpStream::connect(server.addr);
    let _silent = connect().await.unwrap();
    let mut stalled = connect().await.unwrap();
    stalled
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut kept = connect().await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(kept.read(&mut buf).await.unwrap() > 0);

    server.send_term();
    // While it drains, the port stays open and `/health` says why.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = reqwest::get(server.url("/health"))
            .await
            .expect("port closed while draining");
        if r.status() == 503 {
            assert_http_error(r, 503, "shutting_down").await;
            break;
        }
        assert!(Instant::now() < deadline, "no 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every connection above is still held open by its client.
    let status = server.wait_exit();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn requests_the_http_layer_cannot_parse_get_a_bare_status() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let many_headers: String = (0..120).map(|i| format!("\r\nX-H{i}: v")).collect();
    let cases = [
        ("POST /v1/poll HTTP/1.1\r\nContent-Length: abc".to_owned(), 400),
        (
            "POST /v1/poll HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6".to_owned(),
            400,
        ),
        ("G@T / HTTP/1.1".to_owned(), 400),
        (format!("GET /health HTTP/1.1{many_headers}"), 431),
    ];
    // proto/http.md: answered by the HTTP layer itself, without a body, and closed.
    for (head, status) in cases {
        let (got, body) = raw_http(&server, &head, b"").await;
        assert_eq!(got, status, "{head:?}");
        assert_eq!(body, "", "{head:?}");
    }
    b.still_served(&mut server).await;
}
