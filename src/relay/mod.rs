//! The EDITION RELAY: an editiond that serves the ordinary protocol downstream from its own sled
//! store and is one client of an upstream editiond for all its clients' UAIDs.
//!
//! [`book`] keeps every UAID the relay speaks for with its upstream secret; [`ws_link`] (one
//! WebSocket) or [`poll_link`] (outbound HTTP only) is the upstream link; this module is the
//! wiring and the hooks the push protocol calls on a relay: authenticating a downstream UAID
//! (the book, or a claim upstream), forwarding register and unregister, storing an upstream
//! UPDATE durably through the one event path ([`crate::push::events::raise`]) before it is
//! ACKed upstream, and the hop list that refuses loops. [`idle`] forgets UAIDs no downstream
//! client names any more. `proto/relay.md` is the contract.

pub mod book;
pub mod config;
mod idle;
mod poll_link;
mod ws_link;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntGauge;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use self::book::{Book, Check};
pub use self::config::{RelayConfig, Transport};
use crate::config::Config;
use crate::ids::{Appid, TokenId, Uaid};
use crate::metrics::Metrics;
use crate::push::delivery::Delivery;
use crate::push::events::{self, Outcome};
use crate::push::proto::{Credential, EntryError, RegistrationReply, StatusEntry, UaidStatus, WsError};
use crate::state::AppState;
use crate::store::{now_ms, AnyStore, KickChange, Registered, Store, StoreError, VersionReq};

/// UAID → APPID → version, as an UPDATE (or a poll answer) carries them.
pub type Updates = BTreeMap<String, BTreeMap<String, u64>>;

/// What goes wrong between a relay and its upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream did not answer within {0} s")]
    Timeout(u64),
    #[error("upstream refused: {0}")]
    Refused(String),
    #[error("upstream sent what the protocol does not allow: {0}")]
    Protocol(String),
    #[error("relay store: {0}")]
    Store(String),
    #[error("a relay needs the sled store (store.backend = \"sled\")")]
    NeedsSled,
}

impl From<StoreError> for RelayError {
    fn from(e: StoreError) -> Self {
        RelayError::Store(e.to_string())
    }
}

/// A relay's shared state: handlers reach it as the state's `relay` part, the link task owns
/// the socket or the polls.
pub struct Relay {
    config: RelayConfig,
    /// Entries per upstream claim frame and per poll (`limits.max_uaids_per_frame`).
    max_per_frame: usize,
    /// `limits.max_appids_per_uaid`, for the local copy of each registration.
    max_appids: usize,
    /// `limits.max_ttl_secs`: an upstream UPDATE carries no TTL, so it is kept this long.
    ttl_ms: u64,
    /// This process's id in hop lists (random per start: a restarted relay is a new hop).
    node_id: String,
    book: Book,
    /// How long a UAID may go unseen before [`idle`] forgets it, in ms; 0: never
    /// (`relay.book_idle_secs`, else `limits.uaid_idle_days`).
    idle_ms: u64,
    /// `limits.sweep_interval_secs`: how often [`idle`] looks.
    sweep_every: Duration,
    link: LinkState,
    hops: Hops,
    transport: TransportHandle,
}

/// How requests reach the upstream.
enum TransportHandle {
    /// Requests for the WebSocket's task; the receiver is taken once by [`start`].
    Ws {
        requests: mpsc::Sender<ws_link::Request>,
        inbox: Mutex<Option<mpsc::Receiver<ws_link::Request>>>,
    },
    Poll(Arc<poll_link::Http>),
}

/// The upstream link's state, for `/health`, `/metrics` and for failing requests fast.
struct LinkState {
    up: AtomicBool,
    /// `editiond_relay_upstream_up`.
    gauge: IntGauge,
    /// Why the link last went down (a slug or a short message; never a secret).
    last_error: Mutex<Option<String>>,
}

/// Node ids on either side, for refusing loops (`proto/relay.md`, "Chains and loops").
#[derive(Default)]
struct Hops {
    /// Each downstream relay connection's `via` (the relays at and below it).
    downstream: DashMap<u64, Vec<String>>,
    /// The upstream's `via` from its hello reply (the relays at and above it).
    upstream: Mutex<Vec<String>>,
}

