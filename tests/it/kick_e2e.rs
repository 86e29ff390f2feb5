//! KICK drivers end to end, through the real binary: a client registers with a `kick`, goes
//! away, an app server PUTs, and the server's driver reaches its real receiver on 127.0.0.1
//! (`common::receivers`). Also: nothing is kicked while the client is connected, a hung receiver
//! delays no PUT, refused and disabled targets are answered at register, retries, and a 410
//! removing the kick.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::UdpSocket;

use crate::common::receivers::{
    eventually, hanging_receiver, header, receiver, subscription, verify_vapid, verify_webhook, Receiver,
    WEBHOOK_SECRET,
};
use crate::common::{enroll, new_appid, put_version, Client, Server};

const SUBJECT: &str = "mailto:ops@example.com";
const ALLOW: &str = r#"["127.0.0.1/32"]"#;

/// Every driver on, reaching 127.0.0.1 only, no debounce, fast retries; then `extra`.
async fn start(dir: &std::path::Path, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("EDITIOND_KICK__MIN_INTERVAL_SECS", "0"),
        ("EDITIOND_KICK__RETRY_MIN_MS", "20"),
        ("EDITIOND_KICK__RETRY_MAX_SECS", "1"),
        ("EDITIOND_KICK__WEBHOOK__ENABLED", "true"),
        ("EDITIOND_KICK__WEBHOOK__ALLOW", ALLOW),
        ("EDITIOND_KICK__WEBHOOK__SECRET", WEBHOOK_SECRET),
        ("EDITIOND_KICK__UDP__ENABLED", "true"),
        ("EDITIOND_KICK__UDP__ALLOW", ALLOW),
        ("EDITIOND_KICK__WEBPUSH__ENABLED", "true"),
        ("EDITIOND_KICK__WEBPUSH__ALLOW", ALLOW),
        ("EDITIOND_KICK__WEBPUSH__VAPID_SUBJECT", SUBJECT),
    ];
    env.extend_from_slice(extra);
    Server::start_with(dir, &env).await
}

/// register with a `kick`; returns the reply.
async fn register_with(c: &mut Client, uaid: &str, appid: &str, kick: Value) -> Value {
    c.send(json!({"type": "register", "uaid": uaid, "appid": appid, "kick": kick}))
        .await;
    c.expect("register").await
}

async fn endpoint_with(c: &mut Client, uaid: &str, appid: &str, kick: Value) -> String {
    let reply = register_with(c, uaid, appid, kick).await;
    assert_eq!(reply["status"], 200, "{reply}");
    reply["endpoint"].as_str().unwrap().to_owned()
}

fn webhook(r: &Receiver) -> Value {
    json!({"driver": "webhook", "url": format!("http://{}/wake", r.addr)})
}

