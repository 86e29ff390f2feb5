//! Limits on what one client may take (issue 9, findings 3 and 6): new UAIDs per client address
//! and per poll, and a frame rate that closes floods but not a client keeping up with its
//! UPDATEs.

use super::*;

/// POST /v1/poll with `entries`, as from `forwarded_for` when given.
async fn poll(server: &Server, entries: &[Value], forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.url("/v1/poll"))
        .header("content-type", "application/json")
        .body(json!({ "uaids": entries }).to_string());
    if let Some(addr) = forwarded_for {
        request = request.header("x-forwarded-for", addr);
    }
    request.send().await.unwrap()
}

fn fresh(n: usize) -> Vec<Value> {
    (0..n).map(|_| json!({})).collect()
}

#[tokio::test]
async fn a_poll_names_at_most_max_uaids_per_frame() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "5")]).await;
    let mut b = Bystander::join(&server).await;
    assert_http_error(poll(&server, &fresh(6), None).await, 413, "too_many_uaids").await;
    let r = poll(&server, &fresh(5), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["uaids"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn new_uaids_are_limited_per_client_address() {
    let (_dir, mut server) = start(&[
        ("EDITIOND_LIMITS__UAID_RATE_PER_SEC", "1"),
        ("EDITIOND_LIMITS__UAID_BURST", "5"),
        ("EDITIOND_LIMITS__MAX_UAIDS_PER_FRAME", "5"),
        ("EDITIOND_SERVER__TRUSTED_PROXY_HEADER", "x-forwarded-for"),
    ])
    .await;
    // The bystander's UAID is the first of 127.0.0.1's five.
    let mut b = Bystander::join(&server).await;

    // Over HTTP, behind the trusted proxy: the address is the header's last entry.
    let client = Some("198.51.100.7");
    assert_eq!(poll(&server, &fresh(5), client).await.status(), 200);
    let r = poll(&server, &fresh(5), client).await;
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    assert_http_error(r, 429, "uaid_rate_limited").await;
    // An entry the client wrote itself in front does not make it someone else.
    let spoofed = Some("203.0.113.50, 198.51.100.7");
    assert_http_error(poll(&server, &fresh(5), spoofed).await, 429, "uaid_rate_limited").await;
    // Another address has its own budget.
    assert_eq!(poll(&server, &fresh(5), Some("203.0.113.9")).await.status(), 200);

    // Over the WebSocket, from 127.0.0.1 (no header): four more, then the hello is refused.
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(4).await;
    let mut late = Client::connect(&server).await;
    late.send(json!({"type": "hello", "uaids": fresh(5)})).await;
    late.expect_error_close(429, "uaid_rate_limited", 4429).await;
    // A claim that asks for new UAIDs is refused the same way.
    c.send(json!({"type": "claim", "uaids": fresh(5)})).await;
    c.expect_error_close(429, "uaid_rate_limited", 4429).await;
    // UAIDs that exist already are never limited.
    let mut again = Client::connect(&server).await;
    let reply = again.hello(&creds).await;
    assert_eq!(reply["status"], 200, "{reply}");
    b.still_served(&mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_answering_updates_do_not_count_against_the_frame_rate() {
    // The lowest frame rate: however slow the machine, the ACK stream is far above it.
    const RATE: f64 = 1.0;
    const BURST: f64 = 10.0;
    let (_dir, server) = start(&[
        ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1"),
        ("EDITIOND_LIMITS__WS_FRAMES_BURST", "10"),
        ("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "0"),
    ])
    .await;
    // One client (a relay, say) for 5 UAIDs with one registration each: 6 frames.
    let mut c = Client::connect(&server).await;
    let creds = c.hello_new(5).await;
    let mut endpoints = Vec::new();
    for (uaid, _) in &creds {
        endpoints.push(c.register(uaid, &new_appid()).await);
    }
    // The app servers: 2,000 PUTs a second for three seconds, spread over the registrations
    // (each 10 ms batch runs on its own, so a slow PUT does not slow the rate down).
    let putter = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let end = Instant::now() + Duration::from_secs(3);
        let mut batches = Vec::new();
        let mut version = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            for endpoint in endpoints.iter().cycle().take(20) {
                version += 1;
                let (http, endpoint) = (http.clone(), endpoint.clone());
                batches.push(tokio::spawn(async move {
                    // 200: an older version that arrived after a newer one.
                    let status = put_version(&http, &endpoint, version).await;
                    assert!(status == 202 || status == 200, "{status}");
                }));
            }
        }
        let puts = batches.len();
        for b in batches {
            b.await.unwrap();
        }
        puts
    });
    // The client ACKs every UPDATE as it arrives.
    let started = Instant::now();
    let mut acks = 0u32;
    let mut events = 0usize;
    loop {
        match c.read(Duration::from_millis(500)).await {
            Read::Frame(v) if v["type"] == "update" => {
                let updates = v["updates"].as_object().unwrap();
                events += updates
                    .values()
                    .map(|apps| apps.as_object().unwrap().len())
                    .sum::<usize>();
                let uaids: Vec<&str> = updates.keys().map(String::as_str).collect();
                c.ack(&uaids).await;
                acks += 1;
            }
            Read::Frame(v) => panic!("unexpected {v} after {acks} ACKs"),
            Read::Closed(code) => panic!("closed with {code:?} after {acks} ACKs"),
            Read::Timeout if putter.is_finished() => break,
            Read::Timeout => {}
        }
    }
    let puts = putter.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("{puts} PUTs; {events} events in {acks} UPDATEs, each ACKed, in {elapsed:.1} s");
    // More frames than the limit allows in that time: counted, they would have closed it.
    assert!(
        f64::from(acks) > BURST + RATE * elapsed,
        "{acks} ACKs in {elapsed:.1} s do not exceed the frame limit"
    );
    c.barrier().await;
    // Unsolicited frames still count: a ping flood is closed.
    for _ in 0..200 {
        // The server may close before all are sent.
        let _ = c.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
    }
    loop {
        let v = c.recv().await;
        if v["type"] == "error" {
            assert_eq!(v["error"], "rate_limited", "{v}");
            break;
        }
        assert_eq!(v["type"], "pong", "{v}");
    }
    c.expect_close(4429).await;
}
