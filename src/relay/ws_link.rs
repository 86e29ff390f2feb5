//! The upstream link over one WebSocket: hello (with the hop list), then every UAID of the book
//! re-claimed in frames of at most `max_uaids_per_frame`, then claims, registers and
//! unregisters as downstream clients ask, releases of UAIDs the book forgot, UPDATEs stored and
//! ACKed, UAIDs the upstream gave to a newer connection taken from their holders here (and not
//! re-claimed until a client names them again), pings while idle. On any failure the link
//! reconnects with jittered exponential backoff and starts over.
//!
//! The upstream answers one connection's frames in order (claim → claim reply, register →
//! register reply, release → release reply, ping → pong; an ack has no reply), so replies are
//! matched to requests by a FIFO of what is awaiting an answer. UPDATEs interleave freely.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{backoff, store_updates, Relay, RelayError, Updates};
use crate::ids::{Appid, Uaid};
use crate::push::delivery::Delivery;
use crate::push::proto::{Credential, RegistrationReply, ServerMessage, StatusEntry};
use crate::ratelimit::{Bucket, Rate};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a downstream request asks of the upstream.
pub enum Request {
    /// Claim one entry (a new UAID, or a UAID with the secret a client gave).
    Claim(Credential, oneshot::Sender<StatusEntry>),
    /// Register (`register`) or unregister (`!register`) one APPID.
    Registration {
        register: bool,
        uaid: Uaid,
        appid: Appid,
        reply: oneshot::Sender<RegistrationReply>,
    },
    /// Stop speaking for these UAIDs (the book forgot them); at most a frame's worth.
    Release(Vec<Uaid>),
}

/// A frame sent upstream and awaiting its reply, in order.
enum Awaiting {
    /// Claimed entries, each with the request waiting for it (none for re-claims).
    Claim(Vec<(Credential, Option<oneshot::Sender<StatusEntry>>)>),
    Registration(bool, oneshot::Sender<RegistrationReply>),
    Release,
    Pong,
}

/// Runs the link until shutdown: connect, serve, back off, again.
pub async fn run(delivery: Delivery, relay: Arc<Relay>, mut requests: mpsc::Receiver<Request>) {
    let url = format!("{}/v1/ws", relay.config.base_url());
    let mut attempt = 0u32;
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        let ended = tokio::select! {
            ended = connection(&delivery, &relay, &url, &mut requests, &mut attempt) => match ended {
                Err(e) => e,
                Ok(never) => match never {},
            },
            _ = &mut stopping => return,
        };
        relay.link_down(&ended);
        // Requests queued for the link that ended get no answer: their callers answer 503.
        while requests.try_recv().is_ok() {}
        let delay = backoff(&relay.config, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stopping => return,
        }
    }
}

/// Frames sent upstream, paced under `upstream_frames_per_sec` (the upstream closes a
/// connection that sends faster than its `ws_frames_per_sec`).
struct Sender {
    sink: SplitSink<Socket, Message>,
    rate: Rate,
    bucket: Bucket,
}

