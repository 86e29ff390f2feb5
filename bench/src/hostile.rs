//! The `hostile` scenario: well-behaved clients and app servers (the `put` load at the first
//! `--rates` value) while one kind of attack runs at a time, measuring what the attack costs
//! them (PUT→UPDATE p99, PUT p99, events lost) and the server (peak RSS, open connections).
//!
//! Attacks, each with `--clients` sockets or a few flooding tasks:
//! * `never_read`: enrolled WebSocket clients that never read while their endpoints are PUT to
//!   flat out (the server must drop them, not buffer for ever);
//! * `no_hello`: WebSocket upgrades that never send a frame (bounded by `hello_timeout_secs`);
//! * `slowloris_headers`: HTTP requests whose headers arrive one byte a second;
//! * `slowloris_body`: `POST /v1/poll` with a large `Content-Length` and one body byte a second;
//! * `ping_flood`: clients sending `ping` frames flat out, reconnecting when closed;
//! * `mint`: `POST /v1/poll` bodies of many `{}` entries, each asking for a new UAID.
//!
//! Nothing here asserts a limit: it records what happens (issue 9 tracks the fixes), and fails
//! only when a well-behaved client loses an event or the server dies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Shared;
use crate::fleet::{self, Held};
use crate::load::{self, Endpoint, LoadSpec};
use crate::report::Report;
use crate::target::Target;
use crate::{client, BoxError, Settings, KIB};

const ATTACKS: &[&str] = &[
    "calm",
    "never_read",
    "no_hello",
    "slowloris_headers",
    "slowloris_body",
    "ping_flood",
    "mint",
];

/// What the attackers share: a stop flag and counters for the report.
#[derive(Default)]
struct Attack {
    stop: AtomicBool,
    /// Sockets the attack holds open right now.
    open: AtomicU64,
    /// Sockets the server closed (or refused) during the attack.
    closed: AtomicU64,
    /// Frames, bytes or UAIDs the attack got through (per kind).
    sent: AtomicU64,
}

