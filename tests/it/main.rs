//! The integration tests, one binary (the crate links once, not once per file): each module is
//! a former `tests/*.rs` file and starts the real server on 127.0.0.1 (see `common`). Run one
//! with `cargo test --test it flow::` and so on.

mod common;
#[macro_use]
mod store_suite;
#[macro_use]
mod storage_store_suite;
mod storage_support;

mod ack_durability;
mod bad_input;
mod browser;
mod crash;
mod crash_soak;
mod disk_faults;
mod flow;
mod fuzz_smoke;
mod kick;
mod kick_e2e;
mod lost_nudge;
mod multinode;
mod proto_examples;
mod redis_cluster;
mod redis_keys;
mod redis_store;
mod relay;
mod storage;
mod storage_store;
mod store_conformance;
mod watch;