/// A metric's value (the first sample whose name and labels start with `series`), 0 if absent.
async fn metric(server: &Server, http: &reqwest::Client, series: &str) -> u64 {
    let text = server.metrics(http).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// Closes the clients and waits until the server holds no UAID.
async fn go_away(server: &Server, http: &reqwest::Client, clients: Vec<Client>) {
    for mut c in clients {
        c.ws.close(None).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(server, http, "editiond_held_uaids").await != 0 {
        assert!(std::time::Instant::now() < deadline, "the UAID is still held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no kick is waiting, in flight or being retried on the server.
async fn kicks_settled(server: &Server, http: &reqwest::Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(server, http, "editiond_kicks_pending").await != 0 {
        assert!(std::time::Instant::now() < deadline, "kicks still pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One UAID with three registrations, one per driver: while it is connected a PUT is an UPDATE
/// and kicks nothing; once it is away one PUT reaches all three receivers, each carrying only
/// the UAID; back, it gets the event.
#[tokio::test]
async fn each_driver_wakes_a_client_that_is_away_and_none_while_it_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let hook = receiver("127.0.0.1", vec![]).await;
    let push_service = receiver("127.0.0.1", vec![(201, vec![])]).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sub = subscription();

    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let (a, b, p) = (new_appid(), new_appid(), new_appid());
    let endpoint = endpoint_with(&mut c, &uaid, &a, webhook(&hook)).await;
    let udp_kick = json!({"driver": "udp", "addr": udp.local_addr().unwrap().to_string()});
    endpoint_with(&mut c, &uaid, &b, udp_kick).await;
    let push_kick = json!({"driver": "webpush", "subscription": sub.json(&format!("http://{}/push/1", push_service.addr))});
    endpoint_with(&mut c, &uaid, &p, push_kick).await;

    // Connected: an UPDATE, no kick.
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&uaid][&a], 1);
    c.ack(&[&uaid]).await;
    c.barrier().await;
    go_away(&server, &http, vec![c]).await;

    // Away: every driver's receiver is reached.
    assert_eq!(put_version(&http, &endpoint, 2).await, 202);
    eventually("the webhook", || !hook.got().is_empty()).await;
    eventually("the push service", || !push_service.got().is_empty()).await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), udp.recv(&mut buf))
        .await
        .expect("the UDP wake-up")
        .unwrap();
    assert_eq!(&buf[..n], uaid.as_bytes(), "the UDP payload is the UAID");

    let g = &hook.got()[0];
    assert_eq!(g.path, "/wake");
    assert!(verify_webhook(g), "signed with the configured secret");
    let body: Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(body, json!({"uaid": uaid}), "a kick carries only the UAID");

    let key: Value = http
        .get(server.url("/v1/kick/webpush"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vapid_public = key["vapid_public_key"].as_str().unwrap();
    assert_eq!(URL_SAFE_NO_PAD.decode(vapid_public).unwrap().len(), 65);
    let g = &push_service.got()[0];
    assert_eq!(g.path, "/push/1");
    let claims = verify_vapid(header(g, "authorization"), vapid_public);
    assert_eq!(claims["aud"], format!("http://{}", push_service.addr));
    assert_eq!(claims["sub"], SUBJECT);
    let payload: Value = serde_json::from_slice(&sub.decrypt(&g.body)).unwrap();
    assert_eq!(payload, json!({"uaid": uaid}));

    kicks_settled(&server, &http).await;
    assert_eq!(hook.got().len(), 1, "the connected PUT kicked nothing");
    assert_eq!(push_service.got().len(), 1, "the connected PUT kicked nothing");
    let sent = |d: &str| format!("editiond_kicks_total{{driver=\"{d}\",outcome=\"sent\"}}");
    assert_eq!(metric(&server, &http, &sent("webhook")).await, 1);
    assert_eq!(metric(&server, &http, &sent("webpush")).await, 1);
    assert!(metric(&server, &http, &sent("udp")).await >= 1);

    // Back: the event is there.
    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    let update = c.expect("update").await;
    assert_eq!(update["updates"][&uaid][&a], 2);
}

/// A receiver that accepts and never answers holds one kick; PUTs, to that UAID and to
/// others, are answered all the same, and other UAIDs' kicks go out meanwhile.
#[tokio::test]
async fn a_hanging_receiver_delays_no_put() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("EDITIOND_KICK__WEBHOOK__TIMEOUT_MS", "120000")]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (hang_addr, mut accepted) = hanging_receiver().await;
    let healthy = receiver("127.0.0.1", vec![]).await;

    let mut hung = enroll(&server).await;
    let hung_kick = json!({"driver": "webhook", "url": format!("http://{hang_addr}/")});
    let hung_endpoint = endpoint_with(&mut hung.c, &hung.uaid, &new_appid(), hung_kick).await;
    let mut other = enroll(&server).await;
    let other_endpoint = endpoint_with(&mut other.c, &other.uaid, &new_appid(), webhook(&healthy)).await;
    go_away(&server, &http, vec![hung.c, other.c]).await;

    assert_eq!(put_version(&http, &hung_endpoint, 1).await, 202);
    accepted
        .recv()
        .await
        .expect("the kick reached the hanging receiver");
    // The receiver holds that kick (for two minutes): PUTs still answer.
    assert_eq!(put_version(&http, &hung_endpoint, 2).await, 202);
    assert_eq!(put_version(&http, &other_endpoint, 1).await, 202);
    eventually("the healthy receiver", || healthy.got().len() == 1).await;
    assert_eq!(put_version(&http, &hung_endpoint, 3).await, 202);
}

/// A target outside `allow` is refused at register (403, the socket stays open) and at hello
/// (error frame, close), and never contacted; a driver that is off is unsupported.
#[tokio::test]
async fn refused_and_disabled_kicks_are_answered_at_register_and_never_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("EDITIOND_KICK__UDP__ENABLED", "false")]).await;
    let http = reqwest::Client::new();
    // 127.0.0.2 is loopback, outside the allow list.
    let outside = receiver("127.0.0.2", vec![]).await;
    let inside = receiver("127.0.0.1", vec![]).await;

    let mut c = Client::connect(&server).await;
    let uaid = c.hello_new(1).await[0].0.clone();
    let appid = new_appid();
    let reply = register_with(&mut c, &uaid, &appid, webhook(&outside)).await;
    assert_eq!(
        (reply["status"].as_u64(), reply["error"].as_str()),
        (Some(403), Some("kick_refused")),
        "{reply}"
    );
    assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(reply.get("endpoint").is_none());
    let udp = json!({"driver": "udp", "addr": "127.0.0.1:9"});
    let reply = register_with(&mut c, &uaid, &appid, udp.clone()).await;
    assert_eq!(
        (reply["status"].as_u64(), reply["error"].as_str()),
        (Some(400), Some("kick_unsupported")),
        "{reply}"
    );
    let reply = register_with(&mut c, &uaid, &appid, json!({"driver": "webhook", "url": 5})).await;
    assert_eq!(
        (reply["status"].as_u64(), reply["error"].as_str()),
        (Some(400), Some("invalid_kick")),
        "{reply}"
    );
    // The socket stays open: the same pair registers with an allowed target.
    let endpoint = endpoint_with(&mut c, &uaid, &appid, webhook(&inside)).await;
    go_away(&server, &http, vec![c]).await;
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    eventually("the allowed receiver", || inside.got().len() == 1).await;
    kicks_settled(&server, &http).await;
    assert!(outside.got().is_empty(), "a refused target is never contacted");

    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [{}], "kick": webhook(&outside)}))
        .await;
    c.expect_error_close(403, "kick_refused", 4403).await;
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [{}], "kick": udp})).await;
    c.expect_error_close(400, "kick_unsupported", 4400).await;
    assert!(outside.got().is_empty());
}

