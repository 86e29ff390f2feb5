//! The storage conformance suite (tests/storage_store_suite) against every `StorageStore` in
//! this crate: sled (the one the server uses) and the in-memory model. Another backend is one
//! more line.

use std::sync::Arc;
use std::time::Duration;

use crate::storage_store_suite::Fixture;
use editiond::storage::store::{Change, MemoryStorage, SledStorage, StorageStore, StoredBso, NO_EXPIRY};
use editiond::store::SledDb;

/// The storage tree on a shared `SledDb`, as the server opens it.
fn open_sled(dir: &std::path::Path) -> SledStorage {
    let db = SledDb::open(dir, 8 << 20, Duration::from_secs(30)).expect("open sled");
    SledStorage::open(&db).expect("open storage")
}

fn sled_storage() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    Fixture::new(Arc::new(open_sled(dir.path())), dir)
}

fn memory_storage() -> Fixture {
    Fixture::new(Arc::new(MemoryStorage::memory()), ())
}

storage_store_suite!(sled, sled_storage);
storage_store_suite!(memory, memory_storage);

/// What a sled commit covered is there after the database is closed and opened again.
#[tokio::test]
async fn sled_commits_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_sled(dir.path());
        let bso = StoredBso {
            modified: 10,
            expiry: NO_EXPIRY,
            sortindex: Some(1),
            payload: "kept".into(),
        };
        store
            .apply(
                3,
                &[Change::Put {
                    collection: "c".into(),
                    id: "a".into(),
                    bso,
                }],
            )
            .unwrap();
        store.commit().await.unwrap();
    }
    // The commit thread lets go of the first handle (and sled's file lock) a moment after the
    // last handle drops: reopen as a restarted process would, once the lock is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let db = loop {
        match SledDb::open(dir.path(), 8 << 20, Duration::from_secs(30)) {
            Ok(db) => break db,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen sled: {e}"),
        }
    };
    let store = SledStorage::open(&db).expect("open storage");
    assert_eq!(store.get(3, "c", "a").unwrap().unwrap().payload, "kept");
}
