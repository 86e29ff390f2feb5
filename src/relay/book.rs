//! The relay's book: every UAID it speaks for upstream, with the secret the upstream issued for
//! it and when a downstream client last named it, kept durably so that a restarted relay
//! re-claims them all, and so that UAIDs nobody names any more can be forgotten.
//!
//! A sled tree (`relay_uaids`: 16-byte UAID → tag 1, "last seen" as 8 big-endian bytes of Unix
//! milliseconds, then the secret's text) in the node's one sled database, so the group commit
//! that makes a hello reply durable covers the book too. Entries written before "last seen" was
//! kept hold the secret's text alone (which never starts with byte 1: upstream secrets are
//! base64); they load as seen at open, and are rewritten so. The secrets are stored as the
//! upstream issued them, in clear: the relay must present them again, and anything that could
//! decrypt them would sit in the same data dir (see `proto/relay.md`, "What the data dir
//! holds"). A copy in memory answers hellos without a tree read and keeps the order the UAIDs
//! were learnt in, so poll chunks stay stable while the book grows.
//!
//! "Last seen" is exact in memory (every accepted check) and written to the tree at most once
//! per `write_every_ms` per UAID (a day, like the store's [`crate::store::TOUCH_EVERY_MS`]), so
//! a client's reconnect rate costs no writes. [`Book::forget`] takes the write lock and a check
//! the read lock: a UAID is either accepted (and so seen now, not idle) or forgotten (and so
//! unknown, claimed upstream again), never accepted and then forgotten under it.
//!
//! A UAID the upstream gave to a newer connection (its `released`) stays in the book, marked
//! released (tag 2 instead of 1, durable with the next commit): it is not re-claimed on
//! reconnect, and a client's check sends it upstream again, as an unknown UAID, whose claim
//! clears the mark.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use tokio::sync::watch;

use crate::ids::Uaid;
use crate::store::StoreError;

pub struct Book {
    tree: sled::Tree,
    /// UAID → entry, and the UAIDs in the order learnt. A std lock: held for map operations
    /// (and a bounded batch of tree writes when forgetting) only, never across an await.
    entries: RwLock<Entries>,
    /// Bumped whenever a UAID is added or forgotten, watched by the poll transport (its chunks
    /// change, so their polls restart).
    changes: watch::Sender<u64>,
    /// How stale the tree's "last seen" of a UAID may get before a check writes it again.
    write_every_ms: u64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Uaid, Entry>,
    order: Vec<Uaid>,
}

struct Entry {
    secret: String,
    /// When a downstream client last proved the UAID (Unix ms); atomics so that a check under
    /// the read lock records it.
    seen: AtomicU64,
    /// The "last seen" the tree holds.
    written: AtomicU64,
    /// The upstream gave the UAID to a newer connection; changed under the write lock only.
    released: bool,
}

impl Entry {
    fn new(secret: String, seen_ms: u64) -> Entry {
        Entry {
            secret,
            seen: AtomicU64::new(seen_ms),
            written: AtomicU64::new(seen_ms),
            released: false,
        }
    }
}

/// What the book says of a UAID and the secret a client gave for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Not in the book, or released upstream to a newer connection: ask the upstream.
    Unknown,
    /// The secret the upstream accepted; the UAID is seen now.
    Accepted,
    /// Another secret.
    Refused,
}

/// Tags a value that carries "last seen" before the secret.
const SEEN_TAG: u8 = 1;
/// Tags a value like [`SEEN_TAG`] whose UAID the upstream gave to a newer connection.
const RELEASED_TAG: u8 = 2;

fn encode(seen_ms: u64, secret: &str, released: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + secret.len());
    v.push(if released { RELEASED_TAG } else { SEEN_TAG });
    v.extend_from_slice(&seen_ms.to_be_bytes());
    v.extend_from_slice(secret.as_bytes());
    v
}

/// "Last seen" (`None` in a value written before it was kept), whether released, and the
/// secret.
fn decode(value: &[u8]) -> Result<(Option<u64>, bool, String), StoreError> {
    let (seen, released, secret) = match value {
        [tag @ (SEEN_TAG | RELEASED_TAG), rest @ ..] if rest.len() >= 8 => {
            let (ms, secret) = rest.split_at(8);
            let ms = <[u8; 8]>::try_from(ms).map_err(|_| StoreError::Corrupt("relay book seen"))?;
            (Some(u64::from_be_bytes(ms)), *tag == RELEASED_TAG, secret)
        }
        [SEEN_TAG | RELEASED_TAG, ..] => return Err(StoreError::Corrupt("relay book seen")),
        secret => (None, false, secret),
    };
    let secret = String::from_utf8(secret.to_vec()).map_err(|_| StoreError::Corrupt("relay book secret"))?;
    Ok((seen, released, secret))
}

