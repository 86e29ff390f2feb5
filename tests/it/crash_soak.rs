//! Crash soak: SIGKILL the server at random moments under mixed load, round after round, and
//! check after every restart that no PUT answered 2xx was lost and nothing durably ACKed comes
//! back.
//!
//! `tests/crash.rs` proves the same promise in three short cycles of PUTs and WebSocket ACKs.
//! This runs many rounds (by default 3 in CI; `SOAK_ROUNDS=100` and/or `SOAK_SECS=600` for the
//! long run, recorded in RELIABILITY.md) of a wider mix, all at once:
//! * app servers PUTting increasing versions (some retried) to random registrations;
//! * WebSocket clients holding UAIDs, ACKing each UPDATE and proving it with a `ping`;
//! * churning clients that connect, hello some UAIDs, `claim` others, ACK, and disconnect;
//! * fresh connections asking for new UAIDs (hello with `{}` entries);
//! * REST clients long-polling `POST /v1/poll` and ACKing exactly with `POST /v1/ack`;
//! * registrations no one holds, whose events only wait.
//!
//! Use a release server for the long run: `cargo test --release --test crash_soak -- --nocapture`.
//! `SOAK_SEED` repeats a run's kill times and choices.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::crash::{events_of, judge, until_pong, Reg, World};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// UAIDs by role (each role's UAIDs are disjoint, so no client takes another's UAID).
const ACKED_UAIDS: usize = 8;
const UAIDS_PER_ACKER: usize = 4;
const CHURN_UAIDS: usize = 8;
const POLLED_UAIDS: usize = 4;
const IDLE_UAIDS: usize = 4;
const APPIDS_PER_UAID: usize = 5;
const PUT_TASKS: usize = 16;

/// The frame-rate limit would close a busy acker, and the per-registration PUT limit would
/// answer 429 to the storm (a long run on an idle machine reached it): this is about
/// durability, not abuse.
const ENV: &[(&str, &str)] = &[
    ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1000000"),
    ("EDITIOND_LIMITS__WS_FRAMES_BURST", "1000000"),
    ("EDITIOND_LIMITS__PUT_RATE_PER_SEC", "0"),
];

/// SplitMix64, seeded per run and printed for reproduction.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

impl World {
    fn acked(&self) -> &[(String, String)] {
        &self.creds[..ACKED_UAIDS]
    }

    fn churned(&self) -> &[(String, String)] {
        &self.creds[ACKED_UAIDS..ACKED_UAIDS + CHURN_UAIDS]
    }

    fn polled(&self) -> &[(String, String)] {
        let from = ACKED_UAIDS + CHURN_UAIDS;
        &self.creds[from..from + POLLED_UAIDS]
    }

    /// Marks events as seen and their ACK as sent (before the send: a failed write may still
    /// have arrived).
    fn seen_and_ack_sent(&self, batch: &[(usize, u64)]) {
        self.with(|regs| {
            for &(i, v) in batch {
                regs[i].seen = regs[i].seen.max(v);
                regs[i].ack_sent = regs[i].ack_sent.max(v);
            }
        });
    }

    fn ack_durable(&self, batch: &[(usize, u64)]) {
        self.with(|regs| {
            for &(i, v) in batch {
                regs[i].ack_durable = regs[i].ack_durable.max(v);
            }
        });
    }
}

/// Counters over the whole soak, for the summary line.
#[derive(Default)]
struct Tally {
    puts_answered: AtomicU64,
    puts_503: AtomicU64,
    updates: AtomicU64,
    polls_answered: AtomicU64,
    connects: AtomicU64,
    new_uaids: AtomicU64,
}

