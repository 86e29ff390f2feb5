//! WebSocket: frame-level violations close the socket with an error frame.

use super::*;

#[tokio::test]
async fn ws_malformed_json() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for text in ["{", "not json", r#"{"type":"hello","uaids":[}"#, "", "{}}"] {
        violation_text(&server, text, 400, "malformed_json", 4400).await;
    }
    // After hello too.
    let (mut c, _, _) = greeted(&server).await;
    c.send_raw(Message::Text(r#"{"type":"ping""#.into())).await;
    c.expect_error_close(400, "malformed_json", 4400).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_missing_type() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for frame in [
        json!({"uaids": []}),
        json!([1, 2]),
        json!("hello"),
        json!(5),
        json!({"type": 5}),
        json!({"type": null}),
    ] {
        violation(&server, &[frame], 400, "missing_type", 4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_unknown_type() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    violation(&server, &[json!({"type": "bogus"})], 400, "unknown_type", 4400).await;
    violation(
        &server,
        &[json!({"type": "HELLO", "uaids": []})],
        400,
        "unknown_type",
        4400,
    )
    .await;
    let (mut c, _, _) = greeted(&server).await;
    c.send(json!({"type": "update", "updates": {}})).await;
    c.expect_error_close(400, "unknown_type", 4400).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_unknown_fields_are_ignored() {
    let (_dir, server) = start(&[]).await;
    let mut c = Client::connect(&server).await;
    c.send(json!({"type": "hello", "uaids": [{"extra": 1}], "future": true}))
        .await;
    let v = c.expect("hello").await;
    let uaid = v["uaids"][0]["uaid"].as_str().unwrap().to_owned();
    assert_eq!(v["uaids"][0]["status"], 200, "{v}");
    c.send(json!({"type": "ping", "extra": 1})).await;
    c.expect("pong").await;
    c.send(json!({"type": "register", "uaid": uaid, "appid": new_appid(), "x": [1]}))
        .await;
    assert_eq!(c.expect("register").await["status"], 200);
    c.send(json!({"type": "ack", "uaids": [uaid], "updates": {}}))
        .await;
    c.barrier().await;
}

#[tokio::test]
async fn ws_known_type_with_invalid_fields() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    for hello in [
        json!({"type": "hello"}),
        json!({"type": "hello", "uaids": 5}),
        json!({"type": "hello", "uaids": [5]}),
        json!({"type": "hello", "uaids": [{"uaid": 5}]}),
    ] {
        violation(&server, &[hello], 400, "invalid_frame", 4400).await;
    }
    let uaid = uuid::Uuid::new_v4().to_string();
    for frame in [
        json!({"type": "register", "uaid": uaid}),
        json!({"type": "register", "uaid": uaid, "appid": 7}),
        json!({"type": "unregister", "appid": new_appid()}),
        json!({"type": "ack", "uaids": "all"}),
        json!({"type": "ack"}),
        json!({"type": "claim", "uaids": {}}),
        json!({"type": "release", "uaids": [1]}),
    ] {
        let (mut c, _, _) = greeted(&server).await;
        c.send(frame.clone()).await;
        let v = c.expect("error").await;
        assert_eq!(
            (v["status"].clone(), v["error"].clone()),
            (json!(400), json!("invalid_frame")),
            "{frame}: {v}"
        );
        c.expect_close(4400).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_frames_before_hello() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let uaid = uuid::Uuid::new_v4().to_string();
    for frame in [
        json!({"type": "ping"}),
        json!({"type": "register", "uaid": uaid, "appid": new_appid()}),
        json!({"type": "ack", "uaids": [uaid]}),
        json!({"type": "claim", "uaids": [{}]}),
    ] {
        violation(&server, &[frame], 401, "hello_required", 4401).await;
    }
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_second_hello() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let (mut c, uaid, secret) = greeted(&server).await;
    c.send(json!({"type": "hello", "uaids": [{"uaid": uaid, "secret": secret}]}))
        .await;
    c.expect_error_close(409, "duplicate_hello", 4409).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_binary_frame() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut c = Client::connect(&server).await;
    let hello = json!({"type": "hello", "uaids": [{}]}).to_string();
    c.send_raw(Message::Binary(hello.into_bytes().into())).await;
    c.expect_error_close(415, "binary_frame", 1003).await;
    let (mut c, _, _) = greeted(&server).await;
    c.send_raw(Message::Binary(vec![0, 1, 2, 255].into())).await;
    c.expect_error_close(415, "binary_frame", 1003).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_oversized_frame_closes_1009() {
    let (_dir, mut server) = start(&[("EDITIOND_LIMITS__MAX_FRAME_BYTES", "1024")]).await;
    let mut b = Bystander::join(&server).await;
    let big = json!({"type": "hello", "uaids": [{"uaid": "x".repeat(2000)}]}).to_string();
    violation_text(&server, &big, 413, "frame_too_large", 1009).await;
    // After hello, and as a message split into frames that are each under the limit.
    let (mut c, _, _) = greeted(&server).await;
    let ping = format!(r#"{{"type":"ping","pad":"{}"}}"#, "y".repeat(1500)).into_bytes();
    let (first, rest) = ping.split_at(700);
    c.send_raw(Message::Frame(Frame::message(
        first.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send_raw(Message::Frame(Frame::message(
        rest.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    c.expect_error_close(413, "frame_too_large", 1009).await;
    // A frame just under the limit is fine.
    let (mut c, _, _) = greeted(&server).await;
    let pad = "z".repeat(900);
    c.send(json!({"type": "register", "uaid": pad, "appid": new_appid()}))
        .await;
    assert_eq!(c.expect("register").await["status"], 400);
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_invalid_utf8_text_frame() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let mut c = Client::connect(&server).await;
    c.send_raw(raw_frame(
        OpCode::Data(Data::Text),
        b"{\"type\":\"p\xffng\"}".to_vec(),
    ))
    .await;
    c.expect_error_close(400, "invalid_utf8", 1007).await;
    b.still_served(&mut server).await;
}

#[tokio::test]
async fn ws_protocol_violations_close_1002() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let reserved_bits = {
        let mut f = Frame::message(b"{\"type\":\"ping\"}".to_vec(), OpCode::Data(Data::Text), true);
        f.header_mut().rsv1 = true;
        Message::Frame(f)
    };
    let reserved_control = {
        let header = FrameHeader {
            opcode: OpCode::Control(
                tokio_tungstenite::tungstenite::protocol::frame::coding::Control::Reserved(11),
            ),
            ..FrameHeader::default()
        };
        Message::Frame(Frame::from_payload(header, Vec::new().into()))
    };
    for bad in [
        raw_frame(OpCode::Data(Data::Reserved(3)), b"{}".to_vec()),
        raw_frame(OpCode::Data(Data::Continue), b"{}".to_vec()),
        reserved_bits,
        reserved_control,
    ] {
        let (mut c, _, _) = greeted(&server).await;
        c.send_raw(bad).await;
        c.expect_error_close(400, "protocol_error", 1002).await;
    }
    b.still_served(&mut server).await;
}
