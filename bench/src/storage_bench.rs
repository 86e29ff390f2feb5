//! `storage-bench`: load on editiond's Sync 1.5 storage API with Hawk-signed requests, the shape
//! issue 11 sets: 8 users, 32 keep-alive connections, phases of GET of a 100-record collection
//! (`?full=1`), POST of 100-record batches, and GET info/collections; repeated runs to show
//! the figures stay flat. Tokens are minted here in the tokenserver format from the master
//! secret the tool gives the server it starts. Prints a table and one JSON line.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SECRET: &str = "storage-bench-master-secret";

#[derive(Parser)]
#[command(name = "storage-bench")]
struct Args {
    /// editiond binary to start (temp data dir, free 127.0.0.1 port, storage on).
    #[arg(long)]
    server_bin: PathBuf,
    /// Users the connections spread over.
    #[arg(long, default_value_t = 8)]
    users: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Records per collection read and per POST.
    #[arg(long, default_value_t = 100)]
    records: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Distinct record ids a user's POSTs cycle over (the collection stays this size).
    #[arg(long, default_value_t = 2000)]
    post_ids: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Times the three phases run, one after the other.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// One short run of every phase (CI).
    #[arg(long)]
    smoke: bool,
}

fn hkdf32(ikm: &[u8], salt: Option<&[u8]>, info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, &mut out)
        .expect("32 bytes");
    out
}

/// A user's credentials: (token, Hawk key).
fn mint(uid: u64, node: &str) -> (String, String) {
    let signing = hkdf32(
        SECRET.as_bytes(),
        None,
        b"services.mozilla.com/tokenlib/v1/signing",
    );
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 86_400;
    let payload = json!({"uid": uid, "node": node, "expires": expires, "salt": "b3ec4"}).to_string();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&signing).expect("any key");
    mac.update(payload.as_bytes());
    let mut raw = payload.into_bytes();
    raw.extend_from_slice(&mac.finalize().into_bytes());
    let token = URL_SAFE.encode(raw);
    let mut info = b"services.mozilla.com/tokenlib/v1/derive/".to_vec();
    info.extend_from_slice(token.as_bytes());
    (
        token.clone(),
        URL_SAFE.encode(hkdf32(SECRET.as_bytes(), Some(b"b3ec4"), &info)),
    )
}

