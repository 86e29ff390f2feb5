//! Instant sync end to end (proto/storage.md "Instant sync"): the real binary, a device that
//! registers a watch over a real WebSocket, and another device that writes with Hawk-signed
//! Sync 1.5 requests. Tokens are minted by the test's own tokenlib code (tests/storage_support).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::UdpSocket;

use crate::common::{new_appid, Client, Server};
use crate::storage_support::{now_secs, token_for, Sync};

const SECRET: &str = "watch-master-secret";
const UID: u64 = 42;
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

async fn start(dir: &std::path::Path) -> Server {
    Server::start_with(
        dir,
        &[
            ("EDITIOND_STORAGE__MASTER_SECRET", SECRET),
            ("EDITIOND_KICK__MIN_INTERVAL_SECS", "0"),
            ("EDITIOND_KICK__UDP__ENABLED", "true"),
            ("EDITIOND_KICK__UDP__ALLOW", r#"["127.0.0.1/32"]"#),
        ],
    )
    .await
}

fn base(server: &Server) -> String {
    format!("http://{}", server.addr)
}

/// A storage token for `UID` on this server, valid for an hour.
fn token(server: &Server) -> String {
    token_for(SECRET, UID, &base(server), now_secs() + 3600.0).0
}

/// register with extra fields; returns the reply.
async fn register(c: &mut Client, uaid: &str, appid: &str, extra: Value) -> Value {
    let mut frame = json!({"type": "register", "uaid": uaid, "appid": appid});
    for (k, v) in extra.as_object().unwrap() {
        frame[k] = v.clone();
    }
    c.send(frame).await;
    c.expect("register").await
}

/// Reads the next UPDATE, checks it carries exactly `version` for (uaid, appid), and ACKs it.
async fn expect_update(c: &mut Client, uaid: &str, appid: &str, version: u64) {
    let update = c.expect("update").await;
    assert_eq!(update["updates"], json!({uaid: {appid: version}}), "{update}");
    c.ack(&[uaid]).await;
}

/// Takes UPDATEs (ACKing each) until every (APPID, version) of `expected` has arrived; the
/// events of one write to several collections may come in one UPDATE or several.
async fn expect_update_of(c: &mut Client, uaid: &str, expected: &[(&str, u64)]) {
    let mut seen = serde_json::Map::new();
    while seen.len() < expected.len() {
        let update = c.expect("update").await;
        let apps = update["updates"][uaid].as_object().cloned().unwrap_or_default();
        assert!(!apps.is_empty(), "{update}");
        seen.extend(apps);
        c.ack(&[uaid]).await;
    }
    let want: serde_json::Map<String, Value> = expected
        .iter()
        .map(|(appid, v)| (appid.to_string(), json!(v)))
        .collect();
    assert_eq!(seen, want);
}

/// A write's X-Last-Modified, in ms, after checking it succeeded.
fn written(r: &crate::storage_support::Resp) -> u64 {
    assert_eq!(r.status, 200, "{r:?}");
    r.ts("x-last-modified")
}

#[tokio::test]
async fn writes_to_watched_collections_update_the_watching_device_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path()).await;
    let mut a = Client::connect(&server).await;
    let creds = a.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let appid = new_appid();
    let watch = json!({"watch": {"token": token(&server), "collections": ["bookmarks", "tabs"]}});
    let reply = register(&mut a, &uaid, &appid, watch).await;
    assert_eq!(reply["status"], 200, "{reply}");
    assert!(
        reply["endpoint"].is_string(),
        "the reply keeps its shape: {reply}"
    );
    let b = Sync::new(&base(&server), SECRET, UID);

    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b1", "payload": "x"}]))
            .await,
    );
    expect_update(&mut a, &uaid, &appid, ts).await;
    let ts = written(&b.put("storage/tabs/t1", json!({"payload": "y"})).await);
    expect_update(&mut a, &uaid, &appid, ts).await;

    // An unwatched collection, and another user's watched one, raise nothing.
    written(
        &b.post("storage/history", json!([{"id": "h1", "payload": "x"}]))
            .await,
    );
    let other = Sync::new(&base(&server), SECRET, UID + 1);
    written(
        &other
            .post("storage/bookmarks", json!([{"id": "b1", "payload": "x"}]))
            .await,
    );
    a.expect_silence(QUIET).await;

    // Deleting a watched collection is a write to it: version = the delete's time.
    let ts = written(&b.delete("storage/tabs").await);
    expect_update(&mut a, &uaid, &appid, ts).await;
    a.barrier().await;

    // The watch is durable: killed (no shutdown path) and started again, it still works.
    server.restart().await;
    let mut a = Client::connect(&server).await;
    let hello = a.hello(&creds).await;
    assert_eq!(hello["uaids"][0]["status"], 200, "{hello}");
    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b2", "payload": "z"}]))
            .await,
    );
    expect_update(&mut a, &uaid, &appid, ts).await;

    // A register without "watch" keeps it; "watch":null removes it.
    assert_eq!(register(&mut a, &uaid, &appid, json!({})).await["status"], 200);
    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b3", "payload": "z"}]))
            .await,
    );
    expect_update(&mut a, &uaid, &appid, ts).await;
    let cleared = register(&mut a, &uaid, &appid, json!({"watch": null})).await;
    assert_eq!(cleared["status"], 200, "{cleared}");
    written(
        &b.post("storage/bookmarks", json!([{"id": "b4", "payload": "z"}]))
            .await,
    );
    a.expect_silence(QUIET).await;

    // Unregister removes the watch with the registration; registering the pair again (a new
    // registration) does not bring it back.
    let second = new_appid();
    let watch = json!({"watch": {"token": token(&server), "collections": ["bookmarks"]}});
    assert_eq!(register(&mut a, &uaid, &second, watch).await["status"], 200);
    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b5", "payload": "z"}]))
            .await,
    );
    expect_update(&mut a, &uaid, &second, ts).await;
    a.send(json!({"type": "unregister", "uaid": uaid, "appid": second}))
        .await;
    assert_eq!(a.expect("unregister").await["status"], 200);
    assert_eq!(register(&mut a, &uaid, &second, json!({})).await["status"], 200);
    written(
        &b.post("storage/bookmarks", json!([{"id": "b6", "payload": "z"}]))
            .await,
    );
    a.expect_silence(QUIET).await;
}

