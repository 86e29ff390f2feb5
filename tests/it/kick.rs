//! KICK drivers against real receivers on 127.0.0.1: a Standard Webhooks receiver that verifies
//! signatures, a UDP socket, and a Web Push service that holds the subscription's private key,
//! verifies the VAPID JWT and decrypts the RFC 8291 payload with its own code (see
//! `common::receivers`, shared with `kick_e2e`). The scheduler is driven as the wiring
//! drives it: `raised` for an away UAID, `connected` when it comes back.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use editiond::ids::Uaid;
use editiond::kick::scheduler::Hooks;
use editiond::kick::{Drivers, KickConfig, KickKeys, KickMetrics, Scheduler, Target};
use serde_json::{json, Value};
use tokio::net::{TcpListener, UdpSocket};

use crate::common::receivers::{
    eventually, hanging_receiver, header, receiver, subscription, verify_vapid, verify_webhook,
    WEBHOOK_SECRET,
};

const SUBJECT: &str = "mailto:ops@example.com";
const HOUR: Duration = Duration::from_secs(3600);

/// Every driver on, allowed to reach 127.0.0.1 only, retrying fast.
fn config() -> KickConfig {
    let mut c = KickConfig {
        min_interval_secs: 0,
        retry_min_ms: 20,
        retry_max_secs: 1,
        ..KickConfig::default()
    };
    let allow = vec!["127.0.0.1/32".to_owned()];
    c.webhook.enabled = true;
    c.webhook.allow = allow.clone();
    c.webhook.secret = WEBHOOK_SECRET.into();
    c.webhook.timeout_ms = 60_000;
    c.udp.enabled = true;
    c.udp.allow = allow.clone();
    c.webpush.enabled = true;
    c.webpush.allow = allow;
    c.webpush.vapid_subject = SUBJECT.into();
    c
}

struct Kicks {
    drivers: Arc<Drivers>,
    scheduler: Scheduler,
    metrics: KickMetrics,
    gone: Arc<Mutex<Vec<(Uaid, Target)>>>,
    _dir: tempfile::TempDir,
}

fn kicks(config: &KickConfig) -> Kicks {
    let dir = tempfile::tempdir().unwrap();
    let keys = KickKeys::load(config, dir.path()).unwrap();
    let drivers = Arc::new(Drivers::from_config(config, &keys).unwrap());
    let metrics = KickMetrics::default();
    let gone = Arc::new(Mutex::new(Vec::new()));
    let g = gone.clone();
    let hooks = Hooks {
        on_gone: Arc::new(move |u, t: &Target| g.lock().unwrap().push((u, t.clone()))),
        ..Hooks::default()
    };
    let scheduler = Scheduler::new(drivers.clone(), config, metrics.clone(), hooks);
    Kicks {
        drivers,
        scheduler,
        metrics,
        gone,
        _dir: dir,
    }
}

async fn target(k: &Kicks, kick: Value) -> Target {
    k.drivers.validate(&kick).await.unwrap()
}

#[tokio::test]
async fn webhook_reaches_its_receiver_signed_per_standard_webhooks() {
    let k = kicks(&config());
    let r = receiver("127.0.0.1", vec![]).await;
    let t = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/hook?x=1", r.addr)}),
    )
    .await;
    assert_eq!(t.driver(), "webhook");
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![t], HOUR);
    eventually("the webhook", || r.got().len() == 1).await;
    let g = &r.got()[0];
    assert_eq!(g.path, "/hook");
    assert_eq!(header(g, "content-type"), "application/json");
    let body: Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(
        body,
        json!({"uaid": uaid.to_string()}),
        "a kick carries only the UAID"
    );
    assert!(verify_webhook(g), "signature verifies with the configured secret");
    let ts: u64 = header(g, "webhook-timestamp").parse().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(ts.abs_diff(now) < 300);
    eventually("the kick to finish", || k.scheduler.pending() == 0).await;
    assert_eq!(k.metrics.get("webhook", "sent"), 1);
}

