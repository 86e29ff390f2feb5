//! The storage API's state family: the [`StorageStore`] trait, its types, and the key-value
//! implementation shared by the sled store ([`SledStorage`]) and the in-memory one
//! ([`MemoryStorage`]).
//!
//! The trait is a small set of reads plus one atomic [`StorageStore::apply`] of a list of
//! [`Change`]s and one durability barrier, [`StorageStore::commit`]. Everything Sync-specific
//! (timestamps, merging partial updates, expiry, paging) is in the service above it, which
//! also serialises the writes of each user, so a backend needs no compare-and-swap. A
//! PostgreSQL backend implements the same trait and passes the same suite
//! (tests/storage_store_suite).
//!
//! Keys (one function per shape, see [`keys`]): user `uid‖0`, collection `uid‖1‖name`, record
//! `uid‖2‖name‖0‖id`, batch `uid‖3‖batch`, batch item `uid‖4‖batch‖0‖seq`, with `uid` big-endian,
//! so one user's state is one contiguous range.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use crate::store::SledDb;

#[derive(Debug, thiserror::Error)]
pub enum StorageStoreError {
    #[error("storage store I/O: {0}")]
    Io(String),
    #[error("storage record is corrupt: {0}")]
    Corrupt(&'static str),
}

impl From<sled::Error> for StorageStoreError {
    fn from(e: sled::Error) -> Self {
        StorageStoreError::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StorageStoreError>;

/// "Never expires".
pub const NO_EXPIRY: u64 = u64::MAX;

/// A stored record. Times in ms.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBso {
    pub modified: u64,
    /// When it stops being visible; [`NO_EXPIRY`] for never.
    pub expiry: u64,
    pub sortindex: Option<i32>,
    pub payload: String,
}

/// A stored record without its payload: what listings filter and sort on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BsoMeta {
    pub modified: u64,
    pub expiry: u64,
    pub sortindex: Option<i32>,
    pub payload_len: u64,
}

impl StoredBso {
    pub fn meta(&self) -> BsoMeta {
        BsoMeta {
            modified: self.modified,
            expiry: self.expiry,
            sortindex: self.sortindex,
            payload_len: self.payload.len() as u64,
        }
    }
}

/// An uncommitted batch upload.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMeta {
    pub collection: String,
    /// When it stops being usable, in ms.
    pub expiry: u64,
    /// Records and payload bytes collected so far (for the total limits).
    pub records: u64,
    pub bytes: u64,
}

/// One part of an atomic write.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    SetUserModified(u64),
    SetCollectionModified {
        collection: String,
        modified: u64,
    },
    Put {
        collection: String,
        id: String,
        bso: StoredBso,
    },
    Delete {
        collection: String,
        id: String,
    },
    /// The collection, its records and its modified time.
    DeleteCollection {
        collection: String,
    },
    /// Every collection, record and batch of the user (the user's modified time stays).
    DeleteAll,
    /// [`Change::DeleteAll`] but for one record: the record `collection/id` stays, and so does
    /// its collection's modified time while that record exists (without it the collection
    /// goes too). The user's modified time stays. (The 2.0 wishlist's "delete everything
    /// except meta/global".)
    DeleteAllExcept {
        collection: String,
        id: String,
    },
    PutBatch {
        batch: String,
        meta: BatchMeta,
    },
    /// Appends an item (a serialised [`super::bso::BsoIn`]) at position `seq`.
    AppendBatch {
        batch: String,
        seq: u64,
        item: Vec<u8>,
    },
    /// The batch and its items.
    DeleteBatch {
        batch: String,
    },
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SweepStats {
    pub records: u64,
    pub batches: u64,
}

