//! The `storm` scenario: N clients (one app each) connect and register, all disconnect, one event
//! per client piles up, then app servers PUT flat out for `--duration` to the absent clients
//! (durable PUT throughput without delivery, against the bare hyper ceiling), then all reconnect
//! at once (`--connect-concurrency` at a time). Reports
//! the time until every pending event is delivered and ACKed, where a reconnect spends its time
//! (connect, hello, UPDATE; a reconnect holds its concurrency slot until its UPDATE is ACKed),
//! and events lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{self, Shared};
use crate::fleet::{self, Held};
use crate::hist::Histogram;
use crate::load::{self, Endpoint, LoadSpec};
use crate::report::{Goal, Report};
use crate::target::Target;
use crate::{BoxError, Settings};

pub async fn run(s: &Settings, target: &mut Target, report: &mut Report) -> Result<(), BoxError> {
    let n = s.clients;
    let opened = fleet::enroll(&[target.addr], n, 1, s.sources, s.connect_concurrency).await;
    if opened.errors > 0 {
        report.fail(format!(
            "storm: {} clients failed to enroll ({})",
            opened.errors,
            opened.first_error.clone().unwrap_or_default()
        ));
    }
    let mut first = Held::new(Arc::new(Shared::new(n)));
    let mut idents = Vec::with_capacity(n);
    for (ident, ws) in opened.ok {
        let ident = Arc::new(ident);
        idents.push(ident.clone());
        first.hold(ident, ws);
    }
    // Everyone leaves; the server must see them gone before events pile up.
    first.close_all().await;
    target
        .wait_connections_at_most(0, Duration::from_secs(60))
        .await?;

    let endpoints: Arc<Vec<Endpoint>> = Arc::new(
        idents
            .iter()
            .map(|i| Endpoint {
                path: i.apps[0].path.clone(),
                slot: i.apps[0].slot,
                node: 0,
            })
            .collect(),
    );
    let sent = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let piled = load::put_each_once(target.addr, endpoints.clone(), s.app_servers, sent.clone()).await?;
    // Then flat out for --duration while nobody is connected: the durable PUT path alone (token,
    // compare-and-set, group commit, 202), the same work the bare hyper ceiling is compared with
    // minus delivery. Versions coalesce, so each client still has one event pending.
    let cpu0 = target.cpu_seconds()?;
    let spec = LoadSpec {
        app_servers: s.app_servers,
        rate: 0,
        duration: s.duration,
    };
    let offline = load::run(&[target.addr], endpoints, &spec, sent.clone()).await?;
    let offline_cpu = target.cpu_seconds()? - cpu0;
    for (what, r) in [("PUTs", &piled), ("offline PUTs", &offline)] {
        if r.errors > 0 {
            report.fail(format!(
                "storm: {} {what} failed ({})",
                r.errors,
                r.first_error.clone().unwrap_or_default()
            ));
        }
    }

    // All reconnect at once; each starts holding (and ACKing) as soon as its hello is answered.
    let shared = Arc::new(Shared::new(n));
    let mut again = Held::new(shared.clone());
    let stop = again.stop_signal();
    let started = Instant::now();
    let (addr, sources) = (target.addr, s.sources);
    let idents = Arc::new(idents);
    // Where a reconnect spends its time: TCP + WebSocket handshake, hello, and hello → UPDATE.
    let steps: Arc<[Histogram; 3]> = Arc::new(Default::default());
    let reconnect = {
        let (idents, shared, steps) = (idents.clone(), shared.clone(), steps.clone());
        tokio::spawn(fleet::run_all(
            idents.len(),
            s.connect_concurrency,
            Duration::from_secs(60),
            move |i| {
                let (ident, shared, stop) = (idents[i].clone(), shared.clone(), stop.clone());
                let steps = steps.clone();
                async move {
                    let t0 = Instant::now();
                    let mut ws = client::connect(addr, fleet::source(i, sources), "/v1/ws").await?;
                    let t1 = Instant::now();
                    client::hello_known(&mut ws, &ident.uaid, &ident.secret).await?;
                    let t2 = Instant::now();
                    let update = client::next_json(&mut ws, client::REPLY_WAIT).await?;
                    let t3 = Instant::now();
                    for (h, d) in steps.iter().zip([t1 - t0, t2 - t1, t3 - t2]) {
                        h.record(d.as_micros() as u64);
                    }
                    let uaids = client::record_update(&update, &ident, &shared);
                    client::send_json(&mut ws, &serde_json::json!({"type": "ack", "uaids": uaids})).await?;
                    shared.acks.fetch_add(1, Ordering::Relaxed);
                    Ok(tokio::spawn(client::hold(ws, ident, shared, stop)))
                }
            },
        ))
    };
    let (lost, delivered) = load::wait_delivered(&sent, &shared.received, s.storm_timeout).await;
    let reconnected = reconnect.await?;
    let acks_by = Instant::now() + Duration::from_secs(10);
    while shared.acks.load(Ordering::Relaxed) < piled.accepted && Instant::now() < acks_by {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let served = started.elapsed();
    // The server has applied every ACK once nothing is pending any more.
    let clear_by = Instant::now() + Duration::from_secs(30);
    let mut pending = target.metric("editiond_pending_events").await?;
    while pending > 0.0 && Instant::now() < clear_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pending = target.metric("editiond_pending_events").await?;
    }
    let cleared = started.elapsed();
    let reconnect_errors = reconnected.errors;
    for t in reconnected.ok {
        again.adopt(t);
    }
    let dropped = shared.errors.load(Ordering::Relaxed);
    again.close_all().await;

    report.add("storm", "clients", n as f64, "");
    report.add("storm", "pending_events", piled.accepted as f64, "");
    report.add(
        "storm",
        "pile_up_put_rate",
        piled.accepted as f64 / piled.elapsed.as_secs_f64(),
        "/s",
    );
    let row = report.add("storm", "offline_put_rate@max", offline.throughput(), "/s");
    row.ceiling = Some("put_rate@max".into());
    row.goal = Some(Goal::RatioAtLeast(0.6));
    for (name, value) in [
        ("offline_put_p50@max", offline.latency.p50),
        ("offline_put_p99@max", offline.latency.p99),
    ] {
        let ceiling = name.trim_start_matches("offline_");
        report.add("storm", name, value as f64 / 1000.0, "ms").ceiling = Some(ceiling.into());
    }
    report.add(
        "storm",
        "offline_server_cpu_per_put@max",
        offline_cpu * 1e6 / offline.accepted.max(1) as f64,
        "us",
    );
    report
        .add("storm", "offline_errors@max", offline.errors as f64, "")
        .goal = Some(Goal::Zero);
    report.add("storm", "all_delivered", delivered.as_secs_f64(), "s");
    let row = report.add("storm", "all_delivered_acked", served.as_secs_f64(), "s");
    row.ceiling = Some("storm_s".into());
    row.goal = Some(Goal::AtMost(10.0));
    for (name, h) in ["step_connect", "step_hello", "step_update"]
        .iter()
        .zip(steps.iter())
    {
        let h = h.summary();
        report.add("storm", &format!("{name}_p50"), h.p50 as f64 / 1000.0, "ms");
        report.add("storm", &format!("{name}_p99"), h.p99 as f64 / 1000.0, "ms");
    }
    report.add("storm", "server_pending_zero", cleared.as_secs_f64(), "s");
    report.add("storm", "server_pending_left", pending, "").goal = Some(Goal::Zero);
    report
        .add(
            "storm",
            "reconnect_errors",
            (reconnect_errors + dropped) as f64,
            "",
        )
        .goal = Some(Goal::Zero);
    report.add("storm", "events_lost", lost as f64, "").goal = Some(Goal::Zero);
    if lost > 0 || reconnect_errors + dropped > 0 || pending > 0.0 {
        report.fail(format!(
            "storm: {lost} events lost, {reconnect_errors} reconnects failed ({}), {dropped} sockets dropped, {pending} still pending",
            reconnected.first_error.unwrap_or_default()
        ));
    }
    Ok(())
}
