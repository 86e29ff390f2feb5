//! Crash safety, proven with SIGKILL against the real binary.
//!
//! The promise under test (DESIGN.md): a PUT answered with success is durable before the answer,
//! and an ACK is durable before the next frame is answered. So after `kill -9` at any moment:
//! * no registration loses a version that was answered 2xx: it is delivered again, at that
//!   version or a newer attempted one, unless an ACK that covers it may have been applied;
//! * no event is delivered again after an ACK that a later `pong` proved durable;
//! * no registration goes back below a version a client was already sent (an UPDATE only carries
//!   versions that survive a crash).
//!
//! Every PUT and every frame is recorded on the client side, and after each restart the server's
//! one UPDATE per UAID is checked against that record. Nothing here waits for a time to pass: the
//! kill happens after a random delay, but every check is an ordering proven by a reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const UAIDS: usize = 20;
const APPIDS_PER_UAID: usize = 10;
/// UAIDs held by connections that read and ACK during the PUT storm (in groups of this size).
const ACKED_UAIDS: usize = 12;
const UAIDS_PER_ACKER: usize = 4;
const PUT_TASKS: usize = 24;
const CYCLES: usize = 3;

/// The frame rate limit would close a busy acker; this test is about durability, not abuse.
const ENV: &[(&str, &str)] = &[
    ("EDITIOND_LIMITS__WS_FRAMES_PER_SEC", "1000000"),
    ("EDITIOND_LIMITS__WS_FRAMES_BURST", "1000000"),
];

/// SplitMix64: a small deterministic generator, seeded per run and printed for reproduction.
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
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("CRASH_SEED") {
        Ok(s) => s.parse().expect("CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// What the clients know about one registration, across every cycle. Versions are 1-based; 0
/// means "none".
#[derive(Default, Debug, Clone)]
pub(crate) struct Reg {
    /// The next version a PUT task will send (versions only grow).
    pub(crate) next: u64,
    /// Highest version sent in a PUT, answered or not.
    pub(crate) attempted: u64,
    /// Highest version a PUT for which the server answered 200 or 202.
    pub(crate) answered: u64,
    /// Highest version a client was sent (UPDATE or poll answer).
    pub(crate) seen: u64,
    /// Highest version named by an ACK that was sent (it may or may not have been applied).
    pub(crate) ack_sent: u64,
    /// Highest version named by an ACK proven applied and durable (a `pong` after it, or a 200
    /// to `POST /v1/ack`).
    pub(crate) ack_durable: u64,
}

pub(crate) struct World {
    pub(crate) regs: Mutex<Vec<Reg>>,
    /// (uaid, appid) → index into `regs`.
    pub(crate) index: HashMap<(String, String), usize>,
    pub(crate) endpoints: Vec<String>,
    pub(crate) creds: Vec<(String, String)>,
}

impl World {
    pub(crate) fn reg_of(&self, uaid: &str, appid: &str) -> usize {
        *self
            .index
            .get(&(uaid.to_owned(), appid.to_owned()))
            .unwrap_or_else(|| panic!("update names an unknown registration {uaid}/{appid}"))
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Vec<Reg>) -> T) -> T {
        f(&mut self.regs.lock().unwrap())
    }
}

/// The `(uaid, appid, version)` triples of an `updates` object (of an UPDATE or a poll answer).
pub(crate) fn events_of(updates: &Value) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for (uaid, apps) in updates.as_object().expect("updates object") {
        for (appid, v) in apps.as_object().expect("appid object") {
            out.push((uaid.clone(), appid.clone(), v.as_u64().expect("integer version")));
        }
    }
    out
}

/// Registers every (UAID, APPID) pair, pipelining the register frames per connection.
async fn set_up(server: &Server) -> World {
    let mut c = Client::connect(server).await;
    let creds = c.hello_new(UAIDS).await;
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
    for (uaid, appid) in &pairs {
        let v = c.expect("register").await;
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!((&v["uaid"], &v["appid"]), (&json!(uaid), &json!(appid)));
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

/// PUTs increasing versions to random registrations until `stop` or the server dies.
async fn put_storm(world: Arc<World>, http: reqwest::Client, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::SeqCst) {
        let i = rng.below(world.endpoints.len() as u64) as usize;
        // Now and then an app server retries the newest version, which may still be on its way
        // to disk for another request: its 200 ("already known") must be as durable as a 202.
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
        let sent = http
            .put(&world.endpoints[i])
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("version={version}"))
            .send()
            .await;
        let Ok(response) = sent else {
            return; // The server is gone.
        };
        match response.status().as_u16() {
            200 | 202 => world.with(|regs| regs[i].answered = regs[i].answered.max(version)),
            // 503 (a slow disk) is an honest "not stored"; nothing else is expected.
            503 => {}
            other => panic!("PUT answered {other}"),
        }
    }
}

