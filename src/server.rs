//! Wiring: shared state, the router, the sweeper, and graceful shutdown.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests bind `127.0.0.1:0` and
//! start a real server in one line, and `main` only parses flags and waits for a signal.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::http::HttpError;
use crate::ids::Uaid;
use crate::keys::{KeyError, Keys, TokenId};
use crate::metrics::Metrics;
use crate::ratelimit::{Buckets, Rate};
use crate::registry::{Durable, Mailbox, Registry};
use crate::store::{now_ms, AnyStore, RedisStore, RedisTarget, SledStore, Store, StoreError};

/// Everything handlers share, passed explicitly as axum state.
pub struct AppState {
    pub config: Config,
    /// `config.public_url()`, computed once: it prefixes every endpoint.
    pub public_url: String,
    pub keys: Keys,
    pub store: AnyStore,
    /// Which connection on this node holds which UAID.
    pub registry: Registry,
    /// Which node holds which UAID, with the Redis store; `None` on sled (one node).
    pub route: Option<Arc<crate::route::Router>>,
    pub metrics: Metrics,
    /// PUT rate limit per registration, keyed by endpoint token, on this node only (nodes do not
    /// share it: a registration PUT to through N nodes may get up to N times the rate). `None`
    /// when `put_rate_per_sec` is 0. Pruned by the sweeper, so it holds only recent PUTs.
    pub put_limit: Option<Buckets<TokenId>>,
    /// The Sync 1.5 storage API, when `[storage] master_secret` is set.
    pub storage: Option<Arc<crate::storage::Storage>>,
    /// Flips to `true` once to tell every socket and poll to finish.
    shutdown: watch::Sender<bool>,
    /// Wakes every WebSocket when `shutdown` flips: a socket waits on this (a future kept
    /// inline in its task) rather than on [`AppState::stopping`] (a boxed future per socket).
    stop: Notify,
    /// Open sockets; shutdown waits for it to reach zero.
    sockets: watch::Sender<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error("store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("redis store: {0}")]
    Redis(StoreError),
    #[error("{0}")]
    Storage(#[from] crate::storage::OpenError),
}

impl AppState {
    /// Opens keys and store for `config` (and, on Redis, starts routing). Must run inside the
    /// Tokio runtime.
    pub async fn open(config: Config) -> Result<Arc<AppState>, StartError> {
        let (keys, store, route) = if config.store.backend == "redis" {
            let target = RedisTarget {
                url: config.store.url.clone(),
                cluster_urls: config.store.cluster_urls.clone(),
                timeout: Duration::from_millis(config.store.redis_timeout_ms),
            };
            let store = RedisStore::open(&target).await.map_err(StartError::Redis)?;
            // Nodes sharing a Redis are one service: they share keys, never per data dir.
            let keys = match Keys::from_config(&config.keys)? {
                Some(keys) => keys,
                None => {
                    let text = store
                        .load_or_create_keys(&Keys::generate_text())
                        .await
                        .map_err(StartError::Redis)?;
                    Keys::from_text(&text, "redis key ed:server-keys")?
                }
            };
            let route = crate::route::Router::start(&store, &target, &config.store)
                .await
                .map_err(StartError::Redis)?;
            (keys, AnyStore::Redis(store), Some(route))
        } else {
            let dir = &config.server.data_dir;
            std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
            let keys = Keys::load(&config.keys, dir)?;
            let store_dir = dir.join("sled");
            let store = SledStore::open(
                &store_dir,
                config.store.cache_bytes,
                Duration::from_millis(config.store.write_timeout_ms),
            )
            .map_err(|source| StartError::Store {
                path: store_dir.display().to_string(),
                source,
            })?;
            (keys, AnyStore::Sled(store), None)
        };
        let (router, inbox) = match route {
            Some((router, inbox)) => (Some(router), Some(inbox)),
            None => (None, None),
        };
        let limits = &config.limits;
        let put_limit = (limits.put_rate_per_sec > 0)
            .then(|| Buckets::new(Rate::new(limits.put_rate_per_sec, limits.put_burst)));
        let storage = crate::storage::Storage::open(&config)?;
        let state = Arc::new(AppState {
            storage,
            public_url: config.public_url(),
            put_limit,
            config,
            keys,
            store,
            registry: Registry::default(),
            route: router.clone(),
            metrics: Metrics::default(),
            shutdown: watch::Sender::new(false),
            stop: Notify::new(),
            sockets: watch::Sender::new(0),
        });
        if let Some(storage) = &state.storage {
            storage.register_metrics(&state.metrics);
        }
        if let (Some(router), Some(inbox)) = (router, inbox) {
            tokio::spawn(crate::route::listen(state.clone(), router.clone(), inbox));
            tokio::spawn(crate::route::recheck_loop(state.clone(), router));
        }
        Ok(state)
    }

    /// Makes connection `conn_id` the holder of `uaids`, on this node and (with Redis) for every
    /// node, so PUTs anywhere reach it. Route claims run concurrently (a relay claims hundreds).
    pub async fn hold(&self, uaids: &[Uaid], conn_id: u64, mailbox: &Arc<Mailbox>) -> Result<(), StoreError> {
        for uaid in uaids {
            self.registry.claim(*uaid, conn_id, mailbox);
        }
        if let Some(route) = &self.route {
            let claims = uaids.iter().map(|uaid| route.claim(*uaid, conn_id));
            for claimed in futures_util::future::join_all(claims).await {
                claimed?;
            }
        }
        Ok(())
    }

    /// Stops `conn_id` holding `uaid` if it still does; never waits.
    pub fn unhold(&self, uaid: Uaid, conn_id: u64) {
        self.registry.release(uaid, conn_id);
        if let Some(route) = &self.route {
            route.release(uaid, conn_id);
        }
    }

    /// Tells the connection holding `uaid`, on this node or another, that events may be
    /// pending. Best effort: the event is already stored, and a lost nudge only delays it.
    /// `durable` is what the caller saw committed (a PUT after its sync); it reaches a holder on
    /// this node only, so that one can skip its own sync (see `Session::send_pending_after`).
    pub async fn nudge(&self, uaid: Uaid, durable: Option<Durable>) {
        if self.registry.nudge_with(uaid, durable) {
            return;
        }
        if let Some(route) = &self.route {
            if let Err(e) = route.nudge_remote(uaid).await {
                tracing::debug!(error = %e, "cross-node nudge not sent");
            }
        }
    }

    /// The store's durability barrier, timed for `/metrics`.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.store.sync().await;
        self.metrics
            .store_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Completes when shutdown begins, if `enable`d (or first polled) before it began; check
    /// [`AppState::is_stopping`] after enabling it. For the WebSocket loop; see `stop`.
    pub fn stop_notified(&self) -> Notified<'_> {
        self.stop.notified()
    }

    /// Completes once shutdown has begun (at once if it already has).
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Counts a socket as open until the guard drops.
    pub fn open_socket(self: &Arc<Self>) -> SocketGuard {
        self.sockets.send_modify(|n| *n += 1);
        self.metrics.connections.inc();
        SocketGuard(self.clone())
    }
}

pub struct SocketGuard(Arc<AppState>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.sockets.send_modify(|n| *n -= 1);
        self.0.metrics.connections.dec();
    }
}