impl Book {
    /// Loads the book from its tree; entries without "last seen" count as seen at `now_ms` and
    /// are rewritten so (durable with the next commit).
    pub fn open(tree: sled::Tree, now_ms: u64, write_every_ms: u64) -> Result<Book, StoreError> {
        let mut entries = Entries::default();
        let mut untagged = Vec::new();
        for item in tree.iter() {
            let (key, value) = item?;
            let uaid = <[u8; 16]>::try_from(key.as_ref())
                .map(Uaid)
                .map_err(|_| StoreError::Corrupt("relay book key"))?;
            let (seen, released, secret) = decode(&value)?;
            if seen.is_none() {
                untagged.push(uaid);
            }
            entries.order.push(uaid);
            let mut entry = Entry::new(secret, seen.unwrap_or(now_ms));
            entry.released = released;
            entries.map.insert(uaid, entry);
        }
        for uaid in untagged {
            if let Some(entry) = entries.map.get(&uaid) {
                tree.insert(uaid.as_bytes(), encode(now_ms, &entry.secret, false))?;
            }
        }
        Ok(Book {
            tree,
            entries: RwLock::new(entries),
            changes: watch::Sender::new(0),
            write_every_ms: write_every_ms.max(1),
        })
    }

    /// The secret the upstream accepted for `uaid`, if the relay speaks for it.
    pub fn secret(&self, uaid: &Uaid) -> Option<String> {
        self.read(|e| e.map.get(uaid).map(|entry| entry.secret.clone()))
    }

    /// Whether the relay speaks for `uaid`.
    pub fn contains(&self, uaid: &Uaid) -> bool {
        self.read(|e| e.map.contains_key(uaid))
    }

    /// Whether the upstream gave `uaid` to a newer connection and no client here named it since.
    pub fn is_released(&self, uaid: &Uaid) -> bool {
        self.read(|e| e.map.get(uaid).is_some_and(|entry| entry.released))
    }

    /// Checks `given` against the book's secret for `uaid` (in constant time); when it matches,
    /// the UAID is seen at `now_ms` (written to the tree if what it holds is stale; durable with
    /// the next commit).
    pub fn check(&self, uaid: &Uaid, given: &str, now_ms: u64) -> Result<Check, StoreError> {
        let e = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = e.map.get(uaid) else {
            return Ok(Check::Unknown);
        };
        if !same_secret(&entry.secret, given) {
            return Ok(Check::Refused);
        }
        if entry.released {
            return Ok(Check::Unknown);
        }
        self.seen(uaid, entry, now_ms)?;
        Ok(Check::Accepted)
    }

