//! Which connection speaks for which UAID on this node, and how to nudge it.
//!
//! A PUT never writes to a socket. It stores the event, then marks the UAID dirty on the holding
//! connection's [`Mailbox`] and wakes it; the connection reads the store and sends. Marks are a
//! set, so a burst of PUTs to one UAID costs one store read, and a connection that does not keep
//! up holds at most one mark per UAID it speaks for: a slow reader cannot grow memory or stall a
//! PUT. A lost mark loses nothing either: the event is in the store and goes out on the next
//! hello, claim or ACK.
//!
//! A mark may carry a [`Durable`] fact: the (APPID, version) a PUT on this node raised and then
//! saw committed before it nudged. A connection whose reads are all covered by such facts needs
//! no group commit of its own before sending them (see `Session::send_pending_after`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::ids::{Appid, Uaid};

/// At most this many facts are kept per dirty UAID; more are dropped (dropping one only costs
/// the sync it would have saved).
const MAX_FACTS_PER_UAID: usize = 16;

/// "Version `version` of `appid` is committed", told by the PUT that raised it once its sync
/// returned. `epoch` is [`Registry::fact_epoch`] read before that PUT wrote: the fact speaks for
/// the registration that existed then, and only while no unregister has started since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durable {
    pub appid: Appid,
    pub version: u64,
    pub epoch: u64,
}

/// What other tasks leave for one connection.
#[derive(Default)]
pub struct Mailbox {
    /// std `Mutex`: held for a set insert or a swap, never across an `.await`.
    marks: Mutex<Marks>,
    /// Wakes the connection's task; a stored permit means no wake-up is missed.
    pub wake: Notify,
}

#[derive(Default)]
struct Marks {
    /// UAIDs with possibly new pending events, each with the durable facts told about it (at
    /// most one per APPID: the highest version).
    dirty: HashMap<Uaid, Vec<Durable>>,
    /// UAIDs a newer connection took from this one.
    lost: Vec<Uaid>,
}

/// What a connection finds in its mailbox.
#[derive(Default, Debug)]
pub struct Mail {
    pub dirty: Vec<Uaid>,
    /// The durable facts that came with the dirty marks (possibly none for a UAID).
    pub durable: HashMap<Uaid, Vec<Durable>>,
    pub lost: Vec<Uaid>,
}

impl Mail {
    /// Whether `events` of `uaid`, as just read from the store, are all known committed: each
    /// (APPID, version) has a fact with that same APPID and version, and no unregister has
    /// started since the fact's PUT (`registry` decides; see [`Registry::fact_epoch`]).
    pub fn covers(&self, registry: &Registry, uaid: &Uaid, events: &[(Appid, u64)]) -> bool {
        let Some(facts) = self.durable.get(uaid) else {
            return events.is_empty();
        };
        events.iter().all(|(appid, version)| {
            facts
                .iter()
                .any(|f| f.appid == *appid && f.version == *version && registry.fact_still_valid(f.epoch))
        })
    }
}

impl Mailbox {
    /// Marks `uaid` dirty, with nothing known about what is durable.
    pub fn mark_dirty(&self, uaid: Uaid) {
        self.mark(uaid, None);
    }

    /// Marks `uaid` dirty and, with `durable`, records that fact (keeping the highest version
    /// per APPID).
    pub fn mark(&self, uaid: Uaid, durable: Option<Durable>) {
        let inserted = {
            let mut marks = self.lock();
            let mut inserted = false;
            let facts = marks.dirty.entry(uaid).or_insert_with(|| {
                inserted = true;
                Vec::new()
            });
            if let Some(d) = durable {
                match facts.iter().position(|f| f.appid == d.appid) {
                    Some(i) if facts[i].version < d.version => facts[i] = d,
                    Some(_) => {}
                    None if facts.len() < MAX_FACTS_PER_UAID => facts.push(d),
                    None => {}
                }
            }
            inserted
        };
        if inserted {
            self.wake.notify_one();
        }
    }

    fn mark_lost(&self, uaid: Uaid) {
        self.lock().lost.push(uaid);
        self.wake.notify_one();
    }

