//! The co-hosted storage API: Mozilla Sync storage 1.5 under `/1.5/{uid}/…` on the edition
//! server's port (protocol: proto/storage.md).
//!
//! [`Storage`] is the service: Hawk authentication with tokenserver-format tokens ([`token`],
//! [`hawk`]), one reader-writer lock per user (stripe) so each user's writes are serialised
//! and timestamps strictly increase, and the durable [`store::StorageStore`]. [`handlers`]
//! speaks HTTP; [`error`] chooses every status and error body. It shares the port, the config
//! file and shutdown with the edition server, and nothing else; the only links are [`routes`]
//! (one line in the router) and, for instant sync, [`Storage::verify_watch_token`] and
//! [`Storage::set_observer`].

pub mod bso;
mod config;
pub mod error;
pub mod handlers;
pub mod hawk;
pub mod load;
pub mod store;
pub mod token;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::Router;
use tokio::sync::RwLock;

pub use self::config::StorageConfig;
use self::error::StorageError;
use self::hawk::{NonceCache, NonceError, Signed};
use self::store::{SledStorage, StorageStore, StorageStoreError};
use self::token::{Secrets, TokenError};
use crate::store::SledDb;

/// Lock stripes: users hash onto this many locks. Two users sharing a stripe only wait for
/// each other; 4096 keeps that rare at any realistic number of concurrent writers.
const LOCK_STRIPES: usize = 4096;

/// Called after every successful write with (uid, collection, the collection's new
/// last-modified time in ms): the instant-sync hook.
pub type Observer = Arc<dyn Fn(u64, &str, u64) + Send + Sync>;

/// Why a watch token was refused (the push side answers `401 bad_watch_token`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WatchTokenError {
    #[error("the storage API is not configured")]
    Disabled,
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("the token is for another node")]
    WrongNode,
}

/// The storage service; shared by its handlers.
pub struct Storage {
    pub config: StorageConfig,
    /// This node's public URL: a token's `node` must equal it.
    node: String,
    /// Port a Host header without one implies.
    default_port: u16,
    secrets: Secrets,
    store: Arc<dyn StorageStore>,
    /// Per-user (striped) locks: writers exclusive, readers shared, so a read never sees half
    /// a write. A writer holds it while it decides and applies, not while its commit runs, so
    /// the user's next write can join the same group commit.
    /// a write nor one that is not yet durable.
    locks: Box<[RwLock<()>]>,
    /// Per stripe: writes applied whose commit has not finished. A reader that sees one waits
    /// for a commit before it answers, so nothing it tells a client can be lost in a crash.
    dirty: Arc<[AtomicU64]>,
    nonces: NonceCache,
    observer: OnceLock<Observer>,
    /// Answers by status, and the wait for durability of writes; exported with the server's
    /// metrics once [`Storage::register_metrics`] ran.
    requests: prometheus::IntCounterVec,
    commit_seconds: prometheus::Histogram,
    /// Requests in flight: the load signal behind `X-Weave-Backoff` and load shedding.
    load: load::Load,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("storage store: {0}")]
    Store(StorageStoreError),
}

impl Storage {
    /// Opens the storage API for `config` on `db` (see [`SledStorage::open`]); the wiring runs
    /// its [`Storage::sweep_loop`]. Call it only when `config.storage` is enabled.
    pub fn open(config: &crate::config::Config, db: &SledDb) -> Result<Arc<Storage>, OpenError> {
        let store = SledStorage::open(db).map_err(OpenError::Store)?;
        let storage = Storage::new(config.storage.clone(), &config.public_url(), Arc::new(store));
        Ok(storage)
    }