/// All routes. Unknown paths and methods get JSON errors like everything else.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/v1/e/{token}", put(crate::endpoint::put))
        .route("/v1/poll", post(crate::poll::poll))
        .route("/v1/ack", post(crate::poll::ack))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::storage::routes(state.storage.clone()))
        .fallback(|| async { HttpError::NotFound })
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .with_state(state)
}

/// 200 while the store answers (a bounded PING on Redis), so a load balancer stops sending to a
/// node that cannot serve; 503 with `Retry-After` when it does not, or once shutdown began.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if *state.shutdown.borrow() {
        return HttpError::ShuttingDown.into_response();
    }
    if let Err(e) = state.store.health().await {
        tracing::warn!(error = %e, "health: the store does not answer");
        return HttpError::StoreUnavailable {
            retry_after_secs: state.config.store.retry_after_secs,
        }
        .into_response();
    }
    let body = serde_json::json!({
        "status": "ok",
        "store": state.store.backend(),
        "connections": *state.sockets.borrow(),
    });
    crate::http::json(StatusCode::OK, body.to_string())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.pending.set(state.store.pending_count() as i64);
    state.metrics.held_uaids.set(state.registry.len() as i64);
    let buckets = state.put_limit.as_ref().map_or(0, Buckets::len);
    state.metrics.put_buckets.set(buckets as i64);
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// Deletes expired events and tombstones every `sweep_interval_secs`, and forgets PUT buckets
/// that are full again once per refill time (at least a second, at most a sweep interval), so
/// the buckets held are about the registrations PUT to within the last two refill times.
async fn sweep_loop(state: Arc<AppState>) {
    let started = Instant::now();
    let sweep_every = Duration::from_secs(state.config.limits.sweep_interval_secs);
    let mut tick = tokio::time::interval(sweep_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prune_every = state.put_limit.as_ref().map_or(sweep_every, |b| {
        b.rate()
            .refill_time()
            .clamp(Duration::from_secs(1), sweep_every.max(Duration::from_secs(1)))
    });
    let mut prune = tokio::time::interval(prune_every);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopping = state.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sweep_store(&state).await;
                expire_idle_uaids(&state, started).await;
            }
            _ = prune.tick() => {
                if let Some(buckets) = &state.put_limit {
                    buckets.prune(Instant::now());
                }
            }
            _ = &mut stopping => return,
        }
    }
}

