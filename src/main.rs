//! The `editiond` binary: parse flags, load config, set up logging, serve until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use editiond::config::{Config, Flags};
use editiond::server::{self, Node};

/// jemalloc instead of glibc malloc: 14% less CPU per event and less memory per idle socket, both
/// measured in bench/RESULTS.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const JEMALLOC_CONF: &[u8] = b"narenas:2,tcache_nslots_small_max:16,tcache_max:1024\0";

/// jemalloc's options, read once at start-up (`_RJEM_MALLOC_CONF` in the environment is read
/// after them, so an operator can still change any). Two arenas, one per runtime worker on the
/// 2-core machines this was measured on, and small thread caches: with the defaults (4 arenas
/// per core, 200 cached objects per size class and thread) an idle socket cost 4.2 KiB instead
/// of 3.8, for no measurable CPU (bench/RESULTS.md). A thin pointer to NUL-terminated bytes, as
/// jemalloc's `const char *malloc_conf` expects.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; JEMALLOC_CONF.len()] = match JEMALLOC_CONF.first_chunk() {
    Some(conf) => conf,
    None => unreachable!(),
};

/// editiond: tells web apps and devices that a new version of their data exists.
///
/// Configuration is read from a TOML file (see config.toml for every key), then from
/// environment variables named EDITIOND_<SECTION>__<KEY> (for example
/// EDITIOND_LIMITS__MAX_FRAME_BYTES=131072; a nested section [a.b] is EDITIOND_A__B__KEY), then
/// from the flags below. Later sources win.
#[derive(Parser)]
#[command(name = "editiond", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTP and WebSocket on one port).
    ///
    /// Exit status: 0 after SIGTERM or ctrl-c; 75 (EX_TEMPFAIL) after a store commit failed (data
    /// dir full, read-only or failing), once the graceful shutdown is over: start it again and it
    /// recovers from its log (systemd's Restart=on-failure or a container restart policy does);
    /// 2 for a configuration error; 1 when it cannot start (the reason is printed).
    Serve(ServeArgs),
    /// Run a relay: a server for clients inside a protected network that is itself one client
    /// of an upstream editiond for all their UAIDs (proto/relay.md).
    Relay(RelayArgs),
    /// Print the effective configuration (after file, environment and flags) as TOML and exit.
    /// Keys are never printed.
    Config(Sources),
    /// Mint a storage API token (tokenserver format) and its Hawk key, signed with the first
    /// `[storage] master_secret`, for testing and for operators; prints the tokenserver's JSON.
    Token {
        /// The user id the token grants.
        #[arg(long)]
        uid: u64,
        /// Seconds the token is valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[command(flatten)]
        sources: Sources,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    sources: Sources,
    /// Start over with new keys although the store holds data written with others (its
    /// keys.toml or Redis key ed:server-keys lost, or [keys] changed): every endpoint and UAID
    /// secret issued so far stops working, and clients must register again. An existing
    /// keys.toml is kept as keys.toml.replaced-<time> (Redis:
    /// ed:server-keys-replaced-<time>:{ed:server-keys}). Without it, a store holding data
    /// refuses to start when its keys are missing or not those recorded in keys.id (Redis:
    /// ed:keys-id:{ed:server-keys}). On Redis, stop every node and reset on one only.
    #[arg(long)]
    reset_keys: bool,
}

/// `editiond relay`: the upstream, how to reach it, and the ordinary sources.
#[derive(clap::Args)]
struct RelayArgs {
    /// The upstream's base URL, ws://HOST:PORT or http://HOST:PORT (wss/https for TLS)
    /// (relay.upstream); required here or in the config.
    #[arg(long)]
    upstream: Option<String>,
    /// ws (one WebSocket) or poll (outbound HTTP only) (relay.transport).
    #[arg(long, value_enum)]
    transport: Option<editiond::relay::Transport>,
    #[command(flatten)]
    sources: Sources,
}

