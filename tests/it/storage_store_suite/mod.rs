//! The conformance suite every [`StorageStore`] passes: the contract documented on the trait
//! (src/storage/store.rs), one case per rule, written against the trait only.
//!
//! ```ignore
//! mod storage_store_suite;
//! fn sled_storage() -> Fixture { /* a fresh store */ }
//! storage_store_suite!(sled, sled_storage);
//! ```
//!
//! A PostgreSQL backend is one more line. Each case gets its own empty store.
#![allow(dead_code)]

use std::any::Any;
use std::sync::Arc;

use editiond::storage::store::{BatchMeta, Change, StorageStore, StoredBso, NO_EXPIRY};

/// A fresh store and whatever must live as long as it.
pub struct Fixture {
    pub store: Arc<dyn StorageStore>,
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    pub fn new(store: Arc<dyn StorageStore>, keep: impl Any + Send) -> Fixture {
        Fixture {
            store,
            _keep: Box::new(keep),
        }
    }
}

#[macro_export]
macro_rules! storage_store_suite {
    ($name:ident, $fixture:expr) => {
        mod $name {
            use super::*;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test]
                    async fn $case() {
                        let fixture = $fixture();
                        $crate::storage_store_suite::$case(&*fixture.store).await;
                    }
                };
            }

            case!(a_new_user_has_nothing);
            case!(puts_read_back_with_their_times);
            case!(changes_apply_in_order);
            case!(collections_and_users_do_not_mix);
            case!(delete_collection_takes_its_records);
            case!(delete_all_keeps_the_user_time_and_other_users);
            case!(delete_all_except_keeps_one_record_and_its_collection_time);
            case!(delete_all_except_without_the_record_keeps_nothing);
            case!(delete_all_except_sees_the_changes_before_it);
            case!(batches_keep_items_in_order_and_go_whole);
            case!(sweep_removes_only_what_expired);
            case!(commit_resolves_for_every_caller);
        }
    };
}

fn bso(modified: u64, payload: &str) -> StoredBso {
    StoredBso {
        modified,
        expiry: NO_EXPIRY,
        sortindex: None,
        payload: payload.to_owned(),
    }
}

fn put(collection: &str, id: &str, b: StoredBso) -> Change {
    Change::Put {
        collection: collection.into(),
        id: id.into(),
        bso: b,
    }
}

fn set_col(collection: &str, modified: u64) -> Change {
    Change::SetCollectionModified {
        collection: collection.into(),
        modified,
    }
}

fn ids(rows: Vec<(String, StoredBso)>) -> Vec<String> {
    rows.into_iter().map(|(id, _)| id).collect()
}

pub async fn a_new_user_has_nothing(s: &dyn StorageStore) {
    assert_eq!(s.user_modified(1).unwrap(), None);
    assert!(s.collections(1).unwrap().is_empty());
    assert_eq!(s.collection_modified(1, "c").unwrap(), None);
    assert_eq!(s.get(1, "c", "a").unwrap(), None);
    assert!(s.scan(1, "c").unwrap().is_empty());
    assert_eq!(s.batch(1, "0123456789abcdef").unwrap(), None);
    assert!(s.batch_items(1, "0123456789abcdef").unwrap().is_empty());
}

pub async fn puts_read_back_with_their_times(s: &dyn StorageStore) {
    let mut b = bso(1010, "payload with \"quotes\" and \n and ünïcode");
    b.sortindex = Some(-42);
    b.expiry = 99_000;
    s.apply(
        7,
        &[
            put("bookmarks", "a b", b.clone()),
            set_col("bookmarks", 1010),
            Change::SetUserModified(1010),
        ],
    )
    .unwrap();
    s.commit().await.unwrap();
    assert_eq!(s.get(7, "bookmarks", "a b").unwrap(), Some(b.clone()));
    assert_eq!(s.user_modified(7).unwrap(), Some(1010));
    assert_eq!(s.collection_modified(7, "bookmarks").unwrap(), Some(1010));
    assert_eq!(s.collections(7).unwrap(), vec![("bookmarks".to_owned(), 1010)]);
    assert_eq!(
        s.scan_meta(7, "bookmarks").unwrap(),
        vec![("a b".to_owned(), b.meta())]
    );
    assert_eq!(b.meta().payload_len, b.payload.len() as u64);
    assert_eq!(s.scan(7, "bookmarks").unwrap(), vec![("a b".to_owned(), b)]);
}

