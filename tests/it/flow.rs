//! The seed flow end to end: hello, register, PUT, UPDATE, ACK, reconnect, takeover, REST poll.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn put_reaches_connected_client_and_ack_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let uaid = &creds[0].0;
    let appid = new_appid();
    let endpoint = c.register(uaid, &appid).await;
    assert!(endpoint.starts_with(&server.url("/v1/e/")), "{endpoint}");
    assert!(!endpoint.contains(uaid.as_str()) && !endpoint.contains(&appid));
    // Same pair, same endpoint.
    assert_eq!(c.register(uaid, &appid).await, endpoint);

    assert_eq!(put_version(&http, &endpoint, 5).await, 202);
    let update = c.expect("update").await;
    assert_eq!(update["updates"][uaid][&appid], 5);
    // Older or equal versions change nothing.
    assert_eq!(put_version(&http, &endpoint, 5).await, 200);
    assert_eq!(put_version(&http, &endpoint, 3).await, 200);
    c.ack(&[uaid]).await;
    c.barrier().await;

    // A reconnect finds nothing pending.
    drop(c);
    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    c.expect_silence(Duration::from_millis(300)).await;
    // And the last known version survived the ACK.
    assert_eq!(put_version(&http, &endpoint, 5).await, 200);
    assert_eq!(put_version(&http, &endpoint, 6).await, 202);
    assert_eq!(c.expect("update").await["updates"][uaid][&appid], 6);
}

#[tokio::test]
async fn pending_events_wait_for_the_client_and_coalesce() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(2).await;
    let (a1, a2) = (new_appid(), new_appid());
    let e1 = c.register(&creds[0].0, &a1).await;
    let e2 = c.register(&creds[1].0, &a2).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for v in 1..=10 {
        assert_eq!(put_version(&http, &e1, v).await, 202);
    }
    // JSON body and empty body (server clock) work too.
    let r = http.put(&e2).json(&json!({"version": 77})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["version"], 77);
    let r = http.put(&e2).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let clock_version = r.json::<serde_json::Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();
    assert!(clock_version > 77 && clock_version < (1 << 53));

    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&creds[0].0][&a1], 10);
    assert_eq!(update["updates"][&creds[1].0][&a2], clock_version);
    c.ack(&[&creds[0].0, &creds[1].0]).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn put_during_inflight_update_stays_pending_and_follows_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut enrolled = enroll(&server).await;
    enrolled.put_and_receive(&http, 1).await;
    let Enrolled {
        mut c,
        creds,
        uaid,
        appid,
        endpoint,
    } = enrolled;
    // Version 2 lands while version 1 is in flight: no second UPDATE before the ACK.
    assert_eq!(put_version(&http, &endpoint, 2).await, 202);
    c.expect_silence(Duration::from_millis(300)).await;
    c.ack(&[&uaid]).await;
    assert_eq!(c.expect("update").await["updates"][&uaid][&appid], 2);
    c.ack(&[&uaid]).await;
    c.barrier().await;
    drop(c);
    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn secrets_bind_on_first_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut c = Client::connect(&server).await;
    let chosen = uuid::Uuid::new_v4().to_string();
    c.send(json!({"type": "hello", "uaids": [{"uaid": chosen}]}))
        .await;
    let v = c.expect("hello").await;
    let secret = v["uaids"][0]["secret"].as_str().unwrap().to_owned();
    assert_eq!(v["uaids"][0]["uaid"], chosen.as_str());
    drop(c);

    let mut thief = Client::connect(&server).await;
    let other = uuid::Uuid::new_v4().to_string();
    thief
        .send(json!({"type": "hello", "uaids": [
            {"uaid": chosen},
            {"uaid": chosen, "secret": "AAAA"},
            {"uaid": other},
        ]}))
        .await;
    let v = thief.expect("hello").await;
    assert_eq!(v["uaids"][0]["status"], 401);
    assert_eq!(v["uaids"][1]["status"], 401);
    assert_eq!(v["uaids"][2]["status"], 200, "other entries keep working");
    // The thief cannot register for the UAID it failed to claim.
    thief
        .send(json!({"type": "register", "uaid": chosen, "appid": new_appid()}))
        .await;
    assert_eq!(thief.expect("register").await["status"], 403);

    let mut owner = Client::connect(&server).await;
    let v = owner.hello(&[(chosen.clone(), secret)]).await;
    assert_eq!(v["uaids"][0]["status"], 200);
    assert!(v["uaids"][0].get("secret").is_none(), "secret only when new");
}

#[tokio::test]
async fn newer_connection_takes_the_uaid() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut old = Client::connect(&server).await;
    let creds = old.hello_new(2).await;
    let appid = new_appid();
    let endpoint = old.register(&creds[0].0, &appid).await;

    let mut new = Client::connect(&server).await;
    new.hello(&creds[..1]).await;
    let released = old.expect("released").await;
    assert_eq!(released["uaids"][0], creds[0].0.as_str());
    assert_eq!(put_version(&http, &endpoint, 9).await, 202);
    assert_eq!(new.expect("update").await["updates"][&creds[0].0][&appid], 9);
    old.expect_silence(Duration::from_millis(200)).await;

    // Losing its last UAID closes the old connection.
    let mut newest = Client::connect(&server).await;
    newest.hello(&creds[1..]).await;
    old.expect("released").await;
    old.expect_error_close(410, "replaced", 4410).await;
}

