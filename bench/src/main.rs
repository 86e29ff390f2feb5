//! `editiond-bench`: drives a running editiond over real loopback sockets and prints a table
//! and one JSON line of results. Scenarios: `baseline` (this machine's ceilings, measured first
//! so every editiond figure gets a ratio), `idle`, `put`, `storm`. See bench/README.md.
//!
//! This file only wires: flags, the open-files limit, the server under test, the scenarios in
//! order, the report and the exit status (non-zero when a scenario errs or loses an event).

mod bare;
mod baseline;
mod client;
mod fleet;
mod hist;
mod hostile;
mod http;
mod idle;
mod load;
mod put;
mod redis;
mod relay;
mod report;
mod storm;
mod sys;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::redis::Redis;
use crate::report::Report;
use crate::target::{nodes, Target};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const KIB: f64 = 1024.0;

#[derive(Parser)]
#[command(name = "editiond-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    child: Option<Child>,
    #[command(flatten)]
    run: RunArgs,
}

/// The baseline servers, run by this tool as its own children.
#[derive(Subcommand)]
enum Child {
    /// Bare hyper server: 202 to every request. Prints its address, exits when stdin closes.
    BareHttp,
    /// Bare WebSocket server: pushes frames of --frame-bytes, one per reply.
    BareWs {
        #[arg(long, default_value_t = 128)]
        frame_bytes: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Scenario {
    Baseline,
    Idle,
    Put,
    Storm,
    Hostile,
    /// Clients on a relay of the server under test; PUTs to the server.
    Relay,
}

#[derive(clap::Args)]
struct RunArgs {
    /// editiond binary to start with a temp data dir on a free 127.0.0.1 port.
    #[arg(long, conflicts_with = "target")]
    server_bin: Option<PathBuf>,
    /// Address of an already running editiond (127.0.0.1 only); needs --server-pid.
    #[arg(long, requires = "server_pid")]
    target: Option<SocketAddr>,
    /// PID of the server at --target, to read its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Extra environment for a spawned server, KEY=VALUE (e.g. EDITIOND_LIMITS__READ_BUFFER_BYTES=1024).
    #[arg(long = "server-env", value_parser = parse_env)]
    server_env: Vec<(String, String)>,
    /// redis-server binary: start one Redis on a free 127.0.0.1 port (temp dir) and run --nodes
    /// editiond nodes (from --server-bin) on it as one service. Clients go round-robin over
    /// the nodes and each PUT goes to a random node. Runs baseline, idle and put (not storm).
    #[arg(long, requires = "server_bin")]
    redis_server_bin: Option<PathBuf>,
    /// editiond nodes on the Redis of --redis-server-bin.
    #[arg(long, default_value_t = 1, requires = "redis_server_bin")]
    nodes: usize,
    /// redis-server arguments, one per flag (--redis-arg=--appendfsync --redis-arg=always); when
    /// none is given: --save "" --appendonly yes --appendfsync everysec.
    #[arg(long = "redis-arg", allow_hyphen_values = true)]
    redis_args: Vec<String>,
    /// Scenarios to run, comma-separated; they always run in the order baseline, idle, put, storm,
    /// hostile, relay (hostile only when named: attacks at one rate, see src/hostile.rs; relay only
    /// when named: it needs --server-bin and sled).
    #[arg(long, value_delimiter = ',', default_value = "baseline,idle,put,storm")]
    scenarios: Vec<Scenario>,
    /// Every scenario in a few seconds: 100 clients, 2 apps, 1 s phases, rates 200 and max.
    #[arg(long)]
    smoke: bool,
    /// WebSocket clients (user agents) per scenario.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Registrations (apps) per client in idle and put (put needs one or more); storm uses one.
    #[arg(long, default_value_t = 1)]
    apps: usize,
    /// Loopback source addresses to spread clients over (127.0.0.2 upwards). Many, because
    /// bind() searches a source address's ports linearly: with 4 addresses a storm that reconnects
    /// while 19,000 old sockets sit in TIME_WAIT spent 14-31 s in the generator's bind (1.9 s with 32).
    #[arg(long, default_value_t = 32)]
    sources: usize,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Concurrent app servers (one HTTP connection each).
    #[arg(long, default_value_t = 32)]
    app_servers: usize,
    /// Total PUT rates to run in turn, per second; 0 means flat out.
    #[arg(long, value_delimiter = ',', default_value = "2000,0")]
    rates: Vec<u64>,
    /// Seconds each PUT phase (and the idle hold, and the WebSocket ceiling) lasts.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait after a PUT phase for the last events before counting them lost.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Seconds the storm may take before its undelivered events count as lost.
    #[arg(long, default_value_t = 60.0)]
    storm_timeout: f64,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// The settings every scenario reads.
pub struct Settings {
    pub clients: usize,
    pub apps: usize,
    pub sources: usize,
    pub connect_concurrency: usize,
    pub app_servers: usize,
    pub rates: Vec<u64>,
    pub duration: Duration,
    pub drain: Duration,
    pub storm_timeout: Duration,
}

impl Settings {
    fn from(a: &RunArgs) -> Settings {
        let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 3600.0));
        let mut s = Settings {
            clients: a.clients.max(1),
            apps: a.apps,
            sources: a.sources.clamp(1, 250),
            connect_concurrency: a.connect_concurrency.max(1),
            app_servers: a.app_servers.max(1),
            rates: a.rates.clone(),
            duration: secs(a.duration),
            drain: secs(a.drain),
            storm_timeout: secs(a.storm_timeout),
        };
        if a.smoke {
            s.clients = 100;
            s.apps = 2;
            s.app_servers = 4;
            s.rates = vec![200, 0];
            s.duration = Duration::from_secs(1);
        }
        s
    }
}

/// "2000" or "max", naming a PUT phase.
pub fn rate_label(rate: u64) -> String {
    if rate == 0 {
        "max".into()
    } else {
        rate.to_string()
    }
}

/// Bytes of an UPDATE text frame for one UAID and one APPID with a microsecond version.
pub fn update_frame_bytes(_apps: usize) -> usize {
    let id = "00000000-0000-4000-8000-000000000000";
    format!("{{\"type\":\"update\",\"updates\":{{\"{id}\":{{\"{id}\":1764000000000000}}}}}}").len()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("editiond-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.child {
        Some(Child::BareHttp) => runtime.block_on(bare::serve_http()).map(|_| true),
        Some(Child::BareWs { frame_bytes }) => runtime.block_on(bare::serve_ws(frame_bytes)).map(|_| true),
        None => runtime.block_on(run(cli.run)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("editiond-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenarios; `Ok(false)` when one failed or lost events.
async fn run(args: RunArgs) -> Result<bool, BoxError> {
    let nofile = sys::raise_nofile_limit()?;
    let s = Settings::from(&args);
    let mut redis_args = args.redis_args.clone();
    if redis_args.is_empty() {
        redis_args = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
            .map(String::from)
            .to_vec();
    }
    // Declared before the nodes so that it is dropped (killed) after them.
    let mut redis = match &args.redis_server_bin {
        Some(bin) => Some(Redis::spawn(bin, &redis_args).await?),
        None => None,
    };
    let mut targets = match (&args.server_bin, args.target, args.server_pid, &redis) {
        (Some(bin), _, _, Some(redis)) => {
            eprintln!(
                "editiond-bench: redis-server pid {} at {}",
                redis.pid,
                redis.url()
            );
            let mut env = args.server_env.clone();
            env.push(("EDITIOND_STORE__BACKEND".into(), "redis".into()));
            env.push(("EDITIOND_STORE__URL".into(), redis.url()));
            let mut v = Vec::new();
            for _ in 0..args.nodes.clamp(1, 64) {
                v.push(Target::spawn(bin, &env).await?);
            }
            v
        }
        (Some(bin), _, _, None) => vec![Target::spawn(bin, &args.server_env).await?],
        (None, Some(addr), Some(pid), _) => {
            if !addr.ip().is_loopback() {
                return Err("--target must be a loopback address".into());
            }
            vec![Target::attach(addr, pid)]
        }
        _ => return Err("give --server-bin PATH, or --target ADDR --server-pid PID".into()),
    };
    for t in &targets {
        eprintln!("editiond-bench: server pid {} at {}", t.pid, t.addr);
    }
    let mut report = Report::default();
    let mut header = json!({
        "date": date_utc(),
        "commit": git_commit(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": sys::machine(),
        "nofile": nofile,
        "clients": s.clients,
        "apps": s.apps,
        "app_servers": s.app_servers,
        "rates": s.rates,
        "duration_s": s.duration.as_secs_f64(),
        "store": if redis.is_some() { "redis" } else { "sled" },
        "nodes": targets.len(),
    });
    if redis.is_some() {
        header["redis_args"] = json!(redis_args);
    }
    if s.clients + 100 > nofile as usize {
        report.notes.push(format!(
            "{} clients need more than this process's {nofile} open files",
            s.clients
        ));
    }
    let order = [
        Scenario::Baseline,
        Scenario::Idle,
        Scenario::Put,
        Scenario::Storm,
        Scenario::Hostile,
        Scenario::Relay,
    ];
    for scenario in order.into_iter().filter(|sc| args.scenarios.contains(sc)) {
        eprintln!("editiond-bench: {scenario:?} (load {})", sys::load_average());
        let result = match scenario {
            Scenario::Baseline => baseline::run(&s, &mut report).await,
            Scenario::Idle => idle::run(&s, &mut targets, redis.as_ref(), &mut report).await,
            Scenario::Put => put::run(&s, &mut targets, redis.as_ref(), &mut report).await,
            Scenario::Storm if redis.is_some() => {
                report
                    .notes
                    .push("storm is not run on Redis (one node's reconnects only)".into());
                Ok(())
            }
            Scenario::Storm => storm::run(&s, &mut targets[0], &mut report).await,
            Scenario::Hostile if redis.is_some() => {
                report.notes.push("hostile is run on one sled node only".into());
                Ok(())
            }
            Scenario::Hostile => hostile::run(&s, &mut targets[0], &mut report).await,
            Scenario::Relay => match (&args.server_bin, &redis) {
                (Some(bin), None) => {
                    relay::run(&s, bin, &mut targets[0], &args.server_env, &mut report).await
                }
                _ => {
                    report
                        .notes
                        .push("relay runs only on one sled node started here (--server-bin)".into());
                    Ok(())
                }
            },
        };
        if let Err(e) = result {
            report.fail(format!("{scenario:?}: {e}"));
        }
        let alive =
            nodes::check_alive(&mut targets).and_then(|_| redis.as_mut().map_or(Ok(()), |r| r.check_alive()));
        if let Err(e) = alive {
            report.fail(e.to_string());
            break;
        }
    }
    header["load_after"] = json!(sys::load_average());
    print!("{}", report.table());
    println!("{}", report.json(header));
    Ok(report.failures.is_empty())
}

/// `git rev-parse --short HEAD` where the tool runs, if it is a checkout.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn date_utc() -> String {
    let secs = sys::unix_micros() / 1_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