pub async fn changes_apply_in_order(s: &dyn StorageStore) {
    s.apply(
        1,
        &[
            put("c", "x", bso(10, "first")),
            put("c", "x", bso(20, "second")),
            put("c", "y", bso(20, "y")),
            Change::Delete {
                collection: "c".into(),
                id: "y".into(),
            },
        ],
    )
    .unwrap();
    assert_eq!(s.get(1, "c", "x").unwrap().unwrap().payload, "second");
    assert_eq!(s.get(1, "c", "y").unwrap(), None);
}

pub async fn collections_and_users_do_not_mix(s: &dyn StorageStore) {
    s.apply(
        1,
        &[
            put("col", "a", bso(10, "1")),
            put("col2", "b", bso(10, "2")),
            set_col("col", 10),
            set_col("col2", 10),
        ],
    )
    .unwrap();
    s.apply(256, &[put("col", "z", bso(10, "3")), set_col("col", 10)])
        .unwrap();
    assert_eq!(ids(s.scan(1, "col").unwrap()), vec!["a"]);
    assert_eq!(ids(s.scan(1, "col2").unwrap()), vec!["b"]);
    assert_eq!(ids(s.scan(256, "col").unwrap()), vec!["z"]);
    let meta_ids: Vec<String> = s
        .scan_meta(1, "col")
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(meta_ids, vec!["a"]);
    assert_eq!(s.collections(1).unwrap().len(), 2);
    assert_eq!(s.collections(256).unwrap().len(), 1);
    assert_eq!(s.get(256, "col", "a").unwrap(), None);
}

pub async fn delete_collection_takes_its_records(s: &dyn StorageStore) {
    s.apply(
        1,
        &[
            put("col", "a", bso(10, "1")),
            put("col2", "b", bso(10, "2")),
            set_col("col", 10),
            set_col("col2", 10),
        ],
    )
    .unwrap();
    s.apply(2, &[put("col", "a", bso(10, "1")), set_col("col", 10)])
        .unwrap();
    s.apply(
        1,
        &[Change::DeleteCollection {
            collection: "col".into(),
        }],
    )
    .unwrap();
    assert!(s.scan(1, "col").unwrap().is_empty());
    assert_eq!(s.collection_modified(1, "col").unwrap(), None);
    assert_eq!(
        ids(s.scan(1, "col2").unwrap()),
        vec!["b"],
        "a name that extends it stays"
    );
    assert_eq!(ids(s.scan(2, "col").unwrap()), vec!["a"], "another user's stays");
}

pub async fn delete_all_keeps_the_user_time_and_other_users(s: &dyn StorageStore) {
    let meta = BatchMeta {
        collection: "c".into(),
        expiry: NO_EXPIRY,
        records: 1,
        bytes: 1,
    };
    s.apply(
        1,
        &[
            put("c", "a", bso(10, "1")),
            set_col("c", 10),
            Change::SetUserModified(10),
            Change::PutBatch {
                batch: "0123456789abcdef".into(),
                meta,
            },
            Change::AppendBatch {
                batch: "0123456789abcdef".into(),
                seq: 0,
                item: b"{}".to_vec(),
            },
        ],
    )
    .unwrap();
    s.apply(2, &[put("c", "a", bso(10, "1")), set_col("c", 10)])
        .unwrap();
    s.apply(1, &[Change::DeleteAll, Change::SetUserModified(20)])
        .unwrap();
    assert!(s.collections(1).unwrap().is_empty());
    assert!(s.scan(1, "c").unwrap().is_empty());
    assert_eq!(s.batch(1, "0123456789abcdef").unwrap(), None);
    assert!(s.batch_items(1, "0123456789abcdef").unwrap().is_empty());
    assert_eq!(
        s.user_modified(1).unwrap(),
        Some(20),
        "timestamps keep increasing after a wipe"
    );
    assert_eq!(ids(s.scan(2, "c").unwrap()), vec!["a"]);
}

fn keep_meta_global() -> Change {
    Change::DeleteAllExcept {
        collection: "meta".into(),
        id: "global".into(),
    }
}

