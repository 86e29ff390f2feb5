//! The app servers: `M` tasks, each with one keep-alive HTTP connection, PUTting `version=N` to
//! random endpoints at a fixed total rate or flat out, for a bounded time.
//!
//! Each task owns a disjoint share of the endpoints and its versions only grow (microseconds
//! since the epoch, at least one above its last), so no two PUTs race on one registration and
//! every 202 is a version that must reach its client. The version is the send time, so a client
//! computes PUT→UPDATE latency on receipt.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hist::{Histogram, Summary};
use crate::{sys, BoxError};

/// One PUT target: the endpoint's path, its registration slot, and the node (index into the
/// addresses given to [`run`]) that holds its client's socket.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub path: String,
    pub slot: usize,
    pub node: usize,
}

pub struct LoadSpec {
    pub app_servers: usize,
    /// Total PUTs per second over all app servers; 0 means flat out.
    pub rate: u64,
    pub duration: Duration,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    /// 202: a new version that must be delivered.
    pub accepted: u64,
    /// 200: superseded (nothing new); 0 unless endpoints are shared.
    pub superseded: u64,
    /// Any other status, or a transport error.
    pub errors: u64,
    /// PUTs sent to a node other than the one holding the client's socket.
    pub cross_node: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latency: Summary,
}

impl LoadResult {
    pub fn throughput(&self) -> f64 {
        (self.accepted + self.superseded) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A small xorshift generator: enough to pick endpoints, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the load. `sent` (one per slot) receives the highest version answered 202, so the
/// caller can check each arrived. With several `addrs` (nodes of one service) each app server
/// holds one connection to every node and sends each PUT to a random one.
pub async fn run(
    addrs: &[SocketAddr],
    endpoints: Arc<Vec<Endpoint>>,
    spec: &LoadSpec,
    sent: Arc<Vec<AtomicU64>>,
) -> Result<LoadResult, BoxError> {
    if endpoints.is_empty() || addrs.is_empty() {
        return Err("no endpoints to PUT to".into());
    }
    let m = spec.app_servers.clamp(1, endpoints.len());
    let latency = Arc::new(Histogram::default());
    let started = Instant::now();
    let deadline = started + spec.duration;
    let period = (spec.rate > 0).then(|| Duration::from_secs_f64(m as f64 / spec.rate as f64));
    let mut tasks = Vec::with_capacity(m);
    for w in 0..m {
        let (endpoints, sent, latency) = (endpoints.clone(), sent.clone(), latency.clone());
        let addrs = addrs.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            let mut conns = Vec::with_capacity(addrs.len());
            for addr in &addrs {
                match crate::http::HttpConn::connect(*addr).await {
                    Ok(c) => conns.push(c),
                    Err(e) => {
                        r.errors += 1;
                        r.first_error = Some(e.to_string());
                        return r;
                    }
                }
            }
            let share = (endpoints.len() - w).div_ceil(m);
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
            let mut last = 0u64;
            // Stagger the app servers across one period so a fixed rate is smooth.
            let mut next_at = period.map(|p| started + p.mul_f64(w as f64 / m as f64));
            let mut n = 0u64;
            while Instant::now() < deadline {
                if let (Some(at), Some(p)) = (next_at, period) {
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    next_at = Some(at + p);
                }
                let ep = &endpoints[w + m * (rng.next() % share as u64) as usize];
                // One node: no extra draw, so the single-node sequence is unchanged.
                let node = if conns.len() > 1 {
                    (rng.next() % conns.len() as u64) as usize
                } else {
                    0
                };
                if node != ep.node {
                    r.cross_node += 1;
                }
                let conn = &mut conns[node];
                let version = sys::unix_micros().max(last + 1);
                last = version;
                let t0 = Instant::now();
                match conn.put_version(&ep.path, version).await {
                    Ok(202) => {
                        r.accepted += 1;
                        sent[ep.slot].fetch_max(version, Ordering::Relaxed);
                    }
                    Ok(200) => r.superseded += 1,
                    Ok(status) => {
                        r.errors += 1;
                        r.first_error
                            .get_or_insert_with(|| format!("PUT answered {status}"));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| e.to_string());
                        // The connection is gone: stop this app server rather than spin.
                        break;
                    }
                }
                latency.record(t0.elapsed().as_micros() as u64);
                n += 1;
                if n >= 100_000_000 {
                    break;
                }
            }
            r
        }));
    }
    let mut total = LoadResult::default();
    for t in tasks {
        let r = t.await?;
        total.accepted += r.accepted;
        total.superseded += r.superseded;
        total.errors += r.errors;
        total.cross_node += r.cross_node;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.elapsed = started.elapsed();
    total.latency = latency.summary();
    Ok(total)
}

/// Waits up to `limit` until every slot received at least what was sent to it; returns how many
/// slots are still short (events lost) and how long the wait took.
pub async fn wait_delivered(sent: &[AtomicU64], received: &[AtomicU64], limit: Duration) -> (u64, Duration) {
    let started = Instant::now();
    loop {
        let short = sent
            .iter()
            .zip(received)
            .filter(|(s, r)| r.load(Ordering::Relaxed) < s.load(Ordering::Relaxed))
            .count() as u64;
        if short == 0 || started.elapsed() >= limit {
            return (short, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// PUTs one version to every endpoint, `app_servers` at a time, flat out. Returns the count of
/// 202s and the first failure, if any; `sent` gets each 202 version.
pub async fn put_each_once(
    addr: SocketAddr,
    endpoints: Arc<Vec<Endpoint>>,
    app_servers: usize,
    sent: Arc<Vec<AtomicU64>>,
) -> Result<LoadResult, BoxError> {
    let m = app_servers.clamp(1, endpoints.len().max(1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(m);
    for w in 0..m {
        let (endpoints, sent) = (endpoints.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = LoadResult::default();
            let mut conn = match crate::http::HttpConn::connect(addr).await {
                Ok(c) => c,
                Err(e) => {
                    r.errors += 1;
                    r.first_error = Some(e.to_string());
                    return r;
                }
            };
            for ep in endpoints.iter().skip(w).step_by(m) {
                let version = sys::unix_micros();
                match conn.put_version(&ep.path, version).await {
                    Ok(202) => {
                        r.accepted += 1;
                        sent[ep.slot].fetch_max(version, Ordering::Relaxed);
                    }
                    Ok(status) => {
                        r.errors += 1;
                        r.first_error
                            .get_or_insert_with(|| format!("PUT answered {status}"));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| e.to_string());
                        break;
                    }
                }
            }
            r
        }));
    }
    let mut total = LoadResult::default();
    for t in tasks {
        let r = t.await?;
        total.accepted += r.accepted;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
