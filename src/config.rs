//! Configuration: one `config.toml`, sections by concern, every key overridable.
//!
//! Precedence is flag > environment > file > built-in default. The environment names a key as
//! `EDITIOND_<SECTION>__<KEY>` (e.g. `EDITIOND_LIMITS__MAX_FRAME_BYTES=131072`), each `__`
//! descending one table (`EDITIOND_KICK__WEBHOOK__SECRET` is `[kick.webhook] secret`), so a new
//! section is one struct and one field of [`Config`]; an error in a variable names it. Overrides are
//! applied to the TOML document before it is deserialised, so a typo in any source is reported
//! the same way: unknown keys are errors, never silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything the server reads at start-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub web: WebConfig,
    pub kick: crate::kick::KickConfig,
    pub storage: crate::storage::StorageConfig,
    pub relay: crate::relay::RelayConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the one HTTP + WebSocket port listens on: `IP:PORT`, `HOST:PORT` (resolved
    /// once at start-up) or `:PORT` (every interface).
    #[serde(deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    /// Base URL that endpoints are built from, as app servers reach this node. Empty means
    /// `http://<listen>`.
    pub public_url: String,
    /// Directory for the sled store and generated keys.
    pub data_dir: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log: String,
    /// Seconds a graceful shutdown waits for sockets to close before it stops anyway.
    pub shutdown_grace_secs: u64,
    /// A header set by a trusted reverse proxy that names the client's address (e.g.
    /// `x-forwarded-for`, whose last entry counts); empty: the peer address. For per-client
    /// limits (`uaid_rate_per_sec`).
    pub trusted_proxy_header: String,
}

/// Every bound the server enforces. A limit is a named value here, never a number in a handler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket message (and frame) a client may send, in bytes. Larger: close 1009.
    pub max_frame_bytes: usize,
    /// UAIDs one connection (or one poll request) may speak for; a relay needs many.
    pub max_uaids_per_connection: usize,
    /// Entries one hello or claim frame may carry.
    pub max_uaids_per_frame: usize,
    /// Registrations (APPIDs) one UAID may hold.
    pub max_appids_per_uaid: usize,
    /// Largest HTTP request body, in bytes (PUT, poll, ack). Larger: 413.
    pub max_body_bytes: usize,
    /// Largest `kick` object accepted in hello or register, in serialised bytes.
    pub max_kick_bytes: usize,
    /// Collections one register's `watch` may name (instant sync, proto/storage.md).
    pub max_watch_collections: usize,
    /// Frames per second a connection may send on average before it is closed (4429).
    pub ws_frames_per_sec: u32,
    /// Burst of frames allowed above that average.
    pub ws_frames_burst: u32,
    /// PUTs per second one registration (endpoint) may make on average, counted on each node;
    /// beyond it and the burst a PUT gets 429 with `Retry-After`. 0: no limit.
    ///
    /// Default 10, with a burst of 100: versions coalesce and a UAID has one UPDATE in flight,
    /// so faster PUTs to one registration deliver nothing more; a 429 to an app server that
    /// does not retry can cost the client the newest version, so the limit catches runaway
    /// loops and leaves normal bursts alone (a backlog flushed after an outage, an update per
    /// edit). Ten a second is about 0.1% of one node's PUT capacity (`bench/RESULTS.md`), and
    /// ten times what the bench's flat-out run gives each of its 10,000 registrations.
    pub put_rate_per_sec: u32,
    /// PUTs one registration may make at once above that average (the bucket size).
    pub put_burst: u32,
    /// Seconds a new socket has to send its hello before it is closed (4408).
    pub hello_timeout_secs: u64,
    /// Seconds without any frame from the client before the socket is closed (4408).
    pub idle_timeout_secs: u64,
    /// Seconds a send to a client may block (a client that does not read) before it is dropped.
    pub send_timeout_secs: u64,
    /// Bytes the server buffers for one socket's outgoing frames before it drops that client.
    pub max_write_buffer_bytes: usize,
    /// Initial read buffer per socket: small, because most sockets are idle; it grows for a
    /// larger frame.
    pub read_buffer_bytes: usize,
    /// Event TTL when the app server sends none, in seconds.
    pub default_ttl_secs: u64,
    /// Largest TTL an app server may ask for; larger values are clamped to it.
    pub max_ttl_secs: u64,
    /// Longest `?wait=` a poll may hold, in seconds.
    pub max_poll_wait_secs: u64,
    /// Seconds an unregistered endpoint keeps answering 410 before it becomes unknown (404).
    pub gone_ttl_secs: u64,
    /// Days a UAID may go unseen (no hello, claim or poll with its secret) before the sweep
    /// deletes its registrations (the binding stays); 0 keeps every registration for ever.
    pub uaid_idle_days: u64,
    /// Seconds between sweeps that delete expired events and tombstones.
    pub sweep_interval_secs: u64,
    /// Seconds an HTTP connection may wait for the first byte of a request (after connecting or
    /// after its previous answer) before it is closed.
    pub http_idle_timeout_secs: u64,
    /// Seconds from a request's first byte until its headers are complete; slower: closed.
    pub http_header_timeout_secs: u64,
    /// Seconds from a request's headers until its whole body has arrived; slower: 408.
    pub http_body_timeout_secs: u64,
    /// Open client connections (HTTP and WebSocket) at most; beyond it a new connection gets 503
    /// and is closed. 0: the open-file limit less 256.
    pub max_connections: usize,
    /// New UAIDs one client address may create per second on average (hello, claim, poll); 0:
    /// no limit. Beyond it and the burst: 429 with `Retry-After`.
    pub uaid_rate_per_sec: u32,
    /// New UAIDs one client address may create at once above that average.
    pub uaid_burst: u32,
}