impl Relay {
    /// Opens the book in the node's sled store and registers the link metric.
    pub fn open(config: &Config, store: &AnyStore, metrics: &Metrics) -> Result<Relay, RelayError> {
        let AnyStore::Sled(sled) = store else {
            return Err(RelayError::NeedsSled);
        };
        let idle_ms = config.relay.book_idle_ms(config.limits.uaid_idle_days);
        // "Last seen" is written once a day, or twice per idle period when that is shorter,
        // so what a restart reads is never more than half a period behind.
        let write_every_ms = match idle_ms {
            0 => crate::store::TOUCH_EVERY_MS,
            ms => crate::store::TOUCH_EVERY_MS.min(ms / 2),
        };
        let book = Book::open(sled.db().tree("relay_uaids")?, now_ms(), write_every_ms)?;
        let gauge = IntGauge::new(
            "relay_upstream_up",
            "1 while the relay's upstream link is up, else 0",
        )
        .map_err(|e| RelayError::Store(e.to_string()))?;
        metrics
            .register(Box::new(gauge.clone()))
            .map_err(|e| RelayError::Store(e.to_string()))?;
        let rc = config.relay.clone();
        let transport = match rc.transport {
            Transport::Ws => {
                let (tx, rx) = mpsc::channel(rc.max_queued_requests);
                TransportHandle::Ws {
                    requests: tx,
                    inbox: Mutex::new(Some(rx)),
                }
            }
            Transport::Poll => TransportHandle::Poll(Arc::new(poll_link::Http::new(&rc)?)),
        };
        Ok(Relay {
            max_per_frame: config.limits.max_uaids_per_frame,
            max_appids: config.limits.max_appids_per_uaid,
            ttl_ms: config.limits.max_ttl_secs.saturating_mul(1000),
            node_id: uuid::Uuid::new_v4().to_string(),
            book,
            idle_ms,
            sweep_every: Duration::from_secs(config.limits.sweep_interval_secs),
            link: LinkState {
                up: AtomicBool::new(false),
                gauge,
                last_error: Mutex::new(None),
            },
            hops: Hops::default(),
            transport,
            config: rc,
        })
    }

    /// The link's state for `/health`: `{"upstream","transport","up","error","uaids"}`.
    pub fn health(&self) -> serde_json::Value {
        serde_json::json!({
            "upstream": without_userinfo(&self.config.base_url()),
            "transport": self.config.transport.name(),
            "up": self.is_up(),
            "error": *lock(&self.link.last_error),
            "uaids": self.book.len(),
        })
    }

    fn is_up(&self) -> bool {
        self.link.up.load(Ordering::SeqCst)
    }

    fn link_up(&self) {
        if !self.link.up.swap(true, Ordering::SeqCst) {
            tracing::info!(upstream = %without_userinfo(&self.config.base_url()), "relay: upstream link up");
        }
        self.link.gauge.set(1);
        *lock(&self.link.last_error) = None;
    }