/// Reads UPDATEs and ACKs each at once, with a ping after every ACK. A `pong` proves the ACKs
/// sent before its ping were applied and durable. Runs until the server dies.
async fn acker(world: Arc<World>, server_ws: String, creds: Vec<(String, String)>) {
    // A slow machine may kill the server before this connects: then there is nothing to do.
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(server_ws).await else {
        return;
    };
    let entries: Vec<Value> = creds
        .iter()
        .map(|(u, s)| json!({"uaid": u, "secret": s}))
        .collect();
    let hello = json!({"type": "hello", "uaids": entries}).to_string();
    if ws.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    // ACKs sent and not yet proven, one batch per ping, oldest first.
    let mut unproven: std::collections::VecDeque<Vec<(usize, u64)>> = Default::default();
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
        match frame["type"].as_str() {
            Some("hello") => {
                for e in frame["uaids"].as_array().unwrap() {
                    assert_eq!(e["status"], 200, "{frame}");
                }
            }
            Some("update") => {
                let events = events_of(&frame["updates"]);
                let mut uaids: Vec<&str> = events.iter().map(|(u, _, _)| u.as_str()).collect();
                uaids.dedup();
                let batch: Vec<(usize, u64)> =
                    events.iter().map(|(u, a, v)| (world.reg_of(u, a), *v)).collect();
                world.with(|regs| {
                    for &(i, v) in &batch {
                        regs[i].seen = regs[i].seen.max(v);
                    }
                });
                let ack = json!({"type": "ack", "uaids": uaids}).to_string();
                // Counted as sent before the send: a write that fails may still have arrived.
                world.with(|regs| {
                    for &(i, v) in &batch {
                        regs[i].ack_sent = regs[i].ack_sent.max(v);
                    }
                });
                unproven.push_back(batch);
                let ping = json!({"type": "ping"}).to_string();
                if ws.send(Message::Text(ack.into())).await.is_err()
                    || ws.send(Message::Text(ping.into())).await.is_err()
                {
                    return;
                }
            }
            Some("pong") => {
                let batch = unproven.pop_front().expect("a pong answers a ping");
                world.with(|regs| {
                    for (i, v) in batch {
                        regs[i].ack_durable = regs[i].ack_durable.max(v);
                    }
                });
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// Reads frames until `pong`, returning every UPDATE's events on the way.
pub(crate) async fn until_pong(c: &mut Client) -> Vec<(String, String, u64)> {
    c.send(json!({"type": "ping"})).await;
    let mut events = Vec::new();
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("pong") => return events,
            Some("update") => events.extend(events_of(&v["updates"])),
            _ => panic!("unexpected frame {v}"),
        }
    }
}

/// Checks what a restarted server delivered (`events`, read up to a pong) against what the
/// clients recorded: at most one event per registration, and per registration the rules of
/// "nothing lost, nothing back after a durable ACK". Returns the delivered version per
/// registration and one line per registration that breaks a rule.
pub(crate) fn judge(world: &World, events: &[(String, String, u64)]) -> (HashMap<usize, u64>, Vec<String>) {
    let mut delivered: HashMap<usize, u64> = HashMap::new();
    for (u, a, v) in events {
        assert!(
            delivered.insert(world.reg_of(u, a), *v).is_none(),
            "one event per registration: {u}/{a}"
        );
    }
    let regs = world.regs.lock().unwrap().clone();
    let mut failures = Vec::new();
    for (i, r) in regs.iter().enumerate() {
        let got = delivered.get(&i).copied();
        let problem = match got {
            Some(v) if v <= r.ack_durable => Some("delivered again after a durable ACK"),
            Some(v) if v < r.answered => Some("older than a version answered 2xx"),
            Some(v) if v < r.seen => Some("older than a version already sent to a client"),
            Some(v) if v > r.attempted => Some("a version nobody sent"),
            Some(_) => None,
            // Nothing pending is right only if an ACK that covers everything answered or seen
            // may have been applied.
            None if r.answered > r.ack_sent || r.seen > r.ack_sent => {
                Some("an answered or seen version was lost")
            }
            None => None,
        };
        if let Some(problem) = problem {
            failures.push(format!("reg {i}: {problem}: delivered {got:?}, record {r:?}"));
        }
    }
    (delivered, failures)
}

/// After a restart: every UAID reconnects, and what the server delivers is checked against what
/// the clients recorded. Everything delivered is then ACKed (durably) for the next cycle.
async fn check_after_restart(server: &Server, world: &World, cycle: usize) -> usize {
    let mut c = Client::connect(server).await;
    let reply = c.hello(&world.creds).await;
    for e in reply["uaids"].as_array().unwrap() {
        assert_eq!(e["status"], 200, "credentials survive a crash: {reply}");
    }
    // The hello's UPDATE is written before the pong: no waiting on a clock.
    let events = until_pong(&mut c).await;
    let (delivered, failures) = judge(world, &events);
    let regs = world.regs.lock().unwrap().clone();
    // The brief's strict case, implied by the above: a version answered 2xx and durably ACKed,
    // with no later PUT attempted, is never delivered again.
    let quiet = regs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.answered > 0 && r.answered == r.ack_durable && r.attempted == r.ack_durable)
        .count();
    assert!(
        failures.is_empty(),
        "cycle {cycle}: {} of {} registrations wrong:\n{}",
        failures.len(),
        regs.len(),
        failures.join("\n")
    );

    // ACK what came, prove it durable, and expect nothing more: no PUT is running now.
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
    eprintln!(
        "cycle {cycle}: {} registrations delivered after restart, {quiet} durably acked and quiet",
        delivered.len()
    );
    delivered.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_answered_put_and_repeats_no_acked_event() {
    let seed = seed();
    eprintln!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(dir.path(), ENV).await;
    let world = Arc::new(set_up(&server).await);
    let mut delivered_total = 0;
    let mut answered_total = 0;

    for cycle in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let ackers: Vec<_> = world.creds[..ACKED_UAIDS]
            .chunks(UAIDS_PER_ACKER)
            .map(|creds| tokio::spawn(acker(world.clone(), server.ws_url(), creds.to_vec())))
            .collect();
        let http = reqwest::Client::new();
        let puts: Vec<_> = (0..PUT_TASKS)
            .map(|_| tokio::spawn(put_storm(world.clone(), http.clone(), stop.clone(), rng.next())))
            .collect();
        // Kill while PUTs and ACKs are in flight.
        tokio::time::sleep(Duration::from_millis(200 + rng.below(600))).await;
        server.kill();
        stop.store(true, Ordering::SeqCst);
        // Every task must be finished before the new server takes the port, so that the record
        // is complete and no late request reaches the new process.
        for t in puts.into_iter().chain(ackers) {
            t.await.expect("client task");
        }
        answered_total += world.with(|regs| regs.iter().filter(|r| r.answered > 0).count());
        server.restart().await;
        delivered_total += check_after_restart(&server, &world, cycle).await;
    }
    // The test only proves something if the storm got answers and the crash left work to do.
    assert!(answered_total > 0, "no PUT was ever answered");
    assert!(delivered_total > 0, "no restart had anything to deliver");
}