async fn set_up(server: &Server) -> World {
    let mut c = Client::connect(server).await;
    let total = ACKED_UAIDS + CHURN_UAIDS + POLLED_UAIDS + IDLE_UAIDS;
    let creds = c.hello_new(total).await;
    let mut pairs = Vec::new();
    for (uaid, _) in &creds {
        for _ in 0..APPIDS_PER_UAID {
            let appid = new_appid();
            c.send(json!({"type": "register", "uaid": uaid, "appid": appid}))
                .await;
            pairs.push((uaid.clone(), appid));
        }
    }
    let mut endpoints = Vec::new();
    for _ in &pairs {
        let v = c.expect("register").await;
        assert_eq!(v["status"], 200, "{v}");
        endpoints.push(v["endpoint"].as_str().unwrap().to_owned());
    }
    World {
        regs: Mutex::new(vec![
            Reg {
                next: 1,
                ..Reg::default()
            };
            pairs.len()
        ]),
        index: pairs.into_iter().enumerate().map(|(i, p)| (p, i)).collect(),
        endpoints,
        creds,
    }
}

async fn put_storm(
    world: Arc<World>,
    tally: Arc<Tally>,
    http: reqwest::Client,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let i = rng.below(world.endpoints.len() as u64) as usize;
        let retry = rng.below(4) == 0;
        let version = world.with(|regs| {
            let r = &mut regs[i];
            if retry && r.attempted > 0 {
                return r.attempted;
            }
            let v = r.next;
            r.next += 1;
            r.attempted = r.attempted.max(v);
            v
        });
        let Ok(response) = http
            .put(&world.endpoints[i])
            .body(format!("version={version}"))
            .send()
            .await
        else {
            return; // The server is gone.
        };
        match response.status().as_u16() {
            200 | 202 => {
                world.with(|regs| regs[i].answered = regs[i].answered.max(version));
                tally.puts_answered.fetch_add(1, Ordering::Relaxed);
            }
            503 => {
                tally.puts_503.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("PUT answered {other}"),
        }
    }
}

fn hello_frame(kind: &str, creds: &[(String, String)]) -> String {
    let entries: Vec<Value> = creds
        .iter()
        .map(|(u, s)| json!({"uaid": u, "secret": s}))
        .collect();
    json!({"type": kind, "uaids": entries}).to_string()
}

