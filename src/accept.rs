//! The accept loop: one HTTP/1.1 connection per accepted socket (WebSocket upgrades included),
//! with what `axum::serve` leaves open on the internet: a header-read timeout, a keep-alive idle
//! timeout, a body-read timeout, a cap on open connections below the open-file limit, a log line
//! when `accept` runs out of file descriptors, and a drain at shutdown that ends within
//! `shutdown_grace_secs` (plus [`FORCE_CLOSE`]) whatever clients do.
//!
//! Shutdown: the port stays open while sockets drain, so a load balancer's `/health` sees
//! 503 `shutting_down` instead of a refused connection; HTTP connections are told to close after
//! their current request (idle keep-alive ones at once); when everything has closed, or the
//! grace period is over, the port closes and whatever is left is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::config::Config;
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::state::Lifecycle;

/// How long connections still open when the grace period ends get to go before they are dropped.
pub const FORCE_CLOSE: Duration = Duration::from_millis(500);

/// File descriptors kept for everything but client connections (the store, logs, outgoing
/// connections of the KICK drivers and Redis) when `max_connections` is 0 (automatic).
const FD_RESERVE: u64 = 256;

/// Linux (and BSD/macOS) errno values of `accept` running out of descriptors: per process
/// (`EMFILE`) and system-wide (`ENFILE`). Named here because the crate uses no libc.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Sent to a connection refused at the cap; it is closed right after.
const FULL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 95\r\n\r\n\
{\"status\":503,\"error\":\"too_many_connections\",\"message\":\"the server has too many connections\"}";

/// Where the server is in its life; every connection task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish the current request, then close; idle connections close at once.
    Draining,
    /// Drop the connection now.
    Closing,
}

/// The accept loop's own metrics, registered with the node's.
#[derive(Clone)]
struct ConnMetrics {
    open: IntGauge,
    refused: IntCounter,
    accept_errors: IntCounter,
}

impl ConnMetrics {
    fn register(metrics: &Metrics) -> ConnMetrics {
        let m = ConnMetrics {
            open: IntGauge::new(
                "tcp_connections",
                "Open client TCP connections (HTTP and WebSocket)",
            )
            .expect("valid metric"),
            refused: IntCounter::new(
                "connections_refused_total",
                "Connections answered 503 and closed because limits.max_connections were open",
            )
            .expect("valid metric"),
            accept_errors: IntCounter::new(
                "accept_errors_total",
                "Failed accepts (out of file descriptors, or other errors)",
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.refused.clone()),
            Box::new(m.accept_errors.clone()),
        ] {
            // Registered once per process; a second server in one process keeps its own copy.
            let _ = metrics.register(c);
        }
        m
    }
}

/// The open-file limit (soft) of this process, from `/proc/self/limits`; `None` elsewhere.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection cap: `limits.max_connections`, or when it is 0 the open-file limit less
/// [`FD_RESERVE`] (at least half the limit).
pub fn connection_cap(limits: &Limits) -> usize {
    let files = open_file_limit();
    if limits.max_connections > 0 {
        if let Some(files) = files.filter(|f| limits.max_connections as u64 >= *f) {
            tracing::warn!(
                max_connections = limits.max_connections,
                open_file_limit = files,
                "limits.max_connections is not below the open-file limit: accept will fail before the cap"
            );
        }
        return limits.max_connections;
    }
    let files = files.unwrap_or(1024);
    files.saturating_sub(FD_RESERVE).max(files / 2).max(1) as usize
}

/// Per-connection timing, shared by the socket wrapper, the service and the connection task:
/// when the connection became ready for a request (accepted, or its last answer given), when
/// the first byte of the next request came, and how many requests are being answered.
struct Activity {
    born: Instant,
    /// Milliseconds after `born` at which the connection became ready for a request.
    ready_ms: AtomicU64,
    /// Milliseconds after `born` of the first byte read since then; [`NONE`] before it.
    first_byte_ms: AtomicU64,
    busy: AtomicUsize,
    /// Wakes the connection task when its deadline changes (a first byte, a request's end).
    changed: Notify,
}

const NONE: u64 = u64::MAX;