/// Each kind of write is the last thing before its own SIGKILL, so that no later write's commit
/// can make it durable by accident: the reply alone must promise it.
#[tokio::test]
async fn secrets_and_endpoints_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    let http = reqwest::Client::new();

    // New UAIDs: the server-chosen ones and one the client chose, bound on first use.
    let mut c = Client::connect(&server).await;
    let chosen = uuid::Uuid::new_v4().to_string();
    c.send(json!({"type": "hello", "uaids": [{}, {}, {"uaid": chosen}]}))
        .await;
    let v = c.expect("hello").await;
    let creds: Vec<(String, String)> = v["uaids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["status"], 200, "{v}");
            let uaid = e["uaid"].as_str().unwrap().to_owned();
            (uaid, e["secret"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(creds[2].0, chosen);
    server.kill();
    drop(c);
    server.restart().await;
    // The chosen UAID stayed bound: claiming it without its secret fails (first, as the
    // owner's hello would bind it again).
    let mut thief = Client::connect(&server).await;
    thief
        .send(json!({"type": "hello", "uaids": [{"uaid": chosen}]}))
        .await;
    assert_eq!(thief.expect("hello").await["uaids"][0]["status"], 401);
    drop(thief);
    let mut c = Client::connect(&server).await;
    let reply = c.hello(&creds).await;
    for e in reply["uaids"].as_array().unwrap() {
        assert_eq!(e["status"], 200, "secrets still open their UAIDs: {reply}");
        assert!(e.get("secret").is_none(), "no UAID is new again: {reply}");
    }

    // An unregister.
    let gone_appid = new_appid();
    let gone_endpoint = c.register(&creds[0].0, &gone_appid).await;
    c.send(json!({"type": "unregister", "uaid": creds[0].0, "appid": gone_appid}))
        .await;
    assert_eq!(c.expect("unregister").await["status"], 200);
    server.kill();
    drop(c);
    server.restart().await;
    assert_eq!(put_version(&http, &gone_endpoint, 1).await, 410);

    // Registrations.
    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    let mut endpoints = Vec::new();
    for (uaid, _) in &creds {
        let appid = new_appid();
        endpoints.push((uaid.clone(), appid.clone(), c.register(uaid, &appid).await));
    }
    server.kill();
    drop(c);
    server.restart().await;

    // Every endpoint still opens (same keys) and reaches its registration.
    let mut c = Client::connect(&server).await;
    c.hello(&creds).await;
    for (i, (uaid, appid, endpoint)) in endpoints.iter().enumerate() {
        let version = 10 + i as u64;
        assert_eq!(put_version(&http, endpoint, version).await, 202);
        let update = c.expect("update").await;
        assert_eq!(update["updates"][uaid][appid], version, "{update}");
        c.ack(&[uaid]).await;
        c.barrier().await;
        // Registering the same pair again gives the same endpoint.
        assert_eq!(&c.register(uaid, appid).await, endpoint);
    }
    assert_eq!(put_version(&http, &gone_endpoint, 1).await, 410);
}