#[tokio::test]
async fn unregister_makes_the_endpoint_gone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let appid = new_appid();
    let endpoint = c.register(&creds[0].0, &appid).await;
    c.send(json!({"type": "unregister", "uaid": creds[0].0, "appid": appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    let r = http.put(&endpoint).body("version=1").send().await.unwrap();
    assert_eq!(r.status(), 410);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "gone");
}

#[tokio::test]
async fn rest_poll_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let (uaid, secret) = creds[0].clone();
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    drop(c);
    let body = json!({"uaids": [{"uaid": uaid, "secret": secret}]});

    let r = http
        .post(server.url("/v1/poll"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // A long poll is woken by a PUT.
    let poll = {
        let http = http.clone();
        let url = server.url("/v1/poll?wait=10");
        let body = body.clone();
        tokio::spawn(async move { http.post(url).json(&body).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(put_version(&http, &endpoint, 4).await, 202);
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["updates"][&uaid][&appid], 4);

    // A newer version arrives before the ACK of 4: the ACK leaves it pending.
    assert_eq!(put_version(&http, &endpoint, 5).await, 202);
    let ack =
        json!({"uaids": [{"uaid": uaid, "secret": secret}], "updates": {uaid.clone(): {appid.clone(): 4}}});
    let r = http.post(server.url("/v1/ack")).json(&ack).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(server.url("/v1/poll"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["updates"][&uaid][&appid],
        5
    );

    // Wrong secret: 401 with a JSON error.
    let bad = json!({"uaids": [{"uaid": uaid, "secret": "nope"}]});
    let r = http.post(server.url("/v1/poll")).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "bad_secret"
    );
}

#[tokio::test]
async fn health_metrics_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let r = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let health = r.json::<serde_json::Value>().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"], "sled", "{health}");
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let endpoint = c.register(&creds[0].0, &new_appid()).await;
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    c.expect("update").await;
    let text = server.metrics(&http).await;
    for needle in [
        "editiond_connections 1",
        "editiond_puts_total{status=\"202\"} 1",
        "editiond_updates_sent_total 1",
        // The PUT's nudge said its version was committed: the UPDATE needed no sync of its own.
        "editiond_update_syncs_skipped_total 1",
        "editiond_pending_events 1",
        "editiond_store_sync_seconds_count",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let status = server.terminate();
    assert!(status.success(), "{status}");
    c.expect_error_close(503, "shutting_down", 1001).await;
}

/// While sockets drain after SIGTERM the port stays open: `/health` answers 503 `shutting_down`
/// (a load balancer stops sending) instead of refusing the connection.
#[tokio::test]
async fn health_says_shutting_down_while_sockets_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    // A client that never reads holds its socket open through the close handshake (up to 2 s).
    let mut c = Client::connect(&server).await;
    c.hello_new(1).await;
    server.send_term();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let health = loop {
        let r = http.get(server.url("/health")).send().await;
        match r {
            Ok(r) if r.status() == 503 => break r,
            Ok(r) => assert_eq!(r.status(), 200, "before the signal is handled"),
            Err(e) => panic!("/health refused during the drain: {e}"),
        }
        assert!(std::time::Instant::now() < deadline, "/health never said 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(health.headers().contains_key("retry-after"));
    let body = health.json::<serde_json::Value>().await.unwrap();
    assert_eq!(body["error"], "shutting_down", "{body}");
    // A long poll would end at once and be retried at once: it is told to come back later.
    let poll = http
        .post(server.url("/v1/poll?wait=30"))
        .json(&serde_json::json!({"uaids": [{}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), 503);
    assert!(poll.headers().contains_key("retry-after"));
    // A new socket would hold the drain up: the upgrade is refused.
    match tokio_tungstenite::connect_async(server.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("a WebSocket upgrade during the drain: {other:?}"),
    }
    let status = server.wait_exit();
    assert!(status.success(), "{status}");
    drop(c);
}

/// `editiond config` prints what `serve` would run with: file, environment and flags, no keys.
#[test]
fn config_prints_the_effective_configuration_without_keys() {
    let key = "q".repeat(43);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_editiond"))
        .args([
            "config",
            "--listen",
            "127.0.0.1:9999",
            "--data-dir",
            "/tmp/elsewhere",
        ])
        .env("EDITIOND_LIMITS__PUT_BURST", "7")
        .env("EDITIOND_KEYS__ENDPOINT_KEY", &key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "listen = \"127.0.0.1:9999\"",
        "data_dir = \"/tmp/elsewhere\"",
        "put_burst = 7",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains(&key), "a key was printed:\n{text}");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();
    let r = http.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "not_found");
    let r = http.delete(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let mut c = Client::connect(&server).await;
    c.hello_new(1).await;
    let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    };
    c.ws.close(Some(normal)).await.unwrap();
    // The server's reply (echoing the code) completes the handshake: a close, not a reset.
    c.expect_close(1000).await;
}
