//! Which connection speaks for which UAID on this node, and how to nudge it.
//!
//! A PUT never writes to a socket. It stores the event, then marks the UAID dirty on the holding
//! connection's [`Mailbox`] and wakes it; the connection reads the store and sends. Marks are a
//! set, so a burst of PUTs to one UAID costs one store read, and a connection that does not keep
//! up holds at most one mark per UAID it speaks for: a slow reader cannot grow memory or stall a
//! PUT. A lost mark loses nothing either: the event is in the store and goes out on the next
//! hello, claim or ACK.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::ids::Uaid;

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
    /// UAIDs with possibly new pending events.
    dirty: HashSet<Uaid>,
    /// UAIDs a newer connection took from this one.
    lost: Vec<Uaid>,
}

/// What a connection finds in its mailbox.
#[derive(Default, Debug)]
pub struct Delivery {
    pub dirty: Vec<Uaid>,
    pub lost: Vec<Uaid>,
}

impl Mailbox {
    pub fn mark_dirty(&self, uaid: Uaid) {
        let inserted = self.lock().dirty.insert(uaid);
        if inserted {
            self.wake.notify_one();
        }
    }

    fn mark_lost(&self, uaid: Uaid) {
        self.lock().lost.push(uaid);
        self.wake.notify_one();
    }

    /// Takes everything left so far.
    pub fn take(&self) -> Delivery {
        let mut marks = self.lock();
        Delivery {
            dirty: marks.dirty.drain().collect(),
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

    /// Whether `conn_id` is the current holder of `uaid`.
    pub fn is_held_by(&self, uaid: Uaid, conn_id: u64) -> bool {
        self.holders.get(&uaid).is_some_and(|h| h.conn_id == conn_id)
    }

    /// Tells the holder of `uaid`, if any, that it may have new events. `true` if one holds it.
    pub fn nudge(&self, uaid: Uaid) -> bool {
        match self.holders.get(&uaid) {
            Some(h) => {
                h.mailbox.mark_dirty(uaid);
                true
            }
            None => false,
        }
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
