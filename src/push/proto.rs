//! The WebSocket protocol's messages: parsing client frames and writing server frames.
//!
//! Pure: no sockets, no store. `proto/websocket.md` is the prose contract; the examples there are
//! read by the tests, so a change here goes with a change there.

use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::ids::{Appid, Uaid};

/// One entry of `hello` / `claim` / poll: a UAID and its secret, either of which may be absent.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Credential {
    #[serde(default)]
    pub uaid: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
}

/// A frame from the client.
#[derive(Debug, Deserialize, PartialEq)]
/// Unknown fields are ignored, so that a newer client can talk to an older server.
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Hello {
        uaids: Vec<Credential>,
        #[serde(default)]
        kick: Option<Value>,
        /// Relays only: the node ids this link passes through (the sender and the relays
        /// downstream of it), so a relay can refuse a loop (`proto/relay.md`).
        #[serde(default)]
        via: Option<Vec<String>>,
    },
    Claim {
        uaids: Vec<Credential>,
    },
    Release {
        uaids: Vec<String>,
    },
    Register {
        uaid: String,
        appid: String,
        /// `Some(Value::Null)` for `"kick":null` (removes the stored kick), unlike other fields.
        #[serde(default, deserialize_with = "present")]
        kick: Option<Value>,
        /// Instant sync (proto/storage.md); `Some(Value::Null)` for `"watch":null`, like `kick`.
        #[serde(default, deserialize_with = "present")]
        watch: Option<Value>,
    },
    Unregister {
        uaid: String,
        appid: String,
    },
    Ack {
        uaids: Vec<String>,
    },
    Ping {},
}

/// A field that is present, `null` included (absent is the `default`, `None`).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

const KNOWN_TYPES: &[&str] = &[
    "hello",
    "claim",
    "release",
    "register",
    "unregister",
    "ack",
    "ping",
];

/// Longest human-readable message in an error frame, in bytes.
pub(crate) const MAX_ERROR_MESSAGE: usize = 256;

/// A protocol violation: the server answers with an `error` frame and closes the socket.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WsError {
    #[error("frame is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("frame has no string \"type\"")]
    MissingType,
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("invalid {0} frame: {1}")]
    InvalidFrame(String, String),
    #[error("binary frames are not part of the protocol; send JSON text")]
    BinaryFrame,
    #[error("text frame is not valid UTF-8")]
    InvalidUtf8,
    #[error("WebSocket protocol violation: {0}")]
    ProtocolViolation(String),
    #[error("frame exceeds the limit of {0} bytes")]
    FrameTooLarge(usize),
    #[error("the first frame must be hello")]
    HelloRequired,
    #[error("hello was already sent on this connection")]
    DuplicateHello,
    #[error("\"kick\" must be a JSON object")]
    InvalidKick,
    #[error("\"kick\" exceeds the limit of {0} bytes")]
    KickTooLarge(usize),
    /// hello's `kick` was refused by the KICK drivers (malformed for its driver, a driver not
    /// enabled, a target the SSRF guard refuses): status and slug are the driver layer's.
    #[error("{}", .0.message())]
    Kick(crate::kick::KickError),
    #[error("a frame may carry at most {0} UAIDs")]
    TooManyUaidsInFrame(usize),
    #[error("a connection may speak for at most {0} UAIDs")]
    TooManyUaids(usize),
    #[error("more than {0} frames per second")]
    RateLimited(u32),
    #[error("too many new UAIDs from this address: retry in {0} s")]
    UaidRateLimited(u64),
    #[error("no hello within {0} seconds")]
    HelloTimeout(u64),
    #[error("no frame within {0} seconds")]
    IdleTimeout(u64),
    #[error("every UAID of this connection was claimed by a newer connection")]
    Replaced,
    #[error("the store cannot take the request; reconnect later")]
    StoreUnavailable,
    #[error("the server is shutting down; reconnect later")]
    ShuttingDown,
    #[error("this relay link would close a loop of relays")]
    RelayLoop,
}

