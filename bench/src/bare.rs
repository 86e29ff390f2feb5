//! The ceilings: a bare hyper server that answers 202 to every PUT, and a bare WebSocket server
//! (tokio-tungstenite, buffers sized as editiond's) that pushes update-sized frames and waits
//! for each reply, as editiond waits for each ACK. Each runs as a child process of this tool
//! (`editiond-bench bare-http` / `bare-ws`), so it gets its own RSS, runtime and file limit, and
//! exits when its stdin closes (when the parent ends, however it ends).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::{sys, BoxError};

/// A running bare server child.
pub struct Bare {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl Bare {
    /// Re-executes this binary with `args` and reads the address it prints.
    pub fn spawn(args: &[&str]) -> Result<Bare, BoxError> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = match line.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("bare server printed {line:?}, not an address").into());
            }
        };
        Ok(Bare {
            pid: child.id(),
            child,
            addr,
        })
    }

    pub fn rss(&self) -> Result<u64, BoxError> {
        Ok(sys::rss_bytes(self.pid)?)
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Exits the process when stdin reaches EOF: the parent is gone or done with us.
fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

async fn bind_and_announce() -> Result<TcpListener, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    Ok(listener)
}

/// `bare-http`: 202 with a small JSON body to every request, after reading its body.
pub async fn serve_http() -> Result<(), BoxError> {
    exit_with_parent();
    let listener = bind_and_announce().await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                let resp = Response::builder()
                    .status(202)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"version\":1700000000000000}")));
                Ok::<_, Infallible>(resp.unwrap_or_default())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A text frame of exactly `bytes` bytes shaped like an UPDATE.
pub fn update_sized_frame(bytes: usize) -> String {
    let head = "{\"type\":\"update\",\"updates\":{\"";
    let tail = "\":{}}}";
    let pad = bytes.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "0".repeat(pad))
}

/// `bare-ws`: on every WebSocket, send one `frame_bytes` frame, wait for any reply, repeat.
pub async fn serve_ws(frame_bytes: usize) -> Result<(), BoxError> {
    exit_with_parent();
    let listener = bind_and_announce().await?;
    let frame = Utf8Bytes::from(update_sized_frame(frame_bytes));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let frame = frame.clone();
        tokio::spawn(async move {
            // The same buffer sizes editiond's WebSocket uses by default.
            let config = WebSocketConfig::default()
                .read_buffer_size(512)
                .write_buffer_size(0)
                .max_write_buffer_size(1 << 20);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
                return;
            };
            loop {
                if ws.send(Message::Text(frame.clone())).await.is_err() {
                    return;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(_) | Message::Binary(_))) => break,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                        Some(Ok(_)) => {}
                    }
                }
            }
        });
    }
}