    fn link_down(&self, why: &RelayError) {
        if self.link.up.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %why, "relay: upstream link down");
        } else {
            tracing::debug!(error = %why, "relay: upstream link still down");
        }
        self.link.gauge.set(0);
        let slug = match why {
            RelayError::Refused(slug) => slug.clone(),
            other => other.to_string(),
        };
        *lock(&self.link.last_error) = Some(slug);
    }

    fn unavailable(&self) -> EntryError {
        EntryError::UpstreamUnavailable {
            retry_after_secs: self.config.retry_after_secs,
        }
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.config.request_timeout_secs)
    }

    // ---- Hop list -------------------------------------------------------------------------

    /// This node and the relays upstream of it, as its hello reply names them.
    fn chain(&self) -> Vec<String> {
        let mut chain = vec![self.node_id.clone()];
        chain.extend(lock(&self.hops.upstream).iter().cloned());
        chain
    }

    /// This node and the relays downstream of it, as its upstream hello names them.
    fn hello_via(&self) -> Vec<String> {
        let mut via = vec![self.node_id.clone()];
        for entry in self.hops.downstream.iter() {
            for id in entry.value() {
                if !via.contains(id) {
                    via.push(id.clone());
                }
            }
        }
        via
    }

    /// A downstream hello carried `via`: refuses it if a node in it is this one or upstream of
    /// it (the link would close a loop), else remembers it and returns the reply's `via`.
    pub fn accept_downstream(&self, conn_id: u64, via: Vec<String>) -> Result<Vec<String>, WsError> {
        let chain = self.chain();
        if via.iter().any(|id| chain.contains(id)) {
            return Err(WsError::RelayLoop);
        }
        self.hops.downstream.insert(conn_id, via);
        Ok(chain)
    }

    /// Closes a race with an upstream `released`: a UAID that a client's hello or poll checked
    /// just before the release was handled, and that it holds only after the link evicted its
    /// holders, would stay held here while the upstream sends its events to the newer
    /// connection. Called once connection `conn_id` holds `uaids`: any of them now released
    /// is taken back from it, so it hears `released` like the others.
    pub fn lost_meanwhile(&self, delivery: &Delivery, uaids: &[Uaid], conn_id: u64) {
        for uaid in uaids.iter().filter(|u| self.book.is_released(u)) {
            delivery.registry.evict(*uaid, conn_id);
        }
    }

    /// A downstream connection ended.
    pub fn forget_downstream(&self, conn_id: u64) {
        self.hops.downstream.remove(&conn_id);
    }

    /// The upstream's hello reply named `via`: a node in it that is this one or downstream of
    /// it means a loop.
    fn note_upstream(&self, via: Option<Vec<String>>) -> Result<(), RelayError> {
        let via = via.unwrap_or_default();
        let ours = self.hello_via();
        if via.iter().any(|id| ours.contains(id)) {
            return Err(RelayError::Refused(WsError::RelayLoop.slug().into()));
        }
        *lock(&self.hops.upstream) = via;
        Ok(())
    }

    // ---- Hooks of the push protocol -------------------------------------------------------

    /// `authenticate_all` on a relay: a UAID in the book is checked against its secret here; a
    /// new or unknown one is claimed upstream (new UAIDs and secrets are the upstream's; its
    /// 401 passes through). Unreachable upstream: that entry gets 503. Accepted UAIDs are bound
    /// in the local store too, and a secret goes out only once the book entry is durable.
    pub async fn authenticate_all(
        &self,
        state: &AppState,
        entries: &[Credential],
    ) -> Result<(Vec<UaidStatus>, Vec<Uaid>), StoreError> {
        let mut statuses: Vec<Option<UaidStatus>> = vec![None; entries.len()];
        let mut ask = Vec::new();
        let now = now_ms();
        for (i, entry) in entries.iter().enumerate() {
            let Some(s) = &entry.uaid else {
                ask.push(i);
                continue;
            };
            let Ok(uaid) = Uaid::parse(s) else {
                statuses[i] = Some(UaidStatus::failed(Some(s.clone()), EntryError::InvalidUaid));
                continue;
            };
            let check = match &entry.secret {
                None if self.book.contains(&uaid) => Err(EntryError::SecretRequired),
                None => Ok(Check::Unknown),
                // Accepted: seen now, so the idle sweep keeps it.
                Some(given) => Ok(self.book.check(&uaid, given, now)?),
            };
            statuses[i] = match check {
                Ok(Check::Unknown) => {
                    ask.push(i);
                    None
                }
                Ok(Check::Accepted) => Some(UaidStatus::ok(s.clone(), None)),
                Ok(Check::Refused) => Some(UaidStatus::failed(Some(s.clone()), EntryError::BadSecret)),
                Err(e) => Some(UaidStatus::failed(Some(s.clone()), e)),
            };
        }
        let answers =
            futures_util::future::join_all(ask.iter().map(|i| self.upstream_claim(&entries[*i]))).await;
        let mut learnt = false;
        for (i, answer) in ask.into_iter().zip(answers) {
            let named = entries[i].uaid.clone();
            statuses[i] = Some(match answer {
                Ok(entry) if entry.status == 200 => match entry.uaid {
                    Some(uaid) => {
                        learnt = true;
                        UaidStatus::ok(uaid, entry.secret)
                    }
                    None => UaidStatus::failed(named, self.unavailable()),
                },
                Ok(entry) => UaidStatus::failed(named, entry_error(&entry, self.unavailable())),
                Err(e) => {
                    tracing::debug!(error = %e, "relay: claim upstream failed");
                    UaidStatus::failed(named, self.unavailable())
                }
            });
        }
        let statuses: Vec<UaidStatus> = statuses.into_iter().flatten().collect();
        let mut claimed = Vec::new();
        let mut wrote = learnt;
        for status in &statuses {
            if status.error.is_some() {
                continue;
            }
            if let Some(uaid) = status.uaid.as_deref().and_then(|s| Uaid::parse(s).ok()) {
                if !claimed.contains(&uaid) {
                    wrote |= state.delivery.store.touch_uaid(uaid, now).await?;
                    claimed.push(uaid);
                }
            }
        }
        if wrote {
            // The book entries and bindings, before any secret or UPDATE goes out.
            state.delivery.sync().await?;
        }
        Ok((statuses, claimed))
    }

    /// `register` on a relay: forwarded upstream (the endpoint is the upstream's); on success the
    /// registration is also made here, where its kick stays. The upstream's reply passes through.
    pub async fn register(
        &self,
        state: &AppState,
        (uaid, uaid_s): (Uaid, &str),
        (appid, appid_s): (Appid, &str),
        change: KickChange<'_>,
    ) -> Result<RegistrationReply, StoreError> {
        let failed = |e| RegistrationReply::new(uaid_s, appid_s, Err(e));
        let reply = match self.upstream_register(uaid, appid, true).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(error = %e, "relay: register upstream failed");
                return Ok(failed(self.unavailable()));
            }
        };
        if reply.status == 200 {
            let token = TokenId::random();
            match state
                .delivery
                .store
                .register(uaid, appid, token, change, self.max_appids)
                .await?
            {
                Registered::Token(_) => state.delivery.sync().await?,
                Registered::TooMany => return Ok(failed(EntryError::TooManyRegistrations)),
            }
        }
        Ok(pass_through(reply, uaid_s, appid_s))
    }

    /// `unregister` on a relay: forwarded upstream; the local copy goes when the upstream has
    /// none any more (200, or 404 for one it never had).
    pub async fn unregister(
        &self,
        state: &AppState,
        (uaid, uaid_s): (Uaid, &str),
        (appid, appid_s): (Appid, &str),
    ) -> Result<RegistrationReply, StoreError> {
        let reply = match self.upstream_register(uaid, appid, false).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(error = %e, "relay: unregister upstream failed");
                let e = self.unavailable();
                return Ok(RegistrationReply::new(uaid_s, appid_s, Err(e)));
            }
        };
        if matches!(reply.status, 200 | 404)
            && crate::push::session::unregister_local(state, uaid, appid).await?
        {
            state.delivery.sync().await?;
        }
        Ok(pass_through(reply, uaid_s, appid_s))
    }

    // ---- Requests upstream ----------------------------------------------------------------

    /// Claims one entry upstream; on 200 the UAID and its secret are in the book (not yet
    /// durable) when this returns.
    async fn upstream_claim(&self, entry: &Credential) -> Result<StatusEntry, RelayError> {
        if !self.is_up() {
            return Err(RelayError::Unreachable("link down".into()));
        }
        match &self.transport {
            TransportHandle::Ws { requests, .. } => {
                let (tx, rx) = oneshot::channel();
                self.ask(requests, ws_link::Request::Claim(entry.clone(), tx), rx)
                    .await
            }
            TransportHandle::Poll(http) => {
                let answer = http.claim(entry).await?;
                if answer.status == 200 {
                    self.learn(entry, &answer, false)?;
                }
                Ok(answer)
            }
        }
    }

    /// Registers (`register`) or unregisters upstream.
    async fn upstream_register(
        &self,
        uaid: Uaid,
        appid: Appid,
        register: bool,
    ) -> Result<RegistrationReply, RelayError> {
        if !self.is_up() {
            return Err(RelayError::Unreachable("link down".into()));
        }
        match &self.transport {
            TransportHandle::Ws { requests, .. } => {
                let (tx, rx) = oneshot::channel();
                let request = ws_link::Request::Registration {
                    register,
                    uaid,
                    appid,
                    reply: tx,
                };
                self.ask(requests, request, rx).await
            }
            TransportHandle::Poll(http) => {
                let secret = self
                    .book
                    .secret(&uaid)
                    .ok_or_else(|| RelayError::Protocol("a UAID outside the book".into()))?;
                http.registration(register, uaid, &secret, appid).await
            }
        }
    }

    /// Stops speaking upstream for UAIDs just forgotten: a `release` frame on the WebSocket
    /// (queued behind the requests before it, so a claim already asked for goes first); a poll
    /// link drops them from its chunks by itself, as the book changed. A full queue or a link
    /// that is down sends nothing: the next reconnect does not claim them.
    fn release(&self, uaids: Vec<Uaid>) {
        if !self.is_up() {
            return;
        }
        if let TransportHandle::Ws { requests, .. } = &self.transport {
            if requests.try_send(ws_link::Request::Release(uaids)).is_err() {
                tracing::debug!("relay: no room to release UAIDs upstream; the next reconnect drops them");
            }
        }
    }

    /// Queues a request for the WebSocket task and waits (bounded) for its reply.
    async fn ask<T>(
        &self,
        requests: &mpsc::Sender<ws_link::Request>,
        request: ws_link::Request,
        reply: oneshot::Receiver<T>,
    ) -> Result<T, RelayError> {
        requests
            .try_send(request)
            .map_err(|_| RelayError::Unreachable("too many requests waiting".into()))?;
        match tokio::time::timeout(self.request_timeout(), reply).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(RelayError::Unreachable("link lost".into())),
            Err(_) => Err(RelayError::Timeout(self.config.request_timeout_secs)),
        }
    }

    /// The upstream accepted `entry` (answer 200): records its UAID and secret in the book. A
    /// `reclaim` of the book's own entries (on reconnect) names no client: it adds nothing back
    /// (a UAID forgotten since it went out stays forgotten; its release follows) and is no
    /// sighting.
    fn learn(&self, entry: &Credential, answer: &StatusEntry, reclaim: bool) -> Result<(), StoreError> {
        let uaid = answer.uaid.as_deref().or(entry.uaid.as_deref());
        let secret = answer.secret.as_deref().or(entry.secret.as_deref());
        if let (Some(uaid), Some(secret)) = (uaid.and_then(|u| Uaid::parse(u).ok()), secret) {
            if reclaim {
                self.book.update(uaid, secret)?;
            } else {
                self.book.insert(uaid, secret, now_ms())?;
            }
        }
        Ok(())
    }
}