/// No idle expiry this long after start: clients that a restart (or an outage) cut off come
/// back and are seen first, so a UAID held across the idle line is not taken for abandoned.
const IDLE_EXPIRY_AFTER_START: Duration = Duration::from_secs(3600);

/// Deletes the registrations of UAIDs unseen for `uaid_idle_days` (not those held here or, on
/// Redis, anywhere).
async fn expire_idle_uaids(state: &AppState, started: Instant) {
    let limits = &state.config.limits;
    if limits.uaid_idle_days == 0 || started.elapsed() < IDLE_EXPIRY_AFTER_START {
        return;
    }
    let now = now_ms();
    let idle_before = now.saturating_sub(limits.uaid_idle_days.saturating_mul(24 * 3600 * 1000));
    let gone_until = now.saturating_add(limits.gone_ttl_secs.saturating_mul(1000));
    let held = |uaid: &Uaid| state.registry.is_held(uaid);
    match state.store.expire_idle(now, idle_before, gone_until, &held).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(uaids = n, "expired idle UAIDs"),
        Err(e) => tracing::warn!(error = %e, "expiring idle UAIDs failed"),
    }
}

async fn sweep_store(state: &AppState) {
    match state.store.sweep(now_ms()).await {
        Ok(stats) if stats.expired_events + stats.expired_tombstones > 0 => {
            tracing::info!(
                events = stats.expired_events,
                tombstones = stats.expired_tombstones,
                "swept expired entries"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "sweep failed"),
    }
}

/// Serves until `shutdown` completes, then stops accepting, closes every socket with 1001
/// (going away), waits up to the grace period for them, and flushes the store.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = tokio::spawn(sweep_loop(state.clone()));
    let listener = listener.tap_io(|tcp| {
        // Updates are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
    });
    let signal_state = state.clone();
    let grace = Duration::from_secs(state.config.server.shutdown_grace_secs);
    // The listener stays open while sockets drain, so a load balancer's health check sees
    // `/health` answer 503 `shutting_down` (and a late client is told to go) instead of a
    // refused connection; it closes once every socket has gone or the grace period is over.
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing sockets");
            signal_state.shutdown.send_replace(true);
            signal_state.stop.notify_waiters();
            let mut sockets = signal_state.sockets.subscribe();
            if tokio::time::timeout(grace, sockets.wait_for(|n| *n == 0))
                .await
                .is_err()
            {
                tracing::warn!(
                    open = *sockets.borrow(),
                    "sockets still open after the grace period"
                );
            }
        })
        .await?;
    sweeper.abort();
    if let Err(e) = state.store.flush_now() {
        tracing::error!(error = %e, "final store flush failed");
    }
    tracing::info!("stopped");
    Ok(())
}
