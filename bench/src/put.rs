//! The `put` scenario: N clients with K apps each stay connected and ACK every UPDATE while M app
//! servers PUT to random endpoints, once per rate in `--rates` (0 = flat out). Reports PUT
//! throughput and latency, PUT→UPDATE latency, delivered frames/s, and events lost: every
//! version answered 202 must reach its client. With several nodes on one Redis the clients go
//! round-robin over the nodes, each PUT goes to a random node (most cross nodes over pub/sub),
//! CPU and RSS are the nodes' sums, and Redis's own CPU (per event too) is reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::client::Shared;
use crate::fleet::{self, Held};
use crate::load::{self, Endpoint, LoadSpec};
use crate::redis::Redis;
use crate::report::{Goal, Report};
use crate::target::{nodes, Target};
use crate::{rate_label, BoxError, Settings, KIB};

pub async fn run(
    s: &Settings,
    targets: &mut [Target],
    redis: Option<&Redis>,
    report: &mut Report,
) -> Result<(), BoxError> {
    let slots = s.clients * s.apps;
    let addrs = nodes::addrs(targets);
    let opened = fleet::enroll(&addrs, s.clients, s.apps, s.sources, s.connect_concurrency).await;
    if opened.errors > 0 {
        report.fail(format!(
            "put: {} clients failed to enroll ({})",
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
            node: fleet::node_of(a.slot, s.apps, addrs.len()),
        }));
        held.hold(Arc::new(ident), ws);
    }
    let endpoints = Arc::new(endpoints);
    report.add("put", "clients", held.idents.len() as f64, "");
    let sent = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());

    for &rate in &s.rates {
        let label = rate_label(rate);
        shared.latency.reset();
        let updates0 = shared.updates.load(Ordering::Relaxed);
        let sync0 = targets[0].buckets("editiond_store_sync_seconds").await?;
        let cpu0 = nodes::cpu_seconds(targets)?;
        let redis_cpu0 = redis.map(|r| r.cpu_seconds()).transpose()?;
        let t0 = std::time::Instant::now();
        let spec = LoadSpec {
            app_servers: s.app_servers,
            rate,
            duration: s.duration,
        };
        let r = load::run(&addrs, endpoints.clone(), &spec, sent.clone()).await?;
        let cpu = nodes::cpu_seconds(targets)? - cpu0;
        let sync1 = targets[0].buckets("editiond_store_sync_seconds").await?;
        let (lost, drain) = load::wait_delivered(&sent, &shared.received, s.drain).await;
        // Redis's CPU from the first PUT until the last event arrived (the ACKs follow at once).
        let redis_cpu = match (redis, redis_cpu0) {
            (Some(rd), Some(c0)) => Some((rd.cpu_seconds()? - c0, t0.elapsed().as_secs_f64())),
            _ => None,
        };
        let updates = shared.updates.load(Ordering::Relaxed) - updates0;
        let frames_per_s = updates as f64 / (r.elapsed + drain).as_secs_f64();
        let u = shared.latency.summary();
        let ms = |us: u64| us as f64 / 1000.0;

        let m = |name: &str| format!("{name}@{label}");
        let row = report.add("put", &m("put_rate"), r.throughput(), "/s");
        row.ceiling = Some(m("put_rate"));
        if rate == 0 {
            row.goal = Some(Goal::RatioAtLeast(0.6));
        }
        let put_latency = [
            ("put_p50", r.latency.p50),
            ("put_p99", r.latency.p99),
            ("put_p999", r.latency.p999),
        ];
        for (name, value) in put_latency {
            report.add("put", &m(name), ms(value), "ms").ceiling = Some(m(name));
        }
        report.add("put", &m("update_p50"), ms(u.p50), "ms");
        let row = report.add("put", &m("update_p99"), ms(u.p99), "ms");
        if rate == 2000 {
            row.goal = Some(Goal::Below(5.0));
        }
        report.add("put", &m("update_p999"), ms(u.p999), "ms");
        report.add("put", &m("update_max"), ms(u.max), "ms");
        report.add("put", &m("versions_received"), u.count as f64, "");
        let row = report.add("put", &m("delivered_frames"), frames_per_s, "/s");
        row.ceiling = Some("frames_per_s".into());
        if rate == 0 {
            row.goal = Some(Goal::RatioAtLeast(0.5));
        }
        report.add("put", &m("accepted_202"), r.accepted as f64, "");
        report.add("put", &m("server_cpu"), cpu / r.elapsed.as_secs_f64(), "cores");
        report.add(
            "put",
            &m("server_cpu_per_put"),
            cpu * 1e6 / r.accepted.max(1) as f64,
            "us",
        );
        if let Some((redis_cpu, secs)) = redis_cpu {
            report.add("put", &m("cross_node_puts"), r.cross_node as f64, "");
            report.add(
                "put",
                &m("nodes_rss"),
                nodes::rss(targets)? as f64 / (KIB * KIB),
                "MiB",
            );
            report.add("put", &m("redis_cpu"), redis_cpu / secs.max(1e-9), "cores");
            report.add(
                "put",
                &m("redis_cpu_per_event"),
                redis_cpu * 1e6 / r.accepted.max(1) as f64,
                "us",
            );
        }
        // Compared with the disk's own write + fsync, measured by the baseline (sled only: on
        // Redis a 2xx waits for no fsync).
        if redis.is_none() {
            for (name, q, ceiling) in [
                ("fsync_wait_p50_le", 0.5, "fsync_p50"),
                ("fsync_wait_p99_le", 0.99, "fsync_p99"),
            ] {
                let waited = bucket_quantile(&sync0, &sync1, q) * 1e3;
                report.add("put", &m(name), waited, "ms").ceiling = Some(ceiling.into());
            }
        }
        report.add("put", &m("errors"), r.errors as f64, "").goal = Some(Goal::Zero);
        report.add("put", &m("events_lost"), lost as f64, "").goal = Some(Goal::Zero);
        if r.errors > 0 {
            report.fail(format!(
                "put@{label}: {} PUT errors ({})",
                r.errors,
                r.first_error.unwrap_or_default()
            ));
        }
        if lost > 0 {
            report.fail(format!(
                "put@{label}: {lost} events lost (not delivered within {:?})",
                s.drain
            ));
        }
        nodes::check_alive(targets)?;
    }
    let dropped = shared.errors.load(Ordering::Relaxed);
    held.close_all().await;
    if dropped > 0 {
        report.fail(format!("put: {dropped} client sockets dropped during the run"));
    }
    Ok(())
}

/// The upper bound of the bucket holding quantile `q` of what was observed between two readings
/// of a cumulative histogram.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let b = before.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (le, n - b)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return 0.0;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::INFINITY, |(le, _)| *le)
}
