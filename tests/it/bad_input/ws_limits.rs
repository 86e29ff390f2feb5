//! WebSocket: limits.

use super::*;

#[tokio::test]
async fn too_many_uaids_in_hello_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let entries: Vec<Value> = (0..4).map(|_| json!({})).collect();
    violation(
        &server,
        &[json!({"type": "hello", "uaids": entries})],
        413,
        "too_many_uaids_in_frame",
        4413,
    )
    .await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_uaids_in_claim_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    c.send(json!({"type": "claim", "uaids": [{}, {}, {}]})).await;
    assert_eq!(c.expect("claim").await["uaids"].as_array().unwrap().len(), 3);
    c.send(json!({"type": "claim", "uaids": [{}, {}, {}, {}]})).await;
    c.expect_error_close(413, "too_many_uaids_in_frame", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_uaids_per_connection_closes_4413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_CONNECTION", "3")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, secret) = greeted(&server).await;
    c.send(json!({"type": "claim", "uaids": [{}, {}]})).await;
    c.expect("claim").await;
    // At the limit, naming a held UAID again (twice, even) adds nothing.
    let held = json!({"uaid": uaid, "secret": secret});
    c.send(json!({"type": "claim", "uaids": [held, held]})).await;
    c.expect("claim").await;
    c.send(json!({"type": "claim", "uaids": [{}]})).await;
    c.expect_error_close(413, "too_many_uaids", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn too_many_registrations_per_uaid_is_413() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_APPIDS_PER_UAID", "2")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let (a1, a2, a3) = (new_appid(), new_appid(), new_appid());
    let e1 = c.register(&uaid, &a1).await;
    c.register(&uaid, &a2).await;
    c.send(json!({"type": "register", "uaid": uaid, "appid": a3}))
        .await;
    let v = c.expect("register").await;
    assert_eq!(v["status"], 413, "{v}");
    assert_eq!(v["error"], "too_many_registrations", "{v}");
    assert!(v.get("endpoint").is_none(), "{v}");
    // Existing registrations are untouched and re-registering one is still idempotent.
    assert_eq!(c.register(&uaid, &a1).await, e1);
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": a2}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    c.register(&uaid, &a3).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn kick_in_register_not_an_object_or_too_large() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_KICK_BYTES", "64")]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    for (kick, status, slug) in [
        (json!(5), 400, "invalid_kick"),
        (json!("webhook"), 400, "invalid_kick"),
        (json!([{"url": "x"}]), 400, "invalid_kick"),
        (json!({"url": "x".repeat(100)}), 413, "kick_too_large"),
        // An object the drivers refuse: no driver named, or one that is not enabled.
        (json!({"url": "x"}), 400, "invalid_kick"),
        (
            json!({"driver": "webhook", "url": "https://x/"}),
            400,
            "kick_unsupported",
        ),
    ] {
        c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid(), "kick": kick}))
            .await;
        let v = c.expect("register").await;
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["error"], slug, "{v}");
    }
    // None is fine, and the socket stayed open.
    c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["status"], 200);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn kick_in_hello_not_an_object_or_too_large() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_KICK_BYTES", "64")]).await;
    let mut b = Bystander::join(&server).await;
    for kick in [json!(5), json!("webhook"), json!([])] {
        let hello = json!({"type": "hello", "uaids": [{}], "kick": kick});
        violation(&server, &[hello], 400, "invalid_kick", 4400).await;
    }
    let hello = json!({"type": "hello", "uaids": [{}], "kick": {"url": "x".repeat(100)}});
    violation(&server, &[hello], 413, "kick_too_large", 4413).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn hello_timeout_closes_4408() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__HELLO_TIMEOUT_SECS", "1")]).await;
    let mut c = Client::connect(&server).await;
    // WebSocket pings do not count as a hello.
    c.send_raw(Message::Ping(b"hi".to_vec().into())).await;
    c.expect_error_close(408, "hello_timeout", 4408).await;
    // A client that sent hello in time stays.
    let mut b = Bystander::join(&server).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn rate_limit_closes_4429() {
    let (_dir, mut server) = start(&[
        ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1"),
        // Enough for the bystander's hello, register, ack and ping.
        ("EDITIOND_LIMITS__WS_FRAMES_BURST", "5"),
    ])
    .await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    const SENT: usize = 30;
    for _ in 0..SENT {
        // The server may close before all are sent.
        let _ = c.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
    }
    let mut pongs = 0;
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["status"], 429, "{v}");
                assert_eq!(v["error"], "rate_limited", "{v}");
                break;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(pongs < SENT, "{pongs} pongs");
    c.expect_close(4429).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn websocket_ping_frames_count_against_the_rate_limit() {
    let (_dir, mut server) = start(&[
        ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1"),
        ("EDITIOND_LIMITS__WS_FRAMES_BURST", "5"),
    ])
    .await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    for _ in 0..30 {
        // The server may close before all are sent.
        let _ = c.ws.send(Message::Ping(b"flood".to_vec().into())).await;
    }
    c.expect_error_close(429, "rate_limited", 4429).await;
    b.still_served(&mut server).await;
}
