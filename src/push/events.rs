//! Raising an event: the one path from "a new version exists" to the connection that must hear
//! it, without HTTP: [`raise`] takes the [`Delivery`] part alone. The PUT endpoint, the relay's
//! upstream links and storage watch call it.
//!
//! Order matters: compare-and-set in the store, wait for the group commit, and only then nudge
//! the connection holding the UAID (here or on another node) and report who was reached. When
//! nobody holds it, the registration's stored kick comes back with the result, for a KICK driver.

use crate::ids::{Appid, Uaid};
use crate::push::delivery::Delivery;
use crate::push::registry::Durable;
use crate::store::{PutOutcome, Store, StoreError, VersionReq};

/// Who heard about a raised event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// A connection on this node holds the UAID and was woken.
    Local,
    /// Another node holds it (or may: a failed cross-node nudge counts here, as that node's
    /// re-check finds the event) and was told over pub/sub.
    Remote,
    /// No connection holds it on any node (on Redis: no route entry for the UAID).
    Nobody,
}

/// A new pending event, committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    pub version: u64,
    pub reached: Reached,
    /// The registration's stored KICK settings (JSON) when `reached` is [`Reached::Nobody`] and
    /// it has some; read only then. (The kicks of all the UAID's registrations: `Store::kicks`.)
    pub kick: Option<Vec<u8>>,
}

/// What [`raise`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Raised(Raised),
    /// Nothing changed: a version at least this new is already known (and committed).
    Superseded(u64),
    /// The registration no longer exists.
    Gone,
    /// A server-picked version would leave the range JavaScript reads exactly.
    Exhausted,
}

/// Raises `request` for (`uaid`, `appid`), expiring at `expires_at_ms`. Both successes return
/// only once durable: a raised version, and the newer version a supersede reports (which
/// another request may have raised a moment ago and not yet committed). Whatever ends this
/// early (a store error after the write may have landed, the caller dropped) still wakes the
/// holder.
pub async fn raise(
    delivery: &Delivery,
    uaid: Uaid,
    appid: Appid,
    request: VersionReq,
    expires_at_ms: u64,
) -> Result<Outcome, StoreError> {
    // Read before the write, for the durable fact the nudge carries (see `Registry::fact_epoch`).
    let epoch = delivery.registry.fact_epoch();
    let mut nudge = NudgeOnDrop(Some((delivery.clone(), uaid)));
    let outcome = delivery
        .store
        .put_version(uaid, appid, request, expires_at_ms)
        .await?;
    let version = match outcome {
        PutOutcome::Raised(v) => v,
        PutOutcome::Superseded(current) => {
            nudge.0 = None;
            delivery.sync().await?;
            return Ok(Outcome::Superseded(current));
        }
        PutOutcome::Gone => {
            nudge.0 = None;
            return Ok(Outcome::Gone);
        }
        PutOutcome::Exhausted => {
            nudge.0 = None;
            return Ok(Outcome::Exhausted);
        }
    };
    delivery.sync().await?;
    // Committed now: a holder on this node may send it without a sync of its own.
    let durable = epoch.map(|epoch| Durable {
        appid,
        version,
        epoch,
    });
    let reached = delivery.nudge(uaid, durable).await;
    nudge.0 = None;
    if reached == Reached::Nobody {
        // Off this caller's path: a task reads the UAID's kicks and the scheduler runs them.
        crate::push::wake::raised(delivery, uaid, expires_at_ms);
    }
    let kick = match reached {
        Reached::Nobody => match delivery.store.kick(uaid, appid).await {
            Ok(kick) => kick,
            Err(e) => {
                // The event is committed; a kick not read only leaves the client to come back.
                tracing::warn!(error = %e, "reading the kick of a raised event failed");
                None
            }
        },
        Reached::Local | Reached::Remote => None,
    };
    Ok(Outcome::Raised(Raised {
        version,
        reached,
        kick,
    }))
}

/// A raised version must reach the connection holding its UAID even when the raise ends
/// before its nudge: the caller hung up during the commit or the nudge (the future is
/// dropped), or the store failed after the write may have landed. Dropped while set, this
/// nudges with no durable fact, so the holder reads the store and syncs itself before it sends
/// anything.
struct NudgeOnDrop(Option<(Delivery, Uaid)>);

impl Drop for NudgeOnDrop {
    fn drop(&mut self) {
        let Some((delivery, uaid)) = self.0.take() else {
            return;
        };
        if delivery.registry.nudge_with(uaid, None) {
            return;
        }
        // Another node may hold it (Redis): publish from a task, if the runtime still runs.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                delivery.nudge(uaid, None).await;
            });
        }
    }
}
