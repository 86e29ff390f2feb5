//! What every request handler and background task shares: config, keys, the store, who holds
//! which UAID, metrics, and the shutdown signal.
//!
//! Handlers get an `Arc<AppState>`; the wiring in [`crate::server`] builds it and nothing here
//! imports the wiring back.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::http::HttpError;
use crate::ids::{TokenId, Uaid};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::push::events::Reached;
use crate::push::registry::{Durable, Mailbox, Registry};
use crate::push::route::{NodeRoutes, RouteEntry};
use crate::ratelimit::{Buckets, Rate};
use crate::store::{AnyStore, Store, StoreError};

/// Everything handlers share, passed explicitly as axum state.
pub struct AppState {
    pub config: Config,
    /// `config.public_url()`, computed once: it prefixes every endpoint.
    pub public_url: String,
    pub keys: Keys,
    pub store: AnyStore,
    /// Which connection on this node holds which UAID.
    pub registry: Registry,
    /// Which node holds which UAID, with the Redis store; `None` on sled (one node).
    pub routes: Option<Arc<NodeRoutes>>,
    pub metrics: Metrics,
    /// PUT rate limit per registration, keyed by endpoint token, on this node only (nodes do not
    /// share it: a registration PUT to through N nodes may get up to N times the rate). `None`
    /// when `put_rate_per_sec` is 0. Pruned by the sweeper, so it holds only recent PUTs.
    pub put_limit: Option<Buckets<TokenId>>,
    /// The KICK drivers and their scheduler, set once at start-up by `push::wake::install`
    /// (their hooks need this state's address); unset, every kick is unsupported.
    pub kicks: OnceLock<crate::kick::Kicks>,
    /// The Sync 1.5 storage API, when `[storage] master_secret` is set (set by the wiring).
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// New UAIDs per client address (`uaid_rate_per_sec`), on this node only; `None` when 0.
    /// Pruned with `put_limit`.
    pub uaid_limit: Option<Buckets<IpAddr>>,
    /// Which registrations watch which storage collections (instant sync); set by the wiring
    /// with `storage`.
    pub watches: Option<crate::push::watch::Watches>,
    /// The upstream link and UAID book when this node is a relay (`relay.upstream` set); set by
    /// the wiring once, before the state is shared.
    pub relay: Option<Arc<crate::relay::Relay>>,
    /// Flips to `true` once to tell every socket and poll to finish.
    shutdown: watch::Sender<bool>,
    /// Wakes every WebSocket when `shutdown` flips: a socket waits on this (a future kept
    /// inline in its task) rather than on [`AppState::stopping`] (a boxed future per socket).
    stop: Notify,
    /// Open sockets; shutdown waits for it to reach zero.
    sockets: watch::Sender<usize>,
}

impl AppState {
    /// The shared state over an opened store and keys.
    pub fn new(config: Config, keys: Keys, store: AnyStore, routes: Option<Arc<NodeRoutes>>) -> AppState {
        let limits = &config.limits;
        let put_limit = (limits.put_rate_per_sec > 0)
            .then(|| Buckets::new(Rate::new(limits.put_rate_per_sec, limits.put_burst)));
        let uaid_limit = (limits.uaid_rate_per_sec > 0)
            .then(|| Buckets::new(Rate::new(limits.uaid_rate_per_sec, limits.uaid_burst)));
        AppState {
            public_url: config.public_url(),
            put_limit,
            kicks: OnceLock::new(),
            storage: None,
            uaid_limit,
            watches: None,
            config,
            keys,
            store,
            registry: Registry::default(),
            routes,
            relay: None,
            metrics: Metrics::default(),
            shutdown: watch::Sender::new(false),
            stop: Notify::new(),
            sockets: watch::Sender::new(0),
        }
    }

