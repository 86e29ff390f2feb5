//! The Redis backend on a Redis Cluster of three masters: every script runs with keys of one
//! hash slot (no CROSSSLOT), sharded pub/sub carries nudges between nodes, and the full flow
//! works for UAIDs spread over every shard.

use std::time::Duration;

use crate::common::redis_harness::{raw_command, redis_available, RedisCluster};
use crate::common::*;
use editiond::ids::TokenId;
use editiond::ids::{Appid, Uaid};
use editiond::store::{
    now_ms, KickChange, PutOutcome, RedisStore, RedisTarget, Registered, Store, TokenTarget, VersionReq,
};
use serde_json::json;

fn via(endpoint: &str, node: &Server) -> String {
    let (_, token) = endpoint.split_once("/v1/e/").expect("endpoint URL");
    node.url(&format!("/v1/e/{token}"))
}

#[tokio::test]
async fn store_scripts_run_on_every_shard() {
    if !redis_available("store_scripts_run_on_every_shard") {
        return;
    }
    let cluster = RedisCluster::start(3);
    let store = RedisStore::open(&RedisTarget {
        url: String::new(),
        cluster_urls: cluster.urls(),
        // Generous: a sweep reads 16,384 slot indexes, 256 at a time, and this test shares two
        // cores with the other test's three shards and two nodes (a 2 s bound failed once in CI).
        timeout: Duration::from_secs(10),
    })
    .await
    .expect("open cluster store");
    // 48 UAIDs land on all three shards with overwhelming probability.
    for _ in 0..48 {
        let (uaid, appid, token) = (Uaid::random(), Appid::random(), TokenId::random());
        assert!(store.bind_uaid(uaid).await.unwrap());
        assert!(store.uaid_bound(uaid).await.unwrap());
        assert_eq!(
            store
                .register(uaid, appid, token, KickChange::Set(b"{}"), 5)
                .await
                .unwrap(),
            Registered::Token(token)
        );
        assert_eq!(
            store.lookup_token(token).await.unwrap(),
            TokenTarget::Active(uaid, appid)
        );
        let far = now_ms() + 60_000;
        assert_eq!(
            store
                .put_version(uaid, appid, VersionReq::Exact(3), far)
                .await
                .unwrap(),
            PutOutcome::Raised(3)
        );
        assert_eq!(
            store
                .put_version(uaid, appid, VersionReq::Clock(1), far)
                .await
                .unwrap(),
            PutOutcome::Raised(4)
        );
        assert_eq!(store.pending(uaid, now_ms()).await.unwrap(), vec![(appid, 4)]);
        assert!(!store.ack(uaid, appid, 3).await.unwrap());
        assert!(store.ack(uaid, appid, 4).await.unwrap());
        // An event that expires, for the sweep below.
        let soon = now_ms() + 30_000;
        assert_eq!(
            store
                .put_version(uaid, appid, VersionReq::Exact(5), soon)
                .await
                .unwrap(),
            PutOutcome::Raised(5)
        );
        let app2 = Appid::random();
        store
            .register(uaid, app2, TokenId::random(), KickChange::Keep, 5)
            .await
            .unwrap();
        assert!(store.unregister(uaid, app2, now_ms() + 60_000).await.unwrap());
        // Our slot arithmetic agrees with the cluster's.
        let keyslot = raw_command(
            cluster.nodes[0].port,
            &format!("CLUSTER KEYSLOT {}", editiond::store::redis::key::pending(&uaid)),
        )
        .unwrap();
        assert_eq!(
            keyslot.trim(),
            format!(
                ":{}",
                editiond::store::redis::slot::of(&editiond::store::redis::key::pending(&uaid))
            )
        );
    }
    // One sweep reaches every slot's expiry index on every shard.
    let stats = store.sweep(now_ms() + 45_000).await.unwrap();
    assert_eq!(stats.expired_events, 48);
    let stats = store.sweep(now_ms() + 120_000).await.unwrap();
    assert_eq!(stats.expired_tombstones, 48);
    // Every master holds some of the keys.
    for node in &cluster.nodes {
        let keys = raw_command(node.port, "DBSIZE").unwrap();
        assert!(!keys.starts_with(":0"), "node {} is empty: {keys}", node.port);
    }
    // The health probe PINGs every primary.
    store.health().await.unwrap();
}