impl WsError {
    /// The HTTP-like status in the error frame.
    pub fn status(&self) -> u16 {
        match self {
            WsError::MalformedJson(_)
            | WsError::MissingType
            | WsError::UnknownType(_)
            | WsError::InvalidFrame(..)
            | WsError::InvalidUtf8
            | WsError::ProtocolViolation(_)
            | WsError::InvalidKick => 400,
            WsError::BinaryFrame => 415,
            WsError::FrameTooLarge(_)
            | WsError::KickTooLarge(_)
            | WsError::TooManyUaidsInFrame(_)
            | WsError::TooManyUaids(_) => 413,
            WsError::HelloRequired => 401,
            WsError::DuplicateHello => 409,
            WsError::RateLimited(_) | WsError::UaidRateLimited(_) => 429,
            WsError::HelloTimeout(_) | WsError::IdleTimeout(_) => 408,
            WsError::Replaced => 410,
            WsError::StoreUnavailable | WsError::ShuttingDown => 503,
            WsError::Kick(e) => e.status(),
            WsError::RelayLoop => 508,
        }
    }

    /// The short machine-readable name in the error frame.
    pub fn slug(&self) -> &'static str {
        match self {
            WsError::MalformedJson(_) => "malformed_json",
            WsError::MissingType => "missing_type",
            WsError::UnknownType(_) => "unknown_type",
            WsError::InvalidFrame(..) => "invalid_frame",
            WsError::BinaryFrame => "binary_frame",
            WsError::InvalidUtf8 => "invalid_utf8",
            WsError::ProtocolViolation(_) => "protocol_error",
            WsError::FrameTooLarge(_) => "frame_too_large",
            WsError::HelloRequired => "hello_required",
            WsError::DuplicateHello => "duplicate_hello",
            WsError::InvalidKick => "invalid_kick",
            WsError::KickTooLarge(_) => "kick_too_large",
            WsError::TooManyUaidsInFrame(_) => "too_many_uaids_in_frame",
            WsError::TooManyUaids(_) => "too_many_uaids",
            WsError::RateLimited(_) => "rate_limited",
            WsError::UaidRateLimited(_) => "uaid_rate_limited",
            WsError::HelloTimeout(_) => "hello_timeout",
            WsError::IdleTimeout(_) => "idle_timeout",
            WsError::Replaced => "replaced",
            WsError::StoreUnavailable => "store_unavailable",
            WsError::ShuttingDown => "shutting_down",
            WsError::Kick(e) => e.slug(),
            WsError::RelayLoop => "relay_loop",
        }
    }

    /// The WebSocket close code: standard codes where one fits, else 4000 + the status.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::ProtocolViolation(_) => 1002,
            WsError::BinaryFrame => 1003,
            WsError::InvalidUtf8 => 1007,
            WsError::FrameTooLarge(_) => 1009,
            WsError::StoreUnavailable => 1011,
            WsError::ShuttingDown => 1001,
            other => 4000 + other.status(),
        }
    }

    /// The `error` frame sent before the close. The message may quote the client's input, so it
    /// is cut to keep the frame small whatever the client sent.
    pub fn frame(&self) -> String {
        error_frame(self.status(), self.slug(), &cap_message(self.to_string()))
    }
}

/// Cuts an error message that may quote client input to `MAX_ERROR_MESSAGE` bytes on a character
/// boundary; the ellipsis counts, so the whole message stays within the limit.
pub fn cap_message(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// How many UAIDs `entries` would add to those `held`: a UAID named twice, or held already,
/// counts once or not at all; an entry without a UAID asks for a new one and counts.
pub fn uaids_added(entries: &[Credential], held: impl Fn(&Uaid) -> bool) -> usize {
    let mut named: Vec<&str> = Vec::with_capacity(entries.len());
    let mut added = 0;
    for entry in entries {
        match entry.uaid.as_deref() {
            None => added += 1,
            Some(s) if named.contains(&s) => {}
            Some(s) => {
                if !Uaid::parse(s).is_ok_and(|u| held(&u)) {
                    added += 1;
                }
                named.push(s);
            }
        }
    }
    added
}

/// How many of `entries` may create a UAID (no UAID, or a UAID without a secret), for the
/// per-address limit on new UAIDs; a UAID that turns out to be bound creates none, but counts.
pub fn uaids_requested(entries: &[Credential]) -> usize {
    entries
        .iter()
        .filter(|e| e.uaid.is_none() || e.secret.is_none())
        .count()
}

/// Parses one text frame, telling malformed JSON, a missing or unknown type and bad fields apart.
pub fn parse_client(text: &str) -> Result<ClientMessage, WsError> {
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(msg) => Ok(msg),
        Err(e) if e.is_syntax() || e.is_eof() => Err(WsError::MalformedJson(e.to_string())),
        Err(e) => {
            // A shape error can come before a syntax error later in the text (`{}}`).
            if let Err(syntax) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
                return Err(WsError::MalformedJson(syntax.to_string()));
            }
            #[derive(Deserialize)]
            struct TypeOnly<'a> {
                #[serde(rename = "type", borrow, default)]
                kind: Option<std::borrow::Cow<'a, str>>,
            }
            match serde_json::from_str::<TypeOnly>(text) {
                Ok(TypeOnly { kind: Some(kind) }) if KNOWN_TYPES.contains(&kind.as_ref()) => {
                    Err(WsError::InvalidFrame(kind.into_owned(), e.to_string()))
                }
                Ok(TypeOnly { kind: Some(kind) }) => Err(WsError::UnknownType(kind.into_owned())),
                _ => Err(WsError::MissingType),
            }
        }
    }
}

