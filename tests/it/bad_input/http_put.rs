//! HTTP PUT /v1/e/{token}.

use super::*;

#[tokio::test]
async fn put_invalid_form_versions_are_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for body in [
        "version=-1",
        "version=abc",
        "version=1.5",
        "version=1e3",
        "version=18446744073709551616",
        "version=99999999999999999999999",
        "version=",
        "version=+1",
        "version=0x10",
        "v=1",
        "garbage",
    ] {
        for content_type in ["application/x-www-form-urlencoded", "text/plain", ""] {
            let mut req = http.put(&b.endpoint).body(body);
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            assert_http_error(req.send().await.unwrap(), 400, "invalid_version").await;
        }
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_invalid_json_versions_are_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for body in [
        r#"{"version":-1}"#,
        r#"{"version":"5"}"#,
        r#"{"version":1.5}"#,
        r#"{"version":1e3}"#,
        r#"{"version":18446744073709551616}"#,
        r#"{"version":null}"#,
        r#"{"version":[1]}"#,
        r#"{}"#,
        r#"{"version":1"#,
        r#"[1]"#,
    ] {
        let r = http
            .put(&b.endpoint)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_http_error(r, 400, "invalid_version").await;
    }
    // JSON is recognised without a content type too.
    let r = http
        .put(&b.endpoint)
        .body(r#"{"version":-1}"#)
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_version").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_unknown_tampered_or_garbage_tokens_are_404() {
    let endpoint_key = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [7u8; 32]);
    let secret_key = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [9u8; 32]);
    let keys = [
        ("EDITIOND_KEYS__ENDPOINT_KEY", endpoint_key.as_str()),
        ("EDITIOND_KEYS__SECRET_KEY", secret_key.as_str()),
    ];
    // A token validly sealed with the same keys but never registered on this server.
    let unknown = {
        let (_other_dir, other) = start(&keys).await;
        let b = Bystander::join(&other).await;
        b.endpoint.rsplit('/').next().unwrap().to_owned()
    };
    let (_dir, mut server, mut b) = endpoint_setup(&keys).await;
    let http = reqwest::Client::new();
    let token = b.endpoint.rsplit('/').next().unwrap().to_owned();
    let tampered = {
        let mut t = token.clone().into_bytes();
        t[10] = if t[10] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).unwrap()
    };
    let base = server.url("/v1/e/");
    for t in [
        unknown.as_str(),
        tampered.as_str(),
        &token[..42],
        &format!("{token}A"),
        "x",
        "%FF%FE",
        &"A".repeat(43),
        &"~".repeat(43),
        &"A".repeat(5000),
    ] {
        let r = http
            .put(format!("{base}{t}"))
            .body("version=1")
            .send()
            .await
            .unwrap();
        assert_http_error(r, 404, "unknown_token").await;
    }
    // A token with a path separator or none at all is no endpoint either.
    for path in ["/v1/e/", &format!("/v1/e/{token}/x")] {
        let r = http.put(server.url(path)).body("version=1").send().await.unwrap();
        assert_eq!(r.status(), 404);
        check_error_body(&r.text().await.unwrap(), 404, "not_found");
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_oversized_body_with_content_length_is_413() {
    let (_dir, mut server, mut b) = endpoint_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let http = reqwest::Client::new();
    let body = format!("version=1&pad={}", "x".repeat(2000));
    let r = http
        .put(&b.endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_http_error(r, 413, "body_too_large").await;
    // The same with a declared length only.
    let path = b.endpoint.trim_start_matches(&server.url(""));
    let (status, body) = raw_http(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nContent-Length: 1000000"),
        b"version=1",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error_body(&body, 413, "body_too_large");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_oversized_chunked_body_is_413() {
    let (_dir, mut server, mut b) = endpoint_setup(&[("EDITIOND_LIMITS__MAX_BODY_BYTES", "1024")]).await;
    let path = b.endpoint.trim_start_matches(&server.url("")).to_owned();
    let mut chunked = Vec::new();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("200\r\n{}\r\n", "7".repeat(0x200)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = raw_http(
        &server,
        &format!("PUT {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain"),
        &chunked,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    check_error_body(&body, 413, "body_too_large");
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_body_shape_decides_not_content_type() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    let mut c = Client::connect(&server).await;
    let uaid = c.hello_new(1).await.remove(0).0;
    let endpoint = c.register(&uaid, &new_appid()).await;
    // `curl -d '{"version":5}'` labels JSON as a form; it is still read as JSON.
    for (content_type, body, version) in [
        (
            "application/x-www-form-urlencoded",
            "{\"version\": 10000005}",
            10000005,
        ),
        ("application/json", "version=10000006", 10000006),
        ("image/png", "version=10000007", 10000007),
    ] {
        let r = http
            .put(&endpoint)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{content_type} {body}");
        assert_eq!(r.json::<Value>().await.unwrap()["version"], version);
    }
    let r = http
        .put(&endpoint)
        .header("content-type", "image/png")
        .body(vec![0x89u8, b'P', b'N', b'G'])
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_version").await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_invalid_ttl_is_400() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    for ttl in ["-1", "abc", "1.5", "", "99999999999999999999999", "0x10", "1 2"] {
        let r = http
            .put(&b.endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("ttl", ttl)
            .body("version=1")
            .send()
            .await
            .unwrap();
        assert_http_error(r, 400, "invalid_ttl").await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn put_to_unregistered_endpoint_is_410() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let appid = new_appid();
    let endpoint = c.register(&uaid, &appid).await;
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    let http = reqwest::Client::new();
    for body in ["version=1", ""] {
        let r = http.put(&endpoint).body(body).send().await.unwrap();
        assert_http_error(r, 410, "gone").await;
    }
    // Unregistering again is 404 on the socket, and the endpoint stays gone.
    c.send(json!({"type": "unregister", "uaid": uaid, "appid": appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 404);
    let r = http.put(&endpoint).body("version=2").send().await.unwrap();
    assert_http_error(r, 410, "gone").await;
    b.still_served(&mut server).await;
}

/// Reads UPDATEs for `uaid`, ACKing each, until every APPID in `want` has reached its version;
/// panics on a version above the one wanted.
async fn receive_until(c: &mut Client, uaid: &str, want: &[(&str, u64)]) {
    let mut seen: std::collections::HashMap<String, u64> = Default::default();
    while want.iter().any(|(a, v)| seen.get(*a) != Some(v)) {
        let update = c.expect("update").await;
        let events = update["updates"][uaid].as_object().expect("events for the UAID");
        for (appid, version) in events {
            let version = version.as_u64().expect("integer version");
            let (_, wanted) = want.iter().find(|(a, _)| a == appid).expect("a wanted APPID");
            assert!(version <= *wanted, "{update}");
            seen.insert(appid.clone(), version);
        }
        c.ack(&[uaid]).await;
    }
    c.barrier().await;
}

/// One registration PUT to faster than `put_rate_per_sec` beyond `put_burst` gets 429 with
/// `Retry-After`; its version is neither stored nor delivered; other registrations (of the same
/// UAID too) are unaffected; after `Retry-After` the same version is accepted as new.
#[tokio::test]
async fn put_beyond_the_rate_limit_is_429_and_stores_nothing() {
    let env = [
        ("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "1"),
        ("EDITIOND_LIMITS__PUT_BURST", "3"),
    ];
    let (_dir, mut server, mut b) = endpoint_setup(&env).await;
    let (mut c, uaid, _) = greeted(&server).await;
    let (appid, other_appid) = (new_appid(), new_appid());
    let endpoint = c.register(&uaid, &appid).await;
    let other = c.register(&uaid, &other_appid).await;
    let http = reqwest::Client::new();

    // PUT until refused: the burst passes (a slow machine may earn a token or two meanwhile).
    let mut accepted = 0;
    let refused = loop {
        let version = accepted + 1;
        let r = http
            .put(&endpoint)
            .body(format!("version={version}"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            break (version, r);
        }
        assert_eq!(r.status(), 202);
        accepted = version;
        assert!(accepted < 50, "no PUT was ever refused");
    };
    let (rejected, r) = refused;
    assert!(accepted >= 3, "the burst of 3 was refused after {accepted}");
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry_after, 1, "at 1 PUT/s a token is at most a second away");
    assert_http_error(r, 429, "rate_limited").await;

    // A tampered token is rejected before any bucket is looked at: 404, not 429.
    let (base, token) = endpoint.rsplit_once('/').unwrap();
    let flipped = if token.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{base}/{flipped}{}", &token[1..]);
    let r = http.put(&tampered).body("version=1").send().await.unwrap();
    assert_http_error(r, 404, "unknown_token").await;

    // Another registration of the same UAID, and of another UAID, are served.
    assert_eq!(put_version(&http, &other, 1).await, 202);
    receive_until(&mut c, &uaid, &[(&appid, accepted), (&other_appid, 1)]).await;
    b.still_served(&mut server).await;
    // The refused version never reaches the client.
    c.expect_silence(Duration::from_millis(300)).await;

    // After Retry-After the refused version is new to the store (202, not 200) and delivered.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(put_version(&http, &endpoint, rejected).await, 202);
    receive_until(&mut c, &uaid, &[(&appid, rejected)]).await;

    let metrics = server.metrics(&http).await;
    assert!(
        metrics.contains("editiond_puts_total{status=\"429\"}"),
        "{metrics}"
    );
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn websocket_path_without_a_handshake_gets_a_json_error() {
    let (_dir, mut server, mut b) = endpoint_setup(&[]).await;
    let http = reqwest::Client::new();
    let r = http
        .get(server.ws_url().replace("ws://", "http://"))
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_upgrade").await;
    let r = http
        .get(server.url("/v1/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_http_error(r, 400, "invalid_upgrade").await;
    let r = http.post(server.url("/v1/ws")).send().await.unwrap();
    assert_http_error(r, 405, "method_not_allowed").await;
    b.still_served(&mut server).await;
}
