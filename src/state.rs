//! What request handlers and background tasks share, as parts: config, keys, metrics, the
//! delivery part (store, who holds which UAID, routes, kicks), the rate guards, the lifecycle,
//! and the optional storage API, watches and relay.
//!
//! The wiring in [`crate::server`] builds one [`AppState`] (a cheap handle on [`Shared`]) as the
//! router state and nothing here imports the wiring back. Every part is a cheap handle a handler extracts on its own
//! (`State<Delivery>`, `State<Guards>`, ... via [`FromRef`]), so it names what it uses: the PUT,
//! `/health` and `/metrics` take parts only, and so do background tasks (sweeps, routes, kicks,
//! watches, relay links). A connection's protocol ([`crate::push::session`], and the poll that
//! drives the same functions) uses nearly every part (limits, keys, delivery, relay, watches,
//! storage), so it takes the whole `AppState`.

mod guards;
mod lifecycle;

use std::sync::Arc;

use axum::extract::FromRef;

use crate::config::Config;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::push::delivery::Delivery;
use crate::push::route::NodeRoutes;
use crate::store::AnyStore;

pub use guards::Guards;
pub use lifecycle::Lifecycle;

/// The router's state: one `Arc`, so a connection keeps it for the price of a pointer.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl From<Shared> for AppState {
    fn from(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

/// Every part handlers share, each a cheap handle a handler may extract alone.
pub struct Shared {
    pub config: Arc<Config>,
    /// `config.public_url()`, computed once: it prefixes every endpoint.
    pub public_url: Arc<str>,
    pub keys: Arc<Keys>,
    /// The store and everything that moves an event to the connection holding its UAID.
    pub delivery: Delivery,
    pub metrics: Arc<Metrics>,
    /// The PUT and new-UAID rate guards.
    pub guards: Guards,
    /// Shutdown and the open-socket count.
    pub lifecycle: Lifecycle,
    /// The Sync 1.5 storage API, when `[storage] master_secret` is set (set by the wiring).
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Which registrations watch which storage collections (instant sync); set by the wiring
    /// with `storage`.
    pub watches: Option<crate::push::watch::Watches>,
    /// The upstream link and UAID book when this node is a relay (`relay.upstream` set); set by
    /// the wiring once, before the state is shared.
    pub relay: Option<Arc<crate::relay::Relay>>,
}

impl Shared {
    /// The parts over an opened store and keys; the wiring adds storage, watches and relay.
    pub fn new(config: Config, keys: Keys, store: AnyStore, routes: Option<Arc<NodeRoutes>>) -> Shared {
        let metrics = Arc::new(Metrics::default());
        let lifecycle = Lifecycle::default();
        let delivery = Delivery::new(
            store,
            routes,
            metrics.clone(),
            lifecycle.clone(),
            config.store.retry_after_secs,
        );
        Shared {
            public_url: config.public_url().into(),
            guards: Guards::new(&config.limits),
            config: Arc::new(config),
            keys: Arc::new(keys),
            delivery,
            metrics,
            lifecycle,
            storage: None,
            watches: None,
            relay: None,
        }
    }

    /// Counts a socket as open until the guard drops.
    pub fn open_socket(&self) -> SocketGuard {
        self.lifecycle.socket_opened();
        self.metrics.connections.inc();
        SocketGuard(self.lifecycle.clone(), self.metrics.clone())
    }
}

/// An open socket, counted until dropped.
pub struct SocketGuard(Lifecycle, Arc<Metrics>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.socket_closed();
        self.1.connections.dec();
    }
}

/// Implements `FromRef<AppState>` for each part: a handler takes `State<Part>`.
macro_rules! parts {
    ($($part:ty => $field:ident),* $(,)?) => {$(
        impl FromRef<AppState> for $part {
            fn from_ref(state: &AppState) -> Self {
                state.$field.clone()
            }
        }
    )*};
}

parts! {
    Arc<Config> => config,
    Arc<Keys> => keys,
    Delivery => delivery,
    Arc<Metrics> => metrics,
    Guards => guards,
    Lifecycle => lifecycle,
    Option<Arc<crate::relay::Relay>> => relay,
}