/// Where configuration comes from: the file, then the environment, then these flags.
#[derive(clap::Args)]
struct Sources {
    /// Config file. Default: ./config.toml if it exists, else built-in defaults.
    #[arg(long, env = "EDITIOND_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (server.listen): IP:PORT, HOST:PORT or :PORT (every interface),
    /// e.g. 127.0.0.1:8080, localhost:8080, :8080.
    #[arg(long, value_parser = editiond::config::parse_listen)]
    listen: Option<SocketAddr>,
    /// Directory for the store and generated keys (server.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Base URL endpoints are built from, as app servers reach this node (server.public_url).
    #[arg(long)]
    public_url: Option<String>,
}

impl Sources {
    fn load(self) -> Result<Config, String> {
        self.load_with(Flags::default())
    }

    fn load_with(self, flags: Flags) -> Result<Config, String> {
        let flags = Flags {
            listen: self.listen,
            data_dir: self.data_dir,
            public_url: self.public_url,
            ..flags
        };
        let file = self.config.or_else(|| {
            let default = PathBuf::from("config.toml");
            default.exists().then_some(default)
        });
        Config::load(file.as_deref(), std::env::vars(), &flags).map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(sources) => match sources.load() {
            Ok(mut config) => {
                config.redact_secrets();
                match toml::to_string_pretty(&config) {
                    Ok(text) => {
                        print!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("editiond: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("editiond: {e}");
                ExitCode::from(2)
            }
        },
        Command::Token { uid, ttl, sources } => match sources.load() {
            Ok(config) => print_token(&config, uid, ttl),
            Err(e) => {
                eprintln!("editiond: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(ServeArgs { sources, reset_keys }) => match sources.load() {
            Ok(config) => run_server(config, reset_keys),
            Err(e) => {
                eprintln!("editiond: {e}");
                ExitCode::from(2)
            }
        },
        Command::Relay(args) => {
            let flags = Flags {
                relay_upstream: args.upstream,
                relay_transport: args.transport,
                ..Flags::default()
            };
            match args.sources.load_with(flags) {
                Ok(config) if config.relay.enabled() => run_server(config, false),
                Ok(_) => {
                    eprintln!("editiond: a relay needs --upstream URL (or relay.upstream)");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("editiond: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Serves `config` until a signal; a node with `relay.upstream` set is a relay.
fn run_server(config: Config, reset_keys: bool) -> ExitCode {
    if let Err(e) = init_logging(&config.server.log) {
        eprintln!("editiond: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("editiond: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Printed once, on stderr (where the log goes too).
    match runtime.block_on(serve(config, reset_keys)) {
        Ok(server::Stopped::Asked) => ExitCode::SUCCESS,
        // Logged by `run`; a supervisor restarts the node on the log sled recovers.
        Ok(server::Stopped::StoreFailed) => ExitCode::from(server::EXIT_STORE_FAILED),
        Err(e) => {
            eprintln!("editiond: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_token(config: &Config, uid: u64, ttl: u64) -> ExitCode {
    if !config.storage.enabled() {
        eprintln!("editiond: token: [storage] master_secret is not set");
        return ExitCode::from(2);
    }
    let node = config.public_url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let secrets = editiond::storage::token::Secrets::new(&config.storage.secrets());
    match secrets.mint(uid, &node, ttl, now) {
        Some((id, key)) => {
            let out = serde_json::json!({
                "id": id,
                "key": key,
                "uid": uid,
                "api_endpoint": format!("{node}/1.5/{uid}"),
                "duration": ttl,
                "hashalg": "sha256",
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("editiond: token: no randomness for the salt");
            ExitCode::FAILURE
        }
    }
}

/// Logging on stderr with `RUST_LOG` if set, else `server.log` (checked by config). A filter
/// that would silently print nothing is an error, not a quiet server.
fn init_logging(default_filter: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => {
            editiond::config::check_log_filter(&env).map_err(|e| format!("RUST_LOG: {e}"))?;
            env
        }
        _ => default_filter.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    // Colours only for a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

async fn serve(config: Config, reset_keys: bool) -> Result<server::Stopped, String> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let node = Node::open_with(config, reset_keys)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%addr, public_url = %node.public_url(), "editiond listening");
    server::run(listener, node, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Completes on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
