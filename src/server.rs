//! Wiring only: opens the store and keys into an [`AppState`], mounts the routes, runs the
//! background tasks, and shuts down gracefully. Nothing imports this module back.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so `main` only parses flags
//! and waits for a signal (and an in-process test could bind `127.0.0.1:0` the same way).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Backend, Config, Limits};
use crate::http::HttpError;
use crate::ids::Uaid;
use crate::keys::{KeyError, Keys};
use crate::push::delivery::Delivery;
use crate::push::route::{NodeRoutes, RoutesInbox};
use crate::ratelimit::Buckets;
use crate::relay::Relay;
use crate::state::{AppState, Guards, Lifecycle, Shared};
use crate::store::{now_ms, AnyStore, RedisStore, RedisTarget, SledDb, SledStore, Store, StoreError};

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
    Kick(#[from] crate::kick::SetupError),
    #[error("{0}")]
    Storage(#[from] crate::storage::OpenError),
    #[error("relay: {0}")]
    Relay(#[from] crate::relay::RelayError),
}

/// An opened node, not yet serving: its state and, on Redis, the inbox its routing listens to.
pub struct Node {
    state: AppState,
    inbox: Option<RoutesInbox>,
    /// Every sled database the node opened: a failed commit in any stops the node (see [`run`]).
    dbs: Vec<SledDb>,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future completed (SIGTERM, ctrl-c).
    Asked,
    /// A store commit failed: nothing written since is known to be durable, and only a new
    /// process (sled recovering its log) can promise it again. Exit with [`EXIT_STORE_FAILED`].
    StoreFailed,
}

/// Exit status after a failed commit: `EX_TEMPFAIL` from sysexits.h, so a supervisor restarts
/// the node (systemd's `Restart=on-failure`, a container's restart policy).
pub const EXIT_STORE_FAILED: u8 = 75;

impl Node {
    /// The base URL endpoints are built from.
    pub fn public_url(&self) -> &str {
        &self.state.public_url
    }

    /// Opens keys and store for `config` (and, on Redis, subscribes for routing). Must run
    /// inside the Tokio runtime.
    pub async fn open(config: Config) -> Result<Node, StartError> {
        Node::open_with(config, false).await
    }

    /// [`Node::open`]; `reset_keys` (`serve --reset-keys`) generates new keys even though the
    /// store holds data written with others (see `Keys::load_for`).
    pub async fn open_with(config: Config, reset_keys: bool) -> Result<Node, StartError> {
        let (keys, store, routes) = match config.store.backend {
            Backend::Redis => {
                let target = RedisTarget {
                    url: config.store.url.clone(),
                    cluster_urls: config.store.cluster_urls.clone(),
                    timeout: Duration::from_millis(config.store.redis_timeout_ms),
                };
                let store = RedisStore::open(&target).await.map_err(StartError::Redis)?;
                // Nodes sharing a Redis are one service: they share keys, never per data dir.
                let keys = Keys::load_shared(&config.keys, &store, &target.shown(), reset_keys).await?;
                let routes = NodeRoutes::start(&store, &target, &config.store)
                    .await
                    .map_err(StartError::Redis)?;
                (keys, AnyStore::Redis(store), Some(routes))
            }
            Backend::Sled => {
                let dir = config.server.data_dir.clone();
                let keys = {
                    let dir = dir.clone();
                    let keys_config = config.keys.clone();
                    blocking(move || -> Result<Keys, StartError> {
                        std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir {
                            path: dir.display().to_string(),
                            source,
                        })?;
                        let store = dir.join("sled");
                        Ok(Keys::load_for(&keys_config, &dir, Some(&store), reset_keys)?)
                    })
                    .await?
                };
                let store_dir = dir.join("sled");
                let cache_bytes = config.store.cache_bytes;
                let write_timeout = Duration::from_millis(config.store.write_timeout_ms);
                // Opening recovers the log and counts pending events (a whole-tree scan). The
                // database is shared: another state family opens its trees on `store.db()`.
                let store = {
                    let store_dir = store_dir.clone();
                    blocking(move || SledStore::on(SledDb::open(&store_dir, cache_bytes, write_timeout)?))
                        .await
                }
                .map_err(|source| StartError::Store {
                    path: store_dir.display().to_string(),
                    source,
                })?;
                (keys, AnyStore::Sled(store), None)
            }
        };
        let mut dbs: Vec<SledDb> = match &store {
            AnyStore::Sled(store) => vec![store.db().clone()],
            AnyStore::Redis(_) | AnyStore::Memory(_) => Vec::new(),
        };
        let (routes, inbox) = match routes {
            Some((routes, inbox)) => (Some(routes), Some(inbox)),
            None => (None, None),
        };
        let kick_keys = crate::push::wake::load_keys(&config, &store).await?;
        let storage = if config.storage.enabled() {
            Some(open_storage(&config, &store).await?)
        } else {
            None
        };
        let mut shared = Shared::new(config, keys, store, routes);
        crate::push::wake::install(&shared.delivery, &shared.config, &kick_keys)?;
        if let Some((storage, watches, db)) = storage {
            dbs.push(db);
            storage.register_metrics(&shared.metrics);
            let ttl = shared.config.limits.default_ttl_secs;
            crate::push::watch::install(&storage, &watches, &shared.delivery, ttl);
            shared.storage = Some(storage);
            shared.watches = Some(watches);
        }
        if shared.config.relay.enabled() {
            let relay = crate::relay::Relay::open(&shared.config, &shared.delivery.store, &shared.metrics)?;
            shared.relay = Some(Arc::new(relay));
        }
        Ok(Node {
            state: shared.into(),
            inbox,
            dbs,
        })
    }
}

/// Opens the storage API and its watches on the node's sled database: the edition store's on
/// the sled backend (one group commit for both), one of storage's own at `data_dir/storage` on
/// Redis (where config validation has storage pinned to this node).
async fn open_storage(
    config: &Config,
    store: &AnyStore,
) -> Result<(Arc<crate::storage::Storage>, crate::push::watch::Watches, SledDb), StartError> {
    let db = match store {
        AnyStore::Sled(store) => store.db().clone(),
        AnyStore::Redis(_) | AnyStore::Memory(_) => {
            let dir = config.server.data_dir.join("storage");
            let (cache_bytes, timeout) = (
                config.store.cache_bytes,
                Duration::from_millis(config.store.write_timeout_ms),
            );
            let opened = {
                let dir = dir.clone();
                blocking(move || SledDb::open(&dir, cache_bytes, timeout)).await
            };
            opened.map_err(|source| StartError::Store {
                path: dir.display().to_string(),
                source,
            })?
        }
    };
    let watches = crate::push::watch::Watches::open(&db).map_err(|source| StartError::Store {
        path: config.server.data_dir.display().to_string(),
        source,
    })?;
    let config = config.clone();
    let storage = {
        let db = db.clone();
        blocking(move || crate::storage::Storage::open(&config, &db)).await?
    };
    Ok((storage, watches, db))
}

/// Runs `f` on the blocking pool (start-up file and tree work off the async workers).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// All routes. Unknown paths and methods get JSON errors like everything else.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/ws", get(crate::push::ws::upgrade))
        .route("/v1/e/{token}", put(crate::push::endpoint::put))
        .route("/v1/poll", post(crate::push::poll::poll))
        .route("/v1/ack", post(crate::push::poll::ack))
        .route("/v1/register", post(crate::push::poll::register))
        .route("/v1/unregister", post(crate::push::poll::unregister))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::web::routes(&state.config.web))
        .merge(crate::kick::routes(crate::push::wake::drivers(&state.delivery)))
        .merge(crate::storage::routes(state.storage.clone()))
        .fallback(|| async { HttpError::NotFound })
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(crate::web::cors))
        .with_state(state)
}