pub async fn run(s: &Settings, target: &mut Target, report: &mut Report) -> Result<(), BoxError> {
    let addr = target.addr;
    let rate = s.rates.first().copied().filter(|&r| r > 0).unwrap_or(500);
    let slots = s.clients * s.apps;
    let opened = fleet::enroll(&[addr], s.clients, s.apps, s.sources, s.connect_concurrency).await;
    if opened.errors > 0 {
        report.fail(format!("hostile: {} clients failed to enroll", opened.errors));
    }
    let shared = Arc::new(Shared::new(slots));
    let mut held = Held::new(shared.clone());
    let mut endpoints = Vec::new();
    for (ident, ws) in opened.ok {
        endpoints.extend(ident.apps.iter().map(|a| Endpoint {
            path: a.path.clone(),
            slot: a.slot,
            node: 0,
        }));
        held.hold(Arc::new(ident), ws);
    }
    let endpoints = Arc::new(endpoints);
    let sent = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());

    for &kind in ATTACKS {
        let attack = Arc::new(Attack::default());
        let tasks = start(kind, s, addr, attack.clone()).await?;
        // Let the attack build up before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        shared.latency.reset();
        let rss_peak = Arc::new(AtomicU64::new(target.rss()?));
        let sampler = {
            let (peak, pid, attack) = (rss_peak.clone(), target.pid, attack.clone());
            tokio::spawn(async move {
                while !attack.stop.load(Ordering::Relaxed) {
                    if let Ok(rss) = crate::sys::rss_bytes(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let spec = LoadSpec {
            app_servers: s.app_servers,
            rate,
            duration: s.duration,
        };
        let r = load::run(&[addr], endpoints.clone(), &spec, sent.clone()).await?;
        let (lost, _) = load::wait_delivered(&sent, &shared.received, s.drain).await;
        let open_at_end = attack.open.load(Ordering::Relaxed);
        let connections = target.connections().await.unwrap_or(0);
        attack.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let _ = sampler.await;
        let u = shared.latency.summary();
        let ms = |us: u64| us as f64 / 1000.0;
        let m = |name: &str| format!("{name}@{kind}");
        report.add("hostile", &m("update_p99"), ms(u.p99), "ms");
        report.add("hostile", &m("put_p99"), ms(r.latency.p99), "ms");
        report.add("hostile", &m("put_rate"), r.throughput(), "/s");
        report.add("hostile", &m("put_errors"), r.errors as f64, "");
        report.add("hostile", &m("lost"), lost as f64, "");
        report.add(
            "hostile",
            &m("rss_peak"),
            rss_peak.load(Ordering::Relaxed) as f64 / (KIB * KIB),
            "MiB",
        );
        report.add("hostile", &m("attack_open"), open_at_end as f64, "");
        report.add(
            "hostile",
            &m("attack_closed"),
            attack.closed.load(Ordering::Relaxed) as f64,
            "",
        );
        report.add(
            "hostile",
            &m("attack_sent"),
            attack.sent.load(Ordering::Relaxed) as f64,
            "",
        );
        report.add("hostile", &m("ws_connections"), connections as f64, "");
        if lost > 0 {
            report.fail(format!(
                "hostile {kind}: {lost} events lost by well-behaved clients"
            ));
        }
        target.check_alive()?;
    }
    held.close_all().await;
    Ok(())
}

async fn start(
    kind: &str,
    s: &Settings,
    addr: std::net::SocketAddr,
    a: Arc<Attack>,
) -> Result<Vec<JoinHandle<()>>, BoxError> {
    let n = s.clients;
    let mut tasks = Vec::new();
    match kind {
        "calm" => {}
        "never_read" => {
            // Enrolled clients that stop reading; one task PUTs to their endpoints flat out.
            let opened = fleet::enroll(&[addr], n.min(200), 1, s.sources, s.connect_concurrency).await;
            let mut paths = Vec::new();
            let mut sockets = Vec::new();
            for (ident, ws) in opened.ok {
                paths.push(ident.apps[0].path.clone());
                sockets.push(ws);
            }
            a.open.store(sockets.len() as u64, Ordering::Relaxed);
            let a2 = a.clone();
            tasks.push(tokio::spawn(async move {
                let _keep = sockets; // held, never read, until the attack stops
                let Ok(mut conn) = crate::http::HttpConn::connect(addr).await else {
                    return;
                };
                let mut v = 1u64;
                while !a2.stop.load(Ordering::Relaxed) {
                    for p in &paths {
                        if conn.put_version(p, v).await.is_err() {
                            return;
                        }
                        a2.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    v += 1;
                }
            }));
        }
        "no_hello" => {
            for i in 0..n {
                let a = a.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok(mut ws) = client::connect(addr, fleet::source(i, 32), "/v1/ws").await else {
                        a.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    a.open.fetch_add(1, Ordering::Relaxed);
                    hold_until_closed(&a, async {
                        use futures_util::StreamExt;
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                }));
            }
        }
        "slowloris_headers" | "slowloris_body" => {
            let head: &'static [u8] = if kind == "slowloris_headers" {
                b"GET /health HTTP/1.1\r\nHost: x\r\n"
            } else {
                b"POST /v1/poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
            };
            let drip: u8 = if kind == "slowloris_headers" { b'X' } else { b' ' };
            for _ in 0..n {
                let a = a.clone();
                tasks.push(tokio::spawn(async move {
                    let Ok(mut sock) = TcpStream::connect(addr).await else {
                        a.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    if sock.write_all(head).await.is_err() {
                        a.closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    a.open.fetch_add(1, Ordering::Relaxed);
                    while !a.stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if sock.write_all(&[drip]).await.is_err() {
                            a.open.fetch_sub(1, Ordering::Relaxed);
                            a.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        a.sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        "ping_flood" => {
            for i in 0..4 {
                let a = a.clone();
                tasks.push(tokio::spawn(async move {
                    while !a.stop.load(Ordering::Relaxed) {
                        let Ok(mut ws) = client::connect(addr, fleet::source(i, 32), "/v1/ws").await else {
                            return;
                        };
                        if client::hello_new(&mut ws).await.is_err() {
                            continue;
                        }
                        let ping = Message::Text(json!({"type": "ping"}).to_string().into());
                        loop {
                            if a.stop.load(Ordering::Relaxed) {
                                return;
                            }
                            // Send without reading: the pongs pile up on the server's side.
                            if ws.send(ping.clone()).await.is_err() {
                                a.closed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            a.sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        "mint" => {
            let body = format!("{{\"uaids\":[{}]}}", vec!["{}"; 4000].join(","));
            let a2 = a.clone();
            tasks.push(tokio::spawn(async move {
                while !a2.stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = crate::http::HttpConn::connect(addr).await else {
                        return;
                    };
                    while !a2.stop.load(Ordering::Relaxed) {
                        let sent = conn.request(
                            hyper::Method::POST,
                            "/v1/poll",
                            Some("application/json"),
                            bytes::Bytes::from(body.clone()),
                        );
                        match sent.await.map(|(status, _)| status) {
                            Ok(200) => {
                                a2.sent.fetch_add(4000, Ordering::Relaxed);
                            }
                            Ok(_) => {
                                a2.closed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }));
        }
        other => return Err(format!("unknown attack {other}").into()),
    }
    Ok(tasks)
}

/// Waits for `until` (the server closing the socket) or the attack's end, counting the close.
async fn hold_until_closed(a: &Attack, until: impl std::future::Future<Output = ()>) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => {
                a.open.fetch_sub(1, Ordering::Relaxed);
                a.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if a.stop.load(Ordering::Relaxed) {
                    return;
                }
            }
        }
    }
}
