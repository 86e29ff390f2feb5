//! Instant sync ("watch"): a registration that watches collections of a user's Sync storage gets
//! an edition event whenever one of them is written (proto/storage.md "Instant sync").
//!
//! A `register` may carry `"watch":{"token","collections"}`. [`check`] validates it and has the
//! storage service verify the token (the uid it proves) before the registration is made;
//! [`apply`] keeps it durably once the registration exists. The observer that [`install`] gives
//! the storage service runs after every durable storage write and raises an event through
//! [`events::raise`] (the PUT's path, so KICK and Redis routing apply) for each registration
//! watching that (uid, collection), whose version is the collection's new last-modified time in
//! milliseconds (strictly increasing per user, so a later write never loses to an earlier one).
//!
//! Watches are a small state family of their own ([`Watches`]): one sled tree in the database
//! the storage API lives in, since storage is per node and so are watches of it. A watch names
//! its registration's token, so it lives exactly as long as that registration: an unregister
//! drops it at once, and the observer drops a watch whose token no longer points at its
//! registration (expired as idle, unregistered on another path, re-registered anew).

use std::sync::Arc;

use serde_json::Value;

use crate::ids::{Appid, TokenId, Uaid};
use crate::push::delivery::Delivery;
use crate::push::events::{self, Outcome};
use crate::push::proto::EntryError;
use crate::state::AppState;
use crate::storage::Storage;
use crate::store::{now_ms, AnyStore, SledDb, Store, StoreError, TokenTarget, VersionReq};

/// What a user's registration watches: collections of one storage user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub uid: u64,
    /// Valid collection names, sorted, without duplicates.
    pub collections: Vec<String>,
}

/// What a register does to the registration's watch: like its kick, carried replaces,
/// `"watch":null` removes, absent keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchChange {
    Keep,
    Set(Watch),
    Clear,
}

/// One registration watching a (uid, collection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watcher {
    pub uaid: Uaid,
    pub appid: Appid,
    /// The registration's token when the watch was set.
    pub token: TokenId,
}

/// Validates a register's `watch` field and verifies its token, before anything is stored.
/// Shared by the WebSocket `register` and `POST /v1/register`.
pub fn check(state: &AppState, field: Option<&Value>) -> Result<WatchChange, EntryError> {
    let object = match field {
        None => return Ok(WatchChange::Keep),
        Some(Value::Null) => return Ok(WatchChange::Clear),
        Some(Value::Object(object)) => object,
        Some(_) => return Err(EntryError::InvalidWatch),
    };
    let token = object
        .get("token")
        .and_then(Value::as_str)
        .ok_or(EntryError::InvalidWatch)?;
    let names = object
        .get("collections")
        .and_then(Value::as_array)
        .filter(|names| !names.is_empty() && names.len() <= state.config.limits.max_watch_collections)
        .ok_or(EntryError::InvalidWatch)?;
    let mut collections = names
        .iter()
        .map(|name| {
            name.as_str()
                .filter(|name| crate::storage::bso::valid_collection(name))
                .map(str::to_owned)
                .ok_or(EntryError::InvalidWatch)
        })
        .collect::<Result<Vec<_>, _>>()?;
    collections.sort();
    collections.dedup();
    // Storage off on this node (or watches not kept) is the same answer as a bad token: no
    // storage here can vouch for it.
    let storage = state
        .storage
        .as_deref()
        .filter(|_| state.watches.is_some())
        .ok_or(EntryError::BadWatchToken)?;
    let uid = storage
        .verify_watch_token(token)
        .map_err(|_| EntryError::BadWatchToken)?;
    Ok(WatchChange::Set(Watch { uid, collections }))
}

/// Applies a checked change to the registration (`token` is its endpoint token, as the store's
/// register returned it) and makes it durable.
pub async fn apply(
    state: &AppState,
    uaid: Uaid,
    appid: Appid,
    token: TokenId,
    change: &WatchChange,
) -> Result<(), StoreError> {
    let Some(watches) = &state.watches else {
        return Ok(());
    };
    let wrote = match change {
        WatchChange::Keep => false,
        WatchChange::Set(watch) => watches.set(uaid, appid, Some((token, watch)))?,
        WatchChange::Clear => watches.set(uaid, appid, None)?,
    };
    if wrote {
        watches.sync().await?;
    }
    Ok(())
}

/// Drops the registration's watch (it was unregistered). Best effort: a watch left behind
/// names a token that is gone, and the observer drops it when it next finds it.
pub fn forget(state: &AppState, uaid: Uaid, appid: Appid) {
    if let Some(watches) = &state.watches {
        if let Err(e) = watches.set(uaid, appid, None) {
            tracing::warn!(error = %e, "dropping the watch of an unregistered registration failed");
        }
    }
}

