//! The relay's book: every UAID it speaks for upstream, with the secret the upstream issued for
//! it, kept durably so that a restarted relay re-claims them all.
//!
//! A sled tree (`relay_uaids`: 16-byte UAID → the secret's text) in the node's one sled
//! database, so the group commit that makes a hello reply durable covers the book too. The
//! secrets are stored as the upstream issued them, in clear: the relay must present them again,
//! and anything that could decrypt them would sit in the same data dir (see `proto/relay.md`,
//! "What the data dir holds"). A copy in memory answers hellos without a tree read and keeps
//! the order the UAIDs were learnt in, so poll chunks stay stable while the book grows.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::watch;

use crate::ids::Uaid;
use crate::store::StoreError;

pub struct Book {
    tree: sled::Tree,
    /// UAID → secret, and the UAIDs in the order learnt. A std lock: held for map operations
    /// only, never across an await.
    entries: RwLock<Entries>,
    /// The number of UAIDs, watched by the poll transport (a new UAID restarts a poll).
    size: watch::Sender<usize>,
}

#[derive(Default)]
struct Entries {
    secrets: HashMap<Uaid, String>,
    order: Vec<Uaid>,
}

impl Book {
    /// Loads the book from its tree.
    pub fn open(tree: sled::Tree) -> Result<Book, StoreError> {
        let mut entries = Entries::default();
        for item in tree.iter() {
            let (key, value) = item?;
            let uaid = <[u8; 16]>::try_from(key.as_ref())
                .map(Uaid)
                .map_err(|_| StoreError::Corrupt("relay book key"))?;
            let secret =
                String::from_utf8(value.to_vec()).map_err(|_| StoreError::Corrupt("relay book secret"))?;
            entries.order.push(uaid);
            entries.secrets.insert(uaid, secret);
        }
        let size = watch::Sender::new(entries.order.len());
        Ok(Book {
            tree,
            entries: RwLock::new(entries),
            size,
        })
    }

    /// The secret the upstream accepted for `uaid`, if the relay speaks for it.
    pub fn secret(&self, uaid: &Uaid) -> Option<String> {
        self.read(|e| e.secrets.get(uaid).cloned())
    }

    /// Records that the upstream accepted `secret` for `uaid`. Not yet durable: the caller
    /// syncs the store before it hands the secret on. `true` if the UAID is new to the book.
    pub fn insert(&self, uaid: Uaid, secret: &str) -> Result<bool, StoreError> {
        if self.secret(&uaid).as_deref() == Some(secret) {
            return Ok(false);
        }
        self.tree.insert(uaid.as_bytes(), secret.as_bytes())?;
        let added = {
            let mut e = self.entries.write().unwrap_or_else(|p| p.into_inner());
            let added = e.secrets.insert(uaid, secret.to_owned()).is_none();
            if added {
                e.order.push(uaid);
            }
            added
        };
        if added {
            self.size.send_modify(|n| *n += 1);
        }
        Ok(added)
    }

    /// Every UAID with its secret, in the order learnt.
    pub fn all(&self) -> Vec<(Uaid, String)> {
        self.read(|e| {
            e.order
                .iter()
                .filter_map(|u| e.secrets.get(u).map(|s| (*u, s.clone())))
                .collect()
        })
    }

    pub fn len(&self) -> usize {
        self.read(|e| e.order.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes whenever a UAID is added.
    pub fn watch(&self) -> watch::Receiver<usize> {
        self.size.subscribe()
    }

    fn read<T>(&self, f: impl FnOnce(&Entries) -> T) -> T {
        f(&self.entries.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledDb;

    #[test]
    fn the_book_survives_a_reopen_in_the_order_learnt() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let db = SledDb::open(dir.path(), 1 << 20, std::time::Duration::from_secs(5)).unwrap();
            Book::open(db.tree("relay_uaids").unwrap()).unwrap()
        };
        let (a, b) = (Uaid::random(), Uaid::random());
        {
            let book = open();
            let grew = book.watch();
            assert!(book.insert(a, "sa").unwrap());
            assert!(book.insert(b, "sb").unwrap());
            assert!(!book.insert(a, "sa").unwrap(), "known already");
            assert!(grew.has_changed().unwrap());
            assert_eq!(book.all(), vec![(a, "sa".to_owned()), (b, "sb".to_owned())]);
            book.tree.flush().unwrap();
        }
        let book = open();
        assert_eq!(book.len(), 2);
        assert_eq!(book.secret(&b).as_deref(), Some("sb"));
        assert_eq!(book.secret(&Uaid::random()), None);
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