#[tokio::test]
async fn webhook_answering_500_twice_gets_it_on_the_third_try_with_one_id() {
    let k = kicks(&config());
    let r = receiver(
        "127.0.0.1",
        vec![(500, vec![]), (503, vec![("retry-after", "0".into())])],
    )
    .await;
    let t = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", r.addr)}),
    )
    .await;
    k.scheduler.raised(Uaid::random(), vec![t], HOUR);
    eventually("three attempts", || r.got().len() == 3).await;
    eventually("the kick to finish", || k.scheduler.pending() == 0).await;
    let got = r.got();
    assert_eq!(got.len(), 3, "nothing after the 200");
    let id = header(&got[0], "webhook-id");
    assert!(
        got.iter().all(|g| header(g, "webhook-id") == id),
        "webhook-id kept across retries"
    );
    assert!(got.iter().all(verify_webhook));
    assert_eq!(k.metrics.get("webhook", "retry"), 2);
    assert_eq!(k.metrics.get("webhook", "sent"), 1);
}

#[tokio::test]
async fn webhook_410_removes_the_kick_and_redirects_are_never_followed() {
    let k = kicks(&config());
    let gone = receiver("127.0.0.1", vec![(410, vec![])]).await;
    let elsewhere = receiver("127.0.0.1", vec![]).await;
    let redirect = receiver(
        "127.0.0.1",
        vec![(302, vec![("location", format!("http://{}/", elsewhere.addr))])],
    )
    .await;
    let t_gone = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", gone.addr)}),
    )
    .await;
    let t_redirect = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", redirect.addr)}),
    )
    .await;
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![t_gone.clone(), t_redirect], HOUR);
    eventually("the kick to finish", || k.scheduler.pending() == 0).await;
    assert_eq!(*k.gone.lock().unwrap(), vec![(uaid, t_gone)]);
    assert_eq!(redirect.got().len(), 1, "a 3xx gives up for this event");
    assert_eq!(elsewhere.got().len(), 0, "the redirect was not followed");
    assert_eq!(k.metrics.get("webhook", "gone"), 1);
    assert_eq!(k.metrics.get("webhook", "rejected"), 1);
}

#[tokio::test]
async fn a_hanging_receiver_delays_neither_the_caller_nor_other_kicks() {
    let k = kicks(&config());
    // Accepts connections, reads, never answers.
    let (hang_addr, mut accepted) = hanging_receiver().await;
    let healthy = receiver("127.0.0.1", vec![]).await;
    let t_hang = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{hang_addr}/")}),
    )
    .await;
    let t_ok = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", healthy.addr)}),
    )
    .await;
    // `raised` returns while the hung receiver holds the request (the timeout is a minute).
    k.scheduler.raised(Uaid::random(), vec![t_hang], HOUR);
    accepted.recv().await.unwrap();
    k.scheduler.raised(Uaid::random(), vec![t_ok], HOUR);
    eventually("the healthy receiver", || healthy.got().len() == 1).await;
    // The kick task counts the answer (and ends its slot) a moment after the receiver records
    // the request; the hung kick stays in flight throughout.
    eventually("the healthy kick sent and done, the hung one in flight", || {
        k.metrics.get("webhook", "sent") == 1 && k.scheduler.pending() == 1
    })
    .await;
}

#[tokio::test]
async fn targets_outside_allow_are_refused_at_validation_and_never_contacted() {
    let k = kicks(&config());
    // Listening on 127.0.0.2, which is loopback but outside the allow list.
    let outside = receiver("127.0.0.2", vec![]).await;
    let udp_outside = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let sub = subscription();
    let refused = [
        json!({"driver": "webhook", "url": format!("http://{}/", outside.addr)}),
        json!({"driver": "webhook", "url": "http://169.254.169.254/latest/meta-data/"}),
        json!({"driver": "webhook", "url": "https://[::ffff:127.0.0.2]/"}),
        json!({"driver": "udp", "addr": udp_outside.local_addr().unwrap().to_string()}),
        json!({"driver": "udp", "addr": "8.8.8.8:53"}),
        json!({"driver": "webpush", "subscription": sub.json(&format!("http://{}/push", outside.addr))}),
    ];
    for kick in refused {
        let e = k.drivers.validate(&kick).await.unwrap_err();
        assert_eq!((e.status(), e.slug()), (403, "kick_refused"), "{kick}");
    }
    let invalid = [
        json!({"driver": "webhook"}),
        json!({"driver": "webhook", "url": "ftp://127.0.0.1/"}),
        json!({"driver": "udp", "addr": "127.0.0.1"}),
        json!({"driver": "webpush", "subscription": {"endpoint": "http://127.0.0.1:1/"}}),
        json!("webhook"),
    ];
    for kick in invalid {
        let e = k.drivers.validate(&kick).await.unwrap_err();
        assert_eq!((e.status(), e.slug()), (400, "invalid_kick"), "{kick}");
    }
    let off = kicks(&KickConfig::default());
    let e = off
        .drivers
        .validate(&json!({"driver": "webhook", "url": "https://example.com/"}))
        .await
        .unwrap_err();
    assert_eq!((e.status(), e.slug()), (400, "kick_unsupported"));
    let e = k
        .drivers
        .validate(&json!({"driver": "carrier-pigeon"}))
        .await
        .unwrap_err();
    assert_eq!(e.slug(), "kick_unsupported");
    assert!(outside.got().is_empty(), "a refused target is never contacted");
    let mut buf = [0u8; 64];
    assert!(udp_outside.try_recv(&mut buf).is_err());
}