/// Gives the storage service the observer that raises watchers' events through `delivery`;
/// `ttl_secs` is how long such an event stays pending (`limits.default_ttl_secs`). No cycle: the
/// storage service keeps the observer, which keeps the delivery part and the watches.
pub fn install(storage: &Storage, watches: &Watches, delivery: &Delivery, ttl_secs: u64) {
    let (watches, delivery) = (watches.clone(), delivery.clone());
    storage.set_observer(Arc::new(move |uid, collection: &str, modified| {
        let (watches, delivery) = (watches.clone(), delivery.clone());
        let collection = collection.to_owned();
        // Never on the storage request's path: it has answered once this runs.
        tokio::spawn(async move {
            raise_watchers(&watches, &delivery, ttl_secs, uid, &collection, modified).await
        });
    }));
}

/// Every `every` until shutdown, drops the watches whose registration is gone: expired as idle
/// (the store's sweep knows nothing of watches), or unregistered where [`forget`] did not run.
pub async fn sweep_loop(watches: Watches, delivery: Delivery, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stopping => return,
        }
        match sweep(&watches, &delivery.store).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(watches = n, "dropped the watches of gone registrations"),
            Err(e) => tracing::warn!(error = %e, "sweeping watches failed"),
        }
    }
}

/// Drops every watch whose token no longer points at its registration; returns how many.
pub async fn sweep(watches: &Watches, store: &AnyStore) -> Result<u64, StoreError> {
    let mut removed = 0;
    let mut after = None;
    loop {
        let (batch, next) = watches.registrations(after.as_deref(), SWEEP_BATCH)?;
        for w in batch {
            let live = match store.lookup_token(w.token).await? {
                TokenTarget::Active(uaid, appid) => (uaid, appid) == (w.uaid, w.appid),
                TokenTarget::Gone | TokenTarget::Unknown => false,
            };
            if !live && watches.remove_if(w.uaid, w.appid, w.token)? {
                removed += 1;
            }
        }
        match next {
            Some(key) => after = Some(key),
            None => return Ok(removed),
        }
    }
}

/// Watches one step of [`sweep`] reads at once.
const SWEEP_BATCH: usize = 1024;

/// Raises `modified` for every registration watching (`uid`, `collection`).
async fn raise_watchers(
    watches: &Watches,
    delivery: &Delivery,
    ttl_secs: u64,
    uid: u64,
    collection: &str,
    modified: u64,
) {
    let watchers = match watches.watchers(uid, collection) {
        Ok(watchers) => watchers,
        Err(e) => {
            tracing::warn!(error = %e, "reading storage watchers failed");
            return;
        }
    };
    let expires = now_ms().saturating_add(ttl_secs.saturating_mul(1000));
    for w in watchers {
        let live = match delivery.store.lookup_token(w.token).await {
            Ok(TokenTarget::Active(uaid, appid)) => (uaid, appid) == (w.uaid, w.appid),
            Ok(TokenTarget::Gone | TokenTarget::Unknown) => false,
            Err(e) => {
                tracing::warn!(error = %e, "reading a watcher's registration failed");
                continue;
            }
        };
        let outcome = if live {
            events::raise(delivery, w.uaid, w.appid, VersionReq::Exact(modified), expires).await
        } else {
            Ok(Outcome::Gone)
        };
        match outcome {
            Ok(Outcome::Gone) => {
                if let Err(e) = watches.remove_if(w.uaid, w.appid, w.token) {
                    tracing::warn!(error = %e, "dropping a stale watch failed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "raising a storage watch event failed"),
        }
    }
}

/// The watches, durable in one sled tree. Key shapes (one function each, below):
/// registration `0‖uaid‖appid` → token‖uid‖collections (0-separated); index
/// `1‖uid‖collection‖0‖uaid‖appid` → token. Collection names never contain a 0 byte.
#[derive(Clone)]
pub struct Watches {
    tree: sled::Tree,
    db: SledDb,
}

const REG: u8 = 0;
const INDEX: u8 = 1;

fn reg_key(uaid: Uaid, appid: Appid) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(REG);
    k.extend_from_slice(uaid.as_bytes());
    k.extend_from_slice(appid.as_bytes());
    k
}

/// Prefix of every index key of (uid, collection); ends with the separator.
fn index_prefix(uid: u64, collection: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + collection.len() + 32);
    k.push(INDEX);
    k.extend_from_slice(&uid.to_be_bytes());
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k
}

fn index_key(uid: u64, collection: &str, uaid: Uaid, appid: Appid) -> Vec<u8> {
    let mut k = index_prefix(uid, collection);
    k.extend_from_slice(uaid.as_bytes());
    k.extend_from_slice(appid.as_bytes());
    k
}

fn encode(token: TokenId, watch: &Watch) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + watch.collections.len() * 16);
    v.extend_from_slice(&token.0);
    v.extend_from_slice(&watch.uid.to_be_bytes());
    v.extend_from_slice(watch.collections.join("\0").as_bytes());
    v
}