/// Stores an upstream UPDATE through the one event path: each version is raised (and so
/// delivered to a connected client, or kicked) and committed before this returns. Only then may
/// the caller ACK it upstream. A registration this relay has no copy of (made before it
/// relayed, or expired here) is recreated so no event is lost.
pub(crate) async fn store_updates(
    delivery: &Delivery,
    relay: &Relay,
    updates: &Updates,
) -> Result<(), StoreError> {
    let expires = now_ms().saturating_add(relay.ttl_ms);
    let mut events = Vec::new();
    for (uaid_s, apps) in updates {
        for (appid_s, version) in apps {
            match (Uaid::parse(uaid_s), Appid::parse(appid_s)) {
                (Ok(uaid), Ok(appid)) => events.push((uaid, appid, *version)),
                _ => tracing::warn!("relay: upstream UPDATE names an invalid UAID or APPID; skipped"),
            }
        }
    }
    let raise = |(uaid, appid, version): (Uaid, Appid, u64)| async move {
        let request = VersionReq::Exact(version);
        if let Outcome::Gone = events::raise(delivery, uaid, appid, request, expires).await? {
            let token = TokenId::random();
            delivery
                .store
                .register(uaid, appid, token, KickChange::Keep, relay.max_appids)
                .await?;
            events::raise(delivery, uaid, appid, request, expires).await?;
        }
        Ok::<(), StoreError>(())
    };
    for raised in futures_util::future::join_all(events.into_iter().map(raise)).await {
        raised?;
    }
    Ok(())
}