/// `{"type":"error",...}`.
pub fn error_frame(status: u16, slug: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "status": status, "error": slug, "message": message}).to_string()
}

/// `{"type":"pong"}`.
pub fn pong_frame() -> String {
    r#"{"type":"pong"}"#.to_owned()
}

/// A request or entry that fails alone: its reply carries the status and the socket stays open
/// (unlike [`WsError`]). The REST poll and ack answer with the same statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the UAID is not a UUID4 written as 36 lowercase hex digits and dashes")]
    InvalidUaid,
    #[error("this UAID is bound already; send the secret it was issued")]
    SecretRequired,
    #[error("wrong secret for this UAID")]
    BadSecret,
    #[error("this connection does not speak for the UAID")]
    UaidNotHeld,
    #[error("the APPID is not a UUID4 written as 36 lowercase hex digits and dashes")]
    InvalidAppid,
    #[error("\"kick\" must be a JSON object")]
    InvalidKick,
    #[error("\"kick\" is larger than the configured limit")]
    KickTooLarge,
    #[error("the UAID has no registration for this APPID")]
    NotRegistered,
    #[error("the UAID already has the maximum number of registrations")]
    TooManyRegistrations,
    #[error(
        "\"watch\" must be an object with a string \"token\" and 1 to max_watch_collections collection names"
    )]
    InvalidWatch,
    #[error("the watch token is not a valid, unexpired storage token for this node")]
    BadWatchToken,
    /// A relay cannot reach its upstream for this request; the reply carries `retry_after`.
    #[error("the relay cannot reach its upstream now; retry later")]
    UpstreamUnavailable { retry_after_secs: u64 },
}

impl EntryError {
    pub fn status(&self) -> u16 {
        match self {
            EntryError::InvalidUaid
            | EntryError::InvalidAppid
            | EntryError::InvalidKick
            | EntryError::InvalidWatch => 400,
            EntryError::SecretRequired | EntryError::BadSecret | EntryError::BadWatchToken => 401,
            EntryError::UaidNotHeld => 403,
            EntryError::NotRegistered => 404,
            EntryError::KickTooLarge | EntryError::TooManyRegistrations => 413,
            EntryError::UpstreamUnavailable { .. } => 503,
        }
    }

    pub fn slug(&self) -> &'static str {
        match self {
            EntryError::InvalidUaid => "invalid_uaid",
            EntryError::SecretRequired => "secret_required",
            EntryError::BadSecret => "bad_secret",
            EntryError::UaidNotHeld => "uaid_not_held",
            EntryError::InvalidAppid => "invalid_appid",
            EntryError::InvalidKick => "invalid_kick",
            EntryError::KickTooLarge => "kick_too_large",
            EntryError::NotRegistered => "not_registered",
            EntryError::TooManyRegistrations => "too_many_registrations",
            EntryError::InvalidWatch => "invalid_watch",
            EntryError::BadWatchToken => "bad_watch_token",
            EntryError::UpstreamUnavailable { .. } => "upstream_unavailable",
        }
    }

    /// Seconds before a retry may succeed, for the errors that say so.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            EntryError::UpstreamUnavailable { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// Adds `status`, `error` and `message` to a reply object.
    fn describe(&self, m: &mut serde_json::Map<String, Value>) {
        m.insert("status".into(), self.status().into());
        m.insert("error".into(), self.slug().into());
        m.insert("message".into(), self.to_string().into());
        if let EntryError::UpstreamUnavailable { retry_after_secs } = self {
            m.insert("retry_after".into(), (*retry_after_secs).into());
        }
    }
}

