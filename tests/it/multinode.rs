//! Several editiond nodes on one Redis, end to end: clients spread over three nodes, PUTs to
//! random nodes, a node killed with SIGKILL, and Redis itself going away and coming back.
//!
//! Redis runs with `appendonly yes`, `appendfsync always` in its own directory. The outage is a
//! SIGKILL of redis-server and a restart on the same port: connections are reset and refused,
//! which is what a crashed or restarted Redis looks like to a node, and the AOF keeps every
//! acknowledged write, as a production Redis configured that way does. A SIGSTOP freeze (a Redis
//! that hangs without closing sockets) is checked too, for the bounded-timeout path.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::redis_harness::{redis_available, RedisServer};
use crate::common::*;
use serde_json::Value;

/// The same endpoint, addressed to another node.
fn via(endpoint: &str, node: &Server) -> String {
    let (_, token) = endpoint.split_once("/v1/e/").expect("endpoint URL");
    node.url(&format!("/v1/e/{token}"))
}

async fn start_nodes(base: &std::path::Path, redis: &RedisServer, n: usize) -> Vec<Server> {
    let url = redis.url();
    let env = [
        ("EDITIOND_STORE__BACKEND", "redis"),
        ("EDITIOND_STORE__URL", url.as_str()),
        ("EDITIOND_STORE__REDIS_TIMEOUT_MS", "500"),
        ("EDITIOND_STORE__RECHECK_INTERVAL_SECS", "2"),
        ("EDITIOND_STORE__ROUTE_TTL_SECS", "10"),
        ("EDITIOND_STORE__RETRY_AFTER_SECS", "2"),
    ];
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        nodes.push(Server::start_with(&base.join(format!("node{i}")), &env).await);
    }
    nodes
}

/// `GET /health` on `node`: the status, `Retry-After` if any, and the JSON body.
async fn health(http: &reqwest::Client, node: &Server) -> (u16, Option<String>, Value) {
    let r = http.get(node.url("/health")).send().await.unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, r.json().await.unwrap())
}