/// 200 while the store answers (a bounded PING on Redis), so a load balancer stops sending to a
/// node that cannot serve; 503 with `Retry-After` when it does not, or once shutdown began.
async fn health(
    State(delivery): State<Delivery>,
    State(lifecycle): State<Lifecycle>,
    State(relay): State<Option<Arc<Relay>>>,
) -> Response {
    if lifecycle.is_stopping() {
        return HttpError::ShuttingDown.into_response();
    }
    if let Err(e) = delivery.store.health().await {
        return delivery.unavailable(e).into_response();
    }
    let mut body = serde_json::json!({
        "status": "ok",
        "store": delivery.store.backend(),
        "connections": *lifecycle.sockets().borrow(),
    });
    if let Some(relay) = &relay {
        body["relay"] = relay.health();
    }
    crate::http::json(StatusCode::OK, body.to_string())
}

async fn metrics(State(delivery): State<Delivery>, State(guards): State<Guards>) -> Response {
    let metrics = &delivery.metrics;
    metrics.pending.set(delivery.store.pending_count() as i64);
    metrics.held_uaids.set(delivery.registry.len() as i64);
    let buckets = guards.put.as_deref().map_or(0, Buckets::len);
    metrics.put_buckets.set(buckets as i64);
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        metrics.render(),
    )
        .into_response()
}

