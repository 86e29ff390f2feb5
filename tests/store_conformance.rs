//! The store conformance suite (tests/store_suite) against every backend in this crate.
//!
//! Another backend is one more line: `store_suite!(redis, redis_store);` with an
//! `async fn redis_store() -> Fixture<RedisStore>` that returns a fresh, isolated store.

mod store_suite;

use std::time::Duration;

use editiond::store::SledStore;
use store_suite::Fixture;

/// A sled store in its own temporary directory, removed when the test ends.
async fn sled_store() -> Fixture<SledStore> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SledStore::open(dir.path(), 8 << 20, Duration::from_secs(30)).expect("open sled");
    Fixture::new(store, dir)
}

store_suite!(sled, sled_store);