/// One WebSocket client: hello for `hello`, then claim `claim`; ACKs each UPDATE with a ping
/// after it (a `pong` proves the ACKs before it durable). Ends when the server goes away, or
/// after `frames` UPDATEs when given (a churning client then closes).
async fn ws_client(
    world: Arc<World>,
    tally: Arc<Tally>,
    url: String,
    hello: Vec<(String, String)>,
    claim: Vec<(String, String)>,
    frames: Option<usize>,
) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        return;
    };
    tally.connects.fetch_add(1, Ordering::Relaxed);
    if ws
        .send(Message::Text(hello_frame("hello", &hello).into()))
        .await
        .is_err()
    {
        return;
    }
    if !claim.is_empty()
        && ws
            .send(Message::Text(hello_frame("claim", &claim).into()))
            .await
            .is_err()
    {
        return;
    }
    let mut unproven: VecDeque<Vec<(usize, u64)>> = VecDeque::new();
    let mut updates = 0;
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
        match frame["type"].as_str() {
            Some("hello") | Some("claim") => {
                for e in frame["uaids"].as_array().unwrap() {
                    assert_eq!(e["status"], 200, "{frame}");
                }
            }
            Some("update") => {
                tally.updates.fetch_add(1, Ordering::Relaxed);
                let events = events_of(&frame["updates"]);
                let mut uaids: Vec<&str> = events.iter().map(|(u, _, _)| u.as_str()).collect();
                uaids.sort_unstable();
                uaids.dedup();
                let batch: Vec<(usize, u64)> =
                    events.iter().map(|(u, a, v)| (world.reg_of(u, a), *v)).collect();
                world.seen_and_ack_sent(&batch);
                unproven.push_back(batch);
                let ack = json!({"type": "ack", "uaids": uaids}).to_string();
                let ping = json!({"type": "ping"}).to_string();
                if ws.send(Message::Text(ack.into())).await.is_err()
                    || ws.send(Message::Text(ping.into())).await.is_err()
                {
                    return;
                }
                updates += 1;
            }
            Some("pong") => {
                let batch = unproven.pop_front().expect("a pong answers a ping");
                world.ack_durable(&batch);
                if frames.is_some_and(|n| updates >= n) && unproven.is_empty() {
                    let _ = ws.close(None).await;
                    return;
                }
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Connects, hellos part of the churn group and claims the rest, ACKs a few UPDATEs, leaves;
/// again with another split, until `stop`.
async fn churner(world: Arc<World>, tally: Arc<Tally>, url: String, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let group = world.churned().to_vec();
        let split = 1 + rng.below(group.len() as u64 - 1) as usize;
        let (hello, claim) = group.split_at(split);
        let frames = 1 + rng.below(3) as usize;
        let client = ws_client(
            world.clone(),
            tally.clone(),
            url.clone(),
            hello.to_vec(),
            claim.to_vec(),
            Some(frames),
        );
        // A churner with nothing to receive would wait for ever: bound each visit.
        if tokio::time::timeout(Duration::from_millis(300), client)
            .await
            .is_err()
        {
            continue;
        }
        if tokio::net::TcpStream::connect(url.trim_start_matches("ws://").trim_end_matches("/v1/ws"))
            .await
            .is_err()
        {
            return; // The server is gone.
        }
    }
}

/// Fresh clients asking for new UAIDs: the hello reply's new secret is a durable write too.
async fn minter(tally: Arc<Tally>, url: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            return;
        };
        tally.connects.fetch_add(1, Ordering::Relaxed);
        let hello = json!({"type": "hello", "uaids": [{}, {}]}).to_string();
        if ws.send(Message::Text(hello.into())).await.is_err() {
            return;
        }
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                assert_eq!(v["type"], "hello", "{v}");
                for e in v["uaids"].as_array().unwrap() {
                    assert_eq!(e["status"], 200, "{v}");
                    assert!(e["secret"].is_string(), "{v}");
                }
                tally.new_uaids.fetch_add(2, Ordering::Relaxed);
            }
            _ => return,
        }
        let _ = ws.close(None).await;
    }
}

/// Long-polls for its UAIDs and ACKs exactly what each answer carried.
async fn poller(world: Arc<World>, tally: Arc<Tally>, base: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::new();
    let entries: Vec<Value> = world
        .polled()
        .iter()
        .map(|(u, s)| json!({"uaid": u, "secret": s}))
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let Ok(response) = http
            .post(format!("{base}/v1/poll?wait=1"))
            .json(&json!({"uaids": entries}))
            .send()
            .await
        else {
            return;
        };
        match response.status().as_u16() {
            204 => continue,
            200 => {}
            503 => continue,
            other => panic!("poll answered {other}"),
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        tally.polls_answered.fetch_add(1, Ordering::Relaxed);
        let events = events_of(&body["updates"]);
        let batch: Vec<(usize, u64)> = events.iter().map(|(u, a, v)| (world.reg_of(u, a), *v)).collect();
        world.seen_and_ack_sent(&batch);
        let Ok(ack) = http
            .post(format!("{base}/v1/ack"))
            .json(&json!({"uaids": entries, "updates": body["updates"]}))
            .send()
            .await
        else {
            return;
        };
        match ack.status().as_u16() {
            200 => world.ack_durable(&batch),
            503 => {}
            other => panic!("ack answered {other}"),
        }
    }
}

