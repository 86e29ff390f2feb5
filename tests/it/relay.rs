//! The EDITION RELAY end to end: an upstream, relays and downstream clients, each a real
//! `editiond` process on 127.0.0.1 (proto/relay.md). Also `POST /v1/register` and
//! `/v1/unregister` on a plain server, which the poll transport relies on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// Fast reconnects and short polls, so outages heal within a test's patience.
const RELAY_ENV: &[(&str, &str)] = &[
    ("EDITIOND_RELAY__RECONNECT_MIN_MS", "50"),
    ("EDITIOND_RELAY__RECONNECT_MAX_SECS", "1"),
    ("EDITIOND_RELAY__POLL_WAIT_SECS", "5"),
    ("EDITIOND_RELAY__REQUEST_TIMEOUT_SECS", "5"),
];

fn local(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Starts a relay of `upstream` (`ws://` or `http://` by transport) on `addr`.
async fn start_relay(
    dir: &std::path::Path,
    addr: SocketAddr,
    upstream: SocketAddr,
    transport: &str,
) -> Server {
    start_relay_with(dir, addr, upstream, transport, &[]).await
}

async fn start_relay_with(
    dir: &std::path::Path,
    addr: SocketAddr,
    upstream: SocketAddr,
    transport: &str,
    env: &[(&str, &str)],
) -> Server {
    let scheme = if transport == "ws" { "ws" } else { "http" };
    let url = format!("{scheme}://{upstream}");
    let command = ["relay", "--upstream", &url, "--transport", transport];
    let env: Vec<(&str, &str)> = RELAY_ENV.iter().chain(env).copied().collect();
    Server::start_command(dir, addr, &command, &env).await
}

async fn health(server: &Server, http: &reqwest::Client) -> Value {
    let r = http.get(server.url("/health")).send().await.unwrap();
    r.json().await.unwrap()
}

/// Waits (at most 30 s) until the relay's `/health` says its link is `up`.
async fn wait_link(relay: &Server, http: &reqwest::Client, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(relay, http).await;
        if h["relay"]["up"] == up {
            let gauge = metric(relay, http, "editiond_relay_upstream_up").await;
            assert_eq!(gauge, Some(if up { 1.0 } else { 0.0 }), "{h}");
            return;
        }
        assert!(Instant::now() < deadline, "relay link never became up={up}: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One unlabelled metric's value.
async fn metric(server: &Server, http: &reqwest::Client, name: &str) -> Option<f64> {
    let text = server.metrics(http).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (at most 30 s) until `name` on `server` reads `value`.
async fn wait_metric(server: &Server, http: &reqwest::Client, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = metric(server, http, name).await;
        if now == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed {now:?}, not {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The upstream accepts these credentials (they are its own): an ACK of nothing answers 200.
async fn upstream_accepts(upstream: &Server, http: &reqwest::Client, uaid: &str, secret: &str) -> u16 {
    let body = json!({"uaids": [{"uaid": uaid, "secret": secret}], "updates": {}});
    let r = http
        .post(upstream.url("/v1/ack"))
        .json(&body)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

/// After hello: a pong before any update proves nothing was pending.
async fn expect_nothing_pending(c: &mut Client) {
    c.send(json!({"type": "ping"})).await;
    let v = c.recv().await;
    assert_eq!(v["type"], "pong", "nothing should be pending: {v}");
}

/// Register through the relay, PUT upstream, UPDATE downstream, ACK; unregister through the
/// relay and the upstream endpoint is gone.
async fn round_trip(transport: &str) {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let up = Server::start(du.path()).await;
    let relay = start_relay(dr.path(), local(free_port()), up.addr, transport).await;
    wait_link(&relay, &http, true).await;
    assert_eq!(health(&relay, &http).await["relay"]["transport"], transport);

    let mut e = enroll(&relay).await;
    let (uaid, secret) = e.creds[0].clone();
    assert!(
        e.endpoint.starts_with(&up.url("/v1/e/")),
        "the endpoint is the upstream's: {}",
        e.endpoint
    );
    assert_eq!(
        upstream_accepts(&up, &http, &uaid, &secret).await,
        200,
        "the secret is the upstream's"
    );
    assert_eq!(upstream_accepts(&up, &http, &uaid, "nope").await, 401);

    e.put_and_receive(&http, 5).await;
    e.c.ack(&[&uaid]).await;
    e.c.barrier().await;
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    wait_metric(&relay, &http, "editiond_pending_events", 0.0).await;
    e.put_and_receive(&http, 6).await;
    e.c.ack(&[&uaid]).await;

    e.c.send(json!({"type": "unregister", "uaid": uaid, "appid": e.appid}))
        .await;
    let v = e.c.expect("unregister").await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(put_version(&http, &e.endpoint, 7).await, 410);

    // A relay's downstream client with a wrong secret is refused as upstream would.
    let mut other = Client::connect(&relay).await;
    let v = other.hello(&[(uaid.clone(), "wrong".into())]).await;
    assert_eq!(v["uaids"][0]["status"], 401, "{v}");
}

#[tokio::test]
async fn ws_register_put_update_through_a_relay() {
    round_trip("ws").await;
}

#[tokio::test]
async fn poll_register_put_update_through_a_relay() {
    round_trip("poll").await;
}

/// The relay ACKed upstream and was SIGKILLed before its client took the event: after the
/// restart the client gets it from the relay's own store, once. And the restarted relay
/// re-claimed the UAID from its book by itself: an event PUT while the client is still away
/// reaches it too.
#[tokio::test]
async fn relay_killed_after_its_upstream_ack_still_delivers() {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let up = Server::start(du.path()).await;
    let mut relay = start_relay(dr.path(), local(free_port()), up.addr, "ws").await;
    wait_link(&relay, &http, true).await;
    let mut e = enroll(&relay).await;
    let (endpoint, appid, creds) = (e.endpoint.clone(), e.appid.clone(), e.creds.clone());
    let uaid = creds[0].0.clone();
    let appid2 = new_appid();
    let endpoint2 = e.c.register(&uaid, &appid2).await;
    drop(e);
    wait_metric(&relay, &http, "editiond_connections", 0.0).await;

    assert_eq!(put_version(&http, &endpoint, 9).await, 202);
    // The relay took it: stored, then ACKed upstream.
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    wait_metric(&up, &http, "editiond_acks_total", 1.0).await;
    relay.restart().await;
    wait_link(&relay, &http, true).await;
    assert_eq!(put_version(&http, &endpoint2, 1).await, 202);
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    wait_metric(&up, &http, "editiond_acks_total", 2.0).await;

    let mut c = Client::connect(&relay).await;
    let v = c.hello(&creds).await;
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    let update = c.expect("update").await;
    assert_eq!(
        update["updates"][&uaid],
        json!({&appid: 9, &appid2: 1}),
        "{update}"
    );
    c.ack(&[&uaid]).await;
    c.barrier().await;
    drop(c);

    let mut c = Client::connect(&relay).await;
    c.hello(&creds).await;
    expect_nothing_pending(&mut c).await;
    assert_eq!(put_version(&http, &endpoint, 10).await, 202);
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&uaid][&appid], 10, "{update}");
}

/// The upstream goes away: the relay says so, answers register 503 with Retry-After, still
/// serves hellos of known UAIDs; the upstream comes back on its port and the relay reconnects
/// by itself, re-claims, and nothing is lost or repeated.
async fn upstream_restart(transport: &str) {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let mut up = Server::start(du.path()).await;
    let relay = start_relay(dr.path(), local(free_port()), up.addr, transport).await;
    wait_link(&relay, &http, true).await;
    let mut e = enroll(&relay).await;
    let uaid = e.uaid.clone();
    e.put_and_receive(&http, 1).await;
    e.c.ack(&[&uaid]).await;
    e.c.barrier().await;

    up.kill();
    wait_link(&relay, &http, false).await;
    e.c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid()}))
        .await;
    let v = e.c.expect("register").await;
    assert_eq!(v["status"], 503, "{v}");
    assert_eq!(v["error"], "upstream_unavailable", "{v}");
    assert!(v["retry_after"].as_u64().is_some(), "{v}");
    let mut known = Client::connect(&relay).await;
    let v = known.hello(&e.creds).await;
    assert_eq!(
        v["uaids"][0]["status"], 200,
        "known UAIDs work without the upstream: {v}"
    );
    drop(known);
    let mut fresh = Client::connect(&relay).await;
    fresh.send(json!({"type": "hello", "uaids": [{}]})).await;
    let v = fresh.expect("hello").await;
    assert_eq!(v["uaids"][0]["status"], 503, "{v}");
    drop(fresh);

    up.restart().await;
    wait_link(&relay, &http, true).await;
    // The connected client was re-claimed upstream (the known hello above took the UAID from
    // it on the relay, so it reconnects like any client would).
    let mut c = Client::connect(&relay).await;
    c.hello(&e.creds).await;
    expect_nothing_pending(&mut c).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    // A poll relay re-polls within its backoff; PUTs before that are stored upstream and come.
    assert_eq!(put_version(&http, &e.endpoint, 2).await, 202);
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&uaid][&e.appid], 2, "{update}");
    c.ack(&[&uaid]).await;
    c.barrier().await;
    assert!(Instant::now() < deadline);
    c.expect_silence(Duration::from_millis(500)).await;
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
}