fn decode(bytes: &[u8]) -> Result<(TokenId, Watch), StoreError> {
    let bad = || StoreError::Corrupt("watch");
    let token = TokenId(bytes.get(..16).and_then(|b| b.try_into().ok()).ok_or_else(bad)?);
    let uid = u64::from_be_bytes(
        bytes
            .get(16..24)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?,
    );
    let names = std::str::from_utf8(&bytes[24..]).map_err(|_| bad())?;
    let collections = names.split('\0').map(str::to_owned).collect();
    Ok((token, Watch { uid, collections }))
}

fn id16(bytes: &[u8]) -> Result<[u8; 16], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt("watch key"))
}

type TxResult<T> = sled::transaction::ConflictableTransactionResult<T, StoreError>;

fn tx_error(e: sled::transaction::TransactionError<StoreError>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => e.into(),
    }
}

impl Watches {
    /// The watch tree in `db` (the database the storage API lives in).
    pub fn open(db: &SledDb) -> Result<Watches, StoreError> {
        Ok(Watches {
            tree: db.tree("sync-watches")?,
            db: db.clone(),
        })
    }

    /// Replaces the registration's watch (`Some((its token, watch))`) or removes it (`None`),
    /// atomically with its index. `true` if anything changed. Not durable until [`Self::sync`].
    pub fn set(&self, uaid: Uaid, appid: Appid, new: Option<(TokenId, &Watch)>) -> Result<bool, StoreError> {
        let key = reg_key(uaid, appid);
        self.tree
            .transaction(|tx| -> TxResult<bool> {
                let old = tx.get(&key)?;
                let new_value = new.map(|(token, watch)| encode(token, watch));
                if old.as_deref() == new_value.as_deref() {
                    return Ok(false);
                }
                if let Some(old) = old {
                    let (_, watch) =
                        decode(&old).map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                    for c in &watch.collections {
                        tx.remove(index_key(watch.uid, c, uaid, appid))?;
                    }
                    tx.remove(key.clone())?;
                }
                if let (Some((token, watch)), Some(value)) = (new, new_value) {
                    for c in &watch.collections {
                        tx.insert(index_key(watch.uid, c, uaid, appid), &token.0[..])?;
                    }
                    tx.insert(key.clone(), value)?;
                }
                Ok(true)
            })
            .map_err(tx_error)
    }

    /// The registration's token and watch, if it has one.
    pub fn get(&self, uaid: Uaid, appid: Appid) -> Result<Option<(TokenId, Watch)>, StoreError> {
        self.tree
            .get(reg_key(uaid, appid))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Removes the registration's watch if it still names `token` (a register may have replaced
    /// it meanwhile). `true` if removed.
    pub fn remove_if(&self, uaid: Uaid, appid: Appid, token: TokenId) -> Result<bool, StoreError> {
        match self.get(uaid, appid)? {
            Some((current, _)) if current == token => {}
            _ => return Ok(false),
        }
        // A register racing this one only puts the watch back; fine either way.
        self.set(uaid, appid, None)
    }

    /// Every registration watching (`uid`, `collection`), by UAID and APPID.
    pub fn watchers(&self, uid: u64, collection: &str) -> Result<Vec<Watcher>, StoreError> {
        let prefix = index_prefix(uid, collection);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (key, token) = item?;
            let ids = &key[prefix.len()..];
            if ids.len() != 32 {
                return Err(StoreError::Corrupt("watch key"));
            }
            out.push(Watcher {
                uaid: Uaid(id16(&ids[..16])?),
                appid: Appid(id16(&ids[16..])?),
                token: TokenId(id16(&token)?),
            });
        }
        Ok(out)
    }