/// Which timeout a connection waits on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// No byte of a new request within `http_idle_timeout_secs`.
    Idle,
    /// Headers not complete `http_header_timeout_secs` after their first byte.
    Header,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            ready_ms: AtomicU64::new(0),
            first_byte_ms: AtomicU64::new(NONE),
            busy: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Bytes arrived: the first one after the connection became ready starts the header timer.
    fn read(&self) {
        if self.first_byte_ms.load(Ordering::Relaxed) == NONE && self.busy.load(Ordering::Relaxed) == 0 {
            self.first_byte_ms.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// A request was answered: the connection waits for the next one.
    fn request_ended(&self) {
        self.ready_ms.store(self.now_ms(), Ordering::Relaxed);
        self.first_byte_ms.store(NONE, Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// The deadline the connection waits on now; `None` while a request is being answered.
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expiry)> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, d: Duration| self.born + Duration::from_millis(ms) + d;
        match self.first_byte_ms.load(Ordering::Relaxed) {
            NONE => Some((at(self.ready_ms.load(Ordering::Relaxed), t.idle), Expiry::Idle)),
            first => Some((at(first, t.header), Expiry::Header)),
        }
    }
}

/// The client socket, holding its place under the connection cap for as long as it is open
/// (through a WebSocket upgrade too) and noting when bytes arrive.
struct Counted {
    tcp: TcpStream,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
    _open: GaugeGuard,
}

struct GaugeGuard(IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        result
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// A request body that fails with [`BodyTimeout`] once `deadline` passes before it ends, so a
/// client that declares a body and stops sending cannot hold a handler (and the connection).
pub struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    secs: u64,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The body did not arrive within `limits.http_body_timeout_secs` (the seconds).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} s")]
pub struct BodyTimeout(pub u64);

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                // The timer is allocated only for a body that keeps a reader waiting.
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.secs))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Timeouts every connection applies, from `[limits]`.
#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    idle: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then drains as the module doc says.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &Config,
    metrics: &Metrics,
    lifecycle: &Lifecycle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let limits = &config.limits;
    let timeouts = Timeouts {
        header: Duration::from_secs(limits.http_header_timeout_secs),
        body: Duration::from_secs(limits.http_body_timeout_secs),
        idle: Duration::from_secs(limits.http_idle_timeout_secs),
    };
    let cap = connection_cap(limits);
    tracing::info!(
        max_connections = cap,
        open_file_limit = open_file_limit(),
        "accepting connections"
    );
    let mut acceptor = Acceptor {
        listener,
        app,
        timeouts,
        cap,
        permits: Arc::new(Semaphore::new(cap)),
        phase: watch::Sender::new(Phase::Serving),
        tasks: watch::Sender::new(0),
        metrics: ConnMetrics::register(metrics),
        full: false,
        last_error_log: None,
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = acceptor.listener.accept() => acceptor.accepted(accepted).await,
        }
    }

    tracing::info!("shutting down: closing sockets");
    lifecycle.begin_shutdown();
    acceptor.phase.send_replace(Phase::Draining);
    let deadline = Instant::now() + Duration::from_secs(config.server.shutdown_grace_secs);
    let mut sockets = lifecycle.sockets();
    let mut tasks = acceptor.tasks.subscribe();
    let drained = async {
        let _ = sockets.wait_for(|n| *n == 0).await;
        let _ = tasks.wait_for(|n| *n == 0).await;
    };
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => break,
            _ = sleep_until(deadline) => {
                tracing::warn!(
                    sockets = *lifecycle.sockets().borrow(),
                    http_connections = *acceptor.tasks.borrow(),
                    "connections still open after the grace period: closing them"
                );
                break;
            }
            accepted = acceptor.listener.accept() => acceptor.accepted(accepted).await,
        }
    }
    let Acceptor {
        listener,
        phase,
        tasks,
        ..
    } = acceptor;
    drop(listener);
    phase.send_replace(Phase::Closing);
    let mut left = tasks.subscribe();
    let _ = tokio::time::timeout(FORCE_CLOSE, left.wait_for(|n| *n == 0)).await;
}

