//! The delivery part of the state: everything between "a version is stored" and "the connection
//! holding its UAID hears of it", with no HTTP, keys or protocol in it.
//!
//! [`Delivery`] holds the edition store, this node's [`Registry`] of who holds which UAID, the
//! cross-node routes (Redis), the KICK drivers for UAIDs nobody holds, and the metrics and
//! lifecycle those need. [`crate::push::events::raise`], the kick hooks, the Redis route tasks,
//! storage watch and the relay's upstream links take this part alone, so raising an event never
//! needs the whole server state. Connections ([`crate::push::session`], the poll) use it to
//! hold UAIDs ([`Delivery::hold`]) and read what is pending.

use std::ops::Deref;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use crate::http::HttpError;
use crate::ids::Uaid;
use crate::kick::Kicks;
use crate::metrics::Metrics;
use crate::push::events::Reached;
use crate::push::registry::{Durable, Mailbox, Registry};
use crate::push::route::{NodeRoutes, RouteEntry};
use crate::state::Lifecycle;
use crate::store::{AnyStore, Store, StoreError};

/// A cheap handle (one `Arc`): clones share one delivery part.
#[derive(Clone)]
pub struct Delivery(Arc<Parts>);

/// What a [`Delivery`] handle shares (reached through `Deref`).
pub struct Parts {
    pub store: AnyStore,
    /// Which connection on this node holds which UAID.
    pub registry: Registry,
    /// Which node holds which UAID, with the Redis store; `None` on sled (one node).
    pub routes: Option<Arc<NodeRoutes>>,
    /// The KICK drivers and their scheduler, set once at start-up by `push::wake::install`
    /// (their hooks hold this part weakly); unset, every kick is unsupported.
    pub kicks: OnceLock<Kicks>,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Lifecycle,
    /// `store.retry_after_secs`: what a 503 for a store failure asks clients to wait.
    retry_after_secs: u64,
}

impl Deref for Delivery {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// A [`Delivery`] held by something the delivery part owns (the kick hooks), so no cycle keeps
/// it alive.
#[derive(Clone)]
pub struct WeakDelivery(Weak<Parts>);

impl WeakDelivery {
    pub fn upgrade(&self) -> Option<Delivery> {
        self.0.upgrade().map(Delivery)
    }
}

impl Delivery {
    pub fn new(
        store: AnyStore,
        routes: Option<Arc<NodeRoutes>>,
        metrics: Arc<Metrics>,
        lifecycle: Lifecycle,
        retry_after_secs: u64,
    ) -> Delivery {
        Delivery(Arc::new(Parts {
            store,
            registry: Registry::default(),
            routes,
            kicks: OnceLock::new(),
            metrics,
            lifecycle,
            retry_after_secs,
        }))
    }

    pub fn downgrade(&self) -> WeakDelivery {
        WeakDelivery(Arc::downgrade(&self.0))
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

    /// The store's durability barrier, timed for `/metrics`.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.store.sync().await;
        self.metrics
            .store_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The one mapping of a store failure to an HTTP answer: logged, then 503 with Retry-After.
    /// (On a socket, the same failure is `WsError::StoreUnavailable`, see `session`.)
    pub fn unavailable(&self, e: StoreError) -> HttpError {
        tracing::warn!(error = %e, "the store cannot take the request");
        HttpError::StoreUnavailable {
            retry_after_secs: self.retry_after_secs,
        }
    }
}
