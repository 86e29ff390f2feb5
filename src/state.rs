//! What every request handler and background task shares: config, keys, the store, who holds
//! which UAID, metrics, and the shutdown signal.
//!
//! The wiring in [`crate::server`] builds one `Arc<AppState>` as the router state and nothing
//! here imports the wiring back. Parts that stand alone ([`Lifecycle`], [`Guards`]) are cheap
//! handles a handler extracts on its own (`State<Guards>`, via [`FromRef`]), so it names what it
//! uses; the rest (config, keys, store, registry, routes, kicks, watches, relay) is still reached
//! through `AppState`.

mod guards;
mod lifecycle;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::FromRef;

use crate::config::Config;
use crate::http::HttpError;
use crate::ids::Uaid;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::push::events::Reached;
use crate::push::registry::{Durable, Mailbox, Registry};
use crate::push::route::{NodeRoutes, RouteEntry};
use crate::store::{AnyStore, Store, StoreError};

pub use guards::Guards;
pub use lifecycle::Lifecycle;

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
    /// The PUT and new-UAID rate guards.
    pub guards: Guards,
    /// The KICK drivers and their scheduler, set once at start-up by `push::wake::install`
    /// (their hooks need this state's address); unset, every kick is unsupported.
    pub kicks: OnceLock<crate::kick::Kicks>,
    /// The Sync 1.5 storage API, when `[storage] master_secret` is set (set by the wiring).
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Which registrations watch which storage collections (instant sync); set by the wiring
    /// with `storage`.
    pub watches: Option<crate::push::watch::Watches>,
    /// The upstream link and UAID book when this node is a relay (`relay.upstream` set); set by
    /// the wiring once, before the state is shared.
    pub relay: Option<Arc<crate::relay::Relay>>,
    /// Shutdown and the open-socket count.
    pub lifecycle: Lifecycle,
}

impl AppState {
    /// The shared state over an opened store and keys.
    pub fn new(config: Config, keys: Keys, store: AnyStore, routes: Option<Arc<NodeRoutes>>) -> AppState {
        AppState {
            public_url: config.public_url(),
            guards: Guards::new(&config.limits),
            kicks: OnceLock::new(),
            storage: None,
            watches: None,
            config,
            keys,
            store,
            registry: Registry::default(),
            routes,
            relay: None,
            metrics: Metrics::default(),
            lifecycle: Lifecycle::default(),
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

    /// The store's durability barrier, timed for `/metrics`.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.store.sync().await;
        self.metrics
            .store_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Counts a socket as open until the guard drops.
    pub fn open_socket(self: &Arc<Self>) -> SocketGuard {
        self.lifecycle.socket_opened();
        self.metrics.connections.inc();
        SocketGuard(self.clone())
    }
}

/// An open socket, counted until dropped.
pub struct SocketGuard(Arc<AppState>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.lifecycle.socket_closed();
        self.0.metrics.connections.dec();
    }
}

/// Handlers that only watch shutdown take this part alone.
impl FromRef<Arc<AppState>> for Lifecycle {
    fn from_ref(state: &Arc<AppState>) -> Self {
        state.lifecycle.clone()
    }
}

/// Handlers that rate-limit take this part alone.
impl FromRef<Arc<AppState>> for Guards {
    fn from_ref(state: &Arc<AppState>) -> Self {
        state.guards.clone()
    }
}