/// Where durable state lives (`store.backend`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded, one node, in `server.data_dir`.
    #[default]
    Sled,
    /// Several nodes sharing one Redis or Redis Cluster.
    Redis,
}

impl Backend {
    /// The name, as in `store.backend`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sled` (embedded, one node) or `redis` (several nodes sharing one Redis or Redis Cluster).
    pub backend: Backend,
    /// Redis server URL (`redis://host:port/db`, `rediss://` for TLS is not built in), used when
    /// `cluster_urls` is empty.
    pub url: String,
    /// Seed nodes of a Redis Cluster; non-empty selects cluster mode and `url` is ignored.
    pub cluster_urls: Vec<String>,
    /// Milliseconds one Redis call (connecting included) may take before it fails (503 on PUT).
    pub redis_timeout_ms: u64,
    /// Seconds between the re-checks of the pending events of every UAID held on this node
    /// (what repairs a lost pub/sub nudge), which also renew the UAID's route entry.
    pub recheck_interval_secs: u64,
    /// Seconds a route entry (UAID → node) lives unless renewed by a re-check; bounds what a
    /// node that died leaves behind.
    pub route_ttl_secs: u64,
    /// Seconds between a Redis node's checks that Redis still holds the server keys it runs
    /// with; it puts them back if Redis lost them (restarted without persistence), so nodes
    /// started after that get the keys every issued endpoint and secret was made with.
    pub keys_check_secs: u64,
    /// Milliseconds a durable write may take before the request gets 503 + Retry-After.
    pub write_timeout_ms: u64,
    /// Seconds sent in Retry-After when the store cannot take a write.
    pub retry_after_secs: u64,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
}

/// Keys for endpoint tokens and UAID secrets. Empty means: generate once and keep in the data dir.
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// 32 bytes, base64url: signs endpoint tokens.
    pub endpoint_key: String,
    /// 32 bytes, base64url: derives UAID secrets.
    pub secret_key: String,
}

impl std::fmt::Debug for KeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeysConfig { .. }")
    }
}

