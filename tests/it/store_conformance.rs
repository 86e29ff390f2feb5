//! The store conformance suite (tests/store_suite) against every backend in this crate.
//!
//! Another backend is one more line: `store_suite!(redis, redis_store);` with an
//! `async fn redis_store() -> Fixture<RedisStore>` that returns a fresh, isolated store. The Redis
//! instantiation starts a redis-server per case and skips only where none is installed and CI
//! is unset.

use std::time::Duration;

use crate::common::redis_harness::{redis_available, RedisServer};
use crate::store_suite::Fixture;
use editiond::store::{MemoryStore, RedisStore, RedisTarget, SledStore};

/// A sled store in its own temporary directory, removed when the test ends.
async fn sled_store() -> Fixture<SledStore> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SledStore::open(dir.path(), 8 << 20, Duration::from_secs(30)).expect("open sled");
    Fixture::new(store, dir)
}

store_suite!(sled, sled_store);

/// A fresh in-memory store (what the session's unit tests run on).
async fn memory_store() -> Fixture<MemoryStore> {
    Fixture::new(MemoryStore::new(), ())
}

store_suite!(memory, memory_store);

/// A Redis store on its own in-memory redis-server, killed when the test ends.
async fn redis_store() -> Fixture<RedisStore> {
    let server = RedisServer::start();
    let store = RedisStore::open(&RedisTarget {
        url: server.url(),
        cluster_urls: Vec::new(),
        timeout: Duration::from_secs(5),
    })
    .await
    .expect("open redis store");
    Fixture::new(store, server)
}

store_suite!(redis, redis_store, if redis_available);
