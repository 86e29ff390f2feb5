//! The `relay` scenario: the server under test becomes the upstream of a relay (`editiond relay
//! --upstream ws://…`, a second process from the same binary, own temp dir); N clients connect
//! to the relay, app servers PUT to the upstream's endpoints, once per rate in `--rates`.
//! Reports events per second through the relay, PUT→UPDATE latency (compare with the `put`
//! rows of the same run for the latency the relay adds), both processes' CPU, events lost, and
//! that the upstream holds one socket for all of them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::client::Shared;
use crate::fleet::{self, Held};
use crate::load::{self, Endpoint, LoadSpec};
use crate::report::{Goal, Report};
use crate::target::Target;
use crate::{rate_label, BoxError, Settings};

pub async fn run(
    s: &Settings,
    bin: &Path,
    upstream: &mut Target,
    env: &[(String, String)],
    report: &mut Report,
) -> Result<(), BoxError> {
    let url = format!("ws://{}", upstream.addr);
    let mut relay = Target::spawn_command(bin, &["relay", "--upstream", &url], env).await?;
    eprintln!("editiond-bench: relay pid {} at {}", relay.pid, relay.addr);
    // The link comes up right after start; claims need it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while relay.metric("editiond_relay_upstream_up").await? < 1.0 {
        if std::time::Instant::now() > deadline {
            return Err("the relay's upstream link did not come up".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let slots = s.clients * s.apps;
    let opened = fleet::enroll(&[relay.addr], s.clients, s.apps, s.sources, s.connect_concurrency).await;
    if opened.errors > 0 {
        report.fail(format!(
            "relay: {} clients failed to enroll ({})",
            opened.errors,
            opened.first_error.clone().unwrap_or_default()
        ));
    }
    let shared = Arc::new(Shared::new(slots));
    let mut held = Held::new(shared.clone());
    let mut endpoints = Vec::with_capacity(slots);
    for (ident, ws) in opened.ok {
        endpoints.extend(ident.apps.iter().map(|a| Endpoint {
            path: a.path.clone(),
            slot: a.slot,
            node: 0,
        }));
        held.hold(Arc::new(ident), ws);
    }
    let endpoints = Arc::new(endpoints);
    report.add("relay", "clients", held.idents.len() as f64, "");
    let row = report.add(
        "relay",
        "upstream_sockets",
        upstream.connections().await? as f64,
        "",
    );
    row.goal = Some(Goal::Below(1.5));
    let sent = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());

    for &rate in &s.rates {
        let label = rate_label(rate);
        shared.latency.reset();
        let (up0, relay0) = (upstream.cpu_seconds()?, relay.cpu_seconds()?);
        let spec = LoadSpec {
            app_servers: s.app_servers,
            rate,
            duration: s.duration,
        };
        // PUTs go to the upstream (the endpoints are its); UPDATEs come from the relay.
        let r = load::run(&[upstream.addr], endpoints.clone(), &spec, sent.clone()).await?;
        let (lost, drain) = load::wait_delivered(&sent, &shared.received, s.drain).await;
        let secs = (r.elapsed + drain).as_secs_f64();
        let (up_cpu, relay_cpu) = (upstream.cpu_seconds()? - up0, relay.cpu_seconds()? - relay0);
        let u = shared.latency.summary();
        let ms = |us: u64| us as f64 / 1000.0;
        let m = |name: &str| format!("{name}@{label}");
        report.add("relay", &m("put_rate"), r.throughput(), "/s");
        report.add("relay", &m("events_through"), u.count as f64 / secs, "/s");
        report.add("relay", &m("update_p50"), ms(u.p50), "ms");
        report.add("relay", &m("update_p99"), ms(u.p99), "ms");
        report.add("relay", &m("update_max"), ms(u.max), "ms");
        report.add("relay", &m("upstream_cpu"), up_cpu / secs, "cores");
        report.add("relay", &m("relay_cpu"), relay_cpu / secs, "cores");
        report.add(
            "relay",
            &m("relay_cpu_per_event"),
            relay_cpu * 1e6 / r.accepted.max(1) as f64,
            "us",
        );
        report.add("relay", &m("errors"), r.errors as f64, "").goal = Some(Goal::Zero);
        report.add("relay", &m("events_lost"), lost as f64, "").goal = Some(Goal::Zero);
        if r.errors > 0 {
            report.fail(format!(
                "relay@{label}: {} PUT errors ({})",
                r.errors,
                r.first_error.unwrap_or_default()
            ));
        }
        if lost > 0 {
            report.fail(format!("relay@{label}: {lost} events lost"));
        }
        relay.check_alive()?;
        upstream.check_alive()?;
    }
    let dropped = shared.errors.load(Ordering::Relaxed);
    held.close_all().await;
    if dropped > 0 {
        report.fail(format!("relay: {dropped} client sockets dropped during the run"));
    }
    Ok(())
}
