//! The WebSocket transport at `GET /v1/ws`: socket in, [`Session`] in the middle, socket out.
//!
//! Buffers are sized for idle sockets (most are): a small read buffer that grows only for a large
//! frame, no write batching, and a hard cap on what may queue for a client that does not read.
//! A send that blocks longer than `send_timeout_secs` drops that client alone.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::rejection::ExtensionRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::time::{sleep_until, timeout, Instant};

use crate::http::HttpError;
use crate::push::proto::WsError;
use crate::push::session::{Out, Session};
use crate::state::{AppState, Lifecycle};

/// `GET /v1/ws`: upgrades with the configured limits; a request that is no WebSocket handshake
/// gets a JSON error like every other HTTP error.
pub async fn upgrade(
    State(state): State<AppState>,
    State(lifecycle): State<Lifecycle>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return HttpError::InvalidUpgrade(e.body_text()).into_response(),
    };
    // No new sockets while the old ones drain: each would hold the shutdown up.
    if lifecycle.is_stopping() {
        return HttpError::ShuttingDown.into_response();
    }
    let peer = peer.ok().map(|ConnectInfo(addr)| addr);
    let client = crate::http::client_ip(&state.config.server.trusted_proxy_header, &headers, peer);
    let limits = &state.config.limits;
    ws.read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(limits.max_write_buffer_bytes)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| serve(state, Box::new(socket), client))
}

/// Why the loop ended: the peer closed (answer its close), the peer left or stopped reading
/// (nothing more can be said to it), or the server closes with an error.
enum End {
    PeerClosed,
    PeerGone,
    Close(WsError),
}

/// How long a closing socket waits for the peer's side of the close handshake.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Sized for the idle socket: this future is the whole of a connection's task, allocated for its
/// lifetime, so it holds only what the idle wait needs, and everything the loop does when woken
/// (handling a frame, sending, closing) runs boxed, on the heap only while it runs. The task went
/// from 2,576 to 1,024 bytes this way (measured with -Zprint-type-sizes; see bench/RESULTS.md).
async fn serve(state: AppState, mut socket: Box<WebSocket>, client: Option<IpAddr>) {
    let _open = state.open_socket();
    let limits = &state.config.limits;
    let mut session = Session::new(state.clone());
    session.set_client(client);
    let mailbox = session.mailbox().clone();
    let stopping = state.lifecycle.stop_notified();
    tokio::pin!(stopping);
    stopping.as_mut().enable();
    // The hello deadline until hello, then the idle deadline from the last frame heard.
    let mut deadline = Instant::now() + Duration::from_secs(limits.hello_timeout_secs);

    let end = loop {
        if state.lifecycle.is_stopping() {
            break End::Close(WsError::ShuttingDown);
        }
        let wake = tokio::select! {
            biased;
            _ = &mut stopping => Wake::Stop,
            msg = socket.recv() => Wake::Frame(msg),
            _ = mailbox.wake.notified() => Wake::Mailbox,
            _ = sleep_until(deadline) => Wake::Deadline,
        };
        if let Some(end) = Box::pin(step(&mut session, &mut socket, wake, &mut deadline)).await {
            break end;
        }
    };
    Box::pin(finish(&mut session, &mut socket, end)).await;
}

/// What woke the connection's loop.
enum Wake {
    Stop,
    Frame(Option<Result<Message, axum::Error>>),
    Mailbox,
    Deadline,
}