/// Starts the upstream link of a relay node, storing what it receives through `delivery`, and
/// the sweep that forgets idle UAIDs. Each task ends when shutdown begins.
pub fn start(relay: &Arc<Relay>, delivery: &Delivery) -> Vec<JoinHandle<()>> {
    let mut tasks = match &relay.transport {
        TransportHandle::Ws { inbox, .. } => match lock(inbox).take() {
            Some(rx) => vec![tokio::spawn(ws_link::run(delivery.clone(), relay.clone(), rx))],
            None => Vec::new(),
        },
        TransportHandle::Poll(http) => {
            let task = poll_link::run(delivery.clone(), relay.clone(), http.clone());
            vec![tokio::spawn(task)]
        }
    };
    tasks.push(tokio::spawn(idle::run(delivery.clone(), relay.clone())));
    tasks
}

/// The upstream's reply, with the UAID and APPID as the downstream client wrote them. An
/// upstream's `retry_after` is not passed on (as before replies were typed; the wire is unchanged).
fn pass_through(reply: RegistrationReply, uaid: &str, appid: &str) -> RegistrationReply {
    RegistrationReply {
        uaid: uaid.to_owned(),
        appid: appid.to_owned(),
        retry_after: None,
        ..reply
    }
}

/// The downstream status for an upstream entry error (401s pass through as they are).
fn entry_error(entry: &StatusEntry, otherwise: EntryError) -> EntryError {
    match entry.error.as_deref() {
        Some("bad_secret") => EntryError::BadSecret,
        Some("secret_required") => EntryError::SecretRequired,
        Some("invalid_uaid") => EntryError::InvalidUaid,
        _ if entry.status == 401 => EntryError::BadSecret,
        _ => otherwise,
    }
}

