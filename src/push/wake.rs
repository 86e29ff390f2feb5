//! Waking clients that are away: the wiring between the push core and the KICK drivers of
//! [`crate::kick`] (a library that knows nothing of connections or stores).
//!
//! * Start-up: [`load_keys`] (the drivers' secrets, per backend) and [`install`] (drivers,
//!   scheduler and metrics, with hooks back into the [`Delivery`] part).
//! * hello/register: [`canonical`] checks a client's `kick` with the drivers; what is stored is
//!   the driver's canonical target.
//! * A raise that reached nobody: [`raised`] reads every distinct stored target of the UAID and
//!   hands them to the scheduler, in a task of its own, so the PUT never waits for it.
//! * A connection that takes a UAID: [`connected`] stops its kicks on this node; kicks on other
//!   nodes stop at their next attempt, when `still_away` sees the route.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::ids::Uaid;
use crate::kick::scheduler::Hooks;
use crate::kick::{Drivers, KickError, KickKeys, Kicks, SetupError, Target};
use crate::push::delivery::{Delivery, WeakDelivery};
use crate::store::{now_ms, AnyStore, Store};

/// The drivers' secrets: from config, else kept in the data dir (sled) or in Redis (shared by
/// every node); a memory store (tests) gets fresh ones.
pub async fn load_keys(config: &Config, store: &AnyStore) -> Result<KickKeys, SetupError> {
    match store {
        AnyStore::Redis(redis) => KickKeys::load_redis(&config.kick, redis).await,
        AnyStore::Sled(_) => {
            let (kick, dir) = (config.kick.clone(), config.server.data_dir.clone());
            // A small file read (or written, on first start) on the blocking pool.
            tokio::task::spawn_blocking(move || KickKeys::load(&kick, &dir))
                .await
                .map_err(|e| SetupError::Keys(e.to_string()))?
        }
        AnyStore::Memory(_) => KickKeys::resolve(&config.kick, &KickKeys::generate_text()?, "memory"),
    }
}

/// Builds the enabled drivers (`[kick.*]` of `config`) and the scheduler into `delivery` (once;
/// a second call is ignored). The hooks hold it weakly: it owns the scheduler that owns them.
pub fn install(delivery: &Delivery, config: &Config, keys: &KickKeys) -> Result<(), SetupError> {
    let weak = delivery.downgrade();
    let gone = weak.clone();
    let hooks = Hooks {
        on_gone: Arc::new(move |uaid, target: &Target| forget(&gone, uaid, target)),
        still_away: Arc::new(move |uaid| Box::pin(still_away(weak.clone(), uaid))),
    };
    let kicks = Kicks::new(&config.kick, keys, &delivery.metrics, hooks)?;
    let enabled: Vec<&str> = crate::kick::BUILT_IN
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| kicks.drivers.get(name).is_some())
        .collect();
    if !enabled.is_empty() {
        tracing::info!(drivers = ?enabled, "KICK drivers enabled");
    }
    let _ = delivery.kicks.set(kicks);
    Ok(())
}

/// No drivers: what a delivery part without [`install`] validates against (every kick unsupported).
static NO_DRIVERS: LazyLock<Arc<Drivers>> = LazyLock::new(Arc::default);

/// The enabled drivers (none if [`install`] did not run).
pub fn drivers(delivery: &Delivery) -> Arc<Drivers> {
    delivery
        .kicks
        .get()
        .map_or_else(|| NO_DRIVERS.clone(), |k| k.drivers.clone())
}

/// A client's `kick` object (already checked to be an object of bounded size), validated by
/// its driver: the canonical target JSON to store. May resolve the target's host name.
pub async fn canonical(delivery: &Delivery, kick: &Value) -> Result<Vec<u8>, KickError> {
    let target = drivers(delivery).validate(kick).await?;
    Ok(target.json().as_bytes().to_vec())
}

/// A raise for `uaid` reached no connection: kick every distinct stored target of its
/// registrations until the event expires at `expires_at_ms`. Returns at once; the store read
/// and the kicks run in a task.
pub fn raised(delivery: &Delivery, uaid: Uaid, expires_at_ms: u64) {
    let Some(kicks) = delivery.kicks.get() else {
        return;
    };
    if kicks.drivers.is_empty() {
        return;
    }
    let (delivery, scheduler) = (delivery.clone(), kicks.scheduler.clone());
    tokio::spawn(async move {
        let stored = match delivery.store.kicks(uaid).await {
            Ok(stored) => stored,
            Err(e) => {
                // The event stays pending; the client takes it when it comes back on its own.
                tracing::warn!(error = %e, "reading the kicks of an unheard event failed");
                return;
            }
        };
        let mut targets: Vec<Target> = Vec::new();
        for (_, bytes) in stored {
            match Target::from_stored(&bytes) {
                Some(t) if !targets.contains(&t) => targets.push(t),
                Some(_) => {}
                None => tracing::debug!("a stored kick is not a target; skipped"),
            }
        }
        let remaining = Duration::from_millis(expires_at_ms.saturating_sub(now_ms()));
        scheduler.raised(uaid, targets, remaining);
    });
}

/// A connection on this node now holds these UAIDs: their kicks here stop.
pub fn connected(delivery: &Delivery, uaids: &[Uaid]) {
    if let Some(kicks) = delivery.kicks.get() {
        for uaid in uaids {
            kicks.scheduler.connected(uaid);
        }
    }
}

/// Forgets debounce state that limits nothing any more (the sweeper calls it).
pub fn prune(delivery: &Delivery) {
    if let Some(kicks) = delivery.kicks.get() {
        kicks.scheduler.prune();
    }
}

/// `on_gone`: the driver says the target no longer exists; remove it from the UAID's
/// registrations, in a task (the hook must not block the kick task).
fn forget(delivery: &WeakDelivery, uaid: Uaid, target: &Target) {
    let Some(delivery) = delivery.upgrade() else {
        return;
    };
    let kick = target.json().as_bytes().to_vec();
    tokio::spawn(async move {
        match delivery.store.remove_kick(uaid, &kick).await {
            Ok(n) => tracing::info!(removed = n, "a kick target is gone; removed"),
            // Kept: the next kick gets the same answer and tries again.
            Err(e) => tracing::warn!(error = %e, "removing a gone kick failed"),
        }
    });
}

/// `still_away`: no connection on any node holds the UAID (this node's registry; on Redis its
/// route) and it still has an event pending. On an error, `true`: a needless kick is cheaper
/// than a missed one.
async fn still_away(delivery: WeakDelivery, uaid: Uaid) -> bool {
    let Some(delivery) = delivery.upgrade() else {
        return false;
    };
    if delivery.registry.is_held(&uaid) || delivery.lifecycle.is_stopping() {
        return false;
    }
    if let Some(routes) = &delivery.routes {
        match routes.is_routed(uaid).await {
            Ok(true) => return false,
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "route lookup for a kick failed"),
        }
    }
    match delivery.store.pending(uaid, now_ms()).await {
        Ok(events) => !events.is_empty(),
        Err(e) => {
            tracing::debug!(error = %e, "pending lookup for a kick failed");
            true
        }
    }
}