    /// Makes connection `conn_id` the holder of `uaids`, on this node and (with Redis) for every
    /// node, so PUTs anywhere reach it. Route claims run concurrently (a relay claims hundreds).
    pub async fn hold(&self, uaids: &[Uaid], conn_id: u64, mailbox: &Arc<Mailbox>) -> Result<(), StoreError> {
        for uaid in uaids {
            self.registry.claim(*uaid, conn_id, mailbox);
        }
        crate::push::wake::connected(self, uaids);
        if let Some(routes) = &self.routes {
            let claims = uaids.iter().map(|uaid| routes.claim(*uaid, conn_id));
            for claimed in futures_util::future::join_all(claims).await {
                claimed?;
            }
        }
        Ok(())
    }

    /// Stops `conn_id` holding `uaid` if it still does; never waits.
    pub fn unhold(&self, uaid: Uaid, conn_id: u64) {
        self.registry.release(uaid, conn_id);
        if let Some(routes) = &self.routes {
            routes.release(uaid, conn_id);
        }
    }

    /// Tells the connection holding `uaid`, on this node or another, that events may be
    /// pending, and says who was told. Best effort: the event is already stored, and a lost
    /// nudge only delays it (a failed cross-node nudge counts as [`Reached::Remote`]: a holder
    /// may exist, and its re-check finds the event). `durable` is what the caller saw committed
    /// (a PUT after its sync); it reaches a holder on this node only, so that one can skip its
    /// own sync (see `Session::send_pending_after`).
    pub async fn nudge(&self, uaid: Uaid, durable: Option<Durable>) -> Reached {
        if self.registry.nudge_with(uaid, durable) {
            return Reached::Local;
        }
        let Some(routes) = &self.routes else {
            return Reached::Nobody;
        };
        match routes.nudge_remote(uaid).await {
            Ok(RouteEntry::OtherNode) => Reached::Remote,
            Ok(RouteEntry::ThisNode) => Reached::Local,
            Ok(RouteEntry::None) => Reached::Nobody,
            Err(e) => {
                tracing::debug!(error = %e, "cross-node nudge not sent");
                Reached::Remote
            }
        }
    }

    /// The one mapping of a store failure to an HTTP answer: logged, then 503 with Retry-After.
    /// (On a socket, the same failure is `WsError::StoreUnavailable`, see `session`.)
    pub fn unavailable(&self, e: StoreError) -> HttpError {
        tracing::warn!(error = %e, "the store cannot take the request");
        HttpError::StoreUnavailable {
            retry_after_secs: self.config.store.retry_after_secs,
        }
    }

    /// Lets `client` create `n` new UAIDs, or says in how many seconds it may (`Retry-After`).
    /// A client whose address is unknown is not limited.
    pub fn admit_new_uaids(&self, client: Option<IpAddr>, n: usize) -> Result<(), u64> {
        let (Some(buckets), Some(ip), true) = (&self.uaid_limit, client, n > 0) else {
            return Ok(());
        };
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        buckets.take_n(ip, n, Instant::now()).map_err(|wait| {
            tracing::debug!(%ip, n, "new UAIDs refused: over limits.uaid_rate_per_sec");
            crate::ratelimit::retry_after_secs(wait)
        })
    }

    /// The store's durability barrier, timed for `/metrics`.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.store.sync().await;
        self.metrics
            .store_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Completes when shutdown begins, if `enable`d (or first polled) before it began; check
    /// [`AppState::is_stopping`] after enabling it. For the WebSocket loop; see `stop`.
    pub fn stop_notified(&self) -> Notified<'_> {
        self.stop.notified()
    }

    /// Completes once shutdown has begun (at once if it already has).
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Begins shutdown: every socket, poll and background task is told to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        self.stop.notify_waiters();
    }

    /// How many sockets are open, watched (shutdown waits for zero).
    pub fn sockets(&self) -> watch::Receiver<usize> {
        self.sockets.subscribe()
    }

    /// Counts a socket as open until the guard drops.
    pub fn open_socket(self: &Arc<Self>) -> SocketGuard {
        self.sockets.send_modify(|n| *n += 1);
        self.metrics.connections.inc();
        SocketGuard(self.clone())
    }
}

/// An open socket, counted until dropped.
pub struct SocketGuard(Arc<AppState>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.sockets.send_modify(|n| *n -= 1);
        self.0.metrics.connections.dec();
    }
}
