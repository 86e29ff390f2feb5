//! One simulated user agent: a WebSocket from a chosen loopback source address, the JSON
//! protocol steps (hello, register), and the holding loop that records every UPDATE and ACKs it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::hist::Histogram;
use crate::{sys, BoxError};

pub type Ws = WebSocketStream<TcpStream>;

/// How long one protocol reply may take before the step counts as an error.
pub const REPLY_WAIT: Duration = Duration::from_secs(30);

/// What a client knows about itself: enough to reconnect and to be PUT to.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uaid: String,
    pub secret: String,
    pub apps: Vec<App>,
}

#[derive(Debug, Clone)]
pub struct App {
    pub appid: String,
    /// The endpoint's path (`/v1/e/TOKEN`): PUTs go to the server under test directly.
    pub path: String,
    /// Index of this registration in [`Shared::received`].
    pub slot: usize,
}

/// What every holding client reports into, shared by all of them.
pub struct Shared {
    /// Highest version received per registration slot.
    pub received: Vec<AtomicU64>,
    /// PUT→UPDATE latency: receipt time minus the send time the version carries.
    pub latency: Histogram,
    pub updates: AtomicU64,
    pub acks: AtomicU64,
    /// Sockets that closed or failed while they should have stayed open.
    pub errors: AtomicU64,
}

impl Shared {
    pub fn new(slots: usize) -> Shared {
        Shared {
            received: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::default(),
            updates: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

/// Buffers for a mostly idle client, so 19,000 of them fit in the generator too.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a TCP connection from `source` (bound before connect) and upgrades it at `path`.
pub async fn connect(target: SocketAddr, source: Ipv4Addr, path: &str) -> Result<Ws, BoxError> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::new(source.into(), 0))?;
    let stream = sock.connect(target).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{target}{path}");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
    Ok(ws)
}

pub async fn send_json(ws: &mut Ws, v: &Value) -> Result<(), BoxError> {
    ws.send(Message::Text(v.to_string().into())).await?;
    Ok(())
}

/// The next JSON text frame, skipping control frames; an error on close or after `wait`.
pub async fn next_json(ws: &mut Ws, wait: Duration) -> Result<Value, BoxError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("timed out waiting for a frame".into()),
            Ok(None) => return Err("socket closed".into()),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(t.as_str())?),
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("closed by server: {f:?}").into()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn expect(ws: &mut Ws, kind: &str) -> Result<Value, BoxError> {
    let v = next_json(ws, REPLY_WAIT).await?;
    if v["type"] != kind || v["status"] != 200 {
        return Err(format!("expected {kind} with status 200, got {v}").into());
    }
    Ok(v)
}

/// hello asking for a new UAID; returns (uaid, secret).
pub async fn hello_new(ws: &mut Ws) -> Result<(String, String), BoxError> {
    send_json(ws, &json!({"type": "hello", "uaids": [{}]})).await?;
    let v = expect(ws, "hello").await?;
    let entry = &v["uaids"][0];
    match (
        entry["status"].as_u64(),
        entry["uaid"].as_str(),
        entry["secret"].as_str(),
    ) {
        (Some(200), Some(u), Some(s)) => Ok((u.to_owned(), s.to_owned())),
        _ => Err(format!("hello refused: {v}").into()),
    }
}

/// hello with known credentials (a reconnect).
pub async fn hello_known(ws: &mut Ws, uaid: &str, secret: &str) -> Result<(), BoxError> {
    let hello = json!({"type": "hello", "uaids": [{"uaid": uaid, "secret": secret}]});
    send_json(ws, &hello).await?;
    let v = expect(ws, "hello").await?;
    if v["uaids"][0]["status"] != 200 {
        return Err(format!("hello refused: {v}").into());
    }
    Ok(())
}

/// register; returns the endpoint's path.
pub async fn register(ws: &mut Ws, uaid: &str, appid: &str) -> Result<String, BoxError> {
    send_json(ws, &json!({"type": "register", "uaid": uaid, "appid": appid})).await?;
    let v = expect(ws, "register").await?;
    let endpoint = v["endpoint"]
        .as_str()
        .ok_or_else(|| format!("register without endpoint: {v}"))?;
    let path_at = endpoint
        .find("/v1/e/")
        .ok_or_else(|| format!("unexpected endpoint {endpoint}"))?;
    Ok(endpoint[path_at..].to_owned())
}

/// Connects, says hello as a new user agent and registers `apps` fresh APPIDs whose slots start
/// at `first_slot`.
pub async fn enroll(
    target: SocketAddr,
    source: Ipv4Addr,
    apps: usize,
    first_slot: usize,
) -> Result<(Identity, Ws), BoxError> {
    let mut ws = connect(target, source, "/v1/ws").await?;
    let (uaid, secret) = hello_new(&mut ws).await?;
    let mut list = Vec::with_capacity(apps);
    for i in 0..apps {
        let appid = uuid::Uuid::new_v4().to_string();
        let path = register(&mut ws, &uaid, &appid).await?;
        list.push(App {
            appid,
            path,
            slot: first_slot + i,
        });
    }
    Ok((
        Identity {
            uaid,
            secret,
            apps: list,
        },
        ws,
    ))
}

/// Records one UPDATE and returns the UAIDs to ACK.
pub fn record_update(v: &Value, ident: &Identity, shared: &Shared) -> Vec<String> {
    let now = sys::unix_micros();
    let mut uaids = Vec::new();
    let Some(updates) = v["updates"].as_object() else {
        return uaids;
    };
    for (uaid, apps) in updates {
        if let Some(apps) = apps.as_object() {
            for (appid, version) in apps {
                let Some(version) = version.as_u64() else { continue };
                if let Some(app) = ident.apps.iter().find(|a| a.appid == *appid) {
                    shared.received[app.slot].fetch_max(version, Ordering::Relaxed);
                }
                shared.latency.record(now.saturating_sub(version));
            }
        }
        uaids.push(uaid.clone());
    }
    shared.updates.fetch_add(1, Ordering::Relaxed);
    uaids
}

/// Holds the socket: records and ACKs every UPDATE until `stop` turns true, then closes.
/// An unexpected close counts in `shared.errors`.
pub async fn hold(mut ws: Ws, ident: Arc<Identity>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let msg = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if v["type"] != "update" {
                    continue;
                }
                let uaids = record_update(&v, &ident, &shared);
                if send_json(&mut ws, &json!({"type": "ack", "uaids": uaids}))
                    .await
                    .is_err()
                {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                shared.acks.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(Ok(_)) => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
}