/// Deletes expired events and tombstones every `sweep_interval_secs`, and forgets PUT buckets
/// that are full again once per refill time (at least a second, at most a sweep interval), so
/// the buckets held are about the registrations PUT to within the last two refill times.
async fn sweep_loop(delivery: Delivery, guards: Guards, limits: Limits) {
    let started = Instant::now();
    let sweep_every = Duration::from_secs(limits.sweep_interval_secs);
    let mut tick = tokio::time::interval(sweep_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prune_every = guards.put.as_ref().map_or(sweep_every, |b| {
        b.rate()
            .refill_time()
            .clamp(Duration::from_secs(1), sweep_every.max(Duration::from_secs(1)))
    });
    let mut prune = tokio::time::interval(prune_every);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopping = delivery.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A long sweep does not hold shutdown up: each step is atomic, and idle expiry
                // resumes where it stopped at the next sweep.
                let work = async {
                    sweep_store(&delivery.store).await;
                    expire_idle_uaids(&delivery, &limits, started).await;
                };
                tokio::select! {
                    _ = work => {}
                    _ = &mut stopping => return,
                }
            }
            _ = prune.tick() => {
                if let Some(buckets) = &guards.put {
                    buckets.prune(Instant::now());
                }
                crate::push::wake::prune(&delivery);
                if let Some(buckets) = &guards.uaids {
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
async fn expire_idle_uaids(delivery: &Delivery, limits: &Limits, started: Instant) {
    if limits.uaid_idle_days == 0 || started.elapsed() < IDLE_EXPIRY_AFTER_START {
        return;
    }
    let now = now_ms();
    let idle_before = now.saturating_sub(limits.uaid_idle_days.saturating_mul(24 * 3600 * 1000));
    let gone_until = now.saturating_add(limits.gone_ttl_secs.saturating_mul(1000));
    let held = |uaid: &Uaid| delivery.registry.is_held(uaid);
    match delivery
        .store
        .expire_idle(now, idle_before, gone_until, &held)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(uaids = n, "expired idle UAIDs"),
        Err(e) => tracing::warn!(error = %e, "expiring idle UAIDs failed"),
    }
}

async fn sweep_store(store: &AnyStore) {
    match store.sweep(now_ms()).await {
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

/// Serves until `shutdown` completes, then closes every socket with 1001 (going away) and every
/// HTTP connection after its request, keeps the port open (answering 503 `shutting_down`) until
/// they have gone or the grace period is over, drops what is left, waits for the background
/// tasks within the same grace period, and flushes the store. A failed store commit begins the
/// same shutdown and is reported as [`Stopped::StoreFailed`].
pub async fn run(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Stopped> {
    let Node { state, inbox, dbs } = node;
    // Each ends when shutdown begins; kept so the final flush runs after their last write.
    let delivery = &state.delivery;
    let mut tasks: Vec<JoinHandle<()>> = vec![tokio::spawn(sweep_loop(
        delivery.clone(),
        state.guards.clone(),
        state.config.limits.clone(),
    ))];
    if let AnyStore::Redis(store) = &delivery.store {
        let (keys, store) = (state.keys.clone(), store.clone());
        let every = Duration::from_secs(state.config.store.keys_check_secs);
        let stopping = state.lifecycle.stopping();
        tasks.push(tokio::spawn(async move {
            keys.keep_shared(&store, every, stopping).await
        }));
    }
    if let Some(storage) = &state.storage {
        let sweep = storage.clone().sweep_loop(state.lifecycle.clone());
        tasks.push(tokio::spawn(sweep));
    }
    if let Some(watches) = &state.watches {
        let every = Duration::from_secs(state.config.limits.sweep_interval_secs);
        let sweep = crate::push::watch::sweep_loop(watches.clone(), delivery.clone(), every);
        tasks.push(tokio::spawn(sweep));
    }
    if let Some(relay) = &state.relay {
        tasks.extend(crate::relay::start(relay, delivery));
    }
    if let (Some(routes), Some(inbox)) = (delivery.routes.clone(), inbox) {
        let listen = crate::push::route::listen(delivery.clone(), routes.clone(), inbox);
        tasks.push(tokio::spawn(listen));
        tasks.push(tokio::spawn(crate::push::route::recheck_loop(
            delivery.clone(),
            routes,
        )));
    }
    let grace = Duration::from_secs(state.config.server.shutdown_grace_secs);
    let began = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let began = began.clone();
        let failed = dbs.iter().map(SledDb::failed).collect::<Vec<_>>();
        async move {
            let failed = async move {
                if failed.is_empty() {
                    std::future::pending::<()>().await;
                }
                futures_util::future::select_all(failed.into_iter().map(Box::pin)).await;
            };
            tokio::select! {
                _ = shutdown => {}
                _ = failed => {
                    tracing::error!(
                        exit_code = EXIT_STORE_FAILED,
                        "a store commit failed: shutting down, for a supervisor to restart the node"
                    );
                }
            }
            let _ = began.set(tokio::time::Instant::now());
        }
    };
    // Drains within the grace period whatever clients do (see `accept`).
    let app = router(state.clone());
    crate::accept::serve(
        listener,
        app,
        &state.config,
        &state.metrics,
        &state.lifecycle,
        shutdown,
    )
    .await;
    state.lifecycle.begin_shutdown();
    // Background tasks were told at the start of the drain: what is left of the grace period
    // (and the short force-close bound) is theirs; then a task stuck on Redis is cut off.
    let deadline =
        began.get().copied().unwrap_or_else(tokio::time::Instant::now) + grace + crate::accept::FORCE_CLOSE;
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    match tokio::time::timeout_at(deadline, futures_util::future::join_all(tasks)).await {
        Ok(ended) => {
            for e in ended.into_iter().filter_map(Result::err) {
                tracing::warn!(error = %e, "background task failed");
            }
        }
        Err(_) => {
            tracing::warn!("background tasks still running after the grace period; stopped");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
    let store = state.delivery.store.clone();
    let flushed = match tokio::task::spawn_blocking(move || store.flush_now()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "final store flush failed");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "final store flush failed");
            false
        }
    };
    if !flushed || dbs.iter().any(SledDb::has_failed) {
        tracing::error!(
            exit_code = EXIT_STORE_FAILED,
            "stopped after a failed store commit"
        );
        return Ok(Stopped::StoreFailed);
    }
    tracing::info!("stopped");
    Ok(Stopped::Asked)
}