pub type CommitFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Durable state of the storage API. Reads return what is stored, expired or not: expiry is
/// the service's business (and the sweep's).
pub trait StorageStore: Send + Sync + 'static {
    /// The user's last write time, if the user ever wrote.
    fn user_modified(&self, uid: u64) -> Result<Option<u64>>;
    /// Every collection of the user with its modified time, by name.
    fn collections(&self, uid: u64) -> Result<Vec<(String, u64)>>;
    fn collection_modified(&self, uid: u64, collection: &str) -> Result<Option<u64>>;
    fn get(&self, uid: u64, collection: &str, id: &str) -> Result<Option<StoredBso>>;
    /// Every record of the collection, by id.
    fn scan(&self, uid: u64, collection: &str) -> Result<Vec<(String, StoredBso)>>;
    /// Every record of the collection without payloads, by id: a listing of a large collection
    /// copies only the page it answers with.
    fn scan_meta(&self, uid: u64, collection: &str) -> Result<Vec<(String, BsoMeta)>>;
    fn batch(&self, uid: u64, batch: &str) -> Result<Option<BatchMeta>>;
    /// The batch's items in `seq` order.
    fn batch_items(&self, uid: u64, batch: &str) -> Result<Vec<Vec<u8>>>;
    /// Applies `changes` in order, all or none (also across a crash).
    fn apply(&self, uid: u64, changes: &[Change]) -> Result<()>;
    /// Resolves once every change applied before the call is durable.
    fn commit(&self) -> CommitFuture<'_>;
    /// Deletes records and batches that expired before `now`.
    fn sweep(&self, now: u64) -> Result<SweepStats>;
}

/// Key shapes. Collection names and batch ids never contain a 0 byte (validated), ids neither.
pub mod keys {
    pub const USER: u8 = 0;
    pub const COLLECTION: u8 = 1;
    pub const RECORD: u8 = 2;
    pub const BATCH: u8 = 3;
    pub const BATCH_ITEM: u8 = 4;

    pub fn user_prefix(uid: u64) -> Vec<u8> {
        uid.to_be_bytes().to_vec()
    }

    fn tagged(uid: u64, tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = user_prefix(uid);
        k.push(tag);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(part);
        }
        k
    }

    pub fn user(uid: u64) -> Vec<u8> {
        tagged(uid, USER, &[])
    }

    pub fn collection(uid: u64, name: &str) -> Vec<u8> {
        tagged(uid, COLLECTION, &[name.as_bytes()])
    }

    /// Prefix of every collection key of the user.
    pub fn collections(uid: u64) -> Vec<u8> {
        tagged(uid, COLLECTION, &[])
    }

    pub fn record(uid: u64, collection: &str, id: &str) -> Vec<u8> {
        tagged(uid, RECORD, &[collection.as_bytes(), id.as_bytes()])
    }

    /// Prefix of every record key of the collection (ends with the separator).
    pub fn records(uid: u64, collection: &str) -> Vec<u8> {
        tagged(uid, RECORD, &[collection.as_bytes(), b""])
    }

    pub fn batch(uid: u64, batch: &str) -> Vec<u8> {
        tagged(uid, BATCH, &[batch.as_bytes()])
    }

    pub fn batch_item(uid: u64, batch: &str, seq: u64) -> Vec<u8> {
        tagged(uid, BATCH_ITEM, &[batch.as_bytes(), &seq.to_be_bytes()])
    }

    /// Prefix of every item key of the batch (ends with the separator).
    pub fn batch_items(uid: u64, batch: &str) -> Vec<u8> {
        tagged(uid, BATCH_ITEM, &[batch.as_bytes(), b""])
    }
}

mod codec {
    use super::{BatchMeta, BsoMeta, StorageStoreError, StoredBso};

    fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
        bytes.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes)
    }

    pub fn encode_u64(v: u64) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    pub fn decode_u64(bytes: &[u8]) -> Result<u64, StorageStoreError> {
        u64_at(bytes, 0).ok_or(StorageStoreError::Corrupt("timestamp"))
    }

    /// modified ‖ expiry ‖ has-sortindex ‖ sortindex ‖ payload.
    pub fn encode_bso(b: &StoredBso) -> Vec<u8> {
        let mut v = Vec::with_capacity(21 + b.payload.len());
        v.extend_from_slice(&b.modified.to_be_bytes());
        v.extend_from_slice(&b.expiry.to_be_bytes());
        v.push(u8::from(b.sortindex.is_some()));
        v.extend_from_slice(&b.sortindex.unwrap_or(0).to_be_bytes());
        v.extend_from_slice(b.payload.as_bytes());
        v
    }

    pub fn decode_bso(bytes: &[u8]) -> Result<StoredBso, StorageStoreError> {
        let bad = StorageStoreError::Corrupt("record");
        let modified = u64_at(bytes, 0).ok_or(StorageStoreError::Corrupt("record"))?;
        let expiry = u64_at(bytes, 8).ok_or(StorageStoreError::Corrupt("record"))?;
        let has = *bytes.get(16).ok_or(StorageStoreError::Corrupt("record"))?;
        let index: [u8; 4] = bytes
            .get(17..21)
            .and_then(|s| s.try_into().ok())
            .ok_or(StorageStoreError::Corrupt("record"))?;
        let payload = std::str::from_utf8(&bytes[21..]).map_err(|_| bad)?.to_owned();
        Ok(StoredBso {
            modified,
            expiry,
            sortindex: (has == 1).then(|| i32::from_be_bytes(index)),
            payload,
        })
    }

    pub fn decode_meta(bytes: &[u8]) -> Result<BsoMeta, StorageStoreError> {
        let bad = || StorageStoreError::Corrupt("record");
        let index: [u8; 4] = bytes
            .get(17..21)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(bad)?;
        Ok(BsoMeta {
            modified: u64_at(bytes, 0).ok_or_else(bad)?,
            expiry: u64_at(bytes, 8).ok_or_else(bad)?,
            sortindex: (*bytes.get(16).ok_or_else(bad)? == 1).then(|| i32::from_be_bytes(index)),
            payload_len: (bytes.len() - 21) as u64,
        })
    }

    /// expiry ‖ records ‖ bytes ‖ collection.
    pub fn encode_batch(m: &BatchMeta) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + m.collection.len());
        v.extend_from_slice(&m.expiry.to_be_bytes());
        v.extend_from_slice(&m.records.to_be_bytes());
        v.extend_from_slice(&m.bytes.to_be_bytes());
        v.extend_from_slice(m.collection.as_bytes());
        v
    }

    pub fn decode_batch(bytes: &[u8]) -> Result<BatchMeta, StorageStoreError> {
        let bad = || StorageStoreError::Corrupt("batch");
        Ok(BatchMeta {
            expiry: u64_at(bytes, 0).ok_or_else(bad)?,
            records: u64_at(bytes, 8).ok_or_else(bad)?,
            bytes: u64_at(bytes, 16).ok_or_else(bad)?,
            collection: std::str::from_utf8(bytes.get(24..).ok_or_else(bad)?)
                .map_err(|_| bad())?
                .to_owned(),
        })
    }
}