#[tokio::test]
async fn udp_sends_the_uaid_at_most_five_times_per_event() {
    let k = kicks(&config());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let t = target(
        &k,
        json!({"driver": "udp", "addr": socket.local_addr().unwrap().to_string()}),
    )
    .await;
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![t], HOUR);
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        let n = tokio::time::timeout(Duration::from_secs(20), socket.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], uaid.to_string().as_bytes(), "the UAID's 36 characters");
    }
    eventually("the kick to finish", || k.scheduler.pending() == 0).await;
    assert!(socket.try_recv(&mut buf).is_err(), "no sixth datagram");
    assert_eq!(k.metrics.get("udp", "sent"), 5);
}

#[tokio::test]
async fn connecting_stops_the_kicks() {
    let k = kicks(&config());
    let r = receiver("127.0.0.1", vec![(500, vec![]); 1000]).await;
    let t = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", r.addr)}),
    )
    .await;
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![t], HOUR);
    eventually("a retry", || r.got().len() >= 2).await;
    k.scheduler.connected(&uaid);
    assert_eq!(k.scheduler.pending(), 0);
    let after = r.got().len();
    // Another UAID's kick, sent after the cancellation, comes through; the cancelled one is quiet.
    let r2 = receiver("127.0.0.1", vec![]).await;
    let t2 = target(
        &k,
        json!({"driver": "webhook", "url": format!("http://{}/", r2.addr)}),
    )
    .await;
    k.scheduler.raised(Uaid::random(), vec![t2], HOUR);
    eventually("the second receiver", || r2.got().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        r.got().len() <= after + 1,
        "at most the attempt in flight completes"
    );
}

#[tokio::test]
async fn webpush_reaches_a_push_service_that_verifies_vapid_and_decrypts() {
    let k = kicks(&config());
    let body: Value = serde_json::from_str(&k.drivers.webpush_key_body().unwrap()).unwrap();
    let vapid_public = body["vapid_public_key"].as_str().unwrap().to_owned();
    assert_eq!(URL_SAFE_NO_PAD.decode(&vapid_public).unwrap().len(), 65);
    let service = receiver("127.0.0.1", vec![(201, vec![])]).await;
    let sub = subscription();
    let kick =
        json!({"driver": "webpush", "subscription": sub.json(&format!("http://{}/push/abc", service.addr))});
    let t = target(&k, kick).await;
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![t], Duration::from_secs(600));
    eventually("the push", || service.got().len() == 1).await;
    let g = &service.got()[0];
    assert_eq!(g.path, "/push/abc");
    assert_eq!(header(g, "content-encoding"), "aes128gcm");
    let ttl: u64 = header(g, "ttl").parse().unwrap();
    assert!(ttl > 0 && ttl <= 600, "TTL is the event's remaining TTL: {ttl}");
    let claims = verify_vapid(header(g, "authorization"), &vapid_public);
    assert_eq!(
        claims["aud"],
        format!("http://{}", service.addr),
        "aud is the origin, port included"
    );
    assert_eq!(claims["sub"], SUBJECT);
    let exp = claims["exp"].as_u64().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(exp > now && exp <= now + 24 * 3600);
    let payload: Value = serde_json::from_slice(&sub.decrypt(&g.body)).unwrap();
    assert_eq!(payload, json!({"uaid": uaid.to_string()}));
    eventually("the kick to finish", || k.scheduler.pending() == 0).await;
    assert_eq!(k.metrics.get("webpush", "sent"), 1);
}