/// What the server offers browsers besides the protocol (see `crate::web`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the browser client module at `GET /edition.js`.
    pub client: bool,
    /// Serve the demo page at `GET /demo` and redirect `/` to it; needs `client`.
    pub demo: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            client: true,
            demo: true,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: String::new(),
            data_dir: PathBuf::from("data"),
            log: "info".into(),
            shutdown_grace_secs: 10,
            trusted_proxy_header: String::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_uaids_per_connection: 100_000,
            max_uaids_per_frame: 500,
            max_appids_per_uaid: 1000,
            max_body_bytes: 64 * 1024,
            max_kick_bytes: 2048,
            max_watch_collections: 64,
            ws_frames_per_sec: 100,
            ws_frames_burst: 200,
            put_rate_per_sec: 10,
            put_burst: 100,
            hello_timeout_secs: 10,
            idle_timeout_secs: 600,
            send_timeout_secs: 10,
            max_write_buffer_bytes: 1024 * 1024,
            read_buffer_bytes: 512,
            default_ttl_secs: 30 * 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
            max_poll_wait_secs: 60,
            gone_ttl_secs: 30 * 24 * 3600,
            uaid_idle_days: 90,
            sweep_interval_secs: 60,
            http_idle_timeout_secs: 60,
            http_header_timeout_secs: 10,
            http_body_timeout_secs: 30,
            max_connections: 0,
            uaid_rate_per_sec: 10,
            uaid_burst: 1000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sled,
            url: "redis://127.0.0.1:6379".into(),
            cluster_urls: Vec::new(),
            redis_timeout_ms: 2000,
            recheck_interval_secs: 60,
            route_ttl_secs: 300,
            keys_check_secs: 5,
            write_timeout_ms: 5000,
            retry_after_secs: 5,
            cache_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What went wrong while assembling the configuration. The display names the source (the file,
/// the environment variable or the flag) first, once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// `IP:PORT`, `HOST:PORT` (resolved now; the first address wins) or `:PORT` (every IPv4
/// interface, as `0.0.0.0:PORT`).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_owned(),
    };
    if let Ok(addr) = full.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected = "expected IP:PORT, HOST:PORT or :PORT";
    let Some((host, port)) = full.rsplit_once(':') else {
        return Err(format!("{text:?}: {expected}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?}: {expected}"));
    }
    std::net::ToSocketAddrs::to_socket_addrs(&full)
        .map_err(|e| format!("{text:?}: cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?}: {host:?} has no address"))
}

fn deserialize_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

/// Checks a `tracing` filter (`server.log`, `RUST_LOG`): it must parse, and a directive without
/// `=` must be a level. (tracing reads a bare word as a target to trace, so `log = "verbose"`
/// would silently print nothing.)
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=')
            && !directive.contains('[')
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "invalid log filter {filter:?}: {directive:?} is no level (off, error, warn, info, \
                 debug, trace); for one module write MODULE=LEVEL"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("invalid log filter {filter:?}: {e}"))
}

/// What `editiond config` prints for a secret: `(set)`, or empty when it is not set.
pub fn redact(secret: &mut String) {
    if !secret.is_empty() {
        *secret = "(set)".to_owned();
    }
}

/// Overrides given as command-line flags; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub public_url: Option<String>,
    /// `editiond relay --upstream` (relay.upstream).
    pub relay_upstream: Option<String>,
    /// `editiond relay --transport` (relay.transport).
    pub relay_transport: Option<crate::relay::Transport>,
}

