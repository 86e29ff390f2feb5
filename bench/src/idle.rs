//! The `idle` scenario: N clients each say hello and register K apps, then sit idle. Reports the
//! server's RSS per connection (VmRSS before and after), the connect rate, and errors. With
//! several nodes on one Redis the clients go round-robin over the nodes, RSS is the nodes' sum,
//! and Redis's own RSS per connected client and CPU are reported too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::Shared;
use crate::fleet::{self, Held};
use crate::redis::Redis;
use crate::report::{Goal, Report};
use crate::target::{nodes, Target};
use crate::{BoxError, Settings, KIB};

pub async fn run(
    s: &Settings,
    targets: &mut [Target],
    redis: Option<&Redis>,
    report: &mut Report,
) -> Result<(), BoxError> {
    let rss0 = nodes::rss(targets)?;
    let redis0 = match redis {
        Some(r) => Some((r.rss()?, r.cpu_seconds()?, Instant::now())),
        None => None,
    };
    let addrs = nodes::addrs(targets);
    let opened = fleet::enroll(&addrs, s.clients, s.apps, s.sources, s.connect_concurrency).await;
    let connected = opened.ok.len();
    let mut held = Held::new(Arc::new(Shared::new(s.clients * s.apps)));
    for (ident, ws) in opened.ok {
        held.hold(Arc::new(ident), ws);
    }
    // Let the server settle, then hold for the run's duration and read its RSS at the end.
    nodes::wait_connections_at_most(targets, connected as u64, Duration::from_secs(10)).await?;
    tokio::time::sleep(s.duration.max(Duration::from_secs(1))).await;
    let rss1 = nodes::rss(targets)?;
    let redis1 = match redis {
        Some(r) => Some((r.rss()?, r.cpu_seconds()?, Instant::now())),
        None => None,
    };
    let open = nodes::connections(targets).await?;
    let dropped = held.shared.errors.load(std::sync::atomic::Ordering::Relaxed);
    held.close_all().await;
    // What the server gives back once they leave: the sockets' share (an underestimate, as
    // freed heap is not always returned to the OS); stored UAIDs and registrations stay.
    nodes::wait_connections_at_most(targets, 0, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss2 = nodes::rss(targets)?;

    let per_conn = rss1.saturating_sub(rss0) as f64 / connected.max(1) as f64 / KIB;
    report.add("idle", "clients", connected as f64, "");
    report.add("idle", "server_open_sockets", open as f64, "");
    report.add("idle", "rss_before", rss0 as f64 / (KIB * KIB), "MiB");
    report.add("idle", "rss_after", rss1 as f64 / (KIB * KIB), "MiB");
    report.add("idle", "rss_after_close", rss2 as f64 / (KIB * KIB), "MiB");
    let released = rss1.saturating_sub(rss2) as f64 / connected.max(1) as f64 / KIB;
    report.add("idle", "rss_released_per_conn", released, "KiB");
    let row = report.add("idle", "rss_per_conn", per_conn, "KiB");
    row.ceiling = Some("rss_per_conn".into());
    row.goal = Some(Goal::AtMost(4.0));
    let row = report.add(
        "idle",
        "connect_rate",
        connected as f64 / opened.elapsed.as_secs_f64(),
        "/s",
    );
    row.ceiling = Some("connect_rate".into());
    if let (Some(r), Some((rrss0, rcpu0, t0)), Some((rrss1, rcpu1, t1))) = (redis, redis0, redis1) {
        report.add("idle", "redis_rss_before", rrss0 as f64 / (KIB * KIB), "MiB");
        report.add("idle", "redis_rss_after", rrss1 as f64 / (KIB * KIB), "MiB");
        let per_client = rrss1.saturating_sub(rrss0) as f64 / connected.max(1) as f64;
        report.add("idle", "redis_rss_per_client", per_client, "B");
        let used = r.info_field("used_memory").await?;
        report.add("idle", "redis_used_memory", used / (KIB * KIB), "MiB");
        // Connect, hello, register and the hold: the hold alone is the routes' re-check.
        let secs = (t1 - t0).as_secs_f64().max(1e-9);
        report.add("idle", "redis_cpu", (rcpu1 - rcpu0) / secs, "cores");
        report.add(
            "idle",
            "redis_cpu_per_client",
            (rcpu1 - rcpu0) * 1e6 / connected.max(1) as f64,
            "us",
        );
    }
    let errors = opened.errors + dropped;
    report.add("idle", "errors", errors as f64, "").goal = Some(Goal::Zero);
    if errors > 0 {
        report.fail(format!(
            "idle: {} connects failed, {dropped} held sockets dropped ({})",
            opened.errors,
            opened.first_error.unwrap_or_default()
        ));
    }
    Ok(())
}