#[tokio::test]
async fn bad_watches_fail_the_register_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut a = Client::connect(&server).await;
    let uaid = a.hello_new(1).await[0].0.clone();
    let node = base(&server);
    let expired = token_for(SECRET, UID, &node, now_secs() - 10.0).0;
    let forged = token_for("another-secret", UID, &node, now_secs() + 3600.0).0;
    let elsewhere = token_for(SECRET, UID, "http://elsewhere.example", now_secs() + 3600.0).0;
    for token in [expired, forged, elsewhere, "not a token".to_owned()] {
        let watch = json!({"watch": {"token": token, "collections": ["bookmarks"]}});
        let reply = register(&mut a, &uaid, &new_appid(), watch).await;
        assert_eq!(
            (reply["status"].clone(), reply["error"].clone()),
            (json!(401), json!("bad_watch_token")),
            "{reply}"
        );
        assert!(reply.get("endpoint").is_none(), "{reply}");
    }
    let good = token(&server);
    for watch in [
        json!("bookmarks"),
        json!({"collections": ["bookmarks"]}),
        json!({"token": good, "collections": []}),
        json!({"token": good, "collections": ["no spaces"]}),
        json!({"token": good, "collections": [7]}),
    ] {
        let reply = register(&mut a, &uaid, &new_appid(), json!({ "watch": watch })).await;
        assert_eq!(
            (reply["status"].clone(), reply["error"].clone()),
            (json!(400), json!("invalid_watch")),
            "{reply}"
        );
    }
    // The socket is still fine.
    a.barrier().await;
}

#[tokio::test]
async fn a_watching_device_that_is_away_is_kicked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut a = Client::connect(&server).await;
    let creds = a.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let appid = new_appid();
    let fields = json!({
        "kick": {"driver": "udp", "addr": udp.local_addr().unwrap().to_string()},
        "watch": {"token": token(&server), "collections": ["bookmarks"]},
    });
    assert_eq!(register(&mut a, &uaid, &appid, fields).await["status"], 200);
    a.ws.close(None).await.unwrap();
    drop(a);

    // The server may not have seen the close yet: write until a datagram arrives.
    let b = Sync::new(&base(&server), SECRET, UID);
    let mut buf = [0u8; 64];
    let mut last = 0;
    let mut got = None;
    for _ in 0..40 {
        last = written(
            &b.post("storage/bookmarks", json!([{"id": "b", "payload": "k"}]))
                .await,
        );
        if let Ok(n) = tokio::time::timeout(Duration::from_millis(500), udp.recv(&mut buf)).await {
            got = Some(n.unwrap());
            break;
        }
    }
    let got = got.expect("a kick within 40 writes");
    assert_eq!(&buf[..got], uaid.as_bytes(), "a UDP kick carries the UAID");

    // Back, it gets the events, up to the newest write's version.
    let mut a = Client::connect(&server).await;
    a.hello(&creds).await;
    loop {
        let update = a.expect("update").await;
        let version = update["updates"][&uaid][&appid].as_u64().unwrap();
        assert!(version <= last, "{update} vs {last}");
        if version == last {
            break;
        }
        a.ack(&[&uaid]).await;
    }
}