#[tokio::test]
async fn full_flow_across_two_nodes_on_a_cluster() {
    if !redis_available("full_flow_across_two_nodes_on_a_cluster") {
        return;
    }
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls_toml();
    let env = [
        ("EDITIOND_STORE__BACKEND", "redis"),
        ("EDITIOND_STORE__CLUSTER_URLS", urls.as_str()),
        ("EDITIOND_STORE__RECHECK_INTERVAL_SECS", "30"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let a = Server::start_with(&dir.path().join("a"), &env).await;
    let b = Server::start_with(&dir.path().join("b"), &env).await;
    let http = reqwest::Client::new();

    // Many UAIDs on one connection to node A, so their keys spread over every shard.
    let mut c = Client::connect(&a).await;
    let creds = c.hello_new(12).await;
    let mut endpoints = Vec::new();
    for (uaid, _) in &creds {
        let appid = new_appid();
        let endpoint = c.register(uaid, &appid).await;
        assert_eq!(c.register(uaid, &appid).await, endpoint, "idempotent");
        endpoints.push((uaid.clone(), appid, endpoint));
    }
    // PUTs through node B reach A's client by sharded pub/sub, well before any re-check.
    for (uaid, appid, endpoint) in &endpoints {
        assert_eq!(put_version(&http, &via(endpoint, &b), 7).await, 202);
        assert_eq!(put_version(&http, &via(endpoint, &b), 7).await, 200);
        let update = c.expect("update").await;
        assert_eq!(update["updates"][uaid][appid], 7, "{update}");
        c.ack(&[uaid]).await;
    }
    c.barrier().await;
    c.expect_silence(Duration::from_millis(200)).await;

    // Takeover across nodes: a connection on B claims a UAID; A's connection is told.
    let (uaid, appid, endpoint) = endpoints[0].clone();
    let mut c2 = Client::connect(&b).await;
    c2.hello(&creds[..1]).await;
    let released = c.expect("released").await;
    assert_eq!(released["uaids"][0], uaid.as_str());
    assert_eq!(put_version(&http, &via(&endpoint, &a), 8).await, 202);
    assert_eq!(c2.expect("update").await["updates"][&uaid][&appid], 8);
    c2.ack(&[&uaid]).await;
    c2.barrier().await;

    // Unregister through B; the endpoint is gone on every node.
    c2.send(json!({"type": "unregister", "uaid": uaid, "appid": appid}))
        .await;
    assert_eq!(c2.expect("unregister").await["status"], 200);
    for node in [&a, &b] {
        let r = http
            .put(via(&endpoint, node))
            .body("version=9")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 410);
    }

    // REST poll on B for a UAID whose events were PUT on A.
    let (uaid, secret) = creds[1].clone();
    let (_, appid, endpoint) = endpoints[1].clone();
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = json!({"uaids": [{"uaid": uaid, "secret": secret}]});
    let poll = {
        let http = http.clone();
        let url = b.url("/v1/poll?wait=10");
        let body = body.clone();
        tokio::spawn(async move { http.post(url).json(&body).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(put_version(&http, &via(&endpoint, &a), 20).await, 202);
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("poll woken across nodes")
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["updates"][&uaid][&appid], 20);
    let ack =
        json!({"uaids": [{"uaid": uaid, "secret": secret}], "updates": {uaid.clone(): {appid.clone(): 20}}});
    let r = http.post(a.url("/v1/ack")).json(&ack).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["cleared"], 1);
}