impl Config {
    /// Loads `file` (if any), then environment variables (`vars`), then `flags`.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        flags: &Flags,
    ) -> Result<Config, ConfigError> {
        let mut doc = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| invalid(&path.display().to_string(), e))?
            }
            None => toml::Table::new(),
        };
        let file_origin = file.map_or("defaults".into(), |p| p.display().to_string());
        // Who set each key, so that a value refused below names its source.
        let mut origins = Origins::default();
        leaf_paths(&doc, "", &mut |key| origins.set(key, &file_origin));
        // The file alone first, so that its errors name it and an env error names its variable.
        doc.clone()
            .try_into::<Config>()
            .map_err(|e| invalid(&file_origin, e))?;
        let defaults = toml::Table::try_from(Config::default()).map_err(|e| invalid("defaults", e))?;
        for (name, value) in vars {
            let Some(key) = apply_env(&mut doc, &defaults, &name, &value)? else {
                continue;
            };
            doc.clone().try_into::<Config>().map_err(|e| invalid(&name, e))?;
            origins.set(&key, &name);
        }
        let mut config: Config = doc.try_into().map_err(|e| invalid("environment", e))?;
        if let Some(listen) = flags.listen {
            config.server.listen = listen;
            origins.set("server.listen", "--listen");
        }
        if let Some(dir) = &flags.data_dir {
            config.server.data_dir = dir.clone();
            origins.set("server.data_dir", "--data-dir");
        }
        if let Some(url) = &flags.public_url {
            config.server.public_url = url.clone();
            origins.set("server.public_url", "--public-url");
        }
        if let Some(upstream) = &flags.relay_upstream {
            config.relay.upstream = upstream.clone();
            origins.set("relay.upstream", "--upstream");
        }
        if let Some(transport) = flags.relay_transport {
            config.relay.transport = transport;
            origins.set("relay.transport", "--transport");
        }
        // `http://host/` and `http://host` are the same base; endpoints append `/v1/e/…`.
        let trimmed = config.server.public_url.trim_end_matches('/').len();
        config.server.public_url.truncate(trimmed);
        config.validate(&origins)?;
        Ok(config)
    }

    /// Replaces what must never be printed: set keys and secrets become `(set)`, passwords in
    /// Redis URLs `***`.
    pub fn redact_secrets(&mut self) {
        redact(&mut self.keys.endpoint_key);
        redact(&mut self.keys.secret_key);
        self.kick.redact_secrets();
        self.storage.redact_secrets();
        self.store.url = redact_url(&self.store.url);
        self.relay.upstream = redact_url(&self.relay.upstream);
        for url in &mut self.store.cluster_urls {
            *url = redact_url(url);
        }
    }

    /// The base URL endpoints are built from, without a trailing slash.
    pub fn public_url(&self) -> String {
        if self.server.public_url.is_empty() {
            format!("http://{}", self.server.listen)
        } else {
            self.server.public_url.trim_end_matches('/').to_owned()
        }
    }

    fn validate(&self, origins: &Origins) -> Result<(), ConfigError> {
        let l = &self.limits;
        // The message starts with the key at fault; its source names the error.
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(invalid(&origins.of_message(what), what))
            }
        };
        check_log_filter(&self.server.log)
            .map_err(|e| invalid(&origins.of("server.log"), format!("server.log: {e}")))?;
        check(
            self.server.trusted_proxy_header.is_empty()
                || axum::http::HeaderName::try_from(self.server.trusted_proxy_header.as_str()).is_ok(),
            "server.trusted_proxy_header must be a header name (or empty)",
        )?;
        check(
            l.http_idle_timeout_secs >= 1 && l.http_header_timeout_secs >= 1 && l.http_body_timeout_secs >= 1,
            "limits.http_idle_timeout_secs, http_header_timeout_secs and http_body_timeout_secs must be at least 1",
        )?;
        check(
            l.uaid_rate_per_sec == 0 || l.uaid_burst as usize >= l.max_uaids_per_frame,
            "limits.uaid_burst must be at least limits.max_uaids_per_frame unless limits.uaid_rate_per_sec is 0 \
             (a hello of new UAIDs takes its tokens at once)",
        )?;
        let url = &self.server.public_url;
        check(
            url.is_empty() || url.starts_with("http://") || url.starts_with("https://"),
            "server.public_url must start with http:// or https:// (or be empty)",
        )?;
        let st = &self.store;
        check(
            st.backend != Backend::Redis || !st.url.is_empty() || !st.cluster_urls.is_empty(),
            "store.backend = \"redis\" needs store.url or store.cluster_urls",
        )?;
        check(
            st.redis_timeout_ms >= 1,
            "store.redis_timeout_ms must be at least 1",
        )?;
        check(
            st.recheck_interval_secs >= 1,
            "store.recheck_interval_secs must be at least 1",
        )?;
        check(
            st.keys_check_secs >= 1,
            "store.keys_check_secs must be at least 1",
        )?;
        check(
            st.route_ttl_secs > st.recheck_interval_secs,
            "store.route_ttl_secs must exceed store.recheck_interval_secs",
        )?;
        self.storage
            .validate(&self.store.backend)
            .map_err(|m| invalid("config", m))?;
        check(
            l.max_frame_bytes >= 1024,
            "limits.max_frame_bytes must be at least 1024",
        )?;
        check(
            l.max_uaids_per_frame >= 1,
            "limits.max_uaids_per_frame must be at least 1",
        )?;
        check(
            l.max_uaids_per_connection >= 1,
            "limits.max_uaids_per_connection must be at least 1",
        )?;
        check(
            l.max_appids_per_uaid >= 1,
            "limits.max_appids_per_uaid must be at least 1",
        )?;
        check(
            l.ws_frames_per_sec >= 1,
            "limits.ws_frames_per_sec must be at least 1",
        )?;
        check(
            l.put_rate_per_sec == 0 || l.put_burst >= 1,
            "limits.put_burst must be at least 1 unless limits.put_rate_per_sec is 0",
        )?;
        check(l.max_ttl_secs >= 1, "limits.max_ttl_secs must be at least 1")?;
        check(
            l.read_buffer_bytes >= 256,
            "limits.read_buffer_bytes must be at least 256",
        )?;
        check(
            l.sweep_interval_secs >= 1,
            "limits.sweep_interval_secs must be at least 1",
        )?;
        check(
            l.max_write_buffer_bytes > l.max_frame_bytes,
            "limits.max_write_buffer_bytes must exceed limits.max_frame_bytes",
        )?;
        self.relay.check().map_err(|e| invalid("config", e))?;
        check(
            !self.relay.enabled() || st.backend == Backend::Sled,
            "a relay keeps its clients' events in its own sled store: relay.upstream needs store.backend = \"sled\"",
        )?;
        check(
            self.web.client || !self.web.demo,
            "web.demo = true needs web.client = true (the demo page imports /edition.js)",
        )?;
        Ok(())
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`; URLs without a password are unchanged.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    let user = userinfo.split_once(':').map_or("", |(u, _)| u);
    if userinfo.contains(':') {
        format!("{scheme}://{user}:***@{host}")
    } else {
        format!("{scheme}://***@{host}")
    }
}

/// Applies one `EDITIOND_…` variable to `doc`; `false` if the name is not an override. Every
/// `__` descends one table: `EDITIOND_KICK__WEBHOOK__SECRET` is `[kick.webhook] secret`. The
/// value takes the type of the default at that path (`defaults`).
fn apply_env(
    doc: &mut toml::Table,
    defaults: &toml::Table,
    name: &str,
    value: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(rest) = name.strip_prefix("EDITIOND_") else {
        return Ok(None);
    };
    if rest == "CONFIG" {
        return Ok(None);
    }
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let Some((key, tables)) = path.split_last() else {
        return Err(invalid(name, "expected EDITIOND_<SECTION>__<KEY>"));
    };
    if tables.is_empty() || path.iter().any(String::is_empty) {
        return Err(invalid(name, "expected EDITIOND_<SECTION>__<KEY>"));
    }
    let template = tables
        .iter()
        .try_fold(defaults, |table, part| table.get(part)?.as_table())
        .and_then(|table| table.get(key));
    let parsed = env_value(template, value).map_err(|m| invalid(name, m))?;
    let mut table = doc;
    for part in tables {
        table = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid(name, format!("{part} is not a table")))?;
    }
    table.insert(key.clone(), parsed);
    Ok(Some(path.join(".")))
}

/// Which source set each key (dotted path), the last one winning.
#[derive(Default)]
struct Origins(Vec<(String, String)>);

impl Origins {
    fn set(&mut self, key: &str, origin: &str) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_owned(), origin.to_owned()));
    }

    /// The source of `key`, or `defaults`.
    fn of(&self, key: &str) -> String {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| "defaults".to_owned(), |(_, o)| o.clone())
    }

    /// The source of the first key a validation message names that was set somewhere (a
    /// default can be refused only because another key moved).
    fn of_message(&self, message: &str) -> String {
        let mut section = "";
        for word in message.split(|c: char| c.is_whitespace() || c == ',') {
            let key = match word.split_once('.') {
                Some((s, _))
                    if !s.is_empty()
                        && word
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.') =>
                {
                    section = s;
                    word.to_owned()
                }
                // "limits.a, b and c": b and c are keys of the same section.
                None if !section.is_empty()
                    && word.contains('_')
                    && word.chars().all(|c| c.is_ascii_lowercase() || c == '_') =>
                {
                    format!("{section}.{word}")
                }
                _ => continue,
            };
            if let Some((_, origin)) = self.0.iter().find(|(k, _)| *k == key) {
                return origin.clone();
            }
        }
        "defaults".to_owned()
    }
}

/// Calls `f` with the dotted path of every value in `table` that is not a table.
fn leaf_paths(table: &toml::Table, prefix: &str, f: &mut impl FnMut(&str)) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => leaf_paths(t, &path, f),
            _ => f(&path),
        }
    }
}

fn invalid(origin: &str, message: impl std::fmt::Display) -> ConfigError {
    // TOML errors span lines (a quoted source line, `in \`limits\``): one line reads better
    // after `editiond: ORIGIN: `.
    let message = message.to_string();
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    ConfigError::Invalid {
        origin: origin.to_owned(),
        message,
    }
}

