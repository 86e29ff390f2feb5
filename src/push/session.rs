//! The protocol core of one client connection, without sockets.
//!
//! The WebSocket loop feeds a [`Session`] text frames and mailbox wake-ups and sends what it
//! pushes to `out`: typed messages ([`Out`]), serialised only there, at the edge. The session
//! owns every protocol rule: hello first and once, secrets, register/unregister, at most one
//! UPDATE in flight per UAID, ACKs clearing exactly what was sent. Because it never touches a
//! socket, the rules read top to bottom in this file. The REST poll (`crate::push::poll`) drives
//! the same functions: authentication, the pending read, registration and [`ack_events`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::ids::TokenId;
use crate::ids::{Appid, Uaid};
use crate::push::held::Held;
use crate::push::proto::{
    self, ClientMessage, Credential, EntryError, RegistrationReply, ServerMessage, UaidStatus, UaidsReply,
    WsError,
};
use crate::push::registry::{Mail, Mailbox};
use crate::push::wake;
use crate::push::watch::{self, WatchChange};
use crate::ratelimit::{Bucket, Rate};
use crate::state::AppState;
use crate::store::{now_ms, CommitTicket, KickChange, Registered, Store, StoreError};

impl From<StoreError> for WsError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "store error on a socket");
        WsError::StoreUnavailable
    }
}

/// One message a session sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// A reply or notice, serialised by the transport.
    Message(ServerMessage),
    /// An UPDATE, written once by [`proto::UpdateBuilder`]: the hot path. Typed, it would copy
    /// every event into string maps (allocations per event) and be split by `max_frame_bytes`
    /// at the edge; written once, it costs one buffer per frame.
    Update(String),
}

impl Out {
    /// The frame's text.
    pub fn into_frame(self) -> String {
        match self {
            Out::Message(message) => message.frame(),
            Out::Update(frame) => frame,
        }
    }
}

/// One connection's protocol state.
pub struct Session {
    state: AppState,
    conn_id: u64,
    mailbox: Arc<Mailbox>,
    greeted: bool,
    /// UAIDs this connection speaks for, each with the events of its UPDATE awaiting ACK.
    held: Held,
    /// Default KICK settings from hello, applied to registrations that name none.
    kick: Vec<u8>,
    /// `ws_frames_per_sec` and `ws_frames_burst`, and this connection's bucket of frames.
    frame_rate: Rate,
    frames: Bucket,
    /// The commit asked for by this connection's last ACK, until a frame has waited for it.
    unsettled: Option<CommitTicket>,
    /// The client's address, for the limit on new UAIDs per address.
    client: Option<IpAddr>,
    /// On a relay, the `via` its hello reply carries to a downstream relay (see `crate::relay`).
    via_reply: Option<Vec<String>>,
}

impl Session {
    pub fn new(state: AppState) -> Session {
        let limits = &state.config.limits;
        let frame_rate = Rate::new(limits.ws_frames_per_sec, limits.ws_frames_burst);
        Session {
            conn_id: state.delivery.registry.next_conn_id(),
            mailbox: Arc::new(Mailbox::default()),
            greeted: false,
            held: Held::default(),
            kick: Vec::new(),
            frame_rate,
            frames: Bucket::full(frame_rate, Instant::now()),
            unsettled: None,
            client: None,
            via_reply: None,
            state,
        }
    }