impl Sender {
    async fn send(&mut self, frame: String) -> Result<(), RelayError> {
        while let Err(wait) = self.bucket.take(self.rate, std::time::Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        self.sink
            .send(Message::Text(frame.into()))
            .await
            .map_err(|e| RelayError::Unreachable(e.to_string()))
    }
}

/// One connection, from connect to failure (it never ends otherwise).
async fn connection(
    delivery: &Delivery,
    relay: &Relay,
    url: &str,
    requests: &mut mpsc::Receiver<Request>,
    attempt: &mut u32,
) -> Result<Infallible, RelayError> {
    let limit = relay.request_timeout();
    let secs = relay.config.request_timeout_secs;
    let (socket, _) = tokio::time::timeout(limit, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| RelayError::Timeout(secs))?
        .map_err(|e| RelayError::Unreachable(e.to_string()))?;
    let (sink, mut stream) = socket.split();
    let rate = Rate::new(
        relay.config.upstream_frames_per_sec,
        relay.config.upstream_frames_burst,
    );
    let mut out = Sender {
        sink,
        rate,
        bucket: Bucket::full(rate, std::time::Instant::now()),
    };
    let hello = serde_json::json!({"type": "hello", "uaids": [], "via": relay.hello_via()});
    out.send(hello.to_string()).await?;
    match tokio::time::timeout(limit, next_message(&mut stream))
        .await
        .map_err(|_| RelayError::Timeout(secs))??
    {
        ServerMessage::Hello(reply) => relay.note_upstream(reply.via)?,
        ServerMessage::Error { error, .. } => return Err(RelayError::Refused(error)),
        // Named by type only: a reply's entries may carry secrets, which are never logged.
        _ => return Err(RelayError::Protocol("a frame before the hello reply".into())),
    }
    relay.link_up();
    *attempt = 0;

    let mut awaiting = VecDeque::new();
    let book = relay.book.all();
    for chunk in book.chunks(relay.max_per_frame) {
        let entries: Vec<(Credential, Option<oneshot::Sender<StatusEntry>>)> = chunk
            .iter()
            .map(|(uaid, secret)| {
                let credential = Credential {
                    uaid: Some(uaid.to_string()),
                    secret: Some(secret.clone()),
                };
                (credential, None)
            })
            .collect();
        out.send(claim_frame(&entries)).await?;
        awaiting.push_back(Awaiting::Claim(entries));
    }
    if !book.is_empty() {
        tracing::info!(uaids = book.len(), "relay: re-claiming every UAID upstream");
    }

    let every = Duration::from_secs(relay.config.ping_interval_secs);
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    let mut heard = Instant::now();
    // UAIDs whose UPDATE is stored and not yet ACKed, and when the pace allows the ACK frame.
    let mut acks = Acks::default();
    loop {
        tokio::select! {
            msg = next_message(&mut stream) => {
                heard = Instant::now();
                match msg? {
                    ServerMessage::Update { updates } => {
                        let after = store_batch(delivery, relay, updates, &mut stream, &mut acks).await?;
                        out.ack(&mut acks).await?;
                        if let Some(msg) = after {
                            on_message(delivery, relay, msg, &mut awaiting).await?;
                        }
                    }
                    msg => on_message(delivery, relay, msg, &mut awaiting).await?,
                }
            }
            _ = tokio::time::sleep_until(acks.at.unwrap_or_else(Instant::now)), if acks.at.is_some() => {
                out.ack(&mut acks).await?;
            }
            request = requests.recv() => {
                let Some(request) = request else {
                    return Err(RelayError::Unreachable("relay stopped".into()));
                };
                on_requests(relay, request, requests, &mut out, &mut awaiting).await?;
            }
            _ = ping.tick() => {
                if heard.elapsed() > every * 2 {
                    return Err(RelayError::Timeout(every.as_secs() * 2));
                }
                out.send(r#"{"type":"ping"}"#.to_owned()).await?;
                awaiting.push_back(Awaiting::Pong);
            }
        }
    }
}

/// Sends what downstream asked for: registrations one frame each, claims together (this one and
/// any already queued, up to a frame's worth), releases one frame each.
async fn on_requests(
    relay: &Relay,
    first: Request,
    requests: &mut mpsc::Receiver<Request>,
    out: &mut Sender,
    awaiting: &mut VecDeque<Awaiting>,
) -> Result<(), RelayError> {
    let mut claims = Vec::new();
    let mut releases = Vec::new();
    let mut next = Some(first);
    while let Some(request) = next.take() {
        match request {
            Request::Claim(credential, reply) => claims.push((credential, Some(reply))),
            Request::Registration {
                register,
                uaid,
                appid,
                reply,
            } => {
                let kind = if register { "register" } else { "unregister" };
                let frame =
                    serde_json::json!({"type": kind, "uaid": uaid.to_string(), "appid": appid.to_string()});
                out.send(frame.to_string()).await?;
                awaiting.push_back(Awaiting::Registration(register, reply));
            }
            Request::Release(uaids) => releases.push(uaids),
        }
        if claims.len() < relay.max_per_frame {
            next = requests.try_recv().ok();
        }
    }
    for uaids in releases {
        let frame = release_frame(relay, uaids, &claims, awaiting);
        if let Some(frame) = frame {
            out.send(frame).await?;
            awaiting.push_back(Awaiting::Release);
        }
    }
    if !claims.is_empty() {
        out.send(claim_frame(&claims)).await?;
        awaiting.push_back(Awaiting::Claim(claims));
    }
    Ok(())
}

/// The release frame for `uaids`, without those a client named again since they were forgotten:
/// back in the book, or in a client's claim about to go or awaiting its reply (a release sent
/// after such a claim would undo it). A re-claim of the book awaiting its reply does not hold a
/// release back: the release follows it upstream, and its reply adds nothing back to the book.
/// `None` when none is left.
fn release_frame(
    relay: &Relay,
    uaids: Vec<Uaid>,
    claims: &[(Credential, Option<oneshot::Sender<StatusEntry>>)],
    awaiting: &VecDeque<Awaiting>,
) -> Option<String> {
    let awaited = awaiting.iter().flat_map(|a| match a {
        Awaiting::Claim(entries) => entries.as_slice(),
        _ => &[],
    });
    let claimed: std::collections::HashSet<Uaid> = claims
        .iter()
        .chain(awaited)
        .filter(|(_, waiter)| waiter.is_some())
        .filter_map(|(c, _)| c.uaid.as_deref().and_then(|s| Uaid::parse(s).ok()))
        .collect();
    let uaids: Vec<String> = uaids
        .into_iter()
        .filter(|u| !relay.book.contains(u) && !claimed.contains(u))
        .map(|u| u.to_string())
        .collect();
    (!uaids.is_empty()).then(|| serde_json::json!({"type": "release", "uaids": uaids}).to_string())
}

/// Handles one frame from the upstream.
async fn on_message(
    delivery: &Delivery,
    relay: &Relay,
    msg: ServerMessage,
    awaiting: &mut VecDeque<Awaiting>,
) -> Result<(), RelayError> {
    let unexpected = |what: &str| RelayError::Protocol(format!("unexpected {what}"));
    match msg {
        ServerMessage::Update { .. } => return Err(unexpected("update")),
        ServerMessage::Claim(reply) => {
            let Some(Awaiting::Claim(entries)) = awaiting.pop_front() else {
                return Err(unexpected("claim reply"));
            };
            if reply.uaids.len() != entries.len() {
                return Err(unexpected("claim reply length"));
            }
            for ((credential, waiter), answer) in entries.into_iter().zip(reply.uaids) {
                if answer.status == 200 {
                    relay.learn(&credential, &answer, waiter.is_none())?;
                } else if waiter.is_none() {
                    tracing::warn!(
                        status = answer.status,
                        error = answer.error.as_deref().unwrap_or(""),
                        "relay: the upstream refused to re-claim a UAID"
                    );
                }
                if let Some(waiter) = waiter {
                    let _ = waiter.send(answer);
                }
            }
        }
        ServerMessage::Register(reply) => answer_registration(awaiting, true, reply)?,
        ServerMessage::Unregister(reply) => answer_registration(awaiting, false, reply)?,
        ServerMessage::Pong => {
            if !matches!(awaiting.pop_front(), Some(Awaiting::Pong)) {
                return Err(unexpected("pong"));
            }
        }
        ServerMessage::Released { uaids } => {
            // Another connection (a client straight to the upstream, another relay) took them.
            // Claiming them back on reconnect would steal them from it: they are marked in the
            // book and left alone until a client here names one again. Whoever holds one here
            // loses it, as to a newer connection on this node.
            let uaids: Vec<Uaid> = uaids.iter().filter_map(|u| Uaid::parse(u).ok()).collect();
            if !relay.book.release(&uaids)?.is_empty() {
                // Durable, so a relay restarted now does not steal them back either.
                delivery.sync().await?;
            }
            let evicted = uaids
                .iter()
                .filter(|u| delivery.registry.evict_holder(**u))
                .count();
            tracing::info!(
                count = uaids.len(),
                evicted,
                "relay: the upstream gave UAIDs to a newer connection; not claimed again until named"
            );
        }
        ServerMessage::Error { error, .. } => return Err(RelayError::Refused(error)),
        ServerMessage::Release(reply) => {
            if !matches!(awaiting.pop_front(), Some(Awaiting::Release)) {
                return Err(unexpected("release reply"));
            }
            // 403 uaid_not_held: another connection had taken it already; nothing to undo.
            let kept = reply.uaids.iter().filter(|e| e.status != 200).count();
            if kept > 0 {
                tracing::debug!(count = kept, "relay: UAIDs released upstream were not held");
            }
        }
        ServerMessage::Hello(_) => return Err(unexpected("frame")),
    }
    Ok(())
}

/// UPDATEs at most stored in one commit: those already received when one arrives.
const MAX_BATCH_FRAMES: usize = 256;

/// Stores `first` and every UPDATE already received behind it in one batch (one commit for
/// all: at a high event rate the relay keeps up with the upstream instead of paying a commit
/// per frame), then queues their UAIDs for the ACK. Durable here first, ACKed only after: a
/// crash in between makes the upstream send them again, and the store's "only a newer version
/// raises" makes the repeat a no-op. Returns the first other frame met, to handle next.
async fn store_batch(
    delivery: &Delivery,
    relay: &Relay,
    first: Updates,
    stream: &mut SplitStream<Socket>,
    acks: &mut Acks,
) -> Result<Option<ServerMessage>, RelayError> {
    let mut batch = first;
    let mut after = None;
    for _ in 0..MAX_BATCH_FRAMES {
        let Some(next) = next_message(stream).now_or_never() else {
            break;
        };
        match next? {
            ServerMessage::Update { updates } => {
                for (uaid, apps) in updates {
                    let entry = batch.entry(uaid).or_default();
                    for (appid, version) in apps {
                        let v = entry.entry(appid).or_default();
                        *v = (*v).max(version);
                    }
                }
            }
            other => {
                after = Some(other);
                break;
            }
        }
    }
    store_updates(delivery, relay, &batch).await?;
    acks.uaids.extend(batch.into_keys());
    Ok(after)
}

/// ACKs owed upstream, sent together in one frame when the pace allows.
#[derive(Default)]
struct Acks {
    uaids: Vec<String>,
    /// When the next ACK frame may go, while some wait.
    at: Option<Instant>,
}

impl Sender {
    /// Sends one ACK frame for every UAID owed, if the pace allows one now; else sets when.
    async fn ack(&mut self, acks: &mut Acks) -> Result<(), RelayError> {
        if acks.uaids.is_empty() {
            acks.at = None;
            return Ok(());
        }
        match self.bucket.take(self.rate, std::time::Instant::now()) {
            Ok(()) => {
                let frame = serde_json::json!({"type": "ack", "uaids": acks.uaids}).to_string();
                acks.uaids.clear();
                acks.at = None;
                self.sink
                    .send(Message::Text(frame.into()))
                    .await
                    .map_err(|e| RelayError::Unreachable(e.to_string()))
            }
            Err(wait) => {
                acks.at = Some(Instant::now() + wait);
                Ok(())
            }
        }
    }
}

/// Hands a register (`register`) or unregister reply to the request awaiting it.
fn answer_registration(
    awaiting: &mut VecDeque<Awaiting>,
    register: bool,
    reply: RegistrationReply,
) -> Result<(), RelayError> {
    match awaiting.pop_front() {
        Some(Awaiting::Registration(asked, waiter)) if asked == register => {
            let _ = waiter.send(reply);
            Ok(())
        }
        _ => Err(RelayError::Protocol("a registration reply nobody awaits".into())),
    }
}

fn claim_frame(entries: &[(Credential, Option<oneshot::Sender<StatusEntry>>)]) -> String {
    let uaids: Vec<serde_json::Value> = entries
        .iter()
        .map(|(c, _)| {
            let mut m = serde_json::Map::new();
            if let Some(uaid) = &c.uaid {
                m.insert("uaid".into(), uaid.clone().into());
            }
            if let Some(secret) = &c.secret {
                m.insert("secret".into(), secret.clone().into());
            }
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::json!({"type": "claim", "uaids": uaids}).to_string()
}

/// The next JSON frame from the upstream; an error when the socket ends.
async fn next_message(stream: &mut SplitStream<Socket>) -> Result<ServerMessage, RelayError> {
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                return ServerMessage::parse(text.as_str()).map_err(|e| RelayError::Protocol(e.to_string()))
            }
            Some(Ok(Message::Close(frame))) => {
                let why = frame.map_or_else(|| "closed".to_owned(), |f| format!("closed {}", f.code));
                return Err(RelayError::Unreachable(why));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(RelayError::Unreachable(e.to_string())),
            None => return Err(RelayError::Unreachable("closed".into())),
        }
    }
}