/// Reads an environment value with the type of the default it overrides, so that
/// `EDITIOND_KEYS__SECRET_KEY=1234` stays a string and `..._MAX_FRAME_BYTES=1234` a number.
fn env_value(template: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    match template {
        Some(toml::Value::String(_)) | None => Ok(toml::Value::String(raw.to_owned())),
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|e| format!("expected an integer: {e}")),
        Some(toml::Value::Boolean(_)) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|e| format!("expected true or false: {e}")),
        Some(_) => format!("v = {raw}")
            .parse::<toml::Table>()
            .map_err(|e| e.to_string())?
            .remove("v")
            .ok_or_else(|| "empty value".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_toml_equals_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let config = Config::load(Some(&path), [], &Flags::default()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let vars = [
            ("EDITIOND_LIMITS__MAX_FRAME_BYTES".to_owned(), "2048".to_owned()),
            ("EDITIOND_SERVER__LISTEN".to_owned(), "127.0.0.1:9000".to_owned()),
            ("EDITIOND_KEYS__SECRET_KEY".to_owned(), "1234".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let flags = Flags {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Flags::default()
        };
        let config = Config::load(None, vars, &flags).unwrap();
        assert_eq!(config.limits.max_frame_bytes, 2048);
        assert_eq!(config.keys.secret_key, "1234");
        assert_eq!(config.server.listen.port(), 9001);
    }

    #[test]
    fn redis_backend_is_selected_by_env_and_secrets_are_redacted() {
        let vars = [
            ("EDITIOND_STORE__BACKEND".to_owned(), "redis".to_owned()),
            (
                "EDITIOND_STORE__URL".to_owned(),
                "redis://app:hunter2@10.0.0.5:6379".to_owned(),
            ),
            (
                "EDITIOND_STORE__CLUSTER_URLS".to_owned(),
                r#"["redis://:pw@10.0.0.6:7000", "redis://10.0.0.7:7000"]"#.to_owned(),
            ),
        ];
        let mut config = Config::load(None, vars, &Flags::default()).unwrap();
        assert_eq!(config.store.backend, Backend::Redis);
        assert_eq!(config.store.cluster_urls.len(), 2);
        config.redact_secrets();
        assert_eq!(config.store.url, "redis://app:***@10.0.0.5:6379");
        assert_eq!(config.store.cluster_urls[0], "redis://:***@10.0.0.6:7000");
        assert_eq!(config.store.cluster_urls[1], "redis://10.0.0.7:7000");
        let bad = [("EDITIOND_STORE__BACKEND".to_owned(), "mongo".to_owned())];
        assert!(Config::load(None, bad, &Flags::default()).is_err());
    }

    #[test]
    fn public_url_must_be_a_url() {
        let bad = [(
            "EDITIOND_SERVER__PUBLIC_URL".to_owned(),
            "push.example.com".to_owned(),
        )];
        assert!(Config::load(None, bad, &Flags::default()).is_err());
        let good = [(
            "EDITIOND_SERVER__PUBLIC_URL".to_owned(),
            "https://push.example.com/".to_owned(),
        )];
        let config = Config::load(None, good, &Flags::default()).unwrap();
        assert_eq!(config.public_url(), "https://push.example.com");
    }

    #[test]
    fn put_rate_limit_is_set_by_env_and_needs_a_burst() {
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let off = [var("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "0")];
        let config = Config::load(None, off, &Flags::default()).unwrap();
        assert_eq!(config.limits.put_rate_per_sec, 0);
        let no_burst = [var("EDITIOND_LIMITS__PUT_BURST", "0")];
        assert!(Config::load(None, no_burst, &Flags::default()).is_err());
        let off_no_burst = [
            var("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "0"),
            var("EDITIOND_LIMITS__PUT_BURST", "0"),
        ];
        assert!(Config::load(None, off_no_burst, &Flags::default()).is_ok());
    }

    #[test]
    fn env_overrides_reach_nested_tables_and_errors_name_the_variable() {
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let defaults: toml::Table = "[kick]\nmin_interval_secs = 30\n[kick.webhook]\nsecret = \"\"\n"
            .parse()
            .unwrap();
        let mut doc = toml::Table::new();
        assert_eq!(
            apply_env(&mut doc, &defaults, "EDITIOND_KICK__WEBHOOK__SECRET", "whsec_x").unwrap(),
            Some("kick.webhook.secret".to_owned())
        );
        assert!(
            apply_env(&mut doc, &defaults, "EDITIOND_KICK__MIN_INTERVAL_SECS", "5")
                .unwrap()
                .is_some()
        );
        assert_eq!(apply_env(&mut doc, &defaults, "HOME", "/root").unwrap(), None);
        let expected: toml::Table = "[kick]\nmin_interval_secs = 5\n[kick.webhook]\nsecret = \"whsec_x\"\n"
            .parse()
            .unwrap();
        assert_eq!(doc, expected);
        let err = Config::load(None, [var("EDITIOND_STORE__BACKEND", "mongo")], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("EDITIOND_STORE__BACKEND: "), "{err}");
        let err = Config::load(None, [var("EDITIOND_STORE__NOPE__DEEP", "1")], &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("EDITIOND_STORE__NOPE__DEEP: "), "{err}");
        for bad in ["EDITIOND_STORE", "EDITIOND___URL", "EDITIOND_STORE__"] {
            assert!(
                Config::load(None, [var(bad, "1")], &Flags::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn nested_kick_sections_are_set_by_env_and_secrets_redacted() {
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let vars = [
            var("EDITIOND_KICK__WEBHOOK__ENABLED", "true"),
            var("EDITIOND_KICK__WEBHOOK__ALLOW", r#"["127.0.0.1/32"]"#),
            var(
                "EDITIOND_KICK__WEBHOOK__SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            var("EDITIOND_KICK__MIN_INTERVAL_SECS", "5"),
        ];
        let mut config = Config::load(None, vars, &Flags::default()).unwrap();
        assert!(config.kick.webhook.enabled);
        assert_eq!(config.kick.webhook.allow, ["127.0.0.1/32"]);
        assert_eq!(config.kick.min_interval_secs, 5);
        config.redact_secrets();
        assert_eq!(config.kick.webhook.secret, "(set)");
        assert_eq!(config.kick.webpush.vapid_private_key, "");
        let bad = [var("EDITIOND_KICK__WEBHOOK__NO_SUCH", "1")];
        assert!(Config::load(None, bad, &Flags::default()).is_err());
    }

    #[test]
    fn validation_errors_name_the_source_of_the_key_once() {
        let var = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let load = |vars: Vec<(String, String)>, flags: &Flags| {
            Config::load(None, vars, flags).unwrap_err().to_string()
        };
        let err = load(
            vec![var("EDITIOND_LIMITS__MAX_FRAME_BYTES", "10")],
            &Flags::default(),
        );
        assert_eq!(
            err,
            "EDITIOND_LIMITS__MAX_FRAME_BYTES: limits.max_frame_bytes must be at least 1024"
        );
        // A default refused because another key moved names the key that moved.
        let err = load(
            vec![var("EDITIOND_LIMITS__MAX_FRAME_BYTES", "2000000")],
            &Flags::default(),
        );
        assert!(
            err.starts_with("EDITIOND_LIMITS__MAX_FRAME_BYTES: limits.max_write_buffer_bytes"),
            "{err}"
        );
        let flags = Flags {
            public_url: Some("push.example.com".into()),
            ..Flags::default()
        };
        let err = load(vec![var("EDITIOND_SERVER__PUBLIC_URL", "https://x")], &flags);
        assert!(err.starts_with("--public-url: server.public_url"), "{err}");
        let err = load(
            vec![var("EDITIOND_LIMITS__HTTP_BODY_TIMEOUT_SECS", "0")],
            &Flags::default(),
        );
        assert!(
            err.starts_with("EDITIOND_LIMITS__HTTP_BODY_TIMEOUT_SECS: "),
            "{err}"
        );
    }

    #[test]
    fn listen_takes_ip_host_or_bare_port() {
        assert_eq!(
            parse_listen("127.0.0.1:80").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 80))
        );
        assert_eq!(
            parse_listen(":8093").unwrap(),
            SocketAddr::from(([0, 0, 0, 0], 8093))
        );
        assert!(parse_listen("localhost:8093").unwrap().ip().is_loopback());
        assert_eq!(parse_listen("[::1]:9").unwrap().port(), 9);
        for bad in ["", "8093", "localhost", "localhost:x", ":", "a b:1"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let vars = [("EDITIOND_SERVER__LISTEN".to_owned(), ":9000".to_owned())];
        let config = Config::load(None, vars, &Flags::default()).unwrap();
        assert_eq!(config.server.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
    }

    #[test]
    fn log_filters_that_print_nothing_are_refused() {
        for good in ["info", "warn,editiond=debug", "editiond::push=trace", "OFF", ""] {
            assert!(check_log_filter(good).is_ok(), "{good}");
        }
        for bad in ["loud", "verbose", "editiond=loud", "info,editiond"] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let unknown = [("EDITIOND_LIMITS__NO_SUCH".to_owned(), "1".to_owned())];
        assert!(Config::load(None, unknown, &Flags::default()).is_err());
        let bad = [("EDITIOND_LIMITS__MAX_FRAME_BYTES".to_owned(), "big".to_owned())];
        assert!(Config::load(None, bad, &Flags::default()).is_err());
        let small = [("EDITIOND_LIMITS__MAX_FRAME_BYTES".to_owned(), "10".to_owned())];
        assert!(Config::load(None, small, &Flags::default()).is_err());
    }
}