    /// Names the client's address (see `crate::http::client_ip`).
    pub fn set_client(&mut self, client: Option<IpAddr>) {
        self.client = client;
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// Waits for the commit of this connection's last ACK, if nothing has waited for it yet. The
    /// socket loop calls it before any frame goes out (replies, UPDATEs, pongs, error and close
    /// frames): a frame the client hears after its ACK then proves the ACK survives a crash. An
    /// ACK that no frame follows waits for nothing (its commit runs anyway, asked for by
    /// [`Self::ack`]).
    pub async fn settle(&mut self) -> Result<(), WsError> {
        if let Some(ticket) = self.unsettled.take() {
            self.state.delivery.store.committed(ticket).await?;
        }
        Ok(())
    }

    /// Handles one text frame. An `Err` is a protocol violation: send its frame, then close.
    pub async fn on_text(&mut self, text: &str, out: &mut Vec<Out>) -> Result<(), WsError> {
        let msg = proto::parse_client(text);
        // An ACK that answers an UPDATE in flight is the client keeping up with the server, not
        // a frame of its own: it takes no token (a relay ACKs as fast as PUTs arrive). Each UPDATE
        // earns at most one such ACK, so the free frames are bounded by what the server sent.
        let answers = matches!(&msg, Ok(ClientMessage::Ack { uaids }) if self.answers_update(uaids));
        if !answers {
            self.count_frame()?;
        }
        let msg = msg?;
        let limits = &self.state.config.limits;
        match (self.greeted, msg) {
            (false, ClientMessage::Hello { uaids, kick, via }) => {
                self.kick = validate_kick(kick.as_ref(), limits.max_kick_bytes)?;
                if let Some(kick) = kick.as_ref().filter(|_| !self.kick.is_empty()) {
                    // Stored as the driver's canonical target; a refusal closes, like every
                    // hello error.
                    self.kick = wake::canonical(&self.state.delivery, kick)
                        .await
                        .map_err(WsError::Kick)?;
                }
                if let (Some(relay), Some(via)) = (&self.state.relay, via) {
                    self.via_reply = Some(relay.accept_downstream(self.conn_id, via)?);
                }
                self.claim(Kind::Hello, uaids, out).await?;
                self.greeted = true;
                Ok(())
            }
            (false, _) => Err(WsError::HelloRequired),
            (true, ClientMessage::Hello { .. }) => Err(WsError::DuplicateHello),
            (true, ClientMessage::Claim { uaids }) => self.claim(Kind::Claim, uaids, out).await,
            (true, ClientMessage::Release { uaids }) => self.release(uaids, out),
            (
                true,
                ClientMessage::Register {
                    uaid,
                    appid,
                    kick,
                    watch,
                },
            ) => {
                self.register(&uaid, &appid, kick.as_ref(), watch.as_ref(), out)
                    .await
            }
            (true, ClientMessage::Unregister { uaid, appid }) => self.unregister(&uaid, &appid, out).await,
            (true, ClientMessage::Ack { uaids }) => self.ack(uaids, out).await,
            (true, ClientMessage::Ping {}) => {
                out.push(Out::Message(ServerMessage::Pong));
                Ok(())
            }
        }
    }

    /// Whether an ACK naming `uaids` acknowledges at least one UPDATE in flight.
    fn answers_update(&self, uaids: &[String]) -> bool {
        uaids.iter().any(|s| {
            Uaid::parse(s)
                .ok()
                .and_then(|u| self.held.get(&u))
                .is_some_and(|slot| slot.in_flight.is_some())
        })
    }

    /// Counts a frame against `ws_frames_per_sec`; WebSocket pings and pongs count too (the
    /// server sends no pings, so every pong is unsolicited), so a flood of them is closed like
    /// any other. ACKs answering an UPDATE do not come here (see [`Self::on_text`]).
    pub fn count_frame(&mut self) -> Result<(), WsError> {
        if self.frames.take(self.frame_rate, Instant::now()).is_ok() {
            Ok(())
        } else {
            Err(WsError::RateLimited(self.state.config.limits.ws_frames_per_sec))
        }
    }

    /// Handles what other tasks left in the mailbox: UAIDs lost to newer connections, new events.
    pub async fn on_mailbox(&mut self, out: &mut Vec<Out>) -> Result<(), WsError> {
        let mail = self.mailbox.take();
        let registry = &self.state.delivery.registry;
        let lost: Vec<Uaid> = mail
            .lost
            .iter()
            .copied()
            .filter(|u| !registry.is_held_by(*u, self.conn_id) && self.held.remove(u).is_some())
            .collect();
        for uaid in &lost {
            // Drops this connection's route entry if a newer one never replaced it.
            self.state.delivery.unhold(*uaid, self.conn_id);
        }
        if !lost.is_empty() {
            let uaids = lost.iter().map(Uaid::to_string).collect();
            out.push(Out::Message(ServerMessage::Released { uaids }));
            if self.held.is_empty() {
                return Err(WsError::Replaced);
            }
        }
        self.send_pending_after(mail.dirty.iter().copied(), Some(&mail), out)
            .await
    }

    async fn claim(
        &mut self,
        kind: Kind,
        entries: Vec<Credential>,
        out: &mut Vec<Out>,
    ) -> Result<(), WsError> {
        let limits = &self.state.config.limits;
        if entries.len() > limits.max_uaids_per_frame {
            return Err(WsError::TooManyUaidsInFrame(limits.max_uaids_per_frame));
        }
        let adding = proto::uaids_added(&entries, |u| self.held.contains(u));
        if self.held.len() + adding > limits.max_uaids_per_connection {
            return Err(WsError::TooManyUaids(limits.max_uaids_per_connection));
        }
        self.state
            .guards
            .admit_new_uaids(self.client, proto::uaids_requested(&entries))
            .map_err(WsError::UaidRateLimited)?;
        let (statuses, claimed) = authenticate_all(&self.state, &entries).await?;
        for uaid in &claimed {
            // Held first, so that Drop releases it even if routing it fails below.
            self.held.insert(*uaid);
        }
        self.state
            .delivery
            .hold(&claimed, self.conn_id, &self.mailbox)
            .await?;
        if let Some(relay) = &self.state.relay {
            relay.lost_meanwhile(&self.state.delivery, &claimed, self.conn_id);
        }
        let reply = UaidsReply::new(&statuses, self.via_reply.take());
        out.push(Out::Message(match kind {
            Kind::Hello => ServerMessage::Hello(reply),
            Kind::Claim => ServerMessage::Claim(reply),
        }));
        self.send_pending(&claimed, out).await
    }

    fn release(&mut self, uaids: Vec<String>, out: &mut Vec<Out>) -> Result<(), WsError> {
        let mut statuses = Vec::with_capacity(uaids.len());
        for s in uaids {
            let status = match self.held_uaid(&s) {
                Ok(uaid) => {
                    self.held.remove(&uaid);
                    self.state.delivery.unhold(uaid, self.conn_id);
                    UaidStatus::ok(s, None)
                }
                Err(e) => UaidStatus::failed(Some(s), e),
            };
            statuses.push(status);
        }
        out.push(Out::Message(ServerMessage::Release(UaidsReply::new(
            &statuses, None,
        ))));
        Ok(())
    }

    /// Parses a UAID and checks this connection speaks for it.
    fn held_uaid(&self, s: &str) -> Result<Uaid, EntryError> {
        let uaid = Uaid::parse(s).map_err(|_| EntryError::InvalidUaid)?;
        if self.held.contains(&uaid) {
            Ok(uaid)
        } else {
            Err(EntryError::UaidNotHeld)
        }
    }

    async fn register(
        &mut self,
        uaid_s: &str,
        appid_s: &str,
        kick: Option<&Value>,
        watch_field: Option<&Value>,
        out: &mut Vec<Out>,
    ) -> Result<(), WsError> {
        let state = self.state.clone();
        let limits = &state.config.limits;
        let reply = |result| registered(RegistrationReply::new(uaid_s, appid_s, result));
        let kick_field = kick;
        let checked = self.held_uaid(uaid_s).and_then(|u| {
            let a = Appid::parse(appid_s).map_err(|_| EntryError::InvalidAppid)?;
            let k = register_kick(kick, limits.max_kick_bytes)?;
            Ok((u, a, k))
        });
        let (uaid, appid, mut kick) = match checked {
            Ok(v) => v,
            Err(e) => {
                out.push(reply(Err(e)));
                return Ok(());
            }
        };
        if let Some(value) = kick_field.filter(|_| !kick.is_empty()) {
            // The drivers' verdict is per request too: their status, slug and message.
            match wake::canonical(&state.delivery, value).await {
                Ok(target) => kick = target,
                Err(e) => {
                    out.push(registered(RegistrationReply::kick_refused(uaid_s, appid_s, &e)));
                    return Ok(());
                }
            }
        }
        let watch = match watch::check(&state, watch_field) {
            Ok(watch) => watch,
            Err(e) => {
                out.push(reply(Err(e)));
                return Ok(());
            }
        };
        // DESIGN.md "KICK drivers": carried or inherited replaces, null removes, neither keeps.
        let change = match kick_field {
            Some(Value::Null) => KickChange::Clear,
            _ if !kick.is_empty() => KickChange::Set(&kick),
            _ if !self.kick.is_empty() => KickChange::Set(&self.kick),
            _ => KickChange::Keep,
        };
        let reply = register_uaid(&state, (uaid, uaid_s), (appid, appid_s), change, &watch).await?;
        out.push(registered(reply));
        Ok(())
    }

    async fn unregister(&mut self, uaid_s: &str, appid_s: &str, out: &mut Vec<Out>) -> Result<(), WsError> {
        let reply = |result| unregistered(RegistrationReply::new(uaid_s, appid_s, result));
        let checked = self
            .held_uaid(uaid_s)
            .and_then(|u| Ok((u, Appid::parse(appid_s).map_err(|_| EntryError::InvalidAppid)?)));
        let (uaid, appid) = match checked {
            Ok(v) => v,
            Err(e) => {
                out.push(reply(Err(e)));
                return Ok(());
            }
        };
        // An UPDATE in flight may name this APPID; its ACK then clears nothing, which is right.
        let reply = unregister_uaid(&self.state, (uaid, uaid_s), (appid, appid_s)).await?;
        out.push(unregistered(reply));
        Ok(())
    }

    async fn ack(&mut self, uaids: Vec<String>, out: &mut Vec<Out>) -> Result<(), WsError> {
        // What each named UAID's UPDATE carried, up to a UAID that does not parse: what came
        // before it is cleared (and committed) before that error closes the socket. A UAID not
        // held or with nothing in flight is a late or repeated ACK, harmless.
        let mut sent = Vec::with_capacity(uaids.len());
        let mut invalid = None;
        for s in &uaids {
            let Ok(uaid) = Uaid::parse(s) else {
                invalid = Some(WsError::InvalidFrame(
                    "ack".into(),
                    format!("{s:?} is not a UAID"),
                ));
                break;
            };
            if let Some(events) = self.held.get_mut(&uaid).and_then(|slot| slot.in_flight.take()) {
                sent.push((uaid, events));
            }
        }
        // Committed in the background; `settle` waits for it before the next frame.
        ack_events(
            &self.state,
            &sent,
            AckCommit::BeforeNextFrame(&mut self.unsettled),
        )
        .await?;
        if let Some(e) = invalid {
            return Err(e);
        }
        // What arrived while the UPDATE was in flight goes out now (after a sync: nothing read
        // here is known to be durable). Every ACKed UAID is read again, not only those whose
        // events were announced meanwhile: a PUT whose request ended before its nudge (the app
        // server hung up during the commit) is found here.
        self.send_pending_after(sent.iter().map(|(uaid, _)| *uaid), None, out)
            .await
    }

    /// Sends one UPDATE (split only to respect the frame limit) with the pending events of those
    /// `uaids` that are held and have nothing in flight.
    async fn send_pending(&mut self, uaids: &[Uaid], out: &mut Vec<Out>) -> Result<(), WsError> {
        self.send_pending_after(uaids.iter().copied(), None, out).await
    }

    /// [`Self::send_pending`], syncing the store first when events go out.
    ///
    /// An event read from the store may have been raised by a PUT whose group commit is still
    /// running; a client must never see a version that a crash could take back (it would then
    /// see an older one again). So the events are read, then one sync covers them (and this
    /// connection's own writes, such as an ACK), then the UPDATE is queued.
    ///
    /// That sync is skipped when `known` (the mail that woke
    /// this call) covers every event read: each (APPID, version) was raised by a PUT on this
    /// node that saw its own sync return before it nudged, and no unregister has run since (see
    /// [`crate::push::registry::Registry::fact_epoch`]). Versions of a registration only grow, so the
    /// same (APPID, version) read again is that committed write, and a crash cannot take it back;
    /// anything else read (a newer version, another APPID, a nudge from another node or the
    /// re-check) syncs as before. On Redis `sync` waits for nothing, so skipping it changes
    /// nothing there.
    async fn send_pending_after(
        &mut self,
        uaids: impl Iterator<Item = Uaid>,
        known: Option<&Mail>,
        out: &mut Vec<Out>,
    ) -> Result<(), WsError> {
        // Only held UAIDs with nothing in flight (what is in flight is read again after its ACK).
        let idle: Vec<Uaid> = uaids
            .filter(|uaid| self.held.get(uaid).is_some_and(|slot| slot.in_flight.is_none()))
            .collect();
        let found = read_pending(&self.state, &idle).await?;
        let covered = known.is_some_and(|known| {
            found
                .iter()
                .all(|(uaid, events)| known.covers(&self.state.delivery.registry, uaid, events))
        });
        if !found.is_empty() && !covered {
            self.state.delivery.sync().await?;
            // That commit also covers this connection's ACKs.
            self.unsettled = None;
        } else if !found.is_empty() {
            self.state.metrics.syncs_skipped.inc();
        }
        let mut update = proto::UpdateBuilder::new(self.state.config.limits.max_frame_bytes);
        for (uaid, events) in found {
            // A UAID named twice goes out once.
            let Some(slot) = self.held.get_mut(&uaid).filter(|s| s.in_flight.is_none()) else {
                continue;
            };
            let finished = update.add(uaid, &events);
            self.state.metrics.events_sent.inc_by(events.len() as u64);
            slot.in_flight = Some(events);
            if let Some(frame) = finished {
                out.push(Out::Update(frame));
                self.state.metrics.updates_sent.inc();
            }
        }
        if let Some(frame) = update.finish() {
            out.push(Out::Update(frame));
            self.state.metrics.updates_sent.inc();
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(relay) = &self.state.relay {
            relay.forget_downstream(self.conn_id);
        }
        for uaid in self.held.uaids() {
            self.state.delivery.unhold(*uaid, self.conn_id);
        }
    }
}

/// Which reply a claim of UAIDs answers with.
#[derive(Clone, Copy)]
enum Kind {
    Hello,
    Claim,
}

fn registered(reply: RegistrationReply) -> Out {
    Out::Message(ServerMessage::Register(reply))
}

fn unregistered(reply: RegistrationReply) -> Out {
    Out::Message(ServerMessage::Unregister(reply))
}

/// How an ACK's commit is awaited: each transport keeps its own durability rule.
pub(crate) enum AckCommit<'a> {
    /// `POST /v1/ack` answers only once a commit has run, whatever was cleared.
    Now,
    /// The WebSocket asks for a commit when something was cleared and keeps its ticket here;
    /// [`Session::settle`] waits for it before the next frame goes out.
    BeforeNextFrame(&'a mut Option<CommitTicket>),
}

/// The one ACK path, of the WebSocket (what its UPDATE sent) and `POST /v1/ack` (the versions
/// it names): clears each (UAID, APPID, version) whose stored version is still that one (a
/// newer version stays pending), then commits as `commit` says. Returns how many were cleared.
/// A store error stops the clearing; what was cleared before it is still committed.
pub(crate) async fn ack_events(
    state: &AppState,
    acks: &[proto::UaidEvents],
    commit: AckCommit<'_>,
) -> Result<u64, StoreError> {
    let mut cleared = 0;
    let mut result = Ok(());
    'clearing: for (uaid, events) in acks {
        for &(appid, version) in events {
            match state.delivery.store.ack(*uaid, appid, version).await {
                Ok(true) => cleared += 1,
                Ok(false) => {}
                Err(e) => {
                    result = Err(e);
                    break 'clearing;
                }
            }
        }
    }
    state.metrics.acks.inc_by(cleared);
    match commit {
        AckCommit::Now => {
            result?;
            state.delivery.sync().await?;
        }
        AckCommit::BeforeNextFrame(unsettled) => {
            if cleared > 0 {
                *unsettled = Some(state.delivery.store.request_commit());
            }
            result?;
        }
    }
    Ok(cleared)
}

/// Registers (`uaid`, `appid`) for an authenticated UAID and returns the reply (WebSocket
/// and `POST /v1/register` alike). On a relay the upstream registers it (the endpoint is its).
pub async fn register_uaid(
    state: &AppState,
    (uaid, uaid_s): (Uaid, &str),
    (appid, appid_s): (Appid, &str),
    change: KickChange<'_>,
    watch: &WatchChange,
) -> Result<RegistrationReply, StoreError> {
    if let Some(relay) = &state.relay {
        return relay
            .register(state, (uaid, uaid_s), (appid, appid_s), change)
            .await;
    }
    let reply = |result| RegistrationReply::new(uaid_s, appid_s, result);
    let max = state.config.limits.max_appids_per_uaid;
    match state
        .delivery
        .store
        .register(uaid, appid, TokenId::random(), change, max)
        .await?
    {
        Registered::Token(id) => {
            watch::apply(state, uaid, appid, id, watch).await?;
            state.delivery.sync().await?;
            let endpoint = format!("{}/v1/e/{}", state.public_url, state.keys.seal_token(&id));
            Ok(reply(Ok(Some(&endpoint))))
        }
        Registered::TooMany => Ok(reply(Err(EntryError::TooManyRegistrations))),
    }
}

/// Unregisters (`uaid`, `appid`) for an authenticated UAID and returns the reply. On a
/// relay the upstream unregisters it first.
pub async fn unregister_uaid(
    state: &AppState,
    (uaid, uaid_s): (Uaid, &str),
    (appid, appid_s): (Appid, &str),
) -> Result<RegistrationReply, StoreError> {
    if let Some(relay) = &state.relay {
        return relay.unregister(state, (uaid, uaid_s), (appid, appid_s)).await;
    }
    let reply = |result| RegistrationReply::new(uaid_s, appid_s, result);
    if unregister_local(state, uaid, appid).await? {
        state.delivery.sync().await?;
        Ok(reply(Ok(None)))
    } else {
        Ok(reply(Err(EntryError::NotRegistered)))
    }
}

/// Removes a registration from this node's store (its token answers 410 for `gone_ttl_secs`);
/// `false` if there was none. Not yet durable: the caller syncs.
pub async fn unregister_local(state: &AppState, uaid: Uaid, appid: Appid) -> Result<bool, StoreError> {
    let gone_until = now_ms().saturating_add(state.config.limits.gone_ttl_secs.saturating_mul(1000));
    let unregistering = state.delivery.registry.unregistering();
    let removed = state.delivery.store.unregister(uaid, appid, gone_until).await?;
    drop(unregistering);
    if removed {
        watch::forget(state, uaid, appid);
    }
    Ok(removed)
}

/// The pending events of `uaids` that have some, read now, in order. Not yet known to be
/// durable: the caller syncs before it passes them on. Shared by the socket and the REST poll.
pub async fn read_pending(state: &AppState, uaids: &[Uaid]) -> Result<Vec<proto::UaidEvents>, StoreError> {
    let now = now_ms();
    let mut found = Vec::new();
    for uaid in uaids {
        let events = state.delivery.store.pending(*uaid, now).await?;
        if !events.is_empty() {
            found.push((*uaid, events));
        }
    }
    Ok(found)
}

/// Checks each credential, binding new UAIDs. Returns the per-entry statuses and the UAIDs that
/// authenticated. Shared by hello, claim and REST poll.
pub async fn authenticate_all(
    state: &AppState,
    entries: &[Credential],
) -> Result<(Vec<UaidStatus>, Vec<Uaid>), StoreError> {
    if let Some(relay) = &state.relay {
        // UAIDs and secrets are the upstream's: the relay checks them against its book or asks.
        return relay.authenticate_all(state, entries).await;
    }
    let mut statuses = Vec::with_capacity(entries.len());
    let mut claimed = Vec::with_capacity(entries.len());
    let mut bound_any = false;
    for entry in entries {
        let status = authenticate(state, entry, &mut bound_any).await?;
        if status.error.is_none() {
            if let Some(u) = status.uaid.as_deref().and_then(|s| Uaid::parse(s).ok()) {
                if !claimed.contains(&u) {
                    claimed.push(u);
                }
            }
        }
        statuses.push(status);
    }
    if bound_any {
        // A secret is handed out only once its binding is durable.
        state.delivery.sync().await?;
    }
    Ok((statuses, claimed))
}

async fn authenticate(
    state: &AppState,
    entry: &Credential,
    bound_any: &mut bool,
) -> Result<UaidStatus, StoreError> {
    let issued = |uaid: Uaid| UaidStatus::ok(uaid.to_string(), Some(state.keys.uaid_secret(&uaid)));
    match (&entry.uaid, &entry.secret) {
        // No UAID: a new one (a secret without its UAID identifies nothing).
        (None, _) => loop {
            let uaid = Uaid::random();
            if state.delivery.store.bind_uaid(uaid).await? {
                *bound_any = true;
                return Ok(issued(uaid));
            }
        },
        (Some(s), secret) => {
            let failed = |e| Ok(UaidStatus::failed(Some(s.clone()), e));
            let Ok(uaid) = Uaid::parse(s) else {
                return failed(EntryError::InvalidUaid);
            };
            match secret {
                None if state.delivery.store.bind_uaid(uaid).await? => {
                    *bound_any = true;
                    Ok(issued(uaid))
                }
                None => failed(EntryError::SecretRequired),
                Some(secret) if state.keys.check_secret(&uaid, secret) => {
                    // Seen now (it does not expire as idle); re-bound if its record was lost or
                    // expired: the secret proves we issued it.
                    *bound_any |= state.delivery.store.touch_uaid(uaid, now_ms()).await?;
                    Ok(UaidStatus::ok(s.clone(), None))
                }
                Some(_) => failed(EntryError::BadSecret),
            }
        }
    }
}

/// A register's `kick`, checked: shared by the WebSocket and `POST /v1/register`.
pub(crate) fn register_kick(kick: Option<&Value>, max_bytes: usize) -> Result<Vec<u8>, EntryError> {
    validate_kick(kick, max_bytes).map_err(|e| match e {
        WsError::KickTooLarge(_) => EntryError::KickTooLarge,
        _ => EntryError::InvalidKick,
    })
}

/// A `kick` value must be a JSON object of bounded size; stored as its JSON text. The error
/// closes the socket in hello and is the reply's status in register.
pub fn validate_kick(kick: Option<&Value>, max_bytes: usize) -> Result<Vec<u8>, WsError> {
    match kick {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v @ Value::Object(_)) => {
            let bytes = v.to_string().into_bytes();
            if bytes.len() > max_bytes {
                Err(WsError::KickTooLarge(max_bytes))
            } else {
                Ok(bytes)
            }
        }
        Some(_) => Err(WsError::InvalidKick),
    }
}