/// Handles what woke the loop and sends the frames that produced; `Some` ends the connection.
async fn step(
    session: &mut Session,
    socket: &mut WebSocket,
    wake: Wake,
    deadline: &mut Instant,
) -> Option<End> {
    let state = session.state().clone();
    let limits = &state.config.limits;
    let mut out = Vec::new();
    let heard = matches!(wake, Wake::Frame(_));
    // tungstenite answers a ping on the socket's next read or write: that pong is a frame too.
    let pinged = matches!(wake, Wake::Frame(Some(Ok(Message::Ping(_)))));
    let mut result = match wake {
        Wake::Stop => Err(WsError::ShuttingDown),
        Wake::Frame(None) => return Some(End::PeerGone),
        Wake::Frame(Some(Ok(Message::Close(_)))) => return Some(End::PeerClosed),
        Wake::Frame(Some(Ok(Message::Text(text)))) => session.on_text(text.as_str(), &mut out).await,
        Wake::Frame(Some(Ok(Message::Binary(_)))) => Err(WsError::BinaryFrame),
        Wake::Frame(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => session.count_frame(),
        Wake::Frame(Some(Err(e))) => match classify(e, limits.max_frame_bytes) {
            Some(err) => Err(err),
            None => return Some(End::PeerGone),
        },
        Wake::Mailbox => session.on_mailbox(&mut out).await,
        Wake::Deadline => Err(if session.greeted() {
            WsError::IdleTimeout(limits.idle_timeout_secs)
        } else {
            WsError::HelloTimeout(limits.hello_timeout_secs)
        }),
    };
    if heard && session.greeted() {
        *deadline = Instant::now() + Duration::from_secs(limits.idle_timeout_secs);
    }
    if pinged || !out.is_empty() || result.is_err() {
        if let Err(e) = session.settle().await {
            // Nothing may follow an ACK whose commit failed, but the error that closes; a pong
            // tungstenite has queued would go out with that error, so then not even the error.
            if pinged {
                return Some(End::PeerGone);
            }
            out.clear();
            result = result.and(Err(e));
        }
    }
    if !out.is_empty() && !send_all(socket, out, send_timeout(limits)).await {
        tracing::debug!("dropping a client that does not read");
        return Some(End::PeerGone);
    }
    result.err().map(End::Close)
}

/// Ends the connection as `end` says.
async fn finish(session: &mut Session, socket: &mut WebSocket, end: End) {
    let state = session.state().clone();
    let send_timeout = send_timeout(&state.config.limits);
    match end {
        // tungstenite queued the close reply when it read the peer's close; send it, unless it
        // would follow an ACK whose commit failed.
        End::PeerClosed => {
            if session.settle().await.is_ok() {
                let _ = timeout(send_timeout, SinkExt::flush(socket)).await;
            }
        }
        End::PeerGone => {}
        End::Close(err) => {
            // `step` settled already when it produced this error; this covers the rest.
            let err = match session.settle().await {
                Ok(()) => err,
                Err(e) => e,
            };
            close(&state, socket, err, send_timeout).await
        }
    }
}

fn send_timeout(limits: &crate::config::Limits) -> Duration {
    Duration::from_secs(limits.send_timeout_secs)
}

/// Sends `frames` in order, each serialised here, once; `false` if the client did not take one
/// within `send_timeout`. Boxed by the caller, like everything the loop awaits only while busy
/// (see [`serve`]).
async fn send_all(socket: &mut WebSocket, frames: Vec<Out>, send_timeout: Duration) -> bool {
    for frame in frames {
        let text = frame.into_frame();
        let sent = timeout(send_timeout, socket.send(Message::Text(text.into()))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return false;
        }
    }
    true
}

/// Sends the error frame and the close frame for `err`, then waits briefly for the peer's close.
async fn close(state: &AppState, socket: &mut WebSocket, err: WsError, send_timeout: Duration) {
    let code = err.close_code();
    state.metrics.count_close(code);
    tracing::debug!(code, error = err.slug(), "closing socket");
    let sent = timeout(send_timeout, async {
        socket.send(Message::Text(err.frame().into())).await?;
        socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: err.slug().into(),
            })))
            .await
    })
    .await;
    // Wait for the peer's close, discarding what it still sends: dropping a socket with unread
    // input resets it, and the reset can destroy the error frame in flight.
    if matches!(sent, Ok(Ok(()))) {
        let _ = timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(msg)) = socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Maps a read error to the violation it reports, or `None` when the transport just failed.
fn classify(e: axum::Error, max_frame_bytes: usize) -> Option<WsError> {
    match e.into_inner().downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Some(WsError::FrameTooLarge(max_frame_bytes)),
        Some(tungstenite::Error::Utf8(_)) => Some(WsError::InvalidUtf8),
        // A peer that vanished mid-stream is gone, not in violation.
        Some(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )) => None,
        Some(tungstenite::Error::Protocol(e)) => Some(WsError::ProtocolViolation(e.to_string())),
        _ => None,
    }
}