/// `/health` of `node` answers 200 for the Redis store within 15 s (it reconnects by itself).
async fn wait_healthy(http: &reqwest::Client, node: &Server) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = health(http, node).await;
        if status == 200 {
            assert_eq!(body["store"], "redis", "{body}");
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "/health did not recover: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/health` of `node` is 503 `store_unavailable` with `Retry-After`, within the Redis bound.
async fn assert_unhealthy(http: &reqwest::Client, node: &Server) {
    let started = Instant::now();
    let (status, retry_after, body) = health(http, node).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("2"));
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// One client: its node, its credentials, its endpoints by APPID.
struct Peer {
    node: usize,
    client: Client,
    creds: Vec<(String, String)>,
    endpoints: Vec<(String, String)>,
}

impl Peer {
    fn uaid(&self) -> &str {
        &self.creds[0].0
    }

    /// Reads UPDATEs (ACKing each) until every APPID has reached `version`; panics on a repeat
    /// of an ACKed version or on anything but updates.
    async fn receive_round(&mut self, version: u64) {
        let uaid = self.uaid().to_owned();
        let mut seen: HashMap<String, u64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self
            .endpoints
            .iter()
            .any(|(appid, _)| seen.get(appid).copied() != Some(version))
        {
            assert!(Instant::now() < deadline, "round {version}: only {seen:?}");
            let update = self.client.expect("update").await;
            let events = update["updates"][&uaid].as_object().expect("events").clone();
            for (appid, v) in events {
                let v = v.as_u64().expect("version");
                let before = seen.insert(appid.clone(), v);
                assert!(
                    before.is_none_or(|b| v > b),
                    "{appid} got {v} again after {before:?}"
                );
                assert!(v <= version, "future version {v}");
            }
            self.client.ack(&[&uaid]).await;
        }
        self.client.barrier().await;
    }
}

#[tokio::test]
async fn three_nodes_deliver_exactly_once_survive_a_node_and_a_redis_outage() {
    if !redis_available("three_nodes_deliver_exactly_once_survive_a_node_and_a_redis_outage") {
        return;
    }
    let mut redis = RedisServer::start_persistent();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(dir.path(), &redis, 3).await;
    let http = reqwest::Client::new();

    // Nine clients, three per node, two registrations each.
    let mut peers = Vec::new();
    for i in 0..9 {
        let node = i % 3;
        let mut client = Client::connect(&nodes[node]).await;
        let creds = client.hello_new(1).await;
        let mut endpoints = Vec::new();
        for _ in 0..2 {
            let appid = new_appid();
            let endpoint = client.register(&creds[0].0, &appid).await;
            endpoints.push((appid, endpoint));
        }
        peers.push(Peer {
            node,
            client,
            creds,
            endpoints,
        });
    }

    // Rounds of PUTs, each to a pseudo-random node: any node accepts any node's endpoint.
    let mut pick = 7usize;
    for version in 1..=3u64 {
        for peer in &peers {
            for (_, endpoint) in &peer.endpoints {
                pick = (pick * 31 + 11) % 97;
                let target = &nodes[pick % 3];
                assert_eq!(put_version(&http, &via(endpoint, target), version).await, 202);
            }
        }
        for peer in &mut peers {
            peer.receive_round(version).await;
        }
    }
    for peer in &mut peers {
        peer.client.expect_silence(Duration::from_millis(200)).await;
    }

    // SIGKILL node 0. Its clients lose their sockets; events PUT meanwhile wait in Redis.
    nodes[0].kill();
    let mut orphans: Vec<Peer> = Vec::new();
    let mut kept: Vec<Peer> = Vec::new();
    for peer in peers {
        if peer.node == 0 {
            orphans.push(peer);
        } else {
            kept.push(peer);
        }
    }
    for peer in &orphans {
        for (_, endpoint) in &peer.endpoints {
            assert_eq!(put_version(&http, &via(endpoint, &nodes[1]), 10).await, 202);
        }
    }
    for peer in &mut orphans {
        let mut client = Client::connect(&nodes[2]).await;
        let reply = client.hello(&peer.creds).await;
        assert_eq!(
            reply["uaids"][0]["status"], 200,
            "secret from node 0 accepted: {reply}"
        );
        peer.client = client;
        peer.node = 2;
        peer.receive_round(10).await;
    }
    // And the rest keep working, with PUTs to the survivors.
    for peer in kept.iter().chain(orphans.iter()) {
        for (_, endpoint) in &peer.endpoints {
            assert_eq!(put_version(&http, &via(endpoint, &nodes[1]), 11).await, 202);
        }
    }
    for peer in kept.iter_mut().chain(orphans.iter_mut()) {
        peer.receive_round(11).await;
    }

    // Redis freezes (SIGSTOP): PUTs answer 503 + Retry-After within the bound, never hang.
    let pid = redis.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let endpoint = kept[0].endpoints[0].1.clone();
    let started = Instant::now();
    let r = http
        .put(via(&endpoint, &nodes[2]))
        .body("version=12")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // /health says so (a bounded PING), so a load balancer can take the node out.
    assert_unhealthy(&http, &nodes[1]).await;
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    for node in &nodes[1..] {
        wait_healthy(&http, node).await;
    }

    // Redis dies and comes back on the same port with its AOF.
    redis.kill();
    let r = http
        .put(via(&endpoint, &nodes[1]))
        .body("version=12")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // Nothing was stored: the same version is new once Redis is back.
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "store_unavailable");
    assert_unhealthy(&http, &nodes[2]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Sockets stayed open through the outage.
    for peer in kept.iter_mut().chain(orphans.iter_mut()) {
        peer.client.barrier().await;
    }
    redis.restart();
    // Service resumes by itself, on every node: PUTs succeed again and reach clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for peer in kept.iter().chain(orphans.iter()) {
        for (i, (_, e)) in peer.endpoints.iter().enumerate() {
            let target = &nodes[1 + i % 2];
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let status = put_version(&http, &via(e, target), 12).await;
                if status == 202 {
                    break;
                }
                assert_eq!(status, 503);
                assert!(Instant::now() < deadline, "PUTs did not recover");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for peer in kept.iter_mut().chain(orphans.iter_mut()) {
        peer.receive_round(12).await;
        peer.client.expect_silence(Duration::from_millis(200)).await;
    }
    for node in &nodes[1..] {
        wait_healthy(&http, node).await;
    }
}

#[tokio::test]
async fn a_lost_nudge_is_repaired_by_the_periodic_recheck() {
    use editiond::ids::{Appid, Uaid};
    use editiond::store::{now_ms, PutOutcome, RedisStore, RedisTarget, Store, VersionReq};

    if !redis_available("a_lost_nudge_is_repaired_by_the_periodic_recheck") {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &redis, 1).await;
    let mut c = Client::connect(&nodes[0]).await;
    let creds = c.hello_new(1).await;
    let appid = new_appid();
    c.register(&creds[0].0, &appid).await;

    // Write the event straight into Redis, as a PUT whose nudge was lost would leave it.
    let store = RedisStore::open(&RedisTarget {
        url: redis.url(),
        cluster_urls: Vec::new(),
        timeout: Duration::from_secs(2),
    })
    .await
    .unwrap();
    let (uaid, app) = (Uaid::parse(&creds[0].0).unwrap(), Appid::parse(&appid).unwrap());
    let outcome = store
        .put_version(uaid, app, VersionReq::Exact(42), now_ms() + 60_000)
        .await
        .unwrap();
    assert_eq!(outcome, PutOutcome::Raised(42));
    // The re-check runs every 2 s here.
    let started = Instant::now();
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&creds[0].0][&appid], 42);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    c.ack(&[&creds[0].0]).await;
    c.barrier().await;
    c.expect_silence(Duration::from_millis(2500)).await;
}

/// Memory per connected client on a node and in Redis, for capacity planning (README,
/// "Numbers"). Not a pass/fail test:
/// `cargo test --release --test multinode -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_memory_per_connected_client() {
    if !redis_available("measure_memory_per_connected_client") {
        return;
    }
    const CLIENTS: usize = 3000;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(dir.path(), &redis, 1).await;
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let redis_mem = || {
        let info = crate::common::redis_harness::raw_command(redis.port, "INFO memory").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    // Warm up allocator and runtime with a few clients first.
    let mut clients = Vec::with_capacity(CLIENTS + 10);
    for _ in 0..10 {
        let mut c = Client::connect(&nodes[0]).await;
        let creds = c.hello_new(1).await;
        c.register(&creds[0].0, &new_appid()).await;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (node0, redis0) = (rss(nodes[0].pid()), redis_mem());
    for _ in 0..CLIENTS {
        let mut c = Client::connect(&nodes[0]).await;
        let creds = c.hello_new(1).await;
        c.register(&creds[0].0, &new_appid()).await;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (node1, redis1) = (rss(nodes[0].pid()), redis_mem());
    println!(
        "{CLIENTS} idle clients (hello + 1 registration): node RSS {:.1} KiB per client, Redis {:.0} bytes per client",
        (node1.saturating_sub(node0)) as f64 / CLIENTS as f64 / 1024.0,
        (redis1.saturating_sub(redis0)) as f64 / CLIENTS as f64
    );
}