    /// Up to `n` registrations with a watch, in key order, after the key `after` (from the
    /// start if `None`), and the key to continue after if there may be more.
    #[allow(clippy::type_complexity)]
    pub fn registrations(
        &self,
        after: Option<&[u8]>,
        n: usize,
    ) -> Result<(Vec<Watcher>, Option<Vec<u8>>), StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Included(vec![REG]),
        };
        let mut out = Vec::new();
        for item in self
            .tree
            .range::<Vec<u8>, _>((start, Bound::Excluded(vec![REG + 1])))
        {
            let (key, value) = item?;
            if key.len() != 33 {
                return Err(StoreError::Corrupt("watch key"));
            }
            let (token, _) = decode(&value)?;
            out.push(Watcher {
                uaid: Uaid(id16(&key[1..17])?),
                appid: Appid(id16(&key[17..])?),
                token,
            });
            if out.len() == n {
                return Ok((out, Some(key.to_vec())));
            }
        }
        Ok((out, None))
    }

    /// Makes every change so far durable (the database's group commit).
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.db.committed(self.db.request_commit()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn watch(uid: u64, collections: &[&str]) -> Watch {
        Watch {
            uid,
            collections: collections.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// The sweep keeps the watches of live registrations and drops the others, across batches.
    #[tokio::test]
    async fn the_sweep_drops_only_watches_whose_registration_is_gone() {
        use crate::store::{KickChange, MemoryStore, Registered};
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1 << 20, Duration::from_secs(30)).unwrap();
        let store = AnyStore::Memory(MemoryStore::new());
        let watches = Watches::open(&db).unwrap();
        let w = watch(1, &["bookmarks"]);
        let mut live = Vec::new();
        for i in 0..(SWEEP_BATCH + 5) {
            let (uaid, appid) = (Uaid::random(), Appid::random());
            let token = if i % 2 == 0 {
                let registered = store
                    .register(uaid, appid, TokenId::random(), KickChange::Keep, 10)
                    .await
                    .unwrap();
                let Registered::Token(token) = registered else {
                    panic!()
                };
                live.push(appid);
                token
            } else {
                TokenId::random()
            };
            watches.set(uaid, appid, Some((token, &w))).unwrap();
        }
        let gone = SWEEP_BATCH + 5 - live.len();
        assert_eq!(sweep(&watches, &store).await.unwrap(), gone as u64);
        let mut left: Vec<Appid> = watches
            .watchers(1, "bookmarks")
            .unwrap()
            .iter()
            .map(|w| w.appid)
            .collect();
        left.sort_by_key(|a| *a.as_bytes());
        live.sort_by_key(|a| *a.as_bytes());
        assert_eq!(left, live);
        assert_eq!(sweep(&watches, &store).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn set_replaces_the_index_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (uaid, appid, token) = (Uaid::random(), Appid::random(), TokenId::random());
        let other = Appid::random();
        {
            let db = SledDb::open(dir.path(), 1 << 20, Duration::from_secs(30)).unwrap();
            let watches = Watches::open(&db).unwrap();
            let w = watch(7, &["bookmarks", "history"]);
            assert!(watches.set(uaid, appid, Some((token, &w))).unwrap());
            assert!(!watches.set(uaid, appid, Some((token, &w))).unwrap(), "unchanged");
            let w2 = watch(7, &["bookmarks", "tabs"]);
            assert!(watches.set(uaid, other, Some((token, &w2))).unwrap());
            let w3 = watch(7, &["history", "passwords"]);
            assert!(watches.set(uaid, appid, Some((token, &w3))).unwrap());
            watches.sync().await.unwrap();
        }
        let db = SledDb::open(dir.path(), 1 << 20, Duration::from_secs(30)).unwrap();
        let watches = Watches::open(&db).unwrap();
        let apps = |c: &str| -> Vec<Appid> {
            let mut v: Vec<Appid> = watches.watchers(7, c).unwrap().iter().map(|w| w.appid).collect();
            v.sort_by_key(|a| *a.as_bytes());
            v
        };
        assert_eq!(apps("bookmarks"), vec![other], "appid's old collection is gone");
        assert_eq!(apps("history"), vec![appid]);
        assert_eq!(apps("passwords"), vec![appid]);
        assert!(watches.watchers(8, "history").unwrap().is_empty(), "other uid");
        assert!(
            watches.watchers(7, "histor").unwrap().is_empty(),
            "a prefix is not a name"
        );
        assert_eq!(
            watches.get(uaid, appid).unwrap(),
            Some((token, watch(7, &["history", "passwords"])))
        );

        assert!(
            !watches.remove_if(uaid, appid, TokenId::random()).unwrap(),
            "another token"
        );
        assert!(watches.remove_if(uaid, appid, token).unwrap());
        assert!(apps("history").is_empty() && apps("passwords").is_empty());
        assert!(watches.set(uaid, other, None).unwrap());
        assert!(apps("bookmarks").is_empty() && apps("tabs").is_empty());
        assert!(!watches.set(uaid, other, None).unwrap(), "nothing to remove");
    }
}