/// One entry of a hello, claim, release or poll reply.
#[derive(Debug, Clone, PartialEq)]
pub struct UaidStatus {
    /// The UAID as sent (or as issued), or `None` when the entry named none.
    pub uaid: Option<String>,
    /// Present only when the server issued the secret just now.
    pub secret: Option<String>,
    pub error: Option<EntryError>,
}

impl UaidStatus {
    pub fn ok(uaid: String, secret: Option<String>) -> UaidStatus {
        UaidStatus {
            uaid: Some(uaid),
            secret,
            error: None,
        }
    }

    pub fn failed(uaid: Option<String>, error: EntryError) -> UaidStatus {
        UaidStatus {
            uaid,
            secret: None,
            error: Some(error),
        }
    }
}

/// The `uaids` array of a hello, claim, release or poll answer.
pub fn uaid_statuses(entries: &[UaidStatus]) -> Value {
    entries
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            m.insert("uaid".into(), e.uaid.clone().map_or(Value::Null, Value::String));
            match e.error {
                Some(error) => error.describe(&mut m),
                None => {
                    m.insert("status".into(), 200.into());
                }
            }
            if let Some(secret) = &e.secret {
                m.insert("secret".into(), secret.clone().into());
            }
            Value::Object(m)
        })
        .collect()
}

/// Pending events of one UAID, as carried by an UPDATE.
pub type UaidEvents = (Uaid, Vec<(Appid, u64)>);

/// Writes `"uaid":{"appid":version,…}`. Hand-written: it is the hot path and its shape is fixed.
fn write_entry(out: &mut String, uaid: &Uaid, events: &[(Appid, u64)]) {
    let _ = write!(out, "\"{uaid}\":{{");
    for (j, (appid, version)) in events.iter().enumerate() {
        if j > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{appid}\":{version}");
    }
    out.push('}');
}

/// Writes `{"uaid":{"appid":version,…},…}`: the `updates` object of a poll answer.
pub fn write_updates(out: &mut String, events: &[UaidEvents]) {
    out.push('{');
    for (i, (uaid, apps)) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_entry(out, uaid, apps);
    }
    out.push('}');
}

const UPDATE_PREFIX: &str = r#"{"type":"update","updates":{"#;

/// Builds UPDATE frames, starting a new frame before one would pass `max_bytes`, so a relay's
/// thousands of UAIDs never make a frame its peer must refuse. One allocation per frame: the
/// UPDATE is the hot path, so it is written here once, not typed and serialised later.
pub struct UpdateBuilder {
    buf: String,
    max_bytes: usize,
}

impl UpdateBuilder {
    pub fn new(max_bytes: usize) -> UpdateBuilder {
        UpdateBuilder {
            buf: String::new(),
            max_bytes,
        }
    }

    /// Adds one UAID's events; returns the finished frame when they start a new one.
    #[must_use]
    pub fn add(&mut self, uaid: Uaid, events: &[(Appid, u64)]) -> Option<String> {
        // Upper bound of the entry's size: quotes, colons, braces and 20-digit versions.
        let entry_max = 41 + events.len() * 61;
        let mut finished = None;
        if !self.buf.is_empty() && self.buf.len() + entry_max + 2 > self.max_bytes {
            finished = self.close_frame();
        }
        if self.buf.is_empty() {
            self.buf.reserve(UPDATE_PREFIX.len() + entry_max + 2);
            self.buf.push_str(UPDATE_PREFIX);
        } else {
            self.buf.push(',');
        }
        write_entry(&mut self.buf, &uaid, events);
        finished
    }

    /// The last frame, if any.
    #[must_use]
    pub fn finish(mut self) -> Option<String> {
        self.close_frame()
    }

    fn close_frame(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        self.buf.push_str("}}");
        Some(std::mem::take(&mut self.buf))
    }
}

