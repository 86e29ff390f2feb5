//! Garbage storm.

use super::*;

/// Knuth's MMIX linear congruential generator: deterministic bytes without a dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Valid frames to mutate.
fn templates() -> Vec<Vec<u8>> {
    let u = uuid::Uuid::new_v4().to_string();
    let a = uuid::Uuid::new_v4().to_string();
    [
        json!({"type": "hello", "uaids": [{}, {"uaid": u}]}),
        json!({"type": "hello", "uaids": [{"uaid": u, "secret": "AAAA"}], "kick": {"url": "x"}}),
        json!({"type": "claim", "uaids": [{}]}),
        json!({"type": "release", "uaids": [u]}),
        json!({"type": "register", "uaid": u, "appid": a, "kick": {"k": [1, 2]}}),
        json!({"type": "unregister", "uaid": u, "appid": a}),
        json!({"type": "ack", "uaids": [u]}),
        json!({"type": "ping"}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

/// One garbage message: a mutated template, random bytes, or a pathological JSON shape.
fn garbage(rng: &mut Lcg, templates: &[Vec<u8>]) -> Message {
    let mut bytes = templates[rng.below(templates.len())].clone();
    match rng.below(9) {
        0 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
        }
        1 => bytes.truncate(rng.below(bytes.len())),
        2 => {
            let i = rng.below(bytes.len() + 1);
            let n = 1 + rng.below(8);
            let junk = rng.bytes(n);
            bytes.splice(i..i, junk);
        }
        3 => {
            let n = rng.below(200);
            bytes = rng.bytes(n);
        }
        4 => {
            let depth = 1 + rng.below(100_000);
            bytes = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
        }
        5 => {
            let depth = 1 + rng.below(5_000);
            let kick = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            bytes = format!(r#"{{"type":"hello","uaids":[],"kick":{kick}}}"#).into_bytes();
        }
        6 => {
            // Swap a value for another JSON type.
            let s = String::from_utf8_lossy(&bytes).into_owned();
            let other = [
                "null",
                "true",
                "-1",
                "1e999",
                "\"\"",
                "{}",
                "[]",
                "18446744073709551616",
            ];
            bytes = s
                .replacen('[', &format!("{},[", other[rng.below(other.len())]), 1)
                .into_bytes();
        }
        7 => {
            let opcodes = [
                OpCode::Data(Data::Binary),
                OpCode::Data(Data::Continue),
                OpCode::Data(Data::Reserved(3 + rng.below(5) as u8)),
            ];
            return raw_frame(opcodes[rng.below(opcodes.len())], bytes);
        }
        _ => {}
    }
    raw_frame(OpCode::Data(Data::Text), bytes)
}

#[tokio::test]
async fn garbage_storm_leaves_the_server_healthy() {
    let (_dir, mut server) = start(&[]).await;
    let mut b = Bystander::join(&server).await;
    let templates = templates();
    let mut rng = Lcg(0x5EED_F00D_CAFE_D00D);
    let mut closes = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..300 {
        let mut c = Client::connect(&server).await;
        if round % 2 == 0 {
            c.hello_new(1).await;
        }
        let frames = 1 + rng.below(3);
        for _ in 0..frames {
            let _ = c.ws.send(garbage(&mut rng, &templates)).await;
        }
        // Whatever the server made of it, a ping then either answers or it had closed.
        let _ = c.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
        let mut last_error: Option<Value> = None;
        loop {
            match c.read(WAIT).await {
                Read::Frame(v) if v["type"] == "pong" => break,
                Read::Frame(v) if v["type"] == "error" => {
                    assert!(v["status"].as_u64().is_some(), "{v}");
                    assert!(v["error"].as_str().is_some(), "{v}");
                    assert!(v["message"].as_str().is_some(), "{v}");
                    last_error = Some(v);
                }
                Read::Frame(_) => {}
                Read::Closed(code) => {
                    let code = code.unwrap_or_else(|| panic!("closed without a code after {last_error:?}"));
                    let error = last_error
                        .take()
                        .unwrap_or_else(|| panic!("close {code} without an error frame"));
                    *closes.entry(code).or_default() += 1;
                    if code >= 4000 {
                        assert_eq!(
                            u64::from(code - 4000),
                            error["status"].as_u64().unwrap(),
                            "{error}"
                        );
                    }
                    break;
                }
                Read::Timeout => panic!("no answer in round {round}"),
            }
        }
        if round % 50 == 0 {
            assert_healthy(&mut server).await;
        }
    }
    // The storm reached the error paths it was meant to.
    assert!(closes.len() >= 4, "{closes:?}");
    b.still_served(&mut server).await;
}