    /// Takes everything left so far. The sets are moved out, not drained: an idle connection's
    /// mailbox keeps no capacity from its last delivery.
    pub fn take(&self) -> Mail {
        let mut marks = self.lock();
        let durable = std::mem::take(&mut marks.dirty);
        Mail {
            dirty: durable.keys().copied().collect(),
            durable,
            lost: std::mem::take(&mut marks.lost),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        // A panic while holding this lock cannot leave the sets inconsistent; keep going.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
struct Holder {
    conn_id: u64,
    mailbox: Arc<Mailbox>,
}

/// UAID → the connection holding it on this node.
#[derive(Default)]
pub struct Registry {
    holders: DashMap<Uaid, Holder>,
    next_conn_id: AtomicU64,
    /// Unregisters begun / finished on this node; see [`Registry::fact_epoch`].
    unregisters_started: AtomicU64,
    unregisters_finished: AtomicU64,
}

/// Counts one unregister as running until dropped; see [`Registry::unregistering`].
pub struct Unregistering<'a>(&'a Registry);

impl Drop for Unregistering<'_> {
    fn drop(&mut self) {
        self.0.unregisters_finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl Registry {
    /// A process-unique id for a new connection.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Makes `conn_id` the holder of `uaid`; a previous holder is told it lost it.
    pub fn claim(&self, uaid: Uaid, conn_id: u64, mailbox: &Arc<Mailbox>) {
        let previous = self.holders.insert(
            uaid,
            Holder {
                conn_id,
                mailbox: mailbox.clone(),
            },
        );
        if let Some(prev) = previous.filter(|p| p.conn_id != conn_id) {
            prev.mailbox.mark_lost(uaid);
        }
    }

    /// Removes the entry only if `conn_id` still holds it, so a connection that is closing never
    /// removes the newer connection that took its UAID.
    pub fn release(&self, uaid: Uaid, conn_id: u64) {
        self.holders.remove_if(&uaid, |_, h| h.conn_id == conn_id);
    }

    /// Takes `uaid` from `conn_id` (if it still holds it) because a connection on another node
    /// claimed it; the connection is told it lost it.
    pub fn evict(&self, uaid: Uaid, conn_id: u64) {
        if let Some((_, h)) = self.holders.remove_if(&uaid, |_, h| h.conn_id == conn_id) {
            h.mailbox.mark_lost(uaid);
        }
    }

    /// Takes `uaid` from whichever connection or poll holds it (a relay's upstream gave it to a
    /// newer connection elsewhere); that one is told it lost it. `true` if one held it.
    pub fn evict_holder(&self, uaid: Uaid) -> bool {
        match self.holders.remove(&uaid) {
            Some((_, h)) => {
                h.mailbox.mark_lost(uaid);
                true
            }
            None => false,
        }
    }

    /// Whether a connection or poll on this node holds `uaid`.
    pub fn is_held(&self, uaid: &Uaid) -> bool {
        self.holders.contains_key(uaid)
    }

    /// Whether `conn_id` is the current holder of `uaid`.
    pub fn is_held_by(&self, uaid: Uaid, conn_id: u64) -> bool {
        self.holders.get(&uaid).is_some_and(|h| h.conn_id == conn_id)
    }

    /// Tells the holder of `uaid`, if any, that it may have new events. `true` if one holds it.
    pub fn nudge(&self, uaid: Uaid) -> bool {
        self.nudge_with(uaid, None)
    }

    /// [`Self::nudge`], telling the holder a version that is already committed.
    pub fn nudge_with(&self, uaid: Uaid, durable: Option<Durable>) -> bool {
        match self.holders.get(&uaid) {
            Some(h) => {
                h.mailbox.mark(uaid, durable);
                true
            }
            None => false,
        }
    }

    /// Held across every unregister's store write: a registration can be removed (and then
    /// created again, its versions starting over) only while one is held.
    pub fn unregistering(&self) -> Unregistering<'_> {
        self.unregisters_started.fetch_add(1, Ordering::SeqCst);
        Unregistering(self)
    }

    /// The epoch a PUT reads before it writes, for the [`Durable`] fact it may tell later;
    /// `None` while an unregister runs. A fact is valid while [`Self::fact_still_valid`]: then no
    /// unregister ran between the PUT's write and the check, so an (APPID, version) read from
    /// the store is the one that PUT wrote, not the same number in a registration made again
    /// since (whose versions start over), which may not be committed yet.
    pub fn fact_epoch(&self) -> Option<u64> {
        let finished = self.unregisters_finished.load(Ordering::SeqCst);
        let started = self.unregisters_started.load(Ordering::SeqCst);
        (started == finished).then_some(started)
    }

    /// Whether no unregister has started on this node since `epoch` was read.
    pub fn fact_still_valid(&self, epoch: u64) -> bool {
        self.unregisters_started.load(Ordering::SeqCst) == epoch
    }

    /// UAIDs held on this node.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_claim_wins_and_old_release_keeps_it() {
        let reg = Registry::default();
        let u = Uaid::random();
        let (a, b) = (Arc::new(Mailbox::default()), Arc::new(Mailbox::default()));
        reg.claim(u, 1, &a);
        reg.claim(u, 2, &b);
        assert_eq!(a.take().lost, vec![u]);
        reg.release(u, 1);
        assert!(reg.nudge(u));
        assert_eq!(b.take().dirty, vec![u]);
        reg.release(u, 2);
        assert!(!reg.nudge(u));
    }

    #[test]
    fn evict_only_takes_from_the_named_connection() {
        let reg = Registry::default();
        let u = Uaid::random();
        let a = Arc::new(Mailbox::default());
        reg.claim(u, 1, &a);
        reg.evict(u, 2);
        assert!(reg.is_held_by(u, 1));
        reg.evict(u, 1);
        assert!(!reg.is_held_by(u, 1));
        assert_eq!(a.take().lost, vec![u]);
        reg.claim(u, 3, &a);
        assert!(reg.evict_holder(u));
        assert!(!reg.is_held(&u));
        assert_eq!(a.take().lost, vec![u]);
        assert!(!reg.evict_holder(u));
    }

    fn fact(appid: Appid, version: u64, epoch: u64) -> Option<Durable> {
        Some(Durable {
            appid,
            version,
            epoch,
        })
    }

    #[test]
    fn facts_keep_the_highest_version_per_appid() {
        let m = Mailbox::default();
        let (u, a, b) = (Uaid::random(), Appid::random(), Appid::random());
        m.mark(u, fact(a, 5, 0));
        m.mark(u, fact(a, 3, 0));
        m.mark(u, fact(b, 1, 0));
        m.mark(u, fact(a, 7, 0));
        m.mark_dirty(u);
        let d = m.take();
        assert_eq!(d.dirty, vec![u]);
        let mut facts = d.durable[&u].clone();
        facts.sort_by_key(|f| f.version);
        assert_eq!(
            facts.iter().map(|f| (f.appid, f.version)).collect::<Vec<_>>(),
            vec![(b, 1), (a, 7)]
        );
        // Taken with the mark: nothing is left for the next delivery.
        m.mark_dirty(u);
        assert!(m.take().durable[&u].is_empty());
        // Bounded per UAID.
        for _ in 0..100 {
            m.mark(u, fact(Appid::random(), 1, 0));
        }
        assert_eq!(m.take().durable[&u].len(), MAX_FACTS_PER_UAID);
    }

    #[test]
    fn coverage_needs_the_same_appid_and_version_and_no_unregister_since() {
        let reg = Registry::default();
        let m = Mailbox::default();
        let (u, other, a, b) = (Uaid::random(), Uaid::random(), Appid::random(), Appid::random());
        let epoch = reg.fact_epoch().unwrap();
        m.mark(u, fact(a, 7, epoch));
        m.mark_dirty(other);
        let d = m.take();
        assert!(d.covers(&reg, &u, &[(a, 7)]));
        assert!(d.covers(&reg, &u, &[]));
        assert!(!d.covers(&reg, &u, &[(a, 8)]), "newer than the fact");
        assert!(!d.covers(&reg, &u, &[(a, 6)]), "not the same version");
        assert!(!d.covers(&reg, &u, &[(a, 7), (b, 1)]), "one event without a fact");
        assert!(!d.covers(&reg, &other, &[(a, 7)]), "a nudge without facts");
        assert!(d.covers(&reg, &other, &[]));
        {
            let _running = reg.unregistering();
            assert_eq!(reg.fact_epoch(), None, "no facts while an unregister runs");
            assert!(!d.covers(&reg, &u, &[(a, 7)]));
        }
        assert!(!d.covers(&reg, &u, &[(a, 7)]), "an unregister ran since the fact");
        assert!(reg.fact_epoch().is_some());
    }

    #[test]
    fn marks_coalesce() {
        let m = Mailbox::default();
        let u = Uaid::random();
        for _ in 0..100 {
            m.mark_dirty(u);
        }
        assert_eq!(m.take().dirty.len(), 1);
    }
}