/// A frame from the server, typed: what a relay (or any Rust client) parses, and what
/// [`ServerMessage::frame`] writes back as the same JSON the server sent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    Hello(UaidsReply),
    Claim(UaidsReply),
    Release(UaidsReply),
    Register(RegistrationReply),
    Unregister(RegistrationReply),
    /// These UAIDs were claimed by a newer connection.
    Released {
        uaids: Vec<String>,
    },
    /// UAID → APPID → version; the client ACKs each UAID.
    Update {
        updates: BTreeMap<String, BTreeMap<String, u64>>,
    },
    Pong,
    /// A protocol violation; the server closes the socket after it.
    Error {
        status: u16,
        error: String,
        message: String,
    },
}

/// The reply to hello, claim or release.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UaidsReply {
    pub status: u16,
    pub uaids: Vec<StatusEntry>,
    /// A relay's hello reply to a relay: its node id and those upstream of it.
    #[serde(default)]
    pub via: Option<Vec<String>>,
}

/// One entry of a hello, claim, release or poll reply, as on the wire.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusEntry {
    pub uaid: Option<String>,
    pub status: u16,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// With `upstream_unavailable`: seconds before a retry may succeed.
    #[serde(default)]
    pub retry_after: Option<u64>,
}

impl From<&UaidStatus> for StatusEntry {
    fn from(s: &UaidStatus) -> StatusEntry {
        StatusEntry {
            uaid: s.uaid.clone(),
            status: s.error.map_or(200, |e| e.status()),
            secret: s.secret.clone(),
            error: s.error.map(|e| e.slug().to_owned()),
            message: s.error.map(|e| e.to_string()),
            retry_after: s.error.and_then(|e| e.retry_after()),
        }
    }
}

impl UaidsReply {
    /// The reply to hello, claim or release, with a relay's `via` (its node id and those
    /// upstream of it) when given.
    pub fn new(entries: &[UaidStatus], via: Option<Vec<String>>) -> UaidsReply {
        UaidsReply {
            status: 200,
            uaids: entries.iter().map(StatusEntry::from).collect(),
            via,
        }
    }
}

/// The reply to register or unregister.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegistrationReply {
    pub uaid: String,
    pub appid: String,
    pub status: u16,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// With `upstream_unavailable`: seconds before a retry may succeed (also `Retry-After`).
    #[serde(default)]
    pub retry_after: Option<u64>,
}

impl RegistrationReply {
    /// The reply to register (`Ok(Some(endpoint))`) or unregister (`Ok(None)`), or their error.
    pub fn new(uaid: &str, appid: &str, result: Result<Option<&str>, EntryError>) -> RegistrationReply {
        let mut reply = RegistrationReply {
            uaid: uaid.to_owned(),
            appid: appid.to_owned(),
            status: 200,
            endpoint: None,
            error: None,
            message: None,
            retry_after: None,
        };
        match result {
            Ok(endpoint) => reply.endpoint = endpoint.map(str::to_owned),
            Err(e) => {
                reply.status = e.status();
                reply.error = Some(e.slug().to_owned());
                reply.message = Some(e.to_string());
                reply.retry_after = e.retry_after();
            }
        }
        reply
    }

    /// The reply to a register whose `kick` the KICK drivers refused: their status, slug and
    /// message (`proto/kick.md`), the socket staying open.
    pub fn kick_refused(uaid: &str, appid: &str, e: &crate::kick::KickError) -> RegistrationReply {
        RegistrationReply {
            status: e.status(),
            error: Some(e.slug().to_owned()),
            message: Some(e.message()),
            ..RegistrationReply::new(uaid, appid, Ok(None))
        }
    }
}