/// On Redis (storage pinned to one node, its watches in that node's sled), a device that
/// registered its watch there and now connects to another node still gets the event: the
/// raise goes through Redis routing like a PUT's.
#[tokio::test]
async fn on_redis_the_event_reaches_a_device_held_by_another_node() {
    use crate::common::redis_harness::{redis_available, RedisServer};
    if !redis_available("on_redis_the_event_reaches_a_device_held_by_another_node") {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let common = [
        ("EDITIOND_STORE__BACKEND", "redis"),
        ("EDITIOND_STORE__URL", url.as_str()),
    ];
    let mut with_storage = common.to_vec();
    with_storage.extend([
        ("EDITIOND_STORAGE__MASTER_SECRET", SECRET),
        ("EDITIOND_STORAGE__PINNED", "true"),
    ]);
    let storage_node = Server::start_with(&dir.path().join("s"), &with_storage).await;
    let other_node = Server::start_with(&dir.path().join("o"), &common).await;

    let mut a = Client::connect(&storage_node).await;
    let creds = a.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let appid = new_appid();
    let watch = json!({"watch": {"token": token(&storage_node), "collections": ["bookmarks"]}});
    assert_eq!(
        register(&mut a, &uaid, &appid, watch.clone()).await["status"],
        200
    );
    // The device leaves the storage node (which lets go of the UAID) and connects to the other.
    a.ws.close(None).await.unwrap();
    drop(a);
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = storage_node.metrics(&http).await;
        let held = text
            .lines()
            .find_map(|l| l.strip_prefix("editiond_held_uaids "))
            .expect("the held_uaids gauge");
        if held.trim() == "0" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the UAID is still held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut o = Client::connect(&other_node).await;
    assert_eq!(o.hello(&creds).await["uaids"][0]["status"], 200);
    // A node without the storage API cannot vouch for a watch token.
    let refused = register(&mut o, &uaid, &new_appid(), watch).await;
    assert_eq!(refused["error"], "bad_watch_token", "{refused}");

    // The storage node's write reaches the device through Redis routing.
    let b = Sync::new(&base(&storage_node), SECRET, UID);
    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b1", "payload": "x"}]))
            .await,
    );
    expect_update(&mut o, &uaid, &appid, ts).await;
}

/// `DELETE storage?keep=meta/global` is a write to every collection it removes or changes:
/// their watches get the delete's time; a watch on `meta` holding only `global` hears nothing.
#[tokio::test]
async fn delete_storage_keeping_meta_global_updates_the_collections_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut a = Client::connect(&server).await;
    let uaid = a.hello_new(1).await[0].0.clone();
    let (on_bookmarks, on_meta) = (new_appid(), new_appid());
    for (appid, collection) in [(&on_bookmarks, "bookmarks"), (&on_meta, "meta")] {
        let watch = json!({"watch": {"token": token(&server), "collections": [collection]}});
        assert_eq!(register(&mut a, &uaid, appid, watch).await["status"], 200);
    }
    let b = Sync::new(&base(&server), SECRET, UID);
    let ts = written(&b.put("storage/meta/global", json!({"payload": "g"})).await);
    expect_update(&mut a, &uaid, &on_meta, ts).await;
    let ts = written(
        &b.post("storage/bookmarks", json!([{"id": "b1", "payload": "x"}]))
            .await,
    );
    expect_update(&mut a, &uaid, &on_bookmarks, ts).await;

    let ts = written(&b.delete("storage?keep=meta/global").await);
    expect_update(&mut a, &uaid, &on_bookmarks, ts).await;
    a.expect_silence(QUIET).await;

    // meta loses another record: now it changed too (and bookmarks, already gone, did not).
    let ts = written(&b.put("storage/meta/other", json!({"payload": "o"})).await);
    expect_update(&mut a, &uaid, &on_meta, ts).await;
    let ts = written(&b.delete("storage?keep=meta/global").await);
    expect_update(&mut a, &uaid, &on_meta, ts).await;
    a.expect_silence(QUIET).await;
}

/// `DELETE storage` and `DELETE /1.5/{uid}` are writes to every collection they remove: the
/// other devices hear of the wipe at the delete's time, and a user without collections hears
/// nothing.
#[tokio::test]
async fn deleting_all_storage_updates_every_watched_collection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut a = Client::connect(&server).await;
    let uaid = a.hello_new(1).await[0].0.clone();
    let (on_bookmarks, on_tabs) = (new_appid(), new_appid());
    for (appid, collection) in [(&on_bookmarks, "bookmarks"), (&on_tabs, "tabs")] {
        let watch = json!({"watch": {"token": token(&server), "collections": [collection]}});
        assert_eq!(register(&mut a, &uaid, appid, watch).await["status"], 200);
    }
    let b = Sync::new(&base(&server), SECRET, UID);
    for round in 0..2 {
        for (appid, collection) in [(&on_bookmarks, "bookmarks"), (&on_tabs, "tabs")] {
            let path = format!("storage/{collection}");
            let ts = written(&b.post(&path, json!([{"id": "r", "payload": "x"}])).await);
            expect_update(&mut a, &uaid, appid, ts).await;
        }
        let path = if round == 0 {
            "storage".to_owned()
        } else {
            b.root()
        };
        let ts = written(&b.delete(&path).await);
        expect_update_of(&mut a, &uaid, &[(&on_bookmarks, ts), (&on_tabs, ts)]).await;
        a.expect_silence(QUIET).await;
    }
    // Nothing left to remove: nothing to hear.
    written(&b.delete("storage").await);
    a.expect_silence(QUIET).await;
}