/// Called with each key and value of a [`Kv::visit_prefix`].
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// An ordered key-value space with atomic multi-key writes: what [`KvStorage`] needs.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Calls `f` with every key and value under `prefix`, in key order, without copying them.
    fn visit_prefix(&self, prefix: &[u8], f: &mut Visitor<'_>) -> Result<()>;
    /// Every key, for the sweep (in chunks would be kinder; fine at one node's scale).
    fn scan_all(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Sets (`Some`) or removes (`None`) every key, atomically.
    fn write(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()>;
    fn commit(&self) -> CommitFuture<'_>;
}

/// [`StorageStore`] over any [`Kv`].
pub struct KvStorage<K: Kv> {
    kv: K,
}

impl<K: Kv> KvStorage<K> {
    pub fn new(kv: K) -> Self {
        KvStorage { kv }
    }
}

fn suffix_str(key: &[u8], prefix_len: usize) -> Result<String> {
    String::from_utf8(key[prefix_len..].to_vec()).map_err(|_| StorageStoreError::Corrupt("key"))
}

impl<K: Kv> StorageStore for KvStorage<K> {
    fn user_modified(&self, uid: u64) -> Result<Option<u64>> {
        self.kv
            .get(&keys::user(uid))?
            .map(|v| codec::decode_u64(&v))
            .transpose()
    }

    fn collections(&self, uid: u64) -> Result<Vec<(String, u64)>> {
        let prefix = keys::collections(uid);
        self.kv
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(k, v)| Ok((suffix_str(&k, prefix.len())?, codec::decode_u64(&v)?)))
            .collect()
    }

    fn collection_modified(&self, uid: u64, collection: &str) -> Result<Option<u64>> {
        self.kv
            .get(&keys::collection(uid, collection))?
            .map(|v| codec::decode_u64(&v))
            .transpose()
    }

    fn get(&self, uid: u64, collection: &str, id: &str) -> Result<Option<StoredBso>> {
        self.kv
            .get(&keys::record(uid, collection, id))?
            .map(|v| codec::decode_bso(&v))
            .transpose()
    }

    fn scan(&self, uid: u64, collection: &str) -> Result<Vec<(String, StoredBso)>> {
        let prefix = keys::records(uid, collection);
        self.kv
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(k, v)| Ok((suffix_str(&k, prefix.len())?, codec::decode_bso(&v)?)))
            .collect()
    }

    fn scan_meta(&self, uid: u64, collection: &str) -> Result<Vec<(String, BsoMeta)>> {
        let prefix = keys::records(uid, collection);
        let mut out = Vec::new();
        self.kv.visit_prefix(&prefix, &mut |k, v| {
            out.push((suffix_str(k, prefix.len())?, codec::decode_meta(v)?));
            Ok(())
        })?;
        Ok(out)
    }

    fn batch(&self, uid: u64, batch: &str) -> Result<Option<BatchMeta>> {
        self.kv
            .get(&keys::batch(uid, batch))?
            .map(|v| codec::decode_batch(&v))
            .transpose()
    }

    fn batch_items(&self, uid: u64, batch: &str) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .kv
            .scan_prefix(&keys::batch_items(uid, batch))?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn apply(&self, uid: u64, changes: &[Change]) -> Result<()> {
        let mut ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::SetUserModified(ms) => ops.push((keys::user(uid), Some(codec::encode_u64(*ms)))),
                Change::SetCollectionModified { collection, modified } => {
                    ops.push((
                        keys::collection(uid, collection),
                        Some(codec::encode_u64(*modified)),
                    ));
                }
                Change::Put { collection, id, bso } => {
                    ops.push((keys::record(uid, collection, id), Some(codec::encode_bso(bso))));
                }
                Change::Delete { collection, id } => ops.push((keys::record(uid, collection, id), None)),
                Change::DeleteCollection { collection } => {
                    ops.push((keys::collection(uid, collection), None));
                    for (k, _) in self.kv.scan_prefix(&keys::records(uid, collection))? {
                        ops.push((k, None));
                    }
                }
                Change::DeleteAll => {
                    let user = keys::user(uid);
                    for (k, _) in self.kv.scan_prefix(&keys::user_prefix(uid))? {
                        if k != user {
                            ops.push((k, None));
                        }
                    }
                }
                Change::DeleteAllExcept { collection, id } => {
                    let user = keys::user(uid);
                    let record = keys::record(uid, collection, id);
                    let kept_collection = keys::collection(uid, collection);
                    // On the state the changes before this one leave, as every change sees it.
                    let kept = match pending(&ops, &record) {
                        Some(exists) => exists,
                        None => self.kv.get(&record)?.is_some(),
                    };
                    let stays = |k: &[u8]| {
                        k == user.as_slice()
                            || (kept && (k == record.as_slice() || k == kept_collection.as_slice()))
                    };
                    let earlier: Vec<Vec<u8>> = ops
                        .iter()
                        .filter(|(_, v)| v.is_some())
                        .map(|(k, _)| k.clone())
                        .collect();
                    let stored = self.kv.scan_prefix(&keys::user_prefix(uid))?;
                    for k in stored.into_iter().map(|(k, _)| k).chain(earlier) {
                        if !stays(&k) {
                            ops.push((k, None));
                        }
                    }
                }
                Change::PutBatch { batch, meta } => {
                    ops.push((keys::batch(uid, batch), Some(codec::encode_batch(meta))));
                }
                Change::AppendBatch { batch, seq, item } => {
                    ops.push((keys::batch_item(uid, batch, *seq), Some(item.clone())));
                }
                Change::DeleteBatch { batch } => {
                    ops.push((keys::batch(uid, batch), None));
                    for (k, _) in self.kv.scan_prefix(&keys::batch_items(uid, batch))? {
                        ops.push((k, None));
                    }
                }
            }
        }
        self.kv.write(ops)
    }

    fn commit(&self) -> CommitFuture<'_> {
        self.kv.commit()
    }

    fn sweep(&self, now: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        let mut ops = Vec::new();
        let mut dead_batches: Vec<Vec<u8>> = Vec::new();
        for (k, v) in self.kv.scan_all()? {
            match k.get(8) {
                Some(&keys::RECORD) if codec::decode_bso(&v)?.expiry <= now => {
                    stats.records += 1;
                    ops.push((k, None));
                }
                Some(&keys::BATCH) if codec::decode_batch(&v)?.expiry <= now => {
                    stats.batches += 1;
                    // Its items: the same uid and batch id under the item tag.
                    let mut items = k.clone();
                    items[8] = keys::BATCH_ITEM;
                    items.push(0);
                    dead_batches.push(items);
                    ops.push((k, None));
                }
                _ => {}
            }
        }
        for prefix in dead_batches {
            for (k, _) in self.kv.scan_prefix(&prefix)? {
                ops.push((k, None));
            }
        }
        if !ops.is_empty() {
            self.kv.write(ops)?;
        }
        Ok(stats)
    }
}