#[tokio::test]
async fn ws_relay_reconnects_after_its_upstream_restarts() {
    upstream_restart("ws").await;
}

#[tokio::test]
async fn poll_relay_reconnects_after_its_upstream_restarts() {
    upstream_restart("poll").await;
}

/// upstream ← relay ← relay ← client.
#[tokio::test]
async fn two_relays_chained() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let http = reqwest::Client::new();
    let up = Server::start(dirs[0].path()).await;
    let outer = start_relay(dirs[1].path(), local(free_port()), up.addr, "ws").await;
    let inner = start_relay(dirs[2].path(), local(free_port()), outer.addr, "ws").await;
    wait_link(&outer, &http, true).await;
    wait_link(&inner, &http, true).await;
    let mut e = enroll(&inner).await;
    assert!(e.endpoint.starts_with(&up.url("/v1/e/")), "{}", e.endpoint);
    e.put_and_receive(&http, 3).await;
    e.c.ack(&[&e.uaid.clone()]).await;
    e.c.barrier().await;
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    wait_metric(&outer, &http, "editiond_pending_events", 0.0).await;
}

/// Two relays, each the other's upstream: the hop list refuses the link that closes the loop.
#[tokio::test]
async fn a_loop_of_relays_is_refused() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let (pa, pb) = (local(free_port()), local(free_port()));
    let a = start_relay(da.path(), pa, pb, "ws").await;
    let b = start_relay(db.path(), pb, pa, "ws").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ha, hb) = (health(&a, &http).await, health(&b, &http).await);
        let refused = [&ha, &hb].iter().any(|h| h["relay"]["error"] == "relay_loop");
        if refused {
            assert!(
                !(ha["relay"]["up"] == true && hb["relay"]["up"] == true),
                "{ha} {hb}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no loop refused: {ha} {hb}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 30 s) until the relay's book holds `n` UAIDs (`/health`).
async fn wait_book(relay: &Server, http: &reqwest::Client, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(relay, http).await;
        if h["relay"]["uaids"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "the book never held {n} UAIDs: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads UPDATEs for `uaid` (ACKing each) until they have carried `n` APPIDs; returns them.
async fn receive_all(c: &mut Client, uaid: &str, n: usize) -> serde_json::Map<String, Value> {
    let mut got = serde_json::Map::new();
    while got.len() < n {
        let update = c.expect("update").await;
        let apps = update["updates"][uaid].as_object().cloned().unwrap_or_default();
        assert!(!apps.is_empty(), "{update}");
        got.extend(apps);
        c.ack(&[uaid]).await;
    }
    got
}

/// A UAID that no client names for `relay.book_idle_secs` (and none holds) leaves the book: it is
/// released upstream and not claimed again by the restarted relay; a UAID held all along stays.
/// The forgotten one comes back with its secret and is claimed again, and nothing is lost: the
/// event stored before and the one PUT upstream meanwhile both reach it.
async fn idle_uaids_leave_the_book(transport: &str) {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let up = Server::start(du.path()).await;
    let env = [
        ("EDITIOND_RELAY__BOOK_IDLE_SECS", "5"),
        ("EDITIOND_LIMITS__SWEEP_INTERVAL_SECS", "1"),
    ];
    let mut relay = start_relay_with(dr.path(), local(free_port()), up.addr, transport, &env).await;
    wait_link(&relay, &http, true).await;

    let mut held = Client::connect(&relay).await;
    let held_creds = held.hello_new(1).await;
    let mut away = enroll(&relay).await;
    let (uaid, appid, creds) = (away.uaid.clone(), away.appid.clone(), away.creds.clone());
    let endpoint = away.endpoint.clone();
    let appid2 = new_appid();
    let endpoint2 = away.c.register(&uaid, &appid2).await;
    assert_eq!(health(&relay, &http).await["relay"]["uaids"], 2);
    drop(away);
    wait_metric(&relay, &http, "editiond_connections", 1.0).await;
    // Taken by the relay while the client is away (or, if forgotten first, kept upstream).
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);

    wait_book(&relay, &http, 1).await;
    wait_metric(&up, &http, "editiond_held_uaids", 1.0).await;
    assert_eq!(put_version(&http, &endpoint2, 1).await, 202);

    relay.restart().await;
    assert_eq!(
        health(&relay, &http).await["relay"]["uaids"],
        1,
        "forgotten for good"
    );
    // Back at once (a restart is no absence within the first idle period after it).
    let mut held = Client::connect(&relay).await;
    let v = held.hello(&held_creds).await;
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    wait_link(&relay, &http, true).await;
    // A new client's claim goes upstream after the restarted relay's re-claims.
    let mut fresh = Client::connect(&relay).await;
    fresh.hello_new(1).await;
    if transport == "ws" {
        let now = metric(&up, &http, "editiond_held_uaids").await;
        assert_eq!(
            now,
            Some(2.0),
            "the held UAID and the new one, not the forgotten one"
        );
    } else {
        wait_metric(&up, &http, "editiond_held_uaids", 2.0).await;
    }

    let mut back = Client::connect(&relay).await;
    let v = back.hello(&creds).await;
    assert_eq!(v["uaids"][0]["status"], 200, "claimed again with its secret: {v}");
    let got = receive_all(&mut back, &uaid, 2).await;
    assert_eq!(Value::Object(got), json!({&appid: 1, &appid2: 1}));
    back.barrier().await;
    assert_eq!(health(&relay, &http).await["relay"]["uaids"], 3);
    wait_metric(&up, &http, "editiond_held_uaids", 3.0).await;
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    drop(held);
}

/// A client takes a UAID straight from the upstream: the relay's client that held it gets
/// `released` (and, holding nothing else, is closed), events go to the newer client, and the
/// relay, restarted, does not claim the UAID back. A client naming it on the relay again does,
/// and the direct client is the one released then.
#[tokio::test]
async fn a_uaid_taken_upstream_is_released_downstream_and_not_claimed_back() {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let up = Server::start(du.path()).await;
    let mut relay = start_relay(dr.path(), local(free_port()), up.addr, "ws").await;
    wait_link(&relay, &http, true).await;
    // Stays on the relay: its events show when the restarted relay's re-claims are done.
    let other = enroll(&relay).await;
    let other_endpoint = other.endpoint.clone();
    let mut d = enroll(&relay).await;
    let (uaid, appid, creds, endpoint) = (
        d.uaid.clone(),
        d.appid.clone(),
        d.creds.clone(),
        d.endpoint.clone(),
    );

    let mut x = Client::connect(&up).await;
    let v = x.hello(&creds).await;
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    let r = d.c.expect("released").await;
    assert_eq!(r["uaids"], json!([&uaid]), "{r}");
    d.c.expect_error_close(410, "replaced", 4410).await;
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    let update = x.expect("update").await;
    assert_eq!(update["updates"][&uaid][&appid], 1, "{update}");
    x.ack(&[&uaid]).await;
    x.barrier().await;

    drop(other);
    relay.restart().await;
    wait_link(&relay, &http, true).await;
    // The relay re-claimed its book (one frame): the other UAID's event reaches it.
    assert_eq!(put_version(&http, &other_endpoint, 1).await, 202);
    wait_metric(&up, &http, "editiond_pending_events", 0.0).await;
    // Not claimed back: the next event still goes to the direct client, with no `released` first.
    assert_eq!(put_version(&http, &endpoint, 2).await, 202);
    let update = x.expect("update").await;
    assert_eq!(update["updates"][&uaid][&appid], 2, "{update}");
    x.ack(&[&uaid]).await;
    x.barrier().await;

    // Named again on the relay: claimed upstream again, taken from the direct client.
    let mut d = Client::connect(&relay).await;
    let v = d.hello(&creds).await;
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    let r = x.expect("released").await;
    assert_eq!(r["uaids"], json!([&uaid]), "{r}");
    assert_eq!(put_version(&http, &endpoint, 3).await, 202);
    let update = d.expect("update").await;
    assert_eq!(update["updates"][&uaid][&appid], 3, "{update}");
}

#[tokio::test]
async fn ws_relay_forgets_idle_uaids() {
    idle_uaids_leave_the_book("ws").await;
}

#[tokio::test]
async fn poll_relay_forgets_idle_uaids() {
    idle_uaids_leave_the_book("poll").await;
}

/// 1,000 downstream clients on one relay: one upstream socket holds all their UAIDs (claimed in
/// frames of at most 100 here), and events reach them.
#[tokio::test]
async fn a_thousand_clients_share_one_upstream_socket() {
    let (du, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = reqwest::Client::new();
    let up = Server::start(du.path()).await;
    let env = [("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "100")];
    let relay = start_relay_with(dr.path(), local(free_port()), up.addr, "ws", &env).await;
    wait_link(&relay, &http, true).await;
    let connects = (0..1000).map(|_| async {
        let mut c = Client::connect(&relay).await;
        let creds = c.hello_new(1).await;
        (c, creds[0].0.clone())
    });
    let mut clients = futures_util::future::join_all(connects).await;
    assert_eq!(metric(&relay, &http, "editiond_connections").await, Some(1000.0));
    assert_eq!(metric(&up, &http, "editiond_connections").await, Some(1.0));
    assert_eq!(metric(&up, &http, "editiond_held_uaids").await, Some(1000.0));
    for (c, uaid) in clients.iter_mut().step_by(100) {
        let appid = new_appid();
        let endpoint = c.register(uaid, &appid).await;
        assert_eq!(put_version(&http, &endpoint, 4).await, 202);
        let update = c.expect("update").await;
        assert_eq!(update["updates"][uaid.as_str()][&appid], 4, "{update}");
    }
}

/// `POST /v1/register` and `/v1/unregister` on a plain server: the frames' replies and statuses.
#[tokio::test]
async fn http_register_and_unregister() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let server = Server::start(dir.path()).await;
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let (uaid, secret) = creds[0].clone();
    let appid = new_appid();
    let ws_endpoint = c.register(&uaid, &appid).await;
    drop(c);
    let post = |path: &'static str, body: Value| {
        let http = http.clone();
        let url = server.url(path);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let body = json!({"uaid": uaid, "secret": secret, "appid": appid});
    let (status, v) = post("/v1/register", body.clone()).await;
    assert_eq!(
        (status, &v["type"], &v["status"]),
        (200, &json!("register"), &json!(200)),
        "{v}"
    );
    assert_eq!(
        v["endpoint"],
        ws_endpoint.as_str(),
        "idempotent: the same endpoint"
    );
    let bad = json!({"uaid": uaid, "secret": "wrong", "appid": appid});
    let (status, v) = post("/v1/register", bad).await;
    assert_eq!((status, &v["error"]), (401, &json!("bad_secret")), "{v}");
    let (status, v) = post(
        "/v1/register",
        json!({"uaid": uaid, "secret": secret, "appid": "x"}),
    )
    .await;
    assert_eq!((status, &v["error"]), (400, &json!("invalid_appid")), "{v}");
    let (status, v) = post(
        "/v1/register",
        json!({"uaid": uaid, "secret": secret, "appid": appid, "kick": 5}),
    )
    .await;
    assert_eq!((status, &v["error"]), (400, &json!("invalid_kick")), "{v}");

    assert_eq!(put_version(&http, &ws_endpoint, 1).await, 202);
    let (status, v) = post("/v1/unregister", body.clone()).await;
    assert_eq!(
        (status, &v["type"], &v["status"]),
        (200, &json!("unregister"), &json!(200)),
        "{v}"
    );
    assert_eq!(put_version(&http, &ws_endpoint, 2).await, 410);
    let (status, v) = post("/v1/unregister", body).await;
    assert_eq!((status, &v["error"]), (404, &json!("not_registered")), "{v}");
}
