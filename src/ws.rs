//! The WebSocket transport at `GET /v1/ws`: socket in, [`Session`] in the middle, socket out.
//!
//! Buffers are sized for idle sockets (most are): a small read buffer that grows only for a large
//! frame, no write batching, and a hard cap on what may queue for a client that does not read.
//! A send that blocks longer than `send_timeout_secs` drops that client alone.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::time::{sleep_until, timeout, Instant};

use crate::http::HttpError;
use crate::proto::WsError;
use crate::server::AppState;
use crate::session::Session;

/// `GET /v1/ws`: upgrades with the configured limits; a request that is no WebSocket handshake
/// gets a JSON error like every other HTTP error.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return HttpError::InvalidUpgrade(e.body_text()).into_response(),
    };
    let limits = &state.config.limits;
    ws.read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(limits.max_write_buffer_bytes)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| serve(state, Box::new(socket)))
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
/// lifetime, so what only handling a frame needs is boxed while it runs (the socket and the frame
/// handlers live on the heap: 2,576 → 952 bytes per task, measured with -Zprint-type-sizes).
async fn serve(state: Arc<AppState>, mut socket: Box<WebSocket>) {
    let _open = state.open_socket();
    let limits = &state.config.limits;
    let send_timeout = Duration::from_secs(limits.send_timeout_secs);
    let mut session = Session::new(state.clone());
    let mailbox = session.mailbox().clone();
    let stopping = state.stop_notified();
    tokio::pin!(stopping);
    stopping.as_mut().enable();
    let hello_deadline = Instant::now() + Duration::from_secs(limits.hello_timeout_secs);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let mut last_heard = Instant::now();
    let mut out = Vec::new();

    let end = 'serve: loop {
        if state.is_stopping() {
            break End::Close(WsError::ShuttingDown);
        }
        let deadline = if session.greeted() {
            last_heard + idle
        } else {
            hello_deadline
        };
        let step = tokio::select! {
            biased;
            _ = &mut stopping => Err(WsError::ShuttingDown),
            msg = socket.recv() => {
                last_heard = Instant::now();
                match msg {
                    None => break End::PeerGone,
                    Some(Ok(Message::Close(_))) => break End::PeerClosed,
                    Some(Ok(Message::Text(text))) => Box::pin(session.on_text(text.as_str(), &mut out)).await,
                    Some(Ok(Message::Binary(_))) => Err(WsError::BinaryFrame),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => session.count_frame(),
                    Some(Err(e)) => match classify(e, limits.max_frame_bytes) {
                        Some(err) => Err(err),
                        None => break End::PeerGone,
                    },
                }
            }
            _ = mailbox.wake.notified() => Box::pin(session.on_mailbox(&mut out)).await,
            _ = sleep_until(deadline) => Err(if session.greeted() {
                WsError::IdleTimeout(limits.idle_timeout_secs)
            } else {
                WsError::HelloTimeout(limits.hello_timeout_secs)
            }),
        };
        // Taken, not drained: an idle socket keeps no spare capacity.
        for frame in std::mem::take(&mut out) {
            let sent = timeout(send_timeout, socket.send(Message::Text(frame.into()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("dropping a client that does not read");
                break 'serve End::PeerGone;
            }
        }
        if let Err(e) = step {
            break End::Close(e);
        }
    };

    match end {
        // tungstenite queued the close reply when it read the peer's close; send it.
        End::PeerClosed => {
            let _ = timeout(send_timeout, SinkExt::flush(&mut *socket)).await;
        }
        End::PeerGone => {}
        End::Close(err) => {
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
            // Wait for the peer's close, discarding what it still sends: dropping a socket with
            // unread input resets it, and the reset can destroy the error frame in flight.
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