pub async fn delete_all_except_keeps_one_record_and_its_collection_time(s: &dyn StorageStore) {
    let global = bso(10, "{\"syncID\":\"x\"}");
    s.apply(
        1,
        &[
            put("meta", "global", global.clone()),
            put("meta", "other", bso(12, "o")),
            // Names that extend the kept ones go.
            put("meta", "global2", bso(12, "g2")),
            put("meta2", "global", bso(12, "m2")),
            put("crypto", "keys", bso(11, "k")),
            put("bookmarks", "a", bso(12, "b")),
            set_col("meta", 12),
            set_col("meta2", 12),
            set_col("crypto", 11),
            set_col("bookmarks", 12),
            Change::SetUserModified(12),
            Change::PutBatch {
                batch: "0123456789abcdef".into(),
                meta: BatchMeta {
                    collection: "meta".into(),
                    expiry: NO_EXPIRY,
                    records: 1,
                    bytes: 1,
                },
            },
            Change::AppendBatch {
                batch: "0123456789abcdef".into(),
                seq: 0,
                item: b"{}".to_vec(),
            },
        ],
    )
    .unwrap();
    s.apply(
        2,
        &[put("bookmarks", "a", bso(10, "1")), set_col("bookmarks", 10)],
    )
    .unwrap();
    s.apply(1, &[keep_meta_global(), Change::SetUserModified(20)])
        .unwrap();
    s.commit().await.unwrap();
    assert_eq!(s.get(1, "meta", "global").unwrap(), Some(global));
    assert_eq!(ids(s.scan(1, "meta").unwrap()), vec!["global"]);
    assert_eq!(
        s.collections(1).unwrap(),
        vec![("meta".to_owned(), 12)],
        "the kept record's collection keeps its time"
    );
    for gone in ["meta2", "crypto", "bookmarks"] {
        assert!(s.scan(1, gone).unwrap().is_empty(), "{gone}");
        assert_eq!(s.collection_modified(1, gone).unwrap(), None, "{gone}");
    }
    assert_eq!(s.batch(1, "0123456789abcdef").unwrap(), None);
    assert!(s.batch_items(1, "0123456789abcdef").unwrap().is_empty());
    assert_eq!(s.user_modified(1).unwrap(), Some(20));
    assert_eq!(
        ids(s.scan(2, "bookmarks").unwrap()),
        vec!["a"],
        "another user's stays"
    );
}

pub async fn delete_all_except_without_the_record_keeps_nothing(s: &dyn StorageStore) {
    s.apply(
        1,
        &[
            put("meta", "other", bso(10, "o")),
            put("tabs", "t", bso(10, "t")),
            set_col("meta", 10),
            set_col("tabs", 10),
            Change::SetUserModified(10),
        ],
    )
    .unwrap();
    s.apply(1, &[keep_meta_global()]).unwrap();
    assert!(s.collections(1).unwrap().is_empty());
    assert!(s.scan(1, "meta").unwrap().is_empty());
    assert!(s.scan(1, "tabs").unwrap().is_empty());
    assert_eq!(s.user_modified(1).unwrap(), Some(10), "the user's time stays");
}

pub async fn delete_all_except_sees_the_changes_before_it(s: &dyn StorageStore) {
    s.apply(
        1,
        &[
            put("tabs", "old", bso(10, "t")),
            set_col("tabs", 10),
            put("meta", "global", bso(10, "g")),
            set_col("meta", 10),
        ],
    )
    .unwrap();
    // Changes before it in the same list count as applied; changes after it apply after it.
    s.apply(
        1,
        &[
            put("tabs", "new", bso(20, "n")),
            Change::Delete {
                collection: "meta".into(),
                id: "global".into(),
            },
            keep_meta_global(),
            put("clients", "c", bso(20, "c")),
            set_col("clients", 20),
        ],
    )
    .unwrap();
    assert_eq!(s.collections(1).unwrap(), vec![("clients".to_owned(), 20)]);
    assert!(s.scan(1, "tabs").unwrap().is_empty());
    assert!(s.scan(1, "meta").unwrap().is_empty());
    s.apply(
        1,
        &[
            put("meta", "global", bso(30, "g")),
            set_col("meta", 30),
            keep_meta_global(),
        ],
    )
    .unwrap();
    assert_eq!(s.collections(1).unwrap(), vec![("meta".to_owned(), 30)]);
    assert_eq!(ids(s.scan(1, "meta").unwrap()), vec!["global"]);
}