    /// Records `entry` seen at `now_ms`, writing the tree at most once per `write_every_ms`.
    /// The caller holds a lock on the entries, so the entry is not forgotten meanwhile.
    fn seen(&self, uaid: &Uaid, entry: &Entry, now_ms: u64) -> Result<(), StoreError> {
        entry.seen.fetch_max(now_ms, Ordering::Relaxed);
        let written = entry.written.load(Ordering::Relaxed);
        let stale = written.saturating_add(self.write_every_ms) <= now_ms;
        if stale
            && entry
                .written
                .compare_exchange(written, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let value = encode(now_ms, &entry.secret, entry.released);
            if let Err(e) = self.tree.insert(uaid.as_bytes(), value) {
                entry.written.store(written, Ordering::Relaxed);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Records that the upstream accepted `secret` for `uaid` at a client's request, seen at
    /// `now_ms` (nothing changes if the book has that already: the client's check saw it), no
    /// longer released. Not yet durable: the caller syncs the store before it hands the secret
    /// on. `true` if the UAID is new to the book.
    pub fn insert(&self, uaid: Uaid, secret: &str, now_ms: u64) -> Result<bool, StoreError> {
        let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if e.map
            .get(&uaid)
            .is_some_and(|entry| entry.secret == secret && !entry.released)
        {
            return Ok(false);
        }
        self.tree.insert(uaid.as_bytes(), encode(now_ms, secret, false))?;
        let added = e
            .map
            .insert(uaid, Entry::new(secret.to_owned(), now_ms))
            .is_none();
        if added {
            e.order.push(uaid);
        }
        drop(e);
        // A new secret for a known UAID changes what its poll carries, too.
        self.changes.send_modify(|n| *n += 1);
        Ok(added)
    }

    /// The upstream accepted a re-claim of `uaid` with `secret`: a changed secret replaces the
    /// book's (keeping "last seen"); a UAID no longer in the book (forgotten since the re-claim
    /// went out) is not added back.
    pub fn update(&self, uaid: Uaid, secret: &str) -> Result<(), StoreError> {
        let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = e.map.get_mut(&uaid) else {
            return Ok(());
        };
        if entry.secret == secret {
            return Ok(());
        }
        let seen = entry.written.load(Ordering::Relaxed);
        self.tree
            .insert(uaid.as_bytes(), encode(seen, secret, entry.released))?;
        entry.secret = secret.to_owned();
        drop(e);
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The upstream gave `uaids` to a newer connection: those in the book and not released yet
    /// are marked released (durable with the next commit), so the link stops re-claiming them
    /// until a client's claim [`Book::insert`]s them again. Returns the UAIDs marked.
    pub fn release(&self, uaids: &[Uaid]) -> Result<Vec<Uaid>, StoreError> {
        let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut marked = Vec::new();
        for uaid in uaids {
            let Some(entry) = e.map.get_mut(uaid).filter(|entry| !entry.released) else {
                continue;
            };
            let seen = entry.written.load(Ordering::Relaxed);
            self.tree
                .insert(uaid.as_bytes(), encode(seen, &entry.secret, true))?;
            entry.released = true;
            marked.push(*uaid);
        }
        Ok(marked)
    }

    /// The UAIDs last seen before `before_ms`, in the order learnt: candidates for
    /// [`Book::forget`].
    pub fn idle(&self, before_ms: u64) -> Vec<Uaid> {
        self.read(|e| {
            e.order
                .iter()
                .filter(|u| {
                    e.map
                        .get(u)
                        .is_some_and(|entry| entry.seen.load(Ordering::Relaxed) < before_ms)
                })
                .copied()
                .collect()
        })
    }

    /// Forgets those of `candidates` (a bounded batch) still last seen before `before_ms` that
    /// `held` does not claim, removing them from the tree (durable with the next commit); a
    /// held one is seen at `now_ms` instead, so a connection that stays up longer than the idle
    /// period leaves it a whole period. Returns the UAIDs forgotten.
    pub fn forget(
        &self,
        candidates: &[Uaid],
        before_ms: u64,
        now_ms: u64,
        held: impl Fn(&Uaid) -> bool,
    ) -> Result<Vec<Uaid>, StoreError> {
        let mut forgotten = Vec::new();
        let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let mut result = Ok(());
        for uaid in candidates {
            let Some(entry) = e.map.get(uaid) else { continue };
            if entry.seen.load(Ordering::Relaxed) >= before_ms {
                continue;
            }
            if held(uaid) {
                result = self.seen(uaid, entry, now_ms);
            } else {
                result = self
                    .tree
                    .remove(uaid.as_bytes())
                    .map(drop)
                    .map_err(StoreError::from);
                if result.is_ok() {
                    e.map.remove(uaid);
                    forgotten.push(*uaid);
                }
            }
            if result.is_err() {
                break;
            }
        }
        if !forgotten.is_empty() {
            let Entries { map, order } = &mut *e;
            order.retain(|u| map.contains_key(u));
            drop(e);
            self.changes.send_modify(|n| *n += 1);
        }
        result.map(|()| forgotten)
    }

    /// Every UAID with its secret, in the order learnt, but those released upstream: what the
    /// link claims.
    pub fn all(&self) -> Vec<(Uaid, String)> {
        self.read(|e| {
            e.order
                .iter()
                .filter_map(|u| {
                    e.map
                        .get(u)
                        .filter(|entry| !entry.released)
                        .map(|entry| (*u, entry.secret.clone()))
                })
                .collect()
        })
    }

    pub fn len(&self) -> usize {
        self.read(|e| e.order.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes whenever a UAID is added or forgotten.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn read<T>(&self, f: impl FnOnce(&Entries) -> T) -> T {
        f(&self.entries.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledDb;

    const DAY: u64 = 24 * 3600 * 1000;

    fn open(dir: &std::path::Path, now: u64) -> Book {
        let db = SledDb::open(dir, 1 << 20, std::time::Duration::from_secs(5)).unwrap();
        Book::open(db.tree("relay_uaids").unwrap(), now, DAY).unwrap()
    }

    #[test]
    fn the_book_survives_a_reopen_in_the_order_learnt() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uaid::random(), Uaid::random());
        {
            let book = open(dir.path(), 1000);
            let grew = book.watch();
            assert!(book.insert(a, "sa", 1000).unwrap());
            assert!(book.insert(b, "sb", 1000).unwrap());
            assert!(!book.insert(a, "sa", 1000).unwrap(), "known already");
            assert!(grew.has_changed().unwrap());
            assert_eq!(book.all(), vec![(a, "sa".to_owned()), (b, "sb".to_owned())]);
            book.tree.flush().unwrap();
        }
        let book = open(dir.path(), 2000);
        assert_eq!(book.len(), 2);
        assert_eq!(book.secret(&b).as_deref(), Some("sb"));
        assert_eq!(book.secret(&Uaid::random()), None);
        assert_eq!(book.idle(1001).len(), 2, "seen when learnt, not when loaded");
        assert!(book.idle(1000).is_empty());
    }

    #[test]
    fn checks_compare_secrets_and_record_the_time_seen() {
        let dir = tempfile::tempdir().unwrap();
        let book = open(dir.path(), 0);
        let (a, b) = (Uaid::random(), Uaid::random());
        book.insert(a, "sa", 10).unwrap();
        book.insert(b, "sb", 10).unwrap();
        assert_eq!(book.check(&Uaid::random(), "sa", 20).unwrap(), Check::Unknown);
        assert_eq!(book.check(&a, "sb", 20).unwrap(), Check::Refused);
        assert_eq!(book.idle(11), vec![a, b], "a wrong secret is not a sighting");
        assert_eq!(book.check(&a, "sa", 20).unwrap(), Check::Accepted);
        assert_eq!(book.idle(11), vec![b]);
        assert_eq!(book.idle(21), vec![a, b]);
    }

    /// "Last seen" is written at most once per `write_every_ms`, and what a restart reads is
    /// that: at most that much older than the truth.
    #[test]
    fn the_time_seen_is_written_at_most_once_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let a = Uaid::random();
        {
            let book = open(dir.path(), 0);
            book.insert(a, "sa", DAY).unwrap();
            book.check(&a, "sa", DAY + 5).unwrap();
            assert_eq!(book.idle(DAY + 6), vec![a]);
            assert!(book.idle(DAY + 5).is_empty(), "in memory: exact");
            book.tree.flush().unwrap();
        }
        {
            let book = open(dir.path(), 0);
            assert_eq!(book.idle(DAY + 1), vec![a], "not written: the same day");
            book.check(&a, "sa", 2 * DAY).unwrap();
            book.tree.flush().unwrap();
        }
        let book = open(dir.path(), 0);
        assert!(book.idle(2 * DAY).is_empty(), "written: a day later");
        assert_eq!(book.idle(2 * DAY + 1), vec![a]);
    }

    #[test]
    fn a_book_without_times_seen_loads_as_seen_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = Uaid::random();
        {
            let db = SledDb::open(dir.path(), 1 << 20, std::time::Duration::from_secs(5)).unwrap();
            let tree = db.tree("relay_uaids").unwrap();
            tree.insert(a.as_bytes(), "c2VjcmV0".as_bytes()).unwrap();
            tree.flush().unwrap();
        }
        {
            let book = open(dir.path(), 5 * DAY);
            assert_eq!(book.secret(&a).as_deref(), Some("c2VjcmV0"));
            assert!(book.idle(5 * DAY).is_empty());
            assert_eq!(book.idle(5 * DAY + 1), vec![a]);
            book.tree.flush().unwrap();
        }
        let book = open(dir.path(), 9 * DAY);
        assert_eq!(
            book.idle(5 * DAY + 1),
            vec![a],
            "rewritten with the time of the first open, not seen anew at each"
        );
    }

    #[test]
    fn idle_uaids_are_forgotten_unless_held_or_seen_since() {
        let dir = tempfile::tempdir().unwrap();
        let (idle, held, back, recent) = (Uaid::random(), Uaid::random(), Uaid::random(), Uaid::random());
        {
            let book = open(dir.path(), 0);
            for u in [idle, held, back] {
                book.insert(u, "s", 100).unwrap();
            }
            book.insert(recent, "s", 500).unwrap();
            let changes = book.watch();
            let candidates = book.idle(400);
            assert_eq!(candidates, vec![idle, held, back]);
            // `back` proves itself between the scan and the forgetting: it is kept.
            assert_eq!(book.check(&back, "s", 450).unwrap(), Check::Accepted);
            let forgotten = book.forget(&candidates, 400, 1000, |u| *u == held).unwrap();
            assert_eq!(forgotten, vec![idle]);
            assert!(changes.has_changed().unwrap());
            assert_eq!(book.check(&idle, "s", 1000).unwrap(), Check::Unknown);
            assert_eq!(book.len(), 3);
            assert!(
                book.idle(1000).iter().all(|u| *u != held),
                "held: seen at the sweep"
            );
            assert_eq!(
                book.all().iter().map(|(u, _)| *u).collect::<Vec<_>>(),
                vec![held, back, recent]
            );
            // It comes back with its secret: learnt again, at the end.
            assert!(book.insert(idle, "s", 1100).unwrap());
            assert_eq!(book.all().last().map(|(u, _)| *u), Some(idle));
            assert!(book.forget(&[idle], 400, 1200, |_| false).unwrap().is_empty());
            book.forget(&[idle], 1101, 1200, |_| false).unwrap();
            book.tree.flush().unwrap();
        }
        let book = open(dir.path(), 2000);
        assert_eq!(book.len(), 3, "forgetting is durable");
        assert_eq!(book.secret(&idle), None);
    }

    /// A re-claim on reconnect is no sighting, and brings back nothing forgotten meanwhile.
    #[test]
    fn a_reclaim_neither_counts_as_seen_nor_adds_back() {
        let dir = tempfile::tempdir().unwrap();
        let book = open(dir.path(), 0);
        let (a, gone) = (Uaid::random(), Uaid::random());
        book.insert(a, "sa", 100).unwrap();
        book.insert(gone, "sg", 100).unwrap();
        assert_eq!(book.forget(&[gone], 200, 300, |_| false).unwrap(), vec![gone]);
        book.update(gone, "sg").unwrap();
        assert_eq!(book.secret(&gone), None);
        book.update(a, "sa2").unwrap();
        assert_eq!(book.secret(&a).as_deref(), Some("sa2"));
        assert!(!book.insert(a, "sa2", 250).unwrap());
        assert_eq!(book.idle(200), vec![a], "still last seen at 100");
    }

    /// A UAID released upstream stays in the book (across a reopen) but is not claimed again
    /// until a client's check sends it upstream and its claim is learnt.
    #[test]
    fn a_released_uaid_waits_for_a_client_to_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Uaid::random(), Uaid::random());
        {
            let book = open(dir.path(), 0);
            book.insert(a, "sa", 100).unwrap();
            book.insert(b, "sb", 100).unwrap();
            assert_eq!(book.release(&[a, Uaid::random()]).unwrap(), vec![a]);
            assert!(book.release(&[a]).unwrap().is_empty(), "released already");
            book.tree.flush().unwrap();
        }
        let book = open(dir.path(), 0);
        assert_eq!(book.all(), vec![(b, "sb".to_owned())], "not re-claimed");
        assert!(book.contains(&a));
        assert!(book.is_released(&a) && !book.is_released(&b));
        assert_eq!(book.check(&a, "sx", 200).unwrap(), Check::Refused);
        assert_eq!(book.check(&a, "sa", 200).unwrap(), Check::Unknown, "ask upstream");
        let mut idle = book.idle(150);
        idle.sort_by_key(|u| *u.as_bytes());
        let mut both = vec![a, b];
        both.sort_by_key(|u| *u.as_bytes());
        assert_eq!(idle, both, "no sighting until learnt");
        assert!(!book.insert(a, "sa", 300).unwrap(), "not new to the book");
        assert_eq!(book.check(&a, "sa", 300).unwrap(), Check::Accepted);
        assert!(!book.is_released(&a), "learnt again");
        assert_eq!(book.all().len(), 2);
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
