//! `POST /v1/poll`, `POST /v1/ack`, `POST /v1/register` and `POST /v1/unregister`: the protocol
//! for clients (and relays) that cannot hold a WebSocket.
//!
//! A poll authenticates like hello, holds its UAIDs like a connection for as long as it waits
//! (so a PUT wakes it at once), and answers 200 with the pending events or 204. It keeps nothing
//! in flight: the client ACKs with the exact versions it received. Register and unregister are
//! the WebSocket frames over HTTP, with poll's credentials: the same reply body, and its
//! `status` as the HTTP status.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::http::{json, read_body, HttpError};
use crate::ids::{Appid, Uaid};
use crate::push::proto::{self, Credential, EntryError, RegistrationReply, ServerMessage, UaidStatus};
use crate::push::registry::Mailbox;
use crate::push::session::{
    ack_events, authenticate_all, read_pending, register_kick, register_uaid, unregister_uaid, AckCommit,
};
use crate::push::{wake, watch};
use crate::state::AppState;
use crate::store::{KickChange, StoreError};

/// A poll request's body (pub for the fuzz harness).
#[derive(Deserialize)]
pub struct PollBody {
    pub uaids: Vec<Credential>,
}

#[derive(Deserialize)]
pub struct PollQuery {
    wait: Option<u64>,
}

/// An ack request's body (pub for the fuzz harness).
#[derive(Deserialize)]
pub struct AckBody {
    pub uaids: Vec<Credential>,
    pub updates: HashMap<String, HashMap<String, u64>>,
}

#[derive(Deserialize)]
struct RegistrationBody {
    uaid: String,
    secret: String,
    appid: String,
    /// As in the register frame: `null` removes the stored kick, absent keeps it.
    #[serde(default, deserialize_with = "proto::present")]
    kick: Option<serde_json::Value>,
    /// As in the register frame: instant sync of storage collections; `null` removes.
    #[serde(default, deserialize_with = "proto::present")]
    watch: Option<serde_json::Value>,
}

fn unavailable(state: &AppState) -> impl Fn(StoreError) -> HttpError + '_ {
    move |e| state.delivery.unavailable(e)
}

/// Parses a request body (pub for the fuzz harness).
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::InvalidBody(e.to_string()))
}

/// Authenticates every entry; any failure answers the whole request with that entry's status.
async fn authenticate(
    state: &AppState,
    entries: &[Credential],
    client: Option<IpAddr>,
) -> Result<(Vec<UaidStatus>, Vec<Uaid>), HttpError> {
    let limits = &state.config.limits;
    // One request carries a frame's worth of entries, as a hello does: a relay polls in chunks
    // (DESIGN.md, "Relay"). Checked first: it also bounds the work of counting distinct UAIDs.
    if entries.len() > limits.max_uaids_per_frame {
        return Err(HttpError::TooManyUaids(limits.max_uaids_per_frame));
    }
    let limit = limits.max_uaids_per_connection;
    if proto::uaids_added(entries, |_| false) > limit {
        return Err(HttpError::TooManyUaids(limit));
    }
    state
        .guards
        .admit_new_uaids(client, proto::uaids_requested(entries))
        .map_err(|retry_after_secs| HttpError::UaidRateLimited { retry_after_secs })?;
    let (statuses, uaids) = authenticate_all(state, entries)
        .await
        .map_err(unavailable(state))?;
    if let Some((bad, error)) = statuses.iter().find_map(|s| Some((s, s.error?))) {
        return Err(HttpError::Credentials {
            error,
            uaid: bad.uaid.clone().unwrap_or_default(),
        });
    }
    Ok((statuses, uaids))
}

/// Releases a poll's UAIDs however the request ends (answered, timed out, or dropped).
struct Claims<'a> {
    state: &'a AppState,
    conn_id: u64,
    uaids: &'a [Uaid],
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        for uaid in self.uaids {
            self.state.delivery.unhold(*uaid, self.conn_id);
        }
    }
}

