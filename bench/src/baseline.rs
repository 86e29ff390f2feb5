//! The `baseline` scenario: this machine's ceilings, measured in the same run with the same load
//! code. A bare hyper server takes the same PUT load (same app servers, same rates); a bare
//! WebSocket server takes the same number of clients, from the same source addresses and
//! concurrency, and pushes update-sized frames to them flat out, each answered with an
//! ACK-sized frame. Every editiond figure with a ceiling is printed as a ratio to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::bare::Bare;
use crate::load::{self, Endpoint, LoadSpec};
use crate::report::Report;
use crate::{client, fleet, rate_label, BoxError, Settings, KIB};

pub async fn run(s: &Settings, report: &mut Report) -> Result<(), BoxError> {
    fsync_ceiling(s, report).await?;
    http_ceiling(s, report).await?;
    ws_ceiling(s, report).await
}

/// The disk's floor under a durable PUT: append 128 bytes to a file in the temp dir (where the
/// spawned server keeps its data) and fsync it, one at a time, for up to 2 s or 2,000 rounds.
async fn fsync_ceiling(s: &Settings, report: &mut Report) -> Result<(), BoxError> {
    let limit = s.duration.min(Duration::from_secs(2));
    let summary = tokio::task::spawn_blocking(move || -> Result<_, BoxError> {
        use std::io::Write;
        let dir = crate::target::temp_dir("fsync")?;
        let hist = crate::hist::Histogram::default();
        let started = Instant::now();
        let result = (|| -> Result<(), BoxError> {
            let mut file = std::fs::File::create(dir.join("log"))?;
            for _ in 0..2000 {
                if started.elapsed() >= limit {
                    break;
                }
                let t0 = Instant::now();
                file.write_all(&[b'x'; 128])?;
                file.sync_all()?;
                hist.record(t0.elapsed().as_micros() as u64);
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result.map(|_| (hist.summary(), started.elapsed()))
    })
    .await??;
    let (summary, elapsed) = summary;
    let ms = |us: u64| us as f64 / 1000.0;
    report.ceiling("fsync_p50", ms(summary.p50));
    report.ceiling("fsync_p99", ms(summary.p99));
    report.add("baseline", "disk_fsync_p50", ms(summary.p50), "ms");
    report.add("baseline", "disk_fsync_p99", ms(summary.p99), "ms");
    report.add(
        "baseline",
        "disk_fsyncs_per_s",
        summary.count as f64 / elapsed.as_secs_f64(),
        "/s",
    );
    Ok(())
}

async fn http_ceiling(s: &Settings, report: &mut Report) -> Result<(), BoxError> {
    let bare = Bare::spawn(&["bare-http"])?;
    let slots = s.clients * s.apps;
    // Paths as long as real endpoint paths, spread the same way.
    let endpoints: Arc<Vec<Endpoint>> = Arc::new(
        (0..slots)
            .map(|slot| Endpoint {
                path: format!("/v1/e/{}", "t".repeat(90) + &format!("{slot:010}")),
                slot,
                node: 0,
            })
            .collect(),
    );
    for &rate in &s.rates {
        let sent = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let spec = LoadSpec {
            app_servers: s.app_servers,
            rate,
            duration: s.duration,
        };
        let r = load::run(&[bare.addr], endpoints.clone(), &spec, sent).await?;
        let label = rate_label(rate);
        report.ceiling(&format!("put_rate@{label}"), r.throughput());
        report.ceiling(&format!("put_p50@{label}"), r.latency.p50 as f64 / 1000.0);
        report.ceiling(&format!("put_p99@{label}"), r.latency.p99 as f64 / 1000.0);
        report.ceiling(&format!("put_p999@{label}"), r.latency.p999 as f64 / 1000.0);
        report.add(
            "baseline",
            &format!("bare_http_put_rate@{label}"),
            r.throughput(),
            "/s",
        );
        report.add(
            "baseline",
            &format!("bare_http_put_p99@{label}"),
            r.latency.p99 as f64 / 1000.0,
            "ms",
        );
        if r.errors > 0 {
            report.fail(format!(
                "baseline: bare hyper PUT errors {} ({})",
                r.errors,
                r.first_error.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

async fn ws_ceiling(s: &Settings, report: &mut Report) -> Result<(), BoxError> {
    let frame_bytes = crate::update_frame_bytes(s.apps);
    let bare = Bare::spawn(&["bare-ws", "--frame-bytes", &frame_bytes.to_string()])?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = bare.rss()?;
    let frames = Arc::new(AtomicU64::new(0));
    let first = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = watch::channel(false);
    // Clients hold their first frame's reply until `go`: the server is idle while RSS is read.
    let (go, go_rx) = watch::channel(false);
    let addr = bare.addr;
    let sources = s.sources;
    let started = Instant::now();
    let (f2, first2) = (frames.clone(), first.clone());
    let opened = fleet::run_all(
        s.clients,
        s.connect_concurrency,
        Duration::from_secs(60),
        move |i| {
            let (frames, first, mut stop) = (f2.clone(), first2.clone(), stop_rx.clone());
            let mut go = go_rx.clone();
            async move {
                let mut ws = client::connect(addr, fleet::source(i, sources), "/").await?;
                let ack =
                    Message::Text(format!("{{\"type\":\"ack\",\"uaids\":[\"{}\"]}}", "0".repeat(36)).into());
                // The first frame arrives before the job returns: that is the storm ceiling.
                let mut seen_first = false;
                Ok(tokio::spawn(async move {
                    loop {
                        let msg = tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            m = ws.next() => m,
                        };
                        match msg {
                            Some(Ok(Message::Text(_))) => {
                                if !seen_first {
                                    seen_first = true;
                                    first.fetch_add(1, Ordering::Relaxed);
                                    tokio::select! {
                                        _ = stop.wait_for(|s| *s) => break,
                                        _ = go.wait_for(|g| *g) => {}
                                    }
                                }
                                frames.fetch_add(1, Ordering::Relaxed);
                                if ws.send(ack.clone()).await.is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                }))
            }
        },
    )
    .await;
    // Time until every client is connected and has its first frame.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.load(Ordering::Relaxed) < opened.ok.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all_first = started.elapsed();
    report.ceiling("connect_rate", opened.ok.len() as f64 / all_first.as_secs_f64());
    report.ceiling("storm_s", all_first.as_secs_f64());
    report.add("baseline", "bare_ws_clients", opened.ok.len() as f64, "");
    report.add(
        "baseline",
        "bare_ws_all_first_frame",
        all_first.as_secs_f64(),
        "s",
    );
    if opened.errors > 0 {
        report.fail(format!(
            "baseline: {} bare WebSocket clients failed ({})",
            opened.errors,
            opened.first_error.unwrap_or_default()
        ));
    }
    // Memory per connection, all idle: each has had one frame and the server awaits its reply.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = bare.rss()?;
    let per_conn = rss1.saturating_sub(rss0) as f64 / opened.ok.len().max(1) as f64 / KIB;
    report.ceiling("rss_per_conn", per_conn);
    report.add("baseline", "bare_ws_rss_per_conn", per_conn, "KiB");
    // Frames per second, flat out, over the run's duration.
    go.send_replace(true);
    let f0 = frames.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(s.duration).await;
    let rate = (frames.load(Ordering::Relaxed) - f0) as f64 / t0.elapsed().as_secs_f64();
    report.ceiling("frames_per_s", rate);
    report.add("baseline", "bare_ws_frames_per_s", rate, "/s");
    stop.send_replace(true);
    let close_by = tokio::time::Instant::now() + Duration::from_secs(30);
    for t in opened.ok {
        let _ = tokio::time::timeout_at(close_by, t).await;
    }
    Ok(())
}