/// The listening side: what every accepted connection needs, and the cap's bookkeeping.
struct Acceptor {
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    cap: usize,
    permits: Arc<Semaphore>,
    phase: watch::Sender<Phase>,
    /// Connection tasks running (HTTP connections; an upgraded WebSocket is counted by
    /// the lifecycle's socket count instead).
    tasks: watch::Sender<usize>,
    metrics: ConnMetrics,
    /// Whether the cap was reached and not left since (logged once per episode).
    full: bool,
    last_error_log: Option<Instant>,
}

impl Acceptor {
    async fn accepted(&mut self, accepted: std::io::Result<(TcpStream, SocketAddr)>) {
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => return self.accept_failed(e).await,
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.refused.inc();
            if !self.full {
                self.full = true;
                tracing::warn!(
                    max_connections = self.cap,
                    "connection limit reached: new connections get 503 until some close \
                     (limits.max_connections)"
                );
            }
            // Best effort and never waiting: the socket is closed right after.
            let _ = tcp.try_write(FULL_RESPONSE);
            return;
        };
        if self.full {
            self.full = false;
            tracing::info!("below the connection limit again: accepting");
        }
        // Updates are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        self.metrics.open.inc();
        let activity = Arc::new(Activity::new());
        let io = Counted {
            tcp,
            activity: activity.clone(),
            _permit: permit,
            _open: GaugeGuard(self.metrics.open.clone()),
        };
        self.tasks.send_modify(|n| *n += 1);
        let task = TaskGuard(self.tasks.clone());
        tokio::spawn(connection(
            io,
            peer,
            activity,
            self.app.clone(),
            self.timeouts,
            self.phase.subscribe(),
            task,
        ));
    }

    async fn accept_failed(&mut self, e: std::io::Error) {
        self.metrics.accept_errors.inc();
        let out_of_files = matches!(e.raw_os_error(), Some(EMFILE | ENFILE));
        let now = Instant::now();
        // At most one line a second: a full descriptor table fails every accept.
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_error_log = Some(now);
            if out_of_files {
                tracing::error!(
                    error = %e,
                    open_file_limit = open_file_limit(),
                    "accept failed: out of file descriptors; lower limits.max_connections or raise \
                     the open-file limit (ulimit -n, LimitNOFILE=)"
                );
            } else {
                tracing::warn!(error = %e, "accept failed");
            }
        }
        // The listener stays readable while the error lasts: wait rather than spin.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts a connection task until it ends.
struct TaskGuard(watch::Sender<usize>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Serves one connection until it closes, its idle timeout passes, or shutdown drops it.
async fn connection(
    io: Counted,
    peer: SocketAddr,
    activity: Arc<Activity>,
    app: Router,
    timeouts: Timeouts,
    mut phase: watch::Receiver<Phase>,
    _task: TaskGuard,
) {
    let serving = *phase.borrow_and_update() == Phase::Serving;
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let activity = service_activity.clone();
        activity.busy.fetch_add(1, Ordering::AcqRel);
        let deadline = Instant::now() + timeouts.body;
        let mut req = req.map(|inner| {
            axum::body::Body::new(TimedBody {
                inner,
                deadline,
                secs: timeouts.body.as_secs(),
                sleep: None,
            })
        });
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move {
            let response = tower_service::Service::call(&mut app, req).await;
            activity.request_ended();
            response
        }
    });
    // hyper's own header timer runs from "ready" to "headers complete": a backstop to ours.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.idle + timeouts.header)
        .keep_alive(serving);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut closing = !serving;
    loop {
        let deadline = activity.deadline(&timeouts);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                match now {
                    Phase::Closing => return,
                    Phase::Draining if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
            }
            _ = activity.changed.notified() => {}
            _ = sleep_until(deadline.map_or_else(Instant::now, |(at, _)| at)), if deadline.is_some() => {
                match activity.deadline(&timeouts) {
                    Some((at, _)) if at > Instant::now() => {}
                    None => {}
                    // Idle: close politely (hyper closes a connection between requests at once).
                    Some((_, Expiry::Idle)) if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Headers too slow (or idle again after a polite close): drop the socket;
                    // hyper, too, answers a header timeout by closing without a response.
                    Some(_) => return,
                }
            }
        }
    }
}