/// The protocol rules, run on an in-memory store without sockets: frames in, frames out.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::keys::Keys;
    use crate::push::events::{self, Outcome, Reached};
    use crate::push::proto::ServerMessage;
    use crate::state::Shared;
    use crate::store::{AnyStore, MemoryStore, VersionReq};

    fn state() -> AppState {
        let keys = Keys::from_text(&Keys::generate_text(), "test").unwrap();
        let store = AnyStore::Memory(MemoryStore::new());
        Shared::new(Config::default(), keys, store, None).into()
    }

    /// A state whose UDP driver may reach 127.0.0.1.
    async fn state_with_udp() -> AppState {
        let mut config = Config::default();
        config.kick.udp.enabled = true;
        config.kick.udp.allow = vec!["127.0.0.1/32".into()];
        let keys = Keys::from_text(&Keys::generate_text(), "test").unwrap();
        let store = AnyStore::Memory(MemoryStore::new());
        let kick_keys = wake::load_keys(&config, &store).await.unwrap();
        let shared = Shared::new(config, keys, store, None);
        wake::install(&shared.delivery, &shared.config, &kick_keys).unwrap();
        shared.into()
    }

    /// The messages a session answered with; an UPDATE (written once, not typed) parsed back.
    fn messages(out: Vec<Out>) -> Vec<ServerMessage> {
        out.into_iter()
            .map(|out| match out {
                Out::Message(message) => message,
                Out::Update(frame) => ServerMessage::parse(&frame).unwrap(),
            })
            .collect()
    }

    /// Sends one frame; returns the messages the session answered with.
    async fn send(session: &mut Session, frame: serde_json::Value) -> Result<Vec<ServerMessage>, WsError> {
        let mut out = Vec::new();
        session.on_text(&frame.to_string(), &mut out).await?;
        Ok(messages(out))
    }

    /// A greeted session holding one new UAID: (session, uaid).
    async fn greeted(state: &AppState, kick: serde_json::Value) -> (Session, String) {
        let mut session = Session::new(state.clone());
        let hello = serde_json::json!({"type": "hello", "uaids": [{}], "kick": kick});
        let out = send(&mut session, hello).await.unwrap();
        let [ServerMessage::Hello(reply)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert!(reply.uaids[0].secret.is_some(), "a new UAID gets its secret");
        (session, reply.uaids[0].uaid.clone().unwrap())
    }

    async fn register(
        session: &mut Session,
        uaid: &str,
        appid: &str,
        kick: Option<serde_json::Value>,
    ) -> String {
        let mut frame = serde_json::json!({"type": "register", "uaid": uaid, "appid": appid});
        if let Some(kick) = kick {
            frame["kick"] = kick;
        }
        let out = send(session, frame).await.unwrap();
        let [ServerMessage::Register(reply)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.endpoint.clone().unwrap()
    }

    #[tokio::test]
    async fn hello_comes_first_and_once() {
        let state = state();
        let mut session = Session::new(state.clone());
        let ping = serde_json::json!({"type": "ping"});
        assert_eq!(
            send(&mut session, ping.clone()).await,
            Err(WsError::HelloRequired)
        );
        let (mut session, _) = greeted(&state, serde_json::Value::Null).await;
        let hello = serde_json::json!({"type": "hello", "uaids": []});
        assert_eq!(send(&mut session, hello).await, Err(WsError::DuplicateHello));
        assert_eq!(send(&mut session, ping).await, Ok(vec![ServerMessage::Pong]));
    }

    /// DESIGN.md "KICK drivers": a register that carries a kick or inherits hello's replaces the
    /// stored one, `"kick":null` removes it, neither keeps it; a raise nobody hears returns it.
    #[tokio::test]
    async fn registers_set_keep_and_clear_the_kick_that_an_unheard_raise_returns() {
        let state = state_with_udp().await;
        let hook = serde_json::json!({"driver": "udp", "addr": "127.0.0.1:9"});
        let (mut session, uaid_s) = greeted(&state, hook.clone()).await;
        let (uaid, appid) = (Uaid::parse(&uaid_s).unwrap(), Appid::random());
        let appid_s = appid.to_string();
        let stored = || state.delivery.store.kick(uaid, appid);
        register(&mut session, &uaid_s, &appid_s, None).await;
        assert_eq!(
            stored().await.unwrap(),
            Some(hook.to_string().into_bytes()),
            "hello's"
        );
        let udp = serde_json::json!({"driver": "udp", "addr": "127.0.0.1:10"});
        register(&mut session, &uaid_s, &appid_s, Some(udp.clone())).await;
        assert_eq!(stored().await.unwrap(), Some(udp.to_string().into_bytes()));
        register(&mut session, &uaid_s, &appid_s, Some(serde_json::Value::Null)).await;
        assert_eq!(stored().await.unwrap(), None);
        register(&mut session, &uaid_s, &appid_s, Some(udp.clone())).await;

        // Held here: reached locally, no kick.
        let raised = events::raise(&state.delivery, uaid, appid, VersionReq::Exact(1), u64::MAX)
            .await
            .unwrap();
        let Outcome::Raised(raised) = raised else {
            panic!("{raised:?}")
        };
        assert_eq!((raised.reached, raised.kick), (Reached::Local, None));
        // Nobody holds it once the session is gone: the kick comes back.
        drop(session);
        let raised = events::raise(&state.delivery, uaid, appid, VersionReq::Exact(2), u64::MAX)
            .await
            .unwrap();
        let Outcome::Raised(raised) = raised else {
            panic!("{raised:?}")
        };
        assert_eq!(raised.reached, Reached::Nobody);
        assert_eq!(raised.kick, Some(udp.to_string().into_bytes()));
        let superseded = events::raise(&state.delivery, uaid, appid, VersionReq::Exact(2), u64::MAX).await;
        assert_eq!(superseded.unwrap(), Outcome::Superseded(2));
    }

    /// The drivers' verdict on a kick: per request in register (the socket stays open, nothing is
    /// stored), an error and a close in hello.
    #[tokio::test]
    async fn kicks_the_drivers_refuse_fail_the_register_alone_and_close_a_hello() {
        let state = state_with_udp().await;
        let (mut session, uaid_s) = greeted(&state, serde_json::Value::Null).await;
        let appid = Appid::random();
        for (kick, status, slug) in [
            (
                serde_json::json!({"driver": "webhook", "url": "https://example.com/"}),
                400,
                "kick_unsupported",
            ),
            (
                serde_json::json!({"driver": "udp", "addr": "127.0.0.2:9"}),
                403,
                "kick_refused",
            ),
            (
                serde_json::json!({"driver": "udp", "addr": "nowhere"}),
                400,
                "invalid_kick",
            ),
        ] {
            let frame = serde_json::json!({"type": "register", "uaid": uaid_s, "appid": appid.to_string(), "kick": kick});
            let out = send(&mut session, frame).await.unwrap();
            let [ServerMessage::Register(reply)] = out.as_slice() else {
                panic!("{out:?}")
            };
            assert_eq!(
                (reply.status, reply.error.as_deref()),
                (status, Some(slug)),
                "{reply:?}"
            );
            assert!(reply.message.as_deref().is_some_and(|m| !m.is_empty()));
            assert_eq!(reply.endpoint, None);
        }
        let uaid = Uaid::parse(&uaid_s).unwrap();
        assert_eq!(state.delivery.store.kicks(uaid).await.unwrap(), vec![]);
        let mut fresh = Session::new(state.clone());
        let hello = serde_json::json!({"type": "hello", "uaids": [{}], "kick": {"driver": "udp", "addr": "127.0.0.2:9"}});
        let refused = send(&mut fresh, hello).await.unwrap_err();
        assert_eq!((refused.slug(), refused.close_code()), ("kick_refused", 4403));
    }

    /// At most one UPDATE in flight per UAID: what is raised meanwhile goes out after the ACK.
    #[tokio::test]
    async fn one_update_in_flight_until_its_ack() {
        let state = state();
        let (mut session, uaid_s) = greeted(&state, serde_json::Value::Null).await;
        let (uaid, appid) = (Uaid::parse(&uaid_s).unwrap(), Appid::random());
        register(&mut session, &uaid_s, &appid.to_string(), None).await;
        let update = |out: &mut Vec<Out>| -> Option<u64> {
            match messages(std::mem::take(out)).as_slice() {
                [] => None,
                [ServerMessage::Update { updates }] => Some(updates[&uaid_s][&appid.to_string()]),
                other => panic!("{other:?}"),
            }
        };
        for version in [5, 6] {
            events::raise(&state.delivery, uaid, appid, VersionReq::Exact(version), u64::MAX)
                .await
                .unwrap();
        }
        let mut out = Vec::new();
        session.on_mailbox(&mut out).await.unwrap();
        assert_eq!(update(&mut out), Some(6));
        events::raise(&state.delivery, uaid, appid, VersionReq::Exact(7), u64::MAX)
            .await
            .unwrap();
        session.on_mailbox(&mut out).await.unwrap();
        assert_eq!(update(&mut out), None, "6 is still in flight");
        let ack = serde_json::json!({"type": "ack", "uaids": [uaid_s]});
        session.on_text(&ack.to_string(), &mut out).await.unwrap();
        assert_eq!(update(&mut out), Some(7), "sent after the ACK of 6");
        assert_eq!(
            state.delivery.store.pending(uaid, 0).await.unwrap(),
            vec![(appid, 7)]
        );
    }

    /// The one ACK path: only the acknowledged version is cleared (a newer one stays pending);
    /// the REST rule commits whatever was cleared, the socket's asks for a commit only when
    /// something was.
    #[tokio::test]
    async fn an_ack_clears_exactly_its_version_and_commits_by_each_rule() {
        let state = state();
        let (mut session, uaid_s) = greeted(&state, serde_json::Value::Null).await;
        let (uaid, appid) = (Uaid::parse(&uaid_s).unwrap(), Appid::random());
        register(&mut session, &uaid_s, &appid.to_string(), None).await;
        events::raise(&state.delivery, uaid, appid, VersionReq::Exact(5), u64::MAX)
            .await
            .unwrap();
        let mut ticket = None;
        let stale = [(uaid, vec![(appid, 4)])];
        let cleared = ack_events(&state, &stale, AckCommit::BeforeNextFrame(&mut ticket)).await;
        assert_eq!(cleared.unwrap(), 0);
        assert_eq!(ticket, None, "nothing cleared, no commit to wait for");
        assert_eq!(
            state.delivery.store.pending(uaid, 0).await.unwrap(),
            vec![(appid, 5)]
        );
        assert_eq!(ack_events(&state, &stale, AckCommit::Now).await.unwrap(), 0);
        let current = [(uaid, vec![(appid, 5)])];
        let cleared = ack_events(&state, &current, AckCommit::BeforeNextFrame(&mut ticket)).await;
        assert_eq!(cleared.unwrap(), 1);
        assert!(
            ticket.is_some(),
            "the socket waits for this before its next frame"
        );
        assert_eq!(state.delivery.store.pending(uaid, 0).await.unwrap(), vec![]);
    }

    /// An ACK whose later UAID does not parse still clears (and commits) what the earlier ones
    /// acknowledged before the error closes the socket.
    #[tokio::test]
    async fn an_ack_clears_what_precedes_a_bad_uaid_then_fails() {
        let state = state();
        let (mut session, uaid_s) = greeted(&state, serde_json::Value::Null).await;
        let (uaid, appid) = (Uaid::parse(&uaid_s).unwrap(), Appid::random());
        register(&mut session, &uaid_s, &appid.to_string(), None).await;
        events::raise(&state.delivery, uaid, appid, VersionReq::Exact(3), u64::MAX)
            .await
            .unwrap();
        let mut out = Vec::new();
        session.on_mailbox(&mut out).await.unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        let ack = serde_json::json!({"type": "ack", "uaids": [uaid_s, "nope"]});
        let refused = send(&mut session, ack).await.unwrap_err();
        assert_eq!(refused.slug(), "invalid_frame");
        assert_eq!(state.delivery.store.pending(uaid, 0).await.unwrap(), vec![]);
        assert!(
            session.unsettled.is_some(),
            "its commit is waited for before the error frame"
        );
    }
}
