//! The Redis store against a real redis-server: the semantics of `Store` (compare-and-set PUT,
//! compare-and-delete ACK, registrations, tombstones, expiry) and its behaviour in an outage.

use std::time::Duration;

use crate::common::redis_harness::{redis_available, RedisServer};
use editiond::ids::TokenId;
use editiond::ids::{Appid, Uaid};
use editiond::store::{
    now_ms, KickChange, PutOutcome, RedisStore, RedisTarget, Registered, Store, StoreError, TokenTarget,
    VersionReq, MAX_SERVER_VERSION,
};

async fn open(redis: &RedisServer) -> RedisStore {
    RedisStore::open(&RedisTarget {
        url: redis.url(),
        cluster_urls: Vec::new(),
        timeout: Duration::from_millis(1000),
    })
    .await
    .expect("open redis store")
}

const FAR: u64 = u64::MAX / 2;

async fn registered(store: &RedisStore) -> (Uaid, Appid, TokenId) {
    let (uaid, appid) = (Uaid::random(), Appid::random());
    assert!(store.bind_uaid(uaid).await.unwrap());
    let token = match store
        .register(uaid, appid, TokenId::random(), KickChange::Keep, 10)
        .await
        .unwrap()
    {
        Registered::Token(t) => t,
        other => panic!("{other:?}"),
    };
    (uaid, appid, token)
}