/// After a restart: one client hellos every UAID; what arrives is checked against the record,
/// then ACKed durably so the next round starts clean. Returns the registrations delivered.
async fn check_after_restart(server: &Server, world: &World, round: u64) -> usize {
    let mut c = Client::connect(server).await;
    let reply = c.hello(&world.creds).await;
    for e in reply["uaids"].as_array().unwrap() {
        assert_eq!(e["status"], 200, "credentials survive a crash: {reply}");
    }
    let events = until_pong(&mut c).await;
    let (delivered, failures) = judge(world, &events);
    let regs = world.regs.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "round {round}: {} of {} registrations wrong (SOAK_SEED in the log repeats the run):\n{}",
        failures.len(),
        regs.len(),
        failures.join("\n")
    );
    let mut uaids: Vec<&str> = events.iter().map(|(u, _, _)| u.as_str()).collect();
    uaids.sort_unstable();
    uaids.dedup();
    if !uaids.is_empty() {
        c.ack(&uaids).await;
    }
    assert_eq!(until_pong(&mut c).await, vec![], "nothing left after the ACK");
    world.with(|regs| {
        for (&i, &v) in &delivered {
            let r = &mut regs[i];
            r.seen = r.seen.max(v);
            r.ack_sent = r.ack_sent.max(v);
            r.ack_durable = r.ack_durable.max(v);
        }
    });
    delivered.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_under_mixed_load_loses_nothing_answered() {
    let rounds = env_u64("SOAK_ROUNDS").unwrap_or(3);
    let budget = env_u64("SOAK_SECS").map(Duration::from_secs);
    let seed = env_u64("SOAK_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("SOAK_SEED={seed} SOAK_ROUNDS={rounds} SOAK_SECS={budget:?}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(dir.path(), ENV).await;
    let world = Arc::new(set_up(&server).await);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let (mut done, mut delivered_total) = (0u64, 0usize);

    while done < rounds && budget.is_none_or(|b| started.elapsed() < b) {
        let stop = Arc::new(AtomicBool::new(false));
        let url = server.ws_url();
        let base = format!("http://{}", server.addr);
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for creds in world.acked().chunks(UAIDS_PER_ACKER) {
            let client = ws_client(
                world.clone(),
                tally.clone(),
                url.clone(),
                creds.to_vec(),
                vec![],
                None,
            );
            tasks.push(tokio::spawn(client));
        }
        tasks.push(tokio::spawn(churner(
            world.clone(),
            tally.clone(),
            url.clone(),
            stop.clone(),
            rng.next(),
        )));
        tasks.push(tokio::spawn(minter(tally.clone(), url.clone(), stop.clone())));
        tasks.push(tokio::spawn(poller(
            world.clone(),
            tally.clone(),
            base,
            stop.clone(),
        )));
        for _ in 0..PUT_TASKS {
            let storm = put_storm(
                world.clone(),
                tally.clone(),
                http.clone(),
                stop.clone(),
                rng.next(),
            );
            tasks.push(tokio::spawn(storm));
        }
        // The kill lands at a random moment while every kind of request is in flight.
        tokio::time::sleep(Duration::from_millis(150 + rng.below(1200))).await;
        server.kill();
        stop.store(true, Ordering::SeqCst);
        // Every client task ends before the new server takes the port, so the record is
        // complete and no late request reaches the new process.
        for t in tasks {
            t.await.expect("client task");
        }
        server.restart().await;
        delivered_total += check_after_restart(&server, &world, done).await;
        done += 1;
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "soak: {done} rounds in {:.0?}, 0 violations; PUTs answered 2xx {}, 503 {}; UPDATEs {}, \
         poll answers {}, connects {}, new UAIDs {}; registrations delivered after restarts {}",
        started.elapsed(),
        load(&tally.puts_answered),
        load(&tally.puts_503),
        load(&tally.updates),
        load(&tally.polls_answered),
        load(&tally.connects),
        load(&tally.new_uaids),
        delivered_total
    );
    assert!(done >= 1, "no round ran");
    assert!(load(&tally.puts_answered) > 0, "no PUT was ever answered");
    assert!(delivered_total > 0, "no restart had anything to deliver");
}