/// 500, 500, then 200: the third attempt delivers, with the same `webhook-id` each time.
#[tokio::test]
async fn a_receiver_failing_twice_gets_the_kick_on_the_third_try() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let r = receiver("127.0.0.1", vec![(500, vec![]), (500, vec![])]).await;
    let mut e = enroll(&server).await;
    let endpoint = endpoint_with(&mut e.c, &e.uaid, &e.appid, webhook(&r)).await;
    go_away(&server, &http, vec![e.c]).await;
    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    eventually("three attempts", || r.got().len() == 3).await;
    kicks_settled(&server, &http).await;
    let got = r.got();
    assert_eq!(got.len(), 3, "nothing after the 200");
    let id = header(&got[0], "webhook-id");
    assert!(got.iter().all(|g| header(g, "webhook-id") == id));
    assert!(got.iter().all(verify_webhook));
    let series = |o: &str| format!("editiond_kicks_total{{driver=\"webhook\",outcome=\"{o}\"}}");
    assert_eq!(metric(&server, &http, &series("retry")).await, 2);
    assert_eq!(metric(&server, &http, &series("sent")).await, 1);
}

/// A 410 removes the kick from the registration: later PUTs kick the UAID's other target only.
#[tokio::test]
async fn a_410_removes_the_kick_so_later_puts_do_not_send_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let gone = receiver("127.0.0.1", vec![(410, vec![])]).await;
    let witness = receiver("127.0.0.1", vec![]).await;
    let mut e = enroll(&server).await;
    let endpoint = endpoint_with(&mut e.c, &e.uaid, &e.appid, webhook(&gone)).await;
    endpoint_with(&mut e.c, &e.uaid, &new_appid(), webhook(&witness)).await;
    go_away(&server, &http, vec![e.c]).await;

    assert_eq!(put_version(&http, &endpoint, 1).await, 202);
    eventually("the 410", || gone.got().len() == 1).await;
    eventually("the witness", || witness.got().len() == 1).await;
    kicks_settled(&server, &http).await;
    let gone_series = "editiond_kicks_total{driver=\"webhook\",outcome=\"gone\"}";
    assert_eq!(metric(&server, &http, gone_series).await, 1);
    // The removal runs beside the kick task: a round or two may still find it stored, then no
    // round sends it.
    let mut version = 1;
    let mut quiet_rounds = 0;
    while quiet_rounds < 2 {
        assert!(version < 10, "the gone kick is still being sent");
        let before = gone.got().len();
        version += 1;
        assert_eq!(put_version(&http, &endpoint, version).await, 202);
        let witnessed = version as usize;
        eventually("the witness", || witness.got().len() == witnessed).await;
        kicks_settled(&server, &http).await;
        if gone.got().len() == before {
            quiet_rounds += 1;
        } else {
            assert_eq!(quiet_rounds, 0, "a removed kick came back");
        }
    }
}