/// The delay before reconnect attempt `attempt`: doubling from `reconnect_min_ms` to
/// `reconnect_max_secs`, times a random factor in [0.5, 1] so relays cut off together spread out.
fn backoff(config: &RelayConfig, attempt: u32) -> Duration {
    let mut b = [0u8; 4];
    // Jitter needs no cryptographic strength; a failed read spreads nothing, which is harmless.
    let _ = getrandom::fill(&mut b);
    let jitter = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    crate::kick::scheduler::backoff(
        Duration::from_millis(config.reconnect_min_ms),
        Duration::from_secs(config.reconnect_max_secs),
        attempt,
        jitter,
    )
}

/// `scheme://user:pass@host` → `scheme://host`: the URL as logged and shown on `/health`.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest
            .split_once('/')
            .map_or(rest, |(host, _)| host)
            .rsplit_once('@')
        {
            Some((_, _)) => {
                let after = rest.split_once('@').map_or(rest, |(_, r)| r);
                format!("{scheme}://{after}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(dir: &std::path::Path) -> Relay {
        let mut config = Config::default();
        config.relay.upstream = "ws://127.0.0.1:1".into();
        let store = crate::store::SledStore::open(dir, 1 << 20, Duration::from_secs(5)).unwrap();
        Relay::open(&config, &AnyStore::Sled(store), &Metrics::default()).unwrap()
    }

    /// `proto/relay.md`, "Chains and loops": a downstream `via` naming this node or one upstream
    /// of it is refused; so is an upstream `via` naming this node or one downstream of it.
    #[test]
    fn hop_lists_refuse_loops_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path());
        let me = relay.node_id.clone();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(relay.accept_downstream(1, ids(&["d1"])), Ok(vec![me.clone()]));
        assert_eq!(relay.hello_via(), vec![me.clone(), "d1".to_owned()]);
        relay.note_upstream(Some(ids(&["u1", "u2"]))).unwrap();
        assert_eq!(relay.chain(), vec![me.clone(), "u1".into(), "u2".into()]);
        assert_eq!(
            relay.accept_downstream(2, ids(&["d2", "u2"])),
            Err(WsError::RelayLoop)
        );
        assert_eq!(
            relay.accept_downstream(3, vec![me.clone()]),
            Err(WsError::RelayLoop)
        );
        assert!(matches!(
            relay.note_upstream(Some(ids(&["u1", "d1"]))),
            Err(RelayError::Refused(slug)) if slug == "relay_loop"
        ));
        relay.forget_downstream(1);
        assert!(relay.note_upstream(Some(ids(&["u1", "d1"]))).is_ok());
    }

    #[test]
    fn userinfo_is_not_shown() {
        assert_eq!(without_userinfo("wss://u:pw@host:1/x"), "wss://host:1/x");
        assert_eq!(without_userinfo("ws://host:1"), "ws://host:1");
    }

    #[test]
    fn backoff_doubles_within_the_cap() {
        let config = RelayConfig::default();
        assert!(backoff(&config, 0) <= Duration::from_millis(500));
        assert!(backoff(&config, 0) >= Duration::from_millis(250));
        assert!(backoff(&config, 40) <= Duration::from_secs(30));
        assert!(backoff(&config, 40) >= Duration::from_secs(15));
    }
}