    /// A service over any store; `node` is the public URL tokens must name.
    pub fn new(config: StorageConfig, node: &str, store: Arc<dyn StorageStore>) -> Arc<Storage> {
        let secrets = Secrets::new(&config.secrets());
        let default_port = if node.starts_with("https:") { 443 } else { 80 };
        Arc::new(Storage {
            nonces: NonceCache::new(config.max_nonces, config.hawk_skew_secs),
            load: load::Load::new(config.backoff_in_flight, config.shed_in_flight),
            config,
            node: node.trim_end_matches('/').to_owned(),
            default_port,
            secrets,
            store,
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            dirty: (0..LOCK_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            observer: OnceLock::new(),
            requests: prometheus::IntCounterVec::new(
                prometheus::Opts::new("storage_requests_total", "Storage API answers by HTTP status"),
                &["status"],
            )
            .expect("valid metric"),
            commit_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "storage_commit_seconds",
                    "Time for a storage write to become durable (group commit wait)",
                )
                .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets")),
            )
            .expect("valid metric"),
        })
    }

    pub fn store(&self) -> &dyn StorageStore {
        &*self.store
    }

    /// Instant sync: the uid a (non-expired) storage token for this node proves.
    pub fn verify_watch_token(&self, token: &str) -> Result<u64, WatchTokenError> {
        let (data, _) = self.secrets.parse(token, now_secs())?;
        if data.node != self.node {
            return Err(WatchTokenError::WrongNode);
        }
        Ok(data.uid)
    }

    /// Instant sync: `observer` is called after every successful write (once; later calls are
    /// ignored).
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    /// Exports the storage metrics with the server's (`/metrics`).
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        for collector in [
            Box::new(self.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(self.commit_seconds.clone()),
            Box::new(self.load.gauge.clone()),
        ] {
            if let Err(e) = metrics.register(collector) {
                tracing::warn!(error = %e, "storage metrics not registered");
            }
        }
    }

    /// Counts one answer.
    pub(crate) fn count(&self, status: axum::http::StatusCode) {
        self.requests.with_label_values(&[status.as_str()]).inc();
    }

    /// Mints a token and Hawk key for `uid` on this node (`editiond token`).
    pub fn mint(&self, uid: u64, ttl_secs: u64) -> Option<(String, String)> {
        self.secrets.mint(uid, &self.node, ttl_secs, now_secs())
    }

    /// The user's stripe (lock and dirty count).
    fn stripe(&self, uid: u64) -> usize {
        // Fibonacci hashing spreads sequential uids over the stripes.
        let h = uid.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        (h as usize) % self.locks.len()
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.config.write_timeout_ms)
    }

    fn unavailable(&self) -> StorageError {
        StorageError::Unavailable {
            retry_after_secs: self.config.backoff_secs,
        }
    }

    /// Checks the request's Hawk signature and token; returns the uid. `path_uid` must be the
    /// token's. `allow_expired`: a token expired less than `expired_token_grace_secs` ago passes.
    pub fn authenticate(
        &self,
        parts: &Parts,
        body: &[u8],
        path_uid: u64,
        allow_expired: bool,
    ) -> Result<u64, StorageError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(StorageError::Unauthorized("no Hawk Authorization header"))?;
        let hawk = hawk::parse_header(header).map_err(StorageError::Unauthorized)?;
        let now = now_secs();
        let (data, index) = match self.secrets.parse(&hawk.id, now) {
            Ok(found) => found,
            Err(TokenError::Expired(data)) if allow_expired => {
                let (_, index) = self
                    .secrets
                    .parse(&hawk.id, now - self.config.expired_token_grace_secs as f64)
                    .map_err(|_| StorageError::Unauthorized("token expired"))?;
                (data, index)
            }
            Err(TokenError::Expired(_)) => return Err(StorageError::Unauthorized("token expired")),
            Err(_) => return Err(StorageError::Unauthorized("invalid token")),
        };
        if data.node != self.node {
            return Err(StorageError::Unauthorized("token is for another node"));
        }
        if data.uid != path_uid {
            return Err(StorageError::Unauthorized("token is for another user"));
        }
        let key = self.secrets.derived_key(index, &hawk.id, &data.salt);
        let (host, port) = host_and_port(&parts.headers, self.default_port)
            .ok_or(StorageError::Unauthorized("no usable Host header"))?;
        // Nested under `/1.5`, the handlers see the path without it; the client signed it whole.
        let resource = format!(
            "{}{}",
            handlers::PREFIX,
            parts.uri.path_and_query().map_or("/", |pq| pq.as_str())
        );
        let signed = Signed {
            method: parts.method.as_str(),
            resource: &resource,
            host: &host,
            port,
        };
        // A bare trailing `?` is in the request line but not in what some clients sign.
        let bare = resource.strip_suffix('?').map(|path| Signed {
            resource: path,
            ..signed
        });
        if !hawk::verify_mac(key.as_bytes(), &hawk, &signed)
            && !bare.is_some_and(|bare| hawk::verify_mac(key.as_bytes(), &hawk, &bare))
        {
            return Err(StorageError::Unauthorized("Hawk MAC does not verify"));
        }
        let skew = self.config.hawk_skew_secs;
        let now_int = now as u64;
        if hawk.ts.abs_diff(now_int) > skew {
            return Err(StorageError::Unauthorized(
                "Hawk timestamp outside the allowed skew",
            ));
        }
        if let Some(hash) = &hawk.hash {
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if hawk::payload_hash(content_type, body) != *hash {
                return Err(StorageError::Unauthorized(
                    "Hawk payload hash does not match the body",
                ));
            }
        }
        match self.nonces.check(&hawk, now_int) {
            Ok(()) => Ok(data.uid),
            Err(NonceError::Replayed) => Err(StorageError::Unauthorized("Hawk nonce already used")),
            Err(NonceError::Full) => Err(self.unavailable()),
        }
    }

    /// Deletes expired records and batches every `sweep_interval_secs` until shutdown begins
    /// (the wiring keeps the task's handle, so shutdown waits for a sweep in progress).
    pub async fn sweep_loop(self: Arc<Self>, lifecycle: crate::state::Lifecycle) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.config.sweep_interval_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let stopping = lifecycle.stopping();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopping => return,
            }
            let store = self.store.clone();
            let swept = tokio::task::spawn_blocking(move || store.sweep(bso::now_ms())).await;
            match swept {
                Ok(Ok(stats)) if stats.records + stats.batches > 0 => {
                    tracing::info!(
                        records = stats.records,
                        batches = stats.batches,
                        "swept expired storage"
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "storage sweep failed"),
                Err(e) => tracing::warn!(error = %e, "storage sweep panicked"),
            }
        }
    }
}

/// The storage routes (none when the API is off), merged into the server's router.
pub fn routes<S: Clone + Send + Sync + 'static>(storage: Option<Arc<Storage>>) -> Router<S> {
    match storage {
        Some(storage) => handlers::router(storage),
        None => Router::new(),
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Host (lowercase, without port) and port the client addressed, from the Host header.
fn host_and_port(headers: &HeaderMap, default_port: u16) -> Option<(String, u16)> {
    let host = headers.get(header::HOST)?.to_str().ok()?.trim();
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        (name, after.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    Some((name.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn host_header_gives_host_and_port() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("LocalHost:8000"));
        assert_eq!(host_and_port(&h, 80), Some(("localhost".into(), 8000)));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        assert_eq!(host_and_port(&h, 443), Some(("example.com".into(), 443)));
        h.insert(header::HOST, HeaderValue::from_static("[::1]:9"));
        assert_eq!(host_and_port(&h, 80), Some(("::1".into(), 9)));
    }
}