pub async fn poll(
    State(state): State<AppState>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    query: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let peer = peer.ok().map(|ConnectInfo(addr)| addr);
    let client = crate::http::client_ip(&state.config.server.trusted_proxy_header, &headers, peer);
    match poll_inner(&state, query, &headers, body, client).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn poll_inner(
    state: &AppState,
    query: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    body: Body,
    client: Option<IpAddr>,
) -> Result<Response, HttpError> {
    let Query(query) = query.map_err(|e| HttpError::InvalidQuery(e.body_text()))?;
    let limits = &state.config.limits;
    let body = read_body(headers, body, limits.max_body_bytes).await?;
    let request: PollBody = parse_json(&body)?;
    // A poll that starts while the server drains would end at once and be retried at once.
    if state.lifecycle.is_stopping() {
        return Err(HttpError::ShuttingDown);
    }
    let (statuses, uaids) = authenticate(state, &request.uaids, client).await?;
    let wait = Duration::from_secs(query.wait.unwrap_or(0).min(limits.max_poll_wait_secs));
    // New secrets go back at once: the client must learn them even if nothing is pending.
    let issued = statuses.iter().any(|s| s.secret.is_some());

    let conn_id = state.delivery.registry.next_conn_id();
    let mailbox = Arc::new(Mailbox::default());
    let _claims = Claims {
        state,
        conn_id,
        uaids: &uaids,
    };
    state
        .delivery
        .hold(&uaids, conn_id, &mailbox)
        .await
        .map_err(unavailable(state))?;
    if let Some(relay) = &state.relay {
        relay.lost_meanwhile(&state.delivery, &uaids, conn_id);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let stopping = state.lifecycle.stopping();
    tokio::pin!(stopping);
    loop {
        let events = read_pending(state, &uaids).await.map_err(unavailable(state))?;
        if !events.is_empty() || issued {
            // Events read here may have been raised by a PUT whose commit is still running:
            // answer only once they are durable (see `Session::send_pending_after`).
            state.delivery.sync().await.map_err(unavailable(state))?;
            let count: usize = events.iter().map(|(_, e)| e.len()).sum();
            state.metrics.events_sent.inc_by(count as u64);
            return Ok(json(StatusCode::OK, poll_answer(&statuses, issued, &events)));
        }
        tokio::select! {
            _ = mailbox.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
            _ = &mut stopping => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
        // Drain marks so a burst of PUTs does not wake this loop once per PUT.
        let lost = mailbox.take().lost;
        if !lost.is_empty() && lost.len() == uaids.len() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// `{"uaids":[…],"updates":{…}}`, with `uaids` only when secrets were issued.
fn poll_answer(statuses: &[UaidStatus], issued: bool, events: &[proto::UaidEvents]) -> String {
    let mut out = String::from("{");
    if issued {
        out.push_str("\"uaids\":");
        out.push_str(&proto::uaid_statuses(statuses).to_string());
        out.push(',');
    }
    out.push_str("\"updates\":");
    proto::write_updates(&mut out, events);
    out.push('}');
    out
}

pub async fn ack(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match ack_inner(&state, &headers, body).await {
        Ok(cleared) => json(StatusCode::OK, format!("{{\"cleared\":{cleared}}}")),
        Err(e) => e.into_response(),
    }
}

async fn ack_inner(state: &AppState, headers: &HeaderMap, body: Body) -> Result<u64, HttpError> {
    let body = read_body(headers, body, state.config.limits.max_body_bytes).await?;
    let request: AckBody = parse_json(&body)?;
    if let Some(entry) = request
        .uaids
        .iter()
        .find(|c| c.uaid.is_none() || c.secret.is_none())
    {
        return Err(HttpError::Credentials {
            error: EntryError::SecretRequired,
            uaid: entry.uaid.clone().unwrap_or_default(),
        });
    }
    // Every entry carries a secret (checked above): nothing new to limit.
    let (_, uaids) = authenticate(state, &request.uaids, None).await?;
    let mut acks = Vec::with_capacity(request.updates.len());
    for (uaid_s, apps) in &request.updates {
        let uaid =
            Uaid::parse(uaid_s).map_err(|_| HttpError::InvalidBody(format!("{uaid_s:?} is not a UAID")))?;
        if !uaids.contains(&uaid) {
            return Err(HttpError::UaidNotAuthenticated(uaid_s.clone()));
        }
        let mut versions = Vec::with_capacity(apps.len());
        for (appid_s, version) in apps {
            let appid = Appid::parse(appid_s)
                .map_err(|_| HttpError::InvalidBody(format!("{appid_s:?} is not an APPID")))?;
            versions.push((appid, *version));
        }
        acks.push((uaid, versions));
    }
    // Answered once durable: the same clearing as the WebSocket's ACK, committed before the answer.
    ack_events(state, &acks, AckCommit::Now)
        .await
        .map_err(unavailable(state))
}

/// `POST /v1/register` `{"uaid","secret","appid","kick"?}`: the register frame over HTTP.
pub async fn register(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match registration(&state, &headers, body, true).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/unregister` `{"uaid","secret","appid"}`: the unregister frame over HTTP.
pub async fn unregister(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match registration(&state, &headers, body, false).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn registration(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    register: bool,
) -> Result<Response, HttpError> {
    let body = read_body(headers, body, state.config.limits.max_body_bytes).await?;
    let request: RegistrationBody = parse_json(&body)?;
    if state.lifecycle.is_stopping() {
        return Err(HttpError::ShuttingDown);
    }
    let credential = Credential {
        uaid: Some(request.uaid.clone()),
        secret: Some(request.secret.clone()),
    };
    let (_, uaids) = authenticate(state, std::slice::from_ref(&credential), None).await?;
    let Some(&uaid) = uaids.first() else {
        return Err(HttpError::UaidNotAuthenticated(request.uaid));
    };
    let (uaid_s, appid_s) = (request.uaid.as_str(), request.appid.as_str());
    let failed = |e| RegistrationReply::new(uaid_s, appid_s, Err(e));
    let reply = match Appid::parse(appid_s) {
        Err(_) => failed(EntryError::InvalidAppid),
        Ok(appid) if register => {
            let checked = register_kick(request.kick.as_ref(), state.config.limits.max_kick_bytes)
                .and_then(|kick| Ok((kick, watch::check(state, request.watch.as_ref())?)));
            match checked {
                Err(e) => failed(e),
                Ok((mut kick, watch)) => {
                    // The drivers' verdict (status, slug, message), as on the WebSocket.
                    let canonical = match request.kick.as_ref().filter(|_| !kick.is_empty()) {
                        Some(value) => wake::canonical(&state.delivery, value).await.map(Some),
                        None => Ok(None),
                    };
                    match canonical {
                        Err(e) => RegistrationReply::kick_refused(uaid_s, appid_s, &e),
                        Ok(target) => {
                            if let Some(target) = target {
                                kick = target;
                            }
                            let change = match &request.kick {
                                Some(serde_json::Value::Null) => KickChange::Clear,
                                _ if !kick.is_empty() => KickChange::Set(&kick),
                                _ => KickChange::Keep,
                            };
                            register_uaid(state, (uaid, uaid_s), (appid, appid_s), change, &watch)
                                .await
                                .map_err(unavailable(state))?
                        }
                    }
                }
            }
        }
        Ok(appid) => unregister_uaid(state, (uaid, uaid_s), (appid, appid_s))
            .await
            .map_err(unavailable(state))?,
    };
    Ok(reply_response(register, reply))
}

/// A register or unregister reply as an HTTP answer, serialised here: its `status` is the HTTP
/// status, and a `retry_after` (a relay whose upstream is unreachable) is also `Retry-After`.
fn reply_response(register: bool, reply: RegistrationReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK);
    let retry_after = reply.retry_after;
    let message = if register {
        ServerMessage::Register(reply)
    } else {
        ServerMessage::Unregister(reply)
    };
    let mut response = json(status, message.frame());
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