#[tokio::test]
async fn binding_and_registration() {
    if !redis_available("binding_and_registration") {
        return;
    }
    let redis = RedisServer::start();
    let store = open(&redis).await;
    let uaid = Uaid::random();
    assert!(!store.uaid_bound(uaid).await.unwrap());
    assert!(store.bind_uaid(uaid).await.unwrap());
    assert!(!store.bind_uaid(uaid).await.unwrap(), "bound once only");
    assert!(store.uaid_bound(uaid).await.unwrap());

    let appid = Appid::random();
    let first = TokenId::random();
    let kick = br#"{"webhook":"x"}"#;
    assert_eq!(
        store
            .register(uaid, appid, first, KickChange::Set(kick), 2)
            .await
            .unwrap(),
        Registered::Token(first)
    );
    // Idempotent: the same pair keeps its token, and the unused candidate leads nowhere.
    let second = TokenId::random();
    assert_eq!(
        store
            .register(uaid, appid, second, KickChange::Keep, 2)
            .await
            .unwrap(),
        Registered::Token(first)
    );
    assert_eq!(store.lookup_token(second).await.unwrap(), TokenTarget::Unknown);
    assert_eq!(
        store.lookup_token(first).await.unwrap(),
        TokenTarget::Active(uaid, appid)
    );
    let other = Appid::random();
    assert!(matches!(
        store
            .register(uaid, other, TokenId::random(), KickChange::Keep, 2)
            .await
            .unwrap(),
        Registered::Token(_)
    ));
    let extra = TokenId::random();
    assert_eq!(
        store
            .register(uaid, Appid::random(), extra, KickChange::Keep, 2)
            .await
            .unwrap(),
        Registered::TooMany
    );
    assert_eq!(store.lookup_token(extra).await.unwrap(), TokenTarget::Unknown);

    // Unregister: the token answers Gone until the tombstone expires (Redis expiry).
    assert!(store.unregister(uaid, appid, now_ms() + 700).await.unwrap());
    assert!(!store.unregister(uaid, appid, now_ms() + 700).await.unwrap());
    assert_eq!(store.lookup_token(first).await.unwrap(), TokenTarget::Gone);
    assert_eq!(
        store
            .put_version(uaid, appid, VersionReq::Exact(1), FAR)
            .await
            .unwrap(),
        PutOutcome::Gone
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(store.lookup_token(first).await.unwrap(), TokenTarget::Unknown);
}

#[tokio::test]
async fn put_is_compare_and_set_and_ack_is_compare_and_delete() {
    if !redis_available("put_is_compare_and_set_and_ack_is_compare_and_delete") {
        return;
    }
    let redis = RedisServer::start();
    let store = open(&redis).await;
    let (uaid, appid, _) = registered(&store).await;
    let put = |v: u64| store.put_version(uaid, appid, VersionReq::Exact(v), FAR);

    assert_eq!(put(5).await.unwrap(), PutOutcome::Raised(5));
    assert_eq!(put(5).await.unwrap(), PutOutcome::Superseded(5));
    assert_eq!(put(3).await.unwrap(), PutOutcome::Superseded(5));
    assert_eq!(store.pending(uaid, now_ms()).await.unwrap(), vec![(appid, 5)]);
    // An ACK of an older version leaves the newer one.
    assert_eq!(put(9).await.unwrap(), PutOutcome::Raised(9));
    assert!(!store.ack(uaid, appid, 5).await.unwrap());
    assert_eq!(store.pending(uaid, now_ms()).await.unwrap(), vec![(appid, 9)]);
    assert!(store.ack(uaid, appid, 9).await.unwrap());
    assert!(store.pending(uaid, now_ms()).await.unwrap().is_empty());
    // The last known version survives the ACK.
    assert_eq!(put(9).await.unwrap(), PutOutcome::Superseded(9));

    // Versions compare exactly across the whole u64 range (Lua numbers are doubles).
    assert_eq!(put(u64::MAX - 1).await.unwrap(), PutOutcome::Raised(u64::MAX - 1));
    assert_eq!(put(u64::MAX).await.unwrap(), PutOutcome::Raised(u64::MAX));
    assert_eq!(put(u64::MAX).await.unwrap(), PutOutcome::Superseded(u64::MAX));
    assert!(!store.ack(uaid, appid, u64::MAX - 1).await.unwrap());
    assert!(store.ack(uaid, appid, u64::MAX).await.unwrap());

    // Pending events come ordered by APPID.
    let (uaid, a1, _) = registered(&store).await;
    let mut appids = vec![a1];
    for _ in 0..4 {
        let a = Appid::random();
        store
            .register(uaid, a, TokenId::random(), KickChange::Keep, 10)
            .await
            .unwrap();
        appids.push(a);
    }
    for (i, a) in appids.iter().enumerate() {
        store
            .put_version(uaid, *a, VersionReq::Exact(i as u64 + 1), FAR)
            .await
            .unwrap();
    }
    let got: Vec<Appid> = store
        .pending(uaid, now_ms())
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    appids.sort();
    assert_eq!(got, appids);
}

#[tokio::test]
async fn clock_versions_stay_above_the_last_and_below_2_53() {
    if !redis_available("clock_versions_stay_above_the_last_and_below_2_53") {
        return;
    }
    let redis = RedisServer::start();
    let store = open(&redis).await;
    let (uaid, appid, _) = registered(&store).await;
    let clock = |now: u64| store.put_version(uaid, appid, VersionReq::Clock(now), FAR);
    assert_eq!(clock(1000).await.unwrap(), PutOutcome::Raised(1000));
    // The clock went back: the next version is the last + 1.
    assert_eq!(clock(900).await.unwrap(), PutOutcome::Raised(1001));
    assert_eq!(
        store
            .put_version(uaid, appid, VersionReq::Exact(MAX_SERVER_VERSION - 1), FAR)
            .await
            .unwrap(),
        PutOutcome::Raised(MAX_SERVER_VERSION - 1)
    );
    assert_eq!(clock(5).await.unwrap(), PutOutcome::Raised(MAX_SERVER_VERSION));
    assert_eq!(clock(5).await.unwrap(), PutOutcome::Exhausted);
}

#[tokio::test]
async fn expired_events_are_invisible_and_vanish() {
    if !redis_available("expired_events_are_invisible_and_vanish") {
        return;
    }
    let redis = RedisServer::start();
    let store = open(&redis).await;
    let (uaid, appid, _) = registered(&store).await;
    let now = now_ms();
    assert_eq!(
        store
            .put_version(uaid, appid, VersionReq::Exact(1), now + 300)
            .await
            .unwrap(),
        PutOutcome::Raised(1)
    );
    assert_eq!(store.pending(uaid, now).await.unwrap(), vec![(appid, 1)]);
    assert!(store.pending(uaid, now + 300).await.unwrap().is_empty());
    // Expired, the version is still the last known one.
    assert_eq!(
        store
            .put_version(uaid, appid, VersionReq::Exact(1), FAR)
            .await
            .unwrap(),
        PutOutcome::Superseded(1)
    );
    // A sweep deletes it (through the expiry index) and the tombstone of an unregistration.
    let stats = store.sweep(now + 300).await.unwrap();
    assert_eq!(stats.expired_events, 1);
    assert!(store.pending(uaid, 0).await.unwrap().is_empty());
    let (uaid, appid, token) = registered(&store).await;
    assert!(store.unregister(uaid, appid, now_ms() + 200).await.unwrap());
    assert_eq!(store.lookup_token(token).await.unwrap(), TokenTarget::Gone);
    // The tombstone also expires by itself in Redis, sweep or not.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.lookup_token(token).await.unwrap(), TokenTarget::Unknown);
}

#[tokio::test]
async fn outage_gives_bounded_errors_then_heals() {
    if !redis_available("outage_gives_bounded_errors_then_heals") {
        return;
    }
    let mut redis = RedisServer::start_persistent();
    let store = open(&redis).await;
    let (uaid, appid, _) = registered(&store).await;
    assert_eq!(
        store
            .put_version(uaid, appid, VersionReq::Exact(1), FAR)
            .await
            .unwrap(),
        PutOutcome::Raised(1)
    );
    redis.kill();
    let started = std::time::Instant::now();
    let err = store
        .put_version(uaid, appid, VersionReq::Exact(2), FAR)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io(_) | StoreError::Timeout), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The health probe fails too, within the same bound.
    let started = std::time::Instant::now();
    assert!(store.health().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    redis.restart();
    // The same store handle reconnects by itself; the acknowledged write survived (AOF).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.pending(uaid, now_ms()).await {
            Ok(p) => {
                assert_eq!(p, vec![(appid, 1)]);
                store.health().await.expect("healthy once Redis answers");
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "no recovery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis's own cost per event, for capacity planning (README, "Numbers"). Not a pass/fail test:
/// `cargo test --release --test redis_store -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_redis_cost_per_event() {
    if !redis_available("measure_redis_cost_per_event") {
        return;
    }
    measure("no persistence", &RedisServer::start()).await;
    let everysec = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"];
    measure("appendfsync everysec", &RedisServer::start_with(&everysec)).await;
}

async fn measure(label: &str, redis: &RedisServer) {
    use std::sync::Arc;

    println!("== Redis {label}");
    let store = Arc::new(open(redis).await);
    let client = redis::Client::open(redis.url()).unwrap();
    let admin = client.get_multiplexed_async_connection().await.unwrap();
    let info = |section: &'static str| {
        let mut admin = admin.clone();
        async move {
            let text: String = redis::cmd("INFO")
                .arg(section)
                .query_async(&mut admin)
                .await
                .unwrap();
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                .collect::<std::collections::HashMap<_, _>>()
        }
    };
    let cpu = |m: &std::collections::HashMap<String, String>| {
        m["used_cpu_user"].parse::<f64>().unwrap() + m["used_cpu_sys"].parse::<f64>().unwrap()
    };

    // 10k UAIDs, one registration each: what a connected, registered client keeps in Redis.
    const UAIDS: usize = 10_000;
    let mem0: u64 = info("memory").await["used_memory"].parse().unwrap();
    let mut regs = Vec::with_capacity(UAIDS);
    for chunk in 0..UAIDS / 100 {
        let batch = (0..100).map(|_| {
            let store = store.clone();
            async move {
                let (uaid, appid, token) = (Uaid::random(), Appid::random(), TokenId::random());
                store.bind_uaid(uaid).await.unwrap();
                store
                    .register(uaid, appid, token, KickChange::Keep, 10)
                    .await
                    .unwrap();
                (uaid, appid, token)
            }
        });
        regs.extend(futures_util::future::join_all(batch).await);
        let _ = chunk;
    }
    let mem1: u64 = info("memory").await["used_memory"].parse().unwrap();

    // 10k events through the Redis calls of the whole path: token lookup, compare-and-set,
    // route lookup + publish (a cross-node nudge), the holder's pending read, the ACK.
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin.clone())
        .await
        .unwrap();
    let cpu0 = cpu(&info("cpu").await);
    let started = std::time::Instant::now();
    for chunk in regs.chunks(100) {
        let batch = chunk.iter().map(|&(uaid, appid, token)| {
            let store = store.clone();
            let mut conn = admin.clone();
            async move {
                assert_eq!(
                    store.lookup_token(token).await.unwrap(),
                    TokenTarget::Active(uaid, appid)
                );
                let out = store
                    .put_version(uaid, appid, VersionReq::Clock(now_ms()), FAR)
                    .await
                    .unwrap();
                let PutOutcome::Raised(v) = out else {
                    panic!("{out:?}")
                };
                let _: Option<String> = redis::cmd("HGET")
                    .arg(editiond::store::redis::key::route(&uaid))
                    .arg("node")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(editiond::store::redis::key::node_channel("n"))
                    .arg(format!("n {uaid}"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(store.pending(uaid, now_ms()).await.unwrap(), vec![(appid, v)]);
                assert!(store.ack(uaid, appid, v).await.unwrap());
            }
        });
        futures_util::future::join_all(batch).await;
    }
    let wall = started.elapsed();
    let cpu1 = cpu(&info("cpu").await);
    let stats = info("commandstats").await;
    println!(
        "registered UAIDs: {UAIDS}, Redis memory {:.0} bytes per UAID",
        (mem1 - mem0) as f64 / UAIDS as f64
    );
    println!(
        "events: {}, Redis CPU {:.3} s per 10k events ({:.1} µs per event), wall {:?}",
        regs.len(),
        (cpu1 - cpu0) * 10_000.0 / regs.len() as f64,
        (cpu1 - cpu0) * 1e6 / regs.len() as f64,
        wall
    );
    let mut lines: Vec<_> = stats.iter().filter(|(k, _)| k.starts_with("cmdstat_")).collect();
    lines.sort();
    for (k, v) in lines {
        println!("{k}: {v}");
    }
}
