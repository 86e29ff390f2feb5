//! The `idle` scenario: N clients each say hello and register K apps, then sit idle. Reports the
//! server's RSS per connection (VmRSS before and after), the connect rate, and errors.

use std::sync::Arc;
use std::time::Duration;

use crate::client::Shared;
use crate::fleet::{self, Held};
use crate::report::{Goal, Report};
use crate::target::Target;
use crate::{BoxError, Settings, KIB};

pub async fn run(s: &Settings, target: &mut Target, report: &mut Report) -> Result<(), BoxError> {
    let rss0 = target.rss()?;
    let opened = fleet::enroll(target.addr, s.clients, s.apps, s.sources, s.connect_concurrency).await;
    let connected = opened.ok.len();
    let mut held = Held::new(Arc::new(Shared::new(s.clients * s.apps)));
    for (ident, ws) in opened.ok {
        held.hold(Arc::new(ident), ws);
    }
    // Let the server settle, then hold for the run's duration and read its RSS at the end.
    target
        .wait_connections_at_most(connected as u64, Duration::from_secs(10))
        .await?;
    tokio::time::sleep(s.duration.max(Duration::from_secs(1))).await;
    let rss1 = target.rss()?;
    let open = target.connections().await?;
    let dropped = held.shared.errors.load(std::sync::atomic::Ordering::Relaxed);
    held.close_all().await;
    // What the server gives back once they leave: the sockets' share (an underestimate, as
    // freed heap is not always returned to the OS); stored UAIDs and registrations stay.
    target
        .wait_connections_at_most(0, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss2 = target.rss()?;

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