/// A unique nonce per request of this process.
static NONCE: AtomicU64 = AtomicU64::new(0);

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    port: u16,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.ip().to_string(),
            port: addr.port(),
        })
    }

    /// A Hawk-signed request (with the payload hash when there is a body): (status, body).
    async fn send(
        &mut self,
        creds: &(String, String),
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes), BoxError> {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let nonce = format!("n{}", NONCE.fetch_add(1, Ordering::Relaxed));
        let hash = body.as_ref().map(|b| {
            let mut h = Sha256::new();
            h.update(b"hawk.1.payload\napplication/json\n");
            h.update(b);
            h.update(b"\n");
            STANDARD.encode(h.finalize())
        });
        let normalized = format!(
            "hawk.1.header\n{ts}\n{nonce}\n{method}\n{path}\n{}\n{}\n{}\n\n",
            self.host,
            self.port,
            hash.as_deref().unwrap_or("")
        );
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(creds.1.as_bytes()).expect("any key");
        mac.update(normalized.as_bytes());
        let mac = STANDARD.encode(mac.finalize().into_bytes());
        let mut auth = format!(
            r#"Hawk id="{}", ts="{ts}", nonce="{nonce}", mac="{mac}""#,
            creds.0
        );
        if let Some(hash) = &hash {
            auth.push_str(&format!(r#", hash="{hash}""#));
        }
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", self.host, self.port))
            .header("authorization", auth);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .sender
            .send_request(req.body(Full::new(body.unwrap_or_default()))?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    GetCollection,
    PostBatch,
    InfoCollections,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::GetCollection => "get_collection_100",
            Phase::PostBatch => "post_100_records",
            Phase::InfoCollections => "info_collections",
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    server_errors: u64,
    other: u64,
    latencies_us: Vec<u32>,
}

fn records_body(start: usize, n: usize, ids: usize, payload: &str) -> Bytes {
    let records: Vec<serde_json::Value> = (0..n)
        .map(|i| json!({"id": format!("r{}", (start + i) % ids), "payload": payload, "sortindex": i}))
        .collect();
    Bytes::from(serde_json::Value::Array(records).to_string())
}

async fn phase(
    args: &Args,
    addr: SocketAddr,
    creds: &Arc<Vec<(String, String)>>,
    phase: Phase,
    duration: Duration,
) -> Result<Tally, BoxError> {
    let payload: Arc<String> = Arc::new("x".repeat(args.payload_bytes));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let creds = creds.clone();
        let payload = payload.clone();
        let (records, post_ids, users) = (args.records, args.post_ids, args.users);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let mut tally = Tally::default();
            let mut n = c * 7919;
            while Instant::now() < deadline {
                let uid = (n as u64 + c as u64) % users + 1;
                let who = &creds[(uid - 1) as usize];
                let started = Instant::now();
                let (status, _) = match phase {
                    Phase::GetCollection => {
                        conn.send(
                            who,
                            Method::GET,
                            &format!("/1.5/{uid}/storage/bench?full=1"),
                            None,
                        )
                        .await?
                    }
                    Phase::PostBatch => {
                        let body = records_body(n * records, records, post_ids, &payload);
                        conn.send(
                            who,
                            Method::POST,
                            &format!("/1.5/{uid}/storage/posts"),
                            Some(body),
                        )
                        .await?
                    }
                    Phase::InfoCollections => {
                        conn.send(who, Method::GET, &format!("/1.5/{uid}/info/collections"), None)
                            .await?
                    }
                };
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                match status {
                    200..=299 => tally.ok += 1,
                    500..=599 => tally.server_errors += 1,
                    _ => tally.other += 1,
                }
                n += 1;
            }
            Ok::<Tally, BoxError>(tally)
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await??;
        total.ok += t.ok;
        total.server_errors += t.server_errors;
        total.other += t.other;
        total.latencies_us.extend(t.latencies_us);
    }
    total.latencies_us.sort_unstable();
    Ok(total)
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let node = format!("http://{addr}");
    let dir = tempfile::tempdir()?;
    let child = Command::new(&args.server_bin)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--public-url",
            &node,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("EDITIOND_STORAGE__MASTER_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let _server = ServerGuard(child);
    let up = Instant::now();
    loop {
        if let Ok(mut c) = Conn::connect(addr).await {
            if let Ok((200, _)) = c.send(&mint(0, &node), Method::GET, "/__heartbeat__", None).await {
                break;
            }
        }
        if up.elapsed() > Duration::from_secs(30) {
            return Err("the server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let creds: Arc<Vec<(String, String)>> = Arc::new((1..=args.users).map(|uid| mint(uid, &node)).collect());
    // Each user's 100-record collection to read.
    let payload = "x".repeat(args.payload_bytes);
    let mut conn = Conn::connect(addr).await?;
    for uid in 1..=args.users {
        let body = records_body(0, args.records, args.records, &payload);
        let (status, text) = conn
            .send(
                &creds[(uid - 1) as usize],
                Method::POST,
                &format!("/1.5/{uid}/storage/bench"),
                Some(body),
            )
            .await?;
        if status != 200 {
            return Err(format!("setup POST: {status} {}", String::from_utf8_lossy(&text)).into());
        }
    }
    let (runs, duration) = if args.smoke {
        (1, Duration::from_secs(1))
    } else {
        (args.runs, Duration::from_secs(args.duration))
    };
    println!(
        "{:<20} {:>4} {:>10} {:>9} {:>9} {:>7} {:>7}",
        "phase", "run", "req/s", "p50 ms", "p99 ms", "5xx", "other"
    );
    let mut rows = Vec::new();
    let mut clean = true;
    for run in 1..=runs {
        for p in [Phase::GetCollection, Phase::PostBatch, Phase::InfoCollections] {
            let t = phase(&args, addr, &creds, p, duration).await?;
            let rate = (t.ok + t.server_errors + t.other) as f64 / duration.as_secs_f64();
            let (p50, p99) = (pct(&t.latencies_us, 0.50), pct(&t.latencies_us, 0.99));
            println!(
                "{:<20} {:>4} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>7}",
                p.name(),
                run,
                rate,
                p50,
                p99,
                t.server_errors,
                t.other
            );
            clean &= t.server_errors == 0 && t.other == 0;
            rows.push(
                json!({"phase": p.name(), "run": run, "rps": rate.round(), "p50_ms": p50, "p99_ms": p99,
                             "server_errors": t.server_errors, "other_errors": t.other}),
            );
        }
    }
    println!(
        "{}",
        json!({"users": args.users, "connections": args.connections, "records": args.records,
               "payload_bytes": args.payload_bytes, "seconds_per_phase": duration.as_secs(), "results": rows})
    );
    Ok(clean)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("storage-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("storage-bench: some requests failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("storage-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
