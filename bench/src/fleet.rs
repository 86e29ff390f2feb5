//! Many clients at once: connecting them with bounded concurrency spread over loopback source
//! addresses (127.0.0.2, 127.0.0.3, …, so no single address runs out of ephemeral ports), and
//! holding them in tasks that can all be told to disconnect.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{self, Identity, Shared, Ws};
use crate::BoxError;

/// Source address number `i` of `count`: 127.0.0.2 upwards.
pub fn source(i: usize, count: usize) -> Ipv4Addr {
    let n = (i % count.max(1)) as u32 + 2;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n)
}

/// Outcome of connecting many clients.
pub struct Opened<T> {
    /// Successes in index order (failures left out).
    pub ok: Vec<T>,
    pub errors: u64,
    /// The first error, to say what went wrong.
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

/// Runs `job(i)` for `i in 0..n` with at most `concurrency` at once, each bounded by `limit`.
pub async fn run_all<T, F, Fut>(n: usize, concurrency: usize, limit: Duration, job: F) -> Opened<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, BoxError>> + Send,
{
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let (next, job) = (next.clone(), job.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return done;
                }
                let r = match tokio::time::timeout(limit, job(i)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("timed out after {limit:?}")),
                };
                done.push((i, r));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(done) => all.extend(done),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    all.sort_by_key(|(i, _)| *i);
    let mut ok = Vec::with_capacity(all.len());
    for (_, r) in all {
        match r {
            Ok(t) => ok.push(t),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Opened {
        ok,
        errors,
        first_error,
        elapsed: started.elapsed(),
    }
}

/// Enrolls `n` new clients with `apps` registrations each (slots `i * apps ..`), client `i` on
/// `targets[i % targets.len()]` (round-robin over the nodes of one service).
pub async fn enroll(
    targets: &[SocketAddr],
    n: usize,
    apps: usize,
    sources: usize,
    concurrency: usize,
) -> Opened<(Identity, Ws)> {
    let targets = targets.to_vec();
    run_all(n, concurrency, Duration::from_secs(60), move |i| {
        client::enroll(targets[i % targets.len()], source(i, sources), apps, i * apps)
    })
    .await
}

/// The node [`enroll`] put the client of registration `slot` on.
pub fn node_of(slot: usize, apps: usize, nodes: usize) -> usize {
    slot / apps.max(1) % nodes.max(1)
}

/// Clients held open in their own tasks.
pub struct Held {
    pub idents: Vec<Arc<Identity>>,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Held {
    pub fn new(shared: Arc<Shared>) -> Held {
        Held {
            idents: Vec::new(),
            shared,
            stop: watch::Sender::new(false),
            tasks: Vec::new(),
        }
    }

    /// Starts holding one connected client.
    pub fn hold(&mut self, ident: Arc<Identity>, ws: Ws) {
        let task = tokio::spawn(client::hold(
            ws,
            ident.clone(),
            self.shared.clone(),
            self.stop.subscribe(),
        ));
        self.idents.push(ident);
        self.tasks.push(task);
    }

    /// A receiver that turns true when [`Held::close_all`] runs, for tasks started elsewhere.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn adopt(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Tells every client to close and waits (bounded) for them.
    pub async fn close_all(&mut self) {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
    }
}