#[tokio::test]
async fn webpush_404_and_410_remove_the_kick() {
    let k = kicks(&config());
    let service = receiver("127.0.0.1", vec![(404, vec![]), (410, vec![])]).await;
    let sub = subscription();
    let a = target(
        &k,
        json!({"driver": "webpush", "subscription": sub.json(&format!("http://{}/a", service.addr))}),
    )
    .await;
    let b = target(
        &k,
        json!({"driver": "webpush", "subscription": sub.json(&format!("http://{}/b", service.addr))}),
    )
    .await;
    let uaid = Uaid::random();
    k.scheduler.raised(uaid, vec![a, b], HOUR);
    eventually("both pushes to finish", || k.scheduler.pending() == 0).await;
    assert_eq!(k.gone.lock().unwrap().len(), 2);
    assert_eq!(k.metrics.get("webpush", "gone"), 2);
}

#[test]
fn generated_secrets_are_kept_and_the_shipped_config_has_every_driver_off() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = KickConfig::default();
    let a = KickKeys::load(&defaults, dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("kick-keys.toml")).unwrap();
    assert!(text.contains("webhook_secret = \"whsec_"));
    let b = KickKeys::load(&defaults, Path::new(dir.path())).unwrap();
    assert_eq!(a.vapid_public_key(), b.vapid_public_key());
    assert!(Drivers::from_config(&defaults, &a).unwrap().is_empty());
}

#[tokio::test]
async fn pages_get_the_vapid_public_key_over_http() {
    let serve = |drivers: Arc<Drivers>| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app: Router = editiond::kick::routes(drivers);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1/kick/webpush")
    };
    let k = kicks(&config());
    let url = serve(k.drivers.clone()).await;
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let key = URL_SAFE_NO_PAD
        .decode(body["vapid_public_key"].as_str().unwrap())
        .unwrap();
    assert_eq!((key.len(), key[0]), (65, 4), "an uncompressed P-256 point");

    let off = kicks(&KickConfig::default());
    let response = reqwest::get(&serve(off.drivers.clone()).await).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], 404);
}

/// A stored target is checked again at every connection: a name that resolves to a refused
/// address now (DNS changed, or the allow list did) is given up, never connected to.
#[tokio::test]
async fn the_guard_checks_the_resolved_address_at_connect_time() {
    let mut c = config();
    c.webhook.allow = Vec::new();
    let k = kicks(&c);
    let r = receiver("127.0.0.1", vec![]).await;
    for url in [
        format!("http://localhost:{}/", r.addr.port()),
        format!("http://{}/", r.addr),
    ] {
        let stored = json!({"driver": "webhook", "url": url}).to_string();
        let t = Target::from_stored(stored.as_bytes()).unwrap();
        k.scheduler.raised(Uaid::random(), vec![t], HOUR);
    }
    eventually("both kicks to be given up", || k.scheduler.pending() == 0).await;
    assert_eq!(k.metrics.get("webhook", "rejected"), 2);
    assert_eq!(k.metrics.get("webhook", "retry"), 0);
    assert!(r.got().is_empty(), "never connected to");
}

/// On Redis the generated secrets are created once and shared by every node.
#[tokio::test]
async fn nodes_sharing_a_redis_share_the_generated_secrets() {
    use crate::common::redis_harness::{redis_available, RedisServer};
    use editiond::store::{RedisStore, RedisTarget};
    if !redis_available("nodes_sharing_a_redis_share_the_generated_secrets") {
        return;
    }
    let redis = RedisServer::start();
    let open = || async {
        RedisStore::open(&RedisTarget {
            url: redis.url(),
            cluster_urls: Vec::new(),
            timeout: Duration::from_millis(2000),
        })
        .await
        .unwrap()
    };
    let (a, b) = (open().await, open().await);
    let defaults = KickConfig::default();
    let ka = KickKeys::load_redis(&defaults, &a).await.unwrap();
    let kb = KickKeys::load_redis(&defaults, &b).await.unwrap();
    assert_eq!(ka.vapid_public_key(), kb.vapid_public_key());
    assert_eq!(ka.webhook_key(), kb.webhook_key());
    let pinned = KickConfig {
        webhook: editiond::kick::config::WebhookConfig {
            secret: WEBHOOK_SECRET.into(),
            ..Default::default()
        },
        ..KickConfig::default()
    };
    let kp = KickKeys::load_redis(&pinned, &a).await.unwrap();
    assert_eq!(
        kp.webhook_key(),
        STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    );
    assert_eq!(
        kp.vapid_public_key(),
        ka.vapid_public_key(),
        "the VAPID key still comes from Redis"
    );
}