pub async fn batches_keep_items_in_order_and_go_whole(s: &dyn StorageStore) {
    let meta = BatchMeta {
        collection: "tabs".into(),
        expiry: 5000,
        records: 300,
        bytes: 12,
    };
    let mut changes = vec![Change::PutBatch {
        batch: "aaaaaaaaaaaaaaaa".into(),
        meta: meta.clone(),
    }];
    // Out of order, across byte boundaries of the sequence number.
    for seq in [256u64, 3, 255, 0, 1000] {
        changes.push(Change::AppendBatch {
            batch: "aaaaaaaaaaaaaaaa".into(),
            seq,
            item: seq.to_string().into_bytes(),
        });
    }
    changes.push(Change::AppendBatch {
        batch: "aaaaaaaaaaaaaaab".into(),
        seq: 0,
        item: b"other".to_vec(),
    });
    s.apply(1, &changes).unwrap();
    assert_eq!(s.batch(1, "aaaaaaaaaaaaaaaa").unwrap(), Some(meta));
    let items: Vec<String> = s
        .batch_items(1, "aaaaaaaaaaaaaaaa")
        .unwrap()
        .into_iter()
        .map(|i| String::from_utf8(i).unwrap())
        .collect();
    assert_eq!(items, vec!["0", "3", "255", "256", "1000"]);
    assert_eq!(
        s.batch(2, "aaaaaaaaaaaaaaaa").unwrap(),
        None,
        "batches are per user"
    );
    s.apply(
        1,
        &[Change::DeleteBatch {
            batch: "aaaaaaaaaaaaaaaa".into(),
        }],
    )
    .unwrap();
    assert_eq!(s.batch(1, "aaaaaaaaaaaaaaaa").unwrap(), None);
    assert!(s.batch_items(1, "aaaaaaaaaaaaaaaa").unwrap().is_empty());
    assert_eq!(
        s.batch_items(1, "aaaaaaaaaaaaaaab").unwrap(),
        vec![b"other".to_vec()]
    );
}

pub async fn sweep_removes_only_what_expired(s: &dyn StorageStore) {
    let mut old = bso(10, "old");
    old.expiry = 1000;
    let mut later = bso(10, "later");
    later.expiry = 3000;
    let dead = BatchMeta {
        collection: "c".into(),
        expiry: 1500,
        records: 1,
        bytes: 0,
    };
    let live = BatchMeta {
        expiry: 9000,
        ..dead.clone()
    };
    s.apply(
        1,
        &[
            put("c", "old", old),
            put("c", "later", later),
            put("c", "forever", bso(10, "forever")),
            set_col("c", 10),
            Change::PutBatch {
                batch: "dddddddddddddddd".into(),
                meta: dead,
            },
            Change::AppendBatch {
                batch: "dddddddddddddddd".into(),
                seq: 0,
                item: b"x".to_vec(),
            },
            Change::PutBatch {
                batch: "eeeeeeeeeeeeeeee".into(),
                meta: live,
            },
            Change::AppendBatch {
                batch: "eeeeeeeeeeeeeeee".into(),
                seq: 0,
                item: b"y".to_vec(),
            },
        ],
    )
    .unwrap();
    let stats = s.sweep(2000).unwrap();
    assert_eq!((stats.records, stats.batches), (1, 1));
    assert_eq!(ids(s.scan(1, "c").unwrap()), vec!["forever", "later"]);
    assert!(s.batch_items(1, "dddddddddddddddd").unwrap().is_empty());
    assert_eq!(s.batch_items(1, "eeeeeeeeeeeeeeee").unwrap().len(), 1);
    assert_eq!(
        s.collection_modified(1, "c").unwrap(),
        Some(10),
        "the collection stays"
    );
}

pub async fn commit_resolves_for_every_caller(s: &dyn StorageStore) {
    for uid in 0..8 {
        s.apply(uid, &[put("c", "a", bso(10, "x"))]).unwrap();
    }
    let commits: Vec<_> = (0..8).map(|_| s.commit()).collect();
    for result in futures_util::future::join_all(commits).await {
        result.unwrap();
    }
}
