//! Forgetting the UAIDs a relay's clients have abandoned. Without this the book only grows: a
//! device gone for good would be claimed upstream on every reconnect, and its secret kept, for
//! ever. Like the store's idle expiry (`limits.uaid_idle_days`, `Store::expire_idle`), every
//! `limits.sweep_interval_secs` the book entries unseen for the idle period
//! (`relay.book_idle_secs`, else `uaid_idle_days`) that no connection or poll on this relay
//! holds are dropped with their secrets and released upstream, in batches of at most
//! `limits.max_uaids_per_frame`, each on the blocking pool.
//!
//! Nothing is lost: the relay's store keeps such a UAID's registrations and pending events
//! (its own idle expiry deletes them later), events PUT meanwhile wait upstream, and a client
//! that comes back with its secret is claimed upstream again, as any UAID the relay does not
//! know.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Relay;
use crate::push::delivery::Delivery;
use crate::store::now_ms;

/// No forgetting this long after start (or for one idle period, when that is shorter): clients
/// that a restart (or an outage) cut off come back and are seen first, as for the store's idle
/// expiry.
const AFTER_START: Duration = Duration::from_secs(3600);

/// Sweeps until shutdown begins (at once when the relay never forgets).
pub async fn run(delivery: Delivery, relay: Arc<Relay>) {
    if relay.idle_ms == 0 {
        return;
    }
    let started = Instant::now();
    let grace = AFTER_START.min(Duration::from_millis(relay.idle_ms));
    let mut tick = tokio::time::interval(relay.sweep_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if started.elapsed() < grace {
                    continue;
                }
                // Each batch is whole; a sweep cut short goes on at the next tick.
                tokio::select! {
                    _ = sweep(&delivery, &relay) => {}
                    _ = &mut stopping => return,
                }
            }
            _ = &mut stopping => return,
        }
    }
}

/// One pass over the book.
async fn sweep(delivery: &Delivery, relay: &Arc<Relay>) {
    let now = now_ms();
    let before = now.saturating_sub(relay.idle_ms);
    let scan = relay.clone();
    let Ok(candidates) = tokio::task::spawn_blocking(move || scan.book.idle(before)).await else {
        tracing::warn!("relay: scanning the book for idle UAIDs failed");
        return;
    };
    let mut total = 0;
    for batch in candidates.chunks(relay.max_per_frame.max(1)) {
        let (r, d, batch) = (relay.clone(), delivery.clone(), batch.to_vec());
        let forget = move || r.book.forget(&batch, before, now, |u| d.registry.is_held(u));
        let forgotten = match tokio::task::spawn_blocking(forget).await {
            Ok(Ok(forgotten)) => forgotten,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relay: forgetting idle UAIDs failed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay: forgetting idle UAIDs failed");
                return;
            }
        };
        if forgotten.is_empty() {
            continue;
        }
        // Durable before the upstream hears of it: a crash now cannot bring them back to be
        // claimed again.
        if let Err(e) = delivery.sync().await {
            tracing::warn!(error = %e, "relay: committing the forgotten UAIDs failed");
            return;
        }
        total += forgotten.len();
        relay.release(forgotten);
    }
    if total > 0 {
        tracing::info!(
            uaids = total,
            "relay: forgot idle UAIDs and released them upstream"
        );
    }
}