impl ServerMessage {
    /// Parses one server frame.
    pub fn parse(text: &str) -> Result<ServerMessage, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The frame's text, as the server writes it.
    pub fn frame(&self) -> String {
        match self {
            ServerMessage::Hello(r) => typed_uaids_reply("hello", r),
            ServerMessage::Claim(r) => typed_uaids_reply("claim", r),
            ServerMessage::Release(r) => typed_uaids_reply("release", r),
            ServerMessage::Register(r) => typed_registration_reply("register", r),
            ServerMessage::Unregister(r) => typed_registration_reply("unregister", r),
            ServerMessage::Released { uaids } => {
                serde_json::json!({"type": "released", "uaids": uaids}).to_string()
            }
            ServerMessage::Update { updates } => {
                let mut out = String::from(UPDATE_PREFIX);
                for (i, (uaid, apps)) in updates.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{}:{{", Value::from(uaid.as_str()));
                    for (j, (appid, version)) in apps.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{}:{version}", Value::from(appid.as_str()));
                    }
                    out.push('}');
                }
                out.push_str("}}");
                out
            }
            ServerMessage::Pong => pong_frame(),
            ServerMessage::Error {
                status,
                error,
                message,
            } => error_frame(*status, error, message),
        }
    }
}

/// Adds `status` and, on failure, `error`, `message` and `retry_after` to a reply object.
fn typed_status(
    m: &mut serde_json::Map<String, Value>,
    status: u16,
    error: &Option<String>,
    message: &Option<String>,
    retry_after: Option<u64>,
) {
    m.insert("status".into(), status.into());
    if let Some(error) = error {
        m.insert("error".into(), error.clone().into());
    }
    if let Some(message) = message {
        m.insert("message".into(), message.clone().into());
    }
    if let Some(secs) = retry_after {
        m.insert("retry_after".into(), secs.into());
    }
}

fn typed_uaids_reply(kind: &str, r: &UaidsReply) -> String {
    let entries: Vec<Value> = r
        .uaids
        .iter()
        .map(|e| {
            let mut m = serde_json::Map::new();
            m.insert("uaid".into(), e.uaid.clone().map_or(Value::Null, Value::String));
            typed_status(&mut m, e.status, &e.error, &e.message, e.retry_after);
            if let Some(secret) = &e.secret {
                m.insert("secret".into(), secret.clone().into());
            }
            Value::Object(m)
        })
        .collect();
    let mut reply = serde_json::json!({"type": kind, "status": r.status, "uaids": entries});
    if let Some(via) = &r.via {
        reply["via"] = via.clone().into();
    }
    reply.to_string()
}