/// Two nodes on one Redis: a PUT taken by node A for a client held on node B is an UPDATE there
/// and kicks nothing; once the client is away, A kicks it; when it comes back on B, A's retries
/// stop (A sees the route before its next attempt).
#[tokio::test]
async fn on_redis_a_client_held_by_another_node_is_not_kicked_and_its_return_there_cancels() {
    use crate::common::redis_harness::{redis_available, RedisServer};
    if !redis_available("on_redis_a_client_held_by_another_node_is_not_kicked") {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("EDITIOND_STORE__BACKEND", "redis"),
        ("EDITIOND_STORE__URL", url.as_str()),
        // Retries every 20 ms to 1 s while the receiver fails: A keeps trying until it sees B.
        ("EDITIOND_KICK__RETRY_MAX_SECS", "1"),
    ];
    let a = start(&dir.path().join("a"), &env).await;
    let b = start(&dir.path().join("b"), &env).await;
    let http = reqwest::Client::new();
    let failing = receiver("127.0.0.1", vec![(500, vec![]); 10_000]).await;

    let mut c = Client::connect(&b).await;
    let creds = c.hello_new(1).await;
    let uaid = creds[0].0.clone();
    let appid = new_appid();
    let endpoint = endpoint_with(&mut c, &uaid, &appid, webhook(&failing)).await;
    let (_, token) = endpoint.split_once("/v1/e/").unwrap();
    let via_a = a.url(&format!("/v1/e/{token}"));

    assert_eq!(put_version(&http, &via_a, 1).await, 202);
    assert_eq!(c.expect("update").await["updates"][&uaid][&appid], 1);
    c.ack(&[&uaid]).await;
    c.barrier().await;
    kicks_settled(&a, &http).await;
    assert!(failing.got().is_empty(), "held on node B: not kicked");
    go_away(&b, &http, vec![c]).await;

    // B drops its route entry in the background: PUT until A finds the client away.
    let mut version = 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while failing.got().is_empty() {
        assert!(std::time::Instant::now() < deadline, "node A never kicked");
        version += 1;
        assert_eq!(put_version(&http, &via_a, version).await, 202);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("a retry", || failing.got().len() >= 2).await;

    // Back on B: A's next check sees the route and stops.
    let mut c = Client::connect(&b).await;
    c.hello(&creds).await;
    assert_eq!(c.expect("update").await["updates"][&uaid][&appid], version);
    kicks_settled(&a, &http).await;
    let cancelled = "editiond_kicks_total{driver=\"webhook\",outcome=\"cancelled\"}";
    assert_eq!(metric(&a, &http, cancelled).await, 1);
}
