//! HTTP POST /v1/poll and /v1/ack.

use super::*;

/// A server, a bystander, and one UAID with a pending event: (uaid, secret, appid).
async fn poll_setup(env: &[(&str, &str)]) -> (TempDir, Server, Bystander, (String, String, String)) {
    let (dir, server, b) = endpoint_setup(env).await;
    let mut c = Client::connect(&server).await;
    let (uaid, secret) = c.hello_new(1).await.remove(0);
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    drop(c);
    let http = reqwest::Client::new();
    assert_eq!(put_version(&http, &endpoint, 5).await, 202);
    (dir, server, b, (uaid, secret, appid))
}

async fn post(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn poll_and_ack_malformed_json_are_400() {
    let (_dir, mut server, mut b, _) = poll_setup(&[]).await;
    for path in ["/v1/poll", "/v1/ack"] {
        for body in [
            "",
            "{",
            "[]",
            "null",
            "5",
            r#"{"uaids": 5}"#,
            r#"{"uaids":[{"uaid":1}]}"#,
            "\u{0}",
        ] {
            assert_http_error(post(&server, path, body).await, 400, "invalid_body").await;
        }
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_invalid_fields_are_400() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let creds = json!([{"uaid": uaid, "secret": secret}]);
    for body in [json!({"uaids": 5}), json!({"uaids": [{"uaid": 5}]}), json!([])] {
        let r = post(&server, "/v1/poll", body.to_string()).await;
        assert_http_error(r, 400, "invalid_body").await;
    }
    for body in [
        json!({"uaids": creds}),
        json!({"uaids": creds, "updates": {uaid.clone(): {appid.clone(): -1}}}),
        json!({"uaids": creds, "updates": {uaid.clone(): {appid.clone(): "5"}}}),
        json!({"uaids": creds, "updates": {uaid.clone(): {"bogus": 5}}}),
        json!({"uaids": creds, "updates": {"bogus": {appid.clone(): 5}}}),
    ] {
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 400, "invalid_body").await;
    }
    // Nothing was cleared: the pending event is still there.
    let r = post(&server, "/v1/poll", json!({"uaids": creds}).to_string()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_oversized_bodies_are_413() {
    let (_dir, mut server, mut b, (uaid, secret, _)) =
        poll_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let pad = "x".repeat(2000);
    let poll = json!({"uaids": [{"uaid": uaid, "secret": secret}], "pad": pad});
    let ack = json!({"uaids": [{"uaid": uaid, "secret": secret}], "updates": {}, "pad": pad});
    for (path, body) in [("/v1/poll", poll), ("/v1/ack", ack)] {
        assert_http_error(post(&server, path, body.to_string()).await, 413, "body_too_large").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_bad_wait_query_is_400() {
    let (_dir, mut server, mut b, (uaid, secret, _)) = poll_setup(&[]).await;
    let body = json!({"uaids": [{"uaid": uaid, "secret": secret}]}).to_string();
    for query in [
        "wait=abc",
        "wait=-1",
        "wait=1.5",
        "wait=99999999999999999999999",
        "wait=1&wait=2",
    ] {
        let r = post(&server, &format!("/v1/poll?{query}"), body.clone()).await;
        assert_http_error(r, 400, "invalid_query").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_too_many_uaids_are_413() {
    let (_dir, mut server, mut b, (uaid, secret, _)) =
        poll_setup(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_CONNECTION", "3")]).await;
    let entry = json!({"uaid": uaid, "secret": secret});
    // A UAID named twice counts once: four copies of one entry are within the limit.
    let same = json!([entry, entry, entry, entry]);
    let r = post(&server, "/v1/poll", json!({"uaids": same}).to_string()).await;
    assert!(r.status().is_success(), "{}", r.status());
    let other = || json!({"uaid": new_appid(), "secret": "s"});
    let four = json!([entry, other(), other(), other()]);
    let r = post(&server, "/v1/poll", json!({"uaids": four}).to_string()).await;
    assert_http_error(r, 413, "too_many_uaids").await;
    let r = post(
        &server,
        "/v1/ack",
        json!({"uaids": four, "updates": {}}).to_string(),
    )
    .await;
    assert_http_error(r, 413, "too_many_uaids").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_missing_secrets_are_401() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let r = post(
        &server,
        "/v1/poll",
        json!({"uaids": [{"uaid": uaid}]}).to_string(),
    )
    .await;
    assert_http_error(r, 401, "secret_required").await;
    let good = json!({"uaid": uaid, "secret": secret});
    for entries in [
        json!([{"uaid": uaid}]),
        json!([good, {"uaid": uaid}]),
        json!([{"secret": secret}]),
        json!([{}]),
    ] {
        let body = json!({"uaids": entries, "updates": {uaid.clone(): {appid.clone(): 5}}});
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 401, "secret_required").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn poll_and_ack_wrong_secrets_are_401() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let good = json!({"uaid": uaid, "secret": secret});
    let wrong = json!({"uaid": uaid, "secret": format!("{secret}x")});
    let other = json!({"uaid": b.uaid, "secret": secret});
    for entries in [json!([wrong]), json!([good, other])] {
        let r = post(&server, "/v1/poll", json!({"uaids": entries}).to_string()).await;
        assert_http_error(r, 401, "bad_secret").await;
        let body = json!({"uaids": entries, "updates": {uaid.clone(): {appid.clone(): 5}}});
        let r = post(&server, "/v1/ack", body.to_string()).await;
        assert_http_error(r, 401, "bad_secret").await;
    }
    // The pending event was not cleared.
    let r = post(&server, "/v1/poll", json!({"uaids": [good]}).to_string()).await;
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ack_of_a_uaid_not_authenticated_is_403() {
    let (_dir, mut server, mut b, (uaid, secret, appid)) = poll_setup(&[]).await;
    let creds = json!([{"uaid": uaid, "secret": secret}]);
    let body = json!({"uaids": creds, "updates": {
        uaid.clone(): {appid.clone(): 5},
        b.uaid.clone(): {b.appid.clone(): 1},
    }});
    let r = post(&server, "/v1/ack", body.to_string()).await;
    assert_http_error(r, 403, "uaid_not_authenticated").await;
    // The whole request was refused: the authenticated UAID's event is still pending.
    let r = post(&server, "/v1/poll", json!({"uaids": creds}).to_string()).await;
    assert_eq!(r.json::<Value>().await.unwrap()["updates"][&uaid][&appid], 5);
    b.still_served(&mut server).await;
}
