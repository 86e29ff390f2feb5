//! WebSocket: identifiers and credentials.

use super::*;

#[tokio::test]
async fn hello_with_invalid_uaids_gets_per_entry_400_and_others_work() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let good = uuid::Uuid::new_v4().to_string();
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [
        {"uaid": "not-a-uuid"},
        {"uaid": NOT_V4},
        {"uaid": good.to_uppercase()},
        {"uaid": good.replace('-', "")},
        {"uaid": "", "secret": "x"},
        {"uaid": good},
    ]}))
    .await;
    let v = c.expect("hello").await;
    let entries = v["uaids"].as_array().unwrap();
    for (i, slug) in ["invalid_uaid", "invalid_uaid", "invalid_uaid", "invalid_uaid"]
        .iter()
        .enumerate()
    {
        assert_eq!(entries[i]["status"], 400, "{v}");
        assert_eq!(entries[i]["error"], *slug, "{v}");
        assert!(entries[i].get("secret").is_none(), "{v}");
    }
    assert_eq!(entries[5]["status"], 200, "{v}");
    // The good entry works; the rejected ones are not held.
    let http = reqwest::Client::new();
    let appid = new_appid();
    let endpoint = c.register(&good, &appid).await;
    assert_eq!(put_version(&http, &endpoint, 3).await, 202);
    assert_eq!(c.expect("update").await["updates"][&good][&appid], 3);
    let upper = good.to_uppercase();
    c.send(json!({"type": "register", "uaid": upper, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["error"], "invalid_uaid");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn register_and_unregister_with_invalid_ids_reply_400() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let appid = new_appid();
    for kind in ["register", "unregister"] {
        for (u, a, slug) in [
            ("bogus", appid.as_str(), "invalid_uaid"),
            (NOT_V4, appid.as_str(), "invalid_uaid"),
            (uaid.as_str(), "bogus", "invalid_appid"),
            (uaid.as_str(), NOT_V4, "invalid_appid"),
            (uaid.as_str(), &appid.to_uppercase(), "invalid_appid"),
            (uaid.as_str(), "", "invalid_appid"),
        ] {
            c.send(json!({"type": kind, "uaid": u, "appid": a})).await;
            let v = c.expect(kind).await;
            assert_eq!(v["status"], 400, "{v}");
            assert_eq!(v["error"], slug, "{v}");
            assert_eq!(
                (v["uaid"].as_str(), v["appid"].as_str()),
                (Some(u), Some(a)),
                "{v}"
            );
            assert!(v.get("endpoint").is_none(), "{v}");
        }
    }
    // The connection still works.
    c.register(&uaid, &appid).await;
    c.barrier().await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ack_with_invalid_uuid_closes() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for bad in ["bogus", NOT_V4] {
        let (mut c, uaid, _) = greeted(&server).await;
        c.send(json!({"type": "ack", "uaids": [uaid, bad]})).await;
        c.expect_error_close(400, "invalid_frame", 4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn wrong_secrets_get_per_entry_401_and_others_work() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut first = Client::connect(&server).await;
    let creds = first.hello_new(3).await;
    let appid = new_appid();
    let endpoint = first.register(&creds[2].0, &appid).await;
    drop(first);
    let other_secret = creds[1].1.clone();
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [
        {"uaid": creds[0].0, "secret": "wrong"},
        {"uaid": creds[0].0, "secret": other_secret},
        {"uaid": creds[1].0},
        {"uaid": creds[1].0, "secret": ""},
        {"uaid": creds[2].0, "secret": creds[2].1},
    ]}))
    .await;
    let v = c.expect("hello").await;
    let statuses: Vec<(Value, Value)> = v["uaids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["status"].clone(), e["error"].clone()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (json!(401), json!("bad_secret")),
            (json!(401), json!("bad_secret")),
            (json!(401), json!("secret_required")),
            (json!(401), json!("bad_secret")),
            (json!(200), Value::Null),
        ],
        "{v}"
    );
    let http = reqwest::Client::new();
    assert_eq!(put_version(&http, &endpoint, 8).await, 202);
    assert_eq!(c.expect("update").await["updates"][&creds[2].0][&appid], 8);
    c.send(json!({"type": "register", "uaid": creds[0].0, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["status"], 403);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn register_for_a_uaid_not_held_is_403() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, _, _) = greeted(&server).await;
    let stranger = uuid::Uuid::new_v4().to_string();
    for kind in ["register", "unregister"] {
        for uaid in [stranger.as_str(), b.uaid.as_str()] {
            c.send(json!({"type": kind, "uaid": uaid, "appid": b.appid}))
                .await;
            let v = c.expect(kind).await;
            assert_eq!(v["status"], 403, "{v}");
            assert_eq!(v["error"], "uaid_not_held", "{v}");
        }
    }
    c.send(json!({"type": "release", "uaids": [stranger, "bogus"]}))
        .await;
    let v = c.expect("release").await;
    assert_eq!(v["uaids"][0]["status"], 403, "{v}");
    assert_eq!(v["uaids"][1]["status"], 400, "{v}");
    // An ACK for a UAID not held changes nothing and keeps the connection.
    c.ack(&[&b.uaid]).await;
    c.barrier().await;
    b.still_served(&mut server).await;
}