fn typed_registration_reply(kind: &str, r: &RegistrationReply) -> String {
    let mut m = serde_json::Map::new();
    m.insert("type".into(), kind.into());
    m.insert("uaid".into(), r.uaid.clone().into());
    m.insert("appid".into(), r.appid.clone().into());
    typed_status(&mut m, r.status, &r.error, &r.message, r.retry_after);
    if let Some(endpoint) = &r.endpoint {
        m.insert("endpoint".into(), endpoint.clone().into());
    }
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_stay_within_256_bytes_ellipsis_included() {
        for quoted in ["z".repeat(2000), "é".repeat(1000), "z€".repeat(500)] {
            let frame: serde_json::Value =
                serde_json::from_str(&WsError::UnknownType(quoted).frame()).unwrap();
            let message = frame["message"].as_str().unwrap();
            assert!(message.len() <= MAX_ERROR_MESSAGE, "{} bytes", message.len());
            assert!(message.ends_with('…'), "{message}");
        }
    }

    /// `{"type":"update","updates":{…}}` in one frame.
    pub fn update_frame(events: &[UaidEvents]) -> String {
        let mut b = UpdateBuilder::new(usize::MAX);
        for (u, e) in events {
            assert_eq!(b.add(*u, e), None);
        }
        b.finish().unwrap_or_default()
    }

    #[test]
    fn classifies_bad_frames() {
        assert!(matches!(parse_client("{"), Err(WsError::MalformedJson(_))));
        assert!(matches!(parse_client("[1]"), Err(WsError::MissingType)));
        assert!(matches!(
            parse_client(r#"{"uaids":[]}"#),
            Err(WsError::MissingType)
        ));
        assert_eq!(
            parse_client(r#"{"type":"bogus"}"#),
            Err(WsError::UnknownType("bogus".into()))
        );
        assert!(matches!(
            parse_client(r#"{"type":"hello","uaids":5}"#),
            Err(WsError::InvalidFrame(k, _)) if k == "hello"
        ));
        assert!(matches!(parse_client("{}}"), Err(WsError::MalformedJson(_))));
        assert!(matches!(
            parse_client(r#"{"type":"bogus"}]"#),
            Err(WsError::MalformedJson(_))
        ));
        assert_eq!(
            parse_client(r#"{"type":"ping","extra":1}"#),
            Ok(ClientMessage::Ping {})
        );
        assert_eq!(parse_client(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping {}));
    }

    #[test]
    fn update_frame_is_valid_json() {
        let u = Uaid::random();
        let a = Appid::random();
        let frame = update_frame(&[(u, vec![(a, 7)])]);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "update");
        assert_eq!(v["updates"][u.to_string()][a.to_string()], 7);
    }

    #[test]
    fn update_builder_splits_at_the_frame_limit() {
        let events: Vec<UaidEvents> = (0..50)
            .map(|_| (Uaid::random(), vec![(Appid::random(), u64::MAX)]))
            .collect();
        let mut b = UpdateBuilder::new(1024);
        let mut out: Vec<String> = events.iter().filter_map(|(u, e)| b.add(*u, e)).collect();
        out.extend(b.finish());
        assert!(out.len() > 1);
        let mut seen = 0;
        for f in &out {
            assert!(f.len() <= 1024, "{}", f.len());
            let v: Value = serde_json::from_str(f).unwrap();
            seen += v["updates"].as_object().unwrap().len();
        }
        assert_eq!(seen, 50);
    }

    #[test]
    fn close_codes_are_distinct_per_kind() {
        assert_eq!(WsError::ProtocolViolation(String::new()).close_code(), 1002);
        assert_eq!(WsError::BinaryFrame.close_code(), 1003);
        assert_eq!(WsError::FrameTooLarge(1).close_code(), 1009);
        assert_eq!(WsError::HelloRequired.close_code(), 4401);
        assert_eq!(WsError::UnknownType(String::new()).close_code(), 4400);
        let refused = WsError::Kick(crate::kick::KickError::Refused("x".into()));
        assert_eq!((refused.status(), refused.slug()), (403, "kick_refused"));
        assert_eq!(refused.close_code(), 4403);
        let off = WsError::Kick(crate::kick::KickError::Unsupported("x".into()));
        assert_eq!((off.slug(), off.close_code()), ("kick_unsupported", 4400));
    }

    /// The frames as the server wrote them before its output was typed, kept to show that the
    /// typed frames are the same bytes.
    mod legacy {
        use super::super::*;

        /// `{"type":"hello"|"claim"|"release","status":200,"uaids":[…]}`.
        pub(super) fn uaids_reply(kind: &str, entries: &[UaidStatus]) -> String {
            uaids_reply_via(kind, entries, None)
        }

        /// [`uaids_reply`], with a relay's `via` (its node id and those upstream of it) when given.
        pub(super) fn uaids_reply_via(kind: &str, entries: &[UaidStatus], via: Option<&[String]>) -> String {
            let mut reply = serde_json::json!({"type": kind, "status": 200, "uaids": uaid_statuses(entries)});
            if let Some(via) = via {
                reply["via"] = via.into();
            }
            reply.to_string()
        }

        /// The reply to register (`Ok(Some(endpoint))`) or unregister (`Ok(None)`), or their error.
        pub(super) fn registration_reply(
            kind: &str,
            uaid: &str,
            appid: &str,
            result: Result<Option<&str>, EntryError>,
        ) -> String {
            let mut m = serde_json::Map::new();
            m.insert("type".into(), kind.into());
            m.insert("uaid".into(), uaid.into());
            m.insert("appid".into(), appid.into());
            match result {
                Ok(endpoint) => {
                    m.insert("status".into(), 200.into());
                    if let Some(endpoint) = endpoint {
                        m.insert("endpoint".into(), endpoint.into());
                    }
                }
                Err(e) => e.describe(&mut m),
            }
            Value::Object(m).to_string()
        }

        /// The reply to a register whose `kick` the KICK drivers refused: their status, slug and message
        /// (`proto/kick.md`), the socket staying open.
        pub(super) fn kick_refused_reply(uaid: &str, appid: &str, e: &crate::kick::KickError) -> String {
            serde_json::json!({
                "type": "register", "uaid": uaid, "appid": appid,
                "status": e.status(), "error": e.slug(), "message": e.message(),
            })
            .to_string()
        }

        /// `{"type":"released","uaids":[…]}`: these UAIDs were claimed by a newer connection.
        pub(super) fn released_frame(uaids: &[Uaid]) -> String {
            let mut s = String::from(r#"{"type":"released","uaids":["#);
            for (i, u) in uaids.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                let _ = write!(s, "\"{u}\"");
            }
            s.push_str("]}");
            s
        }
    }

    /// Every frame the server writes is the same text as before its output was typed, and parses
    /// back as the [`ServerMessage`] that wrote it.
    #[test]
    fn server_frames_are_the_legacy_bytes_and_parse_back() {
        let (u, a) = (Uaid::random(), Appid::random());
        let (us, as_) = (u.to_string(), a.to_string());
        let hello = [
            UaidStatus::ok(us.clone(), Some("s3cret".into())),
            UaidStatus::failed(None, EntryError::InvalidUaid),
            UaidStatus::failed(Some("x".into()), EntryError::BadSecret),
            UaidStatus::failed(
                Some(us.clone()),
                EntryError::UpstreamUnavailable { retry_after_secs: 5 },
            ),
        ];
        let claim = [UaidStatus::ok(us.clone(), None)];
        let release = [UaidStatus::failed(Some(us.clone()), EntryError::UaidNotHeld)];
        let via = vec!["relay-1".to_owned(), "origin".to_owned()];
        let endpoint = Ok(Some("http://h/v1/e/t"));
        let too_many = Err(EntryError::TooManyRegistrations);
        let unavailable = Err(EntryError::UpstreamUnavailable { retry_after_secs: 5 });
        let refused = crate::kick::KickError::Refused("no \"quotes\" here".into());
        let lost = [u, Uaid::random()];
        let cases = [
            (
                ServerMessage::Hello(UaidsReply::new(&hello, None)),
                legacy::uaids_reply("hello", &hello),
            ),
            (
                ServerMessage::Hello(UaidsReply::new(&claim, Some(via.clone()))),
                legacy::uaids_reply_via("hello", &claim, Some(&via)),
            ),
            (
                ServerMessage::Claim(UaidsReply::new(&claim, None)),
                legacy::uaids_reply("claim", &claim),
            ),
            (
                ServerMessage::Release(UaidsReply::new(&release, None)),
                legacy::uaids_reply("release", &release),
            ),
            (
                ServerMessage::Register(RegistrationReply::new(&us, &as_, endpoint)),
                legacy::registration_reply("register", &us, &as_, endpoint),
            ),
            (
                ServerMessage::Register(RegistrationReply::new(&us, &as_, too_many)),
                legacy::registration_reply("register", &us, &as_, too_many),
            ),
            (
                ServerMessage::Register(RegistrationReply::kick_refused(&us, &as_, &refused)),
                legacy::kick_refused_reply(&us, &as_, &refused),
            ),
            (
                ServerMessage::Unregister(RegistrationReply::new(&us, &as_, Ok(None))),
                legacy::registration_reply("unregister", &us, &as_, Ok(None)),
            ),
            (
                ServerMessage::Unregister(RegistrationReply::new(&us, &as_, unavailable)),
                legacy::registration_reply("unregister", &us, &as_, unavailable),
            ),
            (
                ServerMessage::Released {
                    uaids: lost.iter().map(Uaid::to_string).collect(),
                },
                legacy::released_frame(&lost),
            ),
            (ServerMessage::Pong, pong_frame()),
        ];
        for (message, bytes) in cases {
            assert_eq!(message.frame(), bytes);
            assert_eq!(ServerMessage::parse(&bytes).unwrap(), message, "{bytes}");
        }
        // The UPDATE (written once by `UpdateBuilder`) and the error frame (by `WsError`).
        for frame in [
            tests::update_frame(&[
                (u, vec![(a, 7), (Appid::random(), u64::MAX)]),
                (Uaid::random(), vec![(a, 1)]),
            ]),
            WsError::HelloRequired.frame(),
        ] {
            let parsed = ServerMessage::parse(&frame).unwrap_or_else(|e| panic!("{frame}: {e}"));
            let again: Value = serde_json::from_str(&parsed.frame()).unwrap();
            assert_eq!(again, serde_json::from_str::<Value>(&frame).unwrap(), "{frame}");
        }
    }
}
