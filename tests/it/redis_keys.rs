//! The shared server keys on Redis (`ed:server-keys`), through the real binary and a real
//! redis-server: lost or changed keys refuse to start while the Redis holds data written with
//! them, as on sled; `serve --reset-keys` starts over; an empty Redis gets fresh keys, and nodes
//! racing on it agree on one set.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::redis_harness::{raw_command, redis_available, RedisServer};
use crate::common::*;

/// Keys for `[keys]` (32 bytes each in base64url); not the ones any node generates.
const PINNED_ENDPOINT_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const PINNED_SECRET_KEY: &str = "EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEA";

fn redis_env(redis: &RedisServer) -> Vec<(String, String)> {
    vec![
        ("EDITIOND_STORE__BACKEND".into(), "redis".into()),
        ("EDITIOND_STORE__URL".into(), redis.url()),
        ("EDITIOND_STORE__REDIS_TIMEOUT_MS".into(), "1000".into()),
    ]
}

fn pinned(redis: &RedisServer) -> Vec<(String, String)> {
    let mut env = redis_env(redis);
    env.push(("EDITIOND_KEYS__ENDPOINT_KEY".into(), PINNED_ENDPOINT_KEY.into()));
    env.push(("EDITIOND_KEYS__SECRET_KEY".into(), PINNED_SECRET_KEY.into()));
    env
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// `editiond serve` (with `extra` flags) on a free port.
async fn start(dir: &Path, env: &[(String, String)], extra: &[&str]) -> Server {
    let addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = vec!["serve"];
    command.extend_from_slice(extra);
    Server::start_command(dir, addr, &command, &refs(env)).await
}

/// `editiond serve` that must refuse to start: its exit status and what it printed.
fn refused(dir: &Path, env: &[(String, String)]) -> (ExitStatus, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::create_dir_all(dir).unwrap();
    let log = dir.join(format!("refused-{}.log", free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .env("RUST_LOG", "warn")
        .envs(refs(env))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start editiond");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, std::fs::read_to_string(&log).unwrap());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "editiond neither refused nor stopped:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One inline command to the test's Redis; the raw RESP reply.
fn redis_cli(redis: &RedisServer, command: &str) -> String {
    raw_command(redis.port, command).expect("redis answers")
}

/// The sled refusal's exit status: 1, "cannot start" (`editiond serve --help`).
fn assert_refused(status: ExitStatus, log: &str, says: &[&str]) {
    assert_eq!(status.code(), Some(1), "{log}");
    for text in says {
        assert!(log.contains(text), "no {text:?} in:\n{log}");
    }
    assert_eq!(
        log.trim_end().lines().count(),
        1,
        "one line, printed once:\n{log}"
    );
}

/// The same endpoint, addressed to another node.
fn via(endpoint: &str, node: &Server) -> String {
    let (_, token) = endpoint.split_once("/v1/e/").expect("endpoint URL");
    node.url(&format!("/v1/e/{token}"))
}

/// Says hello for `creds` on a new connection to `node`: the entry's status.
async fn hello_status(node: &Server, creds: &[(String, String)]) -> u64 {
    let mut c = Client::connect(node).await;
    let v = c.hello(creds).await;
    v["uaids"][0]["status"].as_u64().expect("status")
}

#[tokio::test]
async fn a_deleted_server_key_refuses_to_start_until_reset() {
    if !redis_available("a_deleted_server_key_refuses_to_start_until_reset") {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let env = redis_env(&redis);
    let http = reqwest::Client::new();
    // An empty Redis: the first start makes keys.
    let mut node = start(dir.path(), &env, &[]).await;
    let mut enrolled = enroll(&node).await;
    enrolled.put_and_receive(&http, 5).await;
    drop(enrolled.c);
    assert!(node.terminate().success());

    assert_eq!(redis_cli(&redis, "DEL ed:server-keys"), ":1\r\n");
    let (status, log) = refused(dir.path(), &env);
    assert_refused(
        status,
        &log,
        &[
            "has no server keys (key ed:server-keys)",
            "--reset-keys",
            "records that its data",
        ],
    );
    assert!(!log.contains("endpoint_key = \""), "{log}");
    assert_eq!(
        redis_cli(&redis, "EXISTS ed:server-keys"),
        ":0\r\n",
        "keys were generated anyway"
    );

    let node = start(dir.path(), &env, &["--reset-keys"]).await;
    assert_eq!(redis_cli(&redis, "EXISTS ed:server-keys"), ":1\r\n");
    // The old endpoint and secret were made with the lost keys.
    assert_eq!(put_version(&http, &via(&enrolled.endpoint, &node), 6).await, 404);
    assert_eq!(hello_status(&node, &enrolled.creds).await, 401);
    let mut fresh = enroll(&node).await;
    fresh.put_and_receive(&http, 7).await;
    drop(fresh.c);
    drop(node);
    // Once reset, the new keys are the data's keys: a plain start takes them.
    let node = start(dir.path(), &env, &[]).await;
    assert_eq!(put_version(&http, &via(&fresh.endpoint, &node), 8).await, 202);
}

#[tokio::test]
async fn lost_keys_with_bound_uaids_left_refuse_to_start() {
    if !redis_available("lost_keys_with_bound_uaids_left_refuse_to_start") {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let env = redis_env(&redis);
    let node = start(dir.path(), &env, &[]).await;
    let enrolled = enroll(&node).await;
    drop(enrolled.c);
    drop(node);
    // Both the keys and their record gone (deleted by hand), the bindings left.
    assert_eq!(
        redis_cli(&redis, "DEL ed:server-keys ed:keys-id:{ed:server-keys}"),
        ":2\r\n"
    );
    let (status, log) = refused(dir.path(), &env);
    assert_refused(
        status,
        &log,
        &[
            "has no server keys",
            "bound UAIDs or pending events",
            "--reset-keys",
        ],
    );
    // A whole Redis lost is a new start: nothing is left that old keys could open.
    assert_eq!(redis_cli(&redis, "FLUSHALL"), "+OK\r\n");
    let node = start(dir.path(), &env, &[]).await;
    assert_eq!(hello_status(&node, &enrolled.creds).await, 401);
}

#[tokio::test]
async fn keys_from_config_other_than_the_redis_data_refuse_to_start_until_reset() {
    if !redis_available("keys_from_config_other_than_the_redis_data_refuse_to_start_until_reset") {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (generated, pinned) = (redis_env(&redis), pinned(&redis));
    let http = reqwest::Client::new();
    let node = start(dir.path(), &generated, &[]).await;
    let enrolled = enroll(&node).await;
    drop(enrolled.c);
    drop(node);

    let (status, log) = refused(dir.path(), &pinned);
    assert_refused(
        status,
        &log,
        &[
            "the keys from [keys] endpoint_key and secret_key are not the keys",
            "--reset-keys",
        ],
    );
    assert!(!log.contains(PINNED_SECRET_KEY), "{log}");

    let node = start(dir.path(), &pinned, &["--reset-keys"]).await;
    assert_eq!(put_version(&http, &via(&enrolled.endpoint, &node), 2).await, 404);
    let pinned_enrolled = enroll(&node).await;
    drop(pinned_enrolled.c);
    drop(node);
    // The generated keys were kept aside, not destroyed.
    let kept = redis_cli(&redis, "KEYS ed:server-keys-replaced-*");
    assert!(kept.starts_with("*1\r\n"), "{kept:?}");
    // The pinned keys are the data's now: they start; generated keys would not.
    let node = start(dir.path(), &pinned, &[]).await;
    assert_eq!(
        put_version(&http, &via(&pinned_enrolled.endpoint, &node), 3).await,
        202
    );
    drop(node);
    let (status, log) = refused(dir.path(), &generated);
    assert_refused(status, &log, &["has no server keys", "records that its data"]);
}

#[tokio::test]
async fn nodes_racing_on_an_empty_redis_agree_on_one_set_of_keys() {
    if !redis_available("nodes_racing_on_an_empty_redis_agree_on_one_set_of_keys") {
        return;
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let env = redis_env(&redis);
    let http = reqwest::Client::new();
    for round in 0..3 {
        assert_eq!(redis_cli(&redis, "FLUSHALL"), "+OK\r\n");
        // Both processes are spawned before either is awaited.
        let (dir_a, dir_b) = (
            dir.path().join(format!("a{round}")),
            dir.path().join(format!("b{round}")),
        );
        let (a, b) = tokio::join!(start(&dir_a, &env, &[]), start(&dir_b, &env, &[]));
        let enrolled = enroll(&a).await;
        assert_eq!(put_version(&http, &via(&enrolled.endpoint, &b), 2).await, 202);
        assert_eq!(hello_status(&b, &enrolled.creds).await, 200);
        let other = enroll(&b).await;
        assert_eq!(put_version(&http, &via(&other.endpoint, &a), 2).await, 202);
    }
}

/// Waits up to 15 s for `command` to answer `reply` on the test's Redis.
async fn wait_redis(redis: &RedisServer, command: &str, reply: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = raw_command(redis.port, command).unwrap_or_default();
        if reply(&got) {
            return;
        }
        assert!(Instant::now() < deadline, "{command}: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_restarted_empty_gets_the_running_nodes_keys_back() {
    if !redis_available("a_redis_restarted_empty_gets_the_running_nodes_keys_back") {
        return;
    }
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = redis_env(&redis);
    env.push(("EDITIOND_STORE__KEYS_CHECK_SECS".into(), "1".into()));
    let http = reqwest::Client::new();
    let a = start(&dir.path().join("a"), &env, &[]).await;
    let before = enroll(&a).await;
    // Without persistence: everything is gone, but node a still holds the keys in memory.
    redis.restart();
    assert_eq!(redis_cli(&redis, "EXISTS ed:server-keys"), ":0\r\n");
    wait_redis(&redis, "EXISTS ed:server-keys", |r| r == ":1\r\n").await;
    let b = start(&dir.path().join("b"), &env, &[]).await;
    // Node b runs with a's keys: a's old UAID secret passes there, and a's new endpoints.
    assert_eq!(hello_status(&b, &before.creds).await, 200);
    let after = enroll(&a).await;
    assert_eq!(put_version(&http, &via(&after.endpoint, &b), 3).await, 202);
}

#[tokio::test]
async fn a_node_joining_a_restarted_redis_before_its_keys_are_back_refuses() {
    if !redis_available("a_node_joining_a_restarted_redis_before_its_keys_are_back_refuses") {
        return;
    }
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = redis_env(&redis);
    // Node a re-subscribes within a second but would put its keys back only after an hour.
    env.push(("EDITIOND_STORE__KEYS_CHECK_SECS".into(), "3600".into()));
    env.push(("EDITIOND_STORE__RECHECK_INTERVAL_SECS".into(), "1".into()));
    env.push(("EDITIOND_STORE__ROUTE_TTL_SECS".into(), "10".into()));
    let a = start(&dir.path().join("a"), &env, &[]).await;
    redis.restart();
    wait_redis(&redis, "PUBSUB CHANNELS ed:node:*", |r| r.starts_with("*1\r\n")).await;
    let (status, log) = refused(&dir.path().join("b"), &env);
    assert_refused(
        status,
        &log,
        &[
            "has no server keys",
            "1 other editiond node(s) listen on it",
            "start this node again",
        ],
    );
    assert_eq!(redis_cli(&redis, "EXISTS ed:server-keys"), ":0\r\n");
    drop(a);
}