/// Whether `key` exists after `ops` (the last op on it wins); `None` when they do not touch it.
fn pending(ops: &[(Vec<u8>, Option<Vec<u8>>)], key: &[u8]) -> Option<bool> {
    ops.iter()
        .rev()
        .find(|(k, _)| k.as_slice() == key)
        .map(|(_, v)| v.is_some())
}

/// In-memory [`Kv`]: for tests, and a model of the semantics.
#[derive(Default)]
pub struct MemoryKv {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

pub type MemoryStorage = KvStorage<MemoryKv>;

impl MemoryStorage {
    pub fn memory() -> MemoryStorage {
        KvStorage::new(MemoryKv::default())
    }
}

impl Kv for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn visit_prefix(&self, prefix: &[u8], f: &mut Visitor<'_>) -> Result<()> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            f(k, v)?;
        }
        Ok(())
    }

    fn scan_all(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_prefix(&[])
    }

    fn write(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn commit(&self) -> CommitFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// sled [`Kv`]: one tree on the node's shared [`SledDb`] (its atomic batches, and its group
/// commit, which every state family in that database shares: one fsync covers them all).
pub struct SledKv {
    tree: sled::Tree,
    db: SledDb,
}

pub type SledStorage = KvStorage<SledKv>;

impl SledStorage {
    /// Opens the storage tree in `db`: the edition store's database on the sled backend, a
    /// database of storage's own in the data dir on Redis (storage is pinned to one node).
    pub fn open(db: &SledDb) -> Result<SledStorage> {
        let tree = db
            .tree("sync-storage")
            .map_err(|e| StorageStoreError::Io(e.to_string()))?;
        Ok(KvStorage::new(SledKv { tree, db: db.clone() }))
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
            .collect()
    }

    fn visit_prefix(&self, prefix: &[u8], f: &mut Visitor<'_>) -> Result<()> {
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            f(&k, &v)?;
        }
        Ok(())
    }

    fn scan_all(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_prefix(&[])
    }

    fn write(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        Ok(self.tree.apply_batch(batch)?)
    }

    fn commit(&self) -> CommitFuture<'_> {
        // The ticket is taken now, after the caller's writes, as the shared commit requires.
        let ticket = self.db.request_commit();
        Box::pin(async move {
            self.db
                .committed(ticket)
                .await
                .map_err(|e| StorageStoreError::Io(e.to_string()))
        })
    }
}
