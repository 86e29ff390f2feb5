//! The node's lifecycle: the shutdown flag, the notify that wakes every socket when it flips,
//! and the count of open sockets that shutdown waits to drain.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

/// Owned by the wiring (it begins shutdown); read by every socket, poll and background task.
/// A cheap handle: clones share one lifecycle.
#[derive(Clone, Default)]
pub struct Lifecycle(Arc<Signals>);

/// What a [`Lifecycle`] handle shares.
struct Signals {
    /// Flips to `true` once to tell every socket and poll to finish.
    shutdown: watch::Sender<bool>,
    /// Wakes every WebSocket when `shutdown` flips: a socket waits on this (a future kept
    /// inline in its task) rather than on [`Lifecycle::stopping`] (a boxed future per socket).
    stop: Notify,
    /// Open sockets; shutdown waits for it to reach zero.
    sockets: watch::Sender<usize>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            shutdown: watch::Sender::new(false),
            stop: Notify::new(),
            sockets: watch::Sender::new(0),
        }
    }
}

impl Lifecycle {
    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.0.shutdown.borrow()
    }

    /// Completes when shutdown begins, if `enable`d (or first polled) before it began; check
    /// [`Lifecycle::is_stopping`] after enabling it. For the WebSocket loop; see `stop`.
    pub fn stop_notified(&self) -> Notified<'_> {
        self.0.stop.notified()
    }

    /// Completes once shutdown has begun (at once if it already has).
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Begins shutdown: every socket, poll and background task is told to finish.
    pub fn begin_shutdown(&self) {
        self.0.shutdown.send_replace(true);
        self.0.stop.notify_waiters();
    }

    /// How many sockets are open, watched (shutdown waits for zero).
    pub fn sockets(&self) -> watch::Receiver<usize> {
        self.0.sockets.subscribe()
    }

    /// Counts one more open socket (see `AppState::open_socket`, which pairs it with a drop).
    pub(crate) fn socket_opened(&self) {
        self.0.sockets.send_modify(|n| *n += 1);
    }

    /// Counts one socket fewer.
    pub(crate) fn socket_closed(&self) {
        self.0.sockets.send_modify(|n| *n -= 1);
    }
}
