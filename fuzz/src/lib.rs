//! Fuzz targets: one function per parser that reads outside input, each asserting what must
//! hold for any input (no panic, errors that stay small and well-formed, round trips).
//!
//! The same functions are driven two ways: by libFuzzer (`fuzz_targets/*.rs`, nightly, long
//! runs) and by `tests/it/fuzz_smoke.rs` (stable, seconds, in CI), which includes this file with
//! `#[path]` so the two can never drift apart. Only `editiond`, `axum` (for `HeaderMap`),
//! `serde_json` and `toml` are used here, because the smoke test has exactly those.

use std::io::Write as _;

use axum::http::{HeaderMap, HeaderValue};
use editiond::config::{Config, Flags};
use editiond::ids::TokenId;
use editiond::ids::{Appid, Uaid};
use editiond::keys::Keys;
use editiond::push::proto::{self, ClientMessage, Credential};

/// A fuzz target: panics when an input breaks what it checks.
pub type Target = fn(&[u8]);

/// Every target, by name, for the smoke test and for replaying kept inputs.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_frame", client_frame),
    ("put_request", put_request),
    ("endpoint_token", endpoint_token),
    ("poll_ack_body", poll_ack_body),
    ("config_load", config_load),
    ("kick_object", kick_object),
    ("server_frame", server_frame),
    ("storage_body", storage_body),
    ("storage_query", storage_query),
    ("hawk_header", hawk_header),
    ("sync_token", sync_token),
];

/// An error frame's message is cut to 256 bytes of text (`proto::WsError::frame`).
const MAX_ERROR_MESSAGE: usize = 256;
/// JSON escaping can make each byte of the message six (`\u001f`); the rest is short fields.
/// (The first long run found a 514-byte frame of backslashes: a bound of 512 was wrong.)
const MAX_ERROR_FRAME: usize = 6 * MAX_ERROR_MESSAGE + 128;

/// A UAID or APPID that parses has exactly one spelling: the one it was parsed from.
fn check_id(s: &str) {
    if let Ok(u) = Uaid::parse(s) {
        assert_eq!(u.to_string(), s, "a UAID has one spelling");
    }
    if let Ok(a) = Appid::parse(s) {
        assert_eq!(a.to_string(), s, "an APPID has one spelling");
    }
}

fn check_credentials(entries: &[Credential]) {
    for c in entries {
        if let Some(u) = &c.uaid {
            check_id(u);
        }
    }
    let added = proto::uaids_added(entries, |_| false);
    assert!(
        added <= entries.len(),
        "{added} added from {} entries",
        entries.len()
    );
    // Holding everything adds only the entries that ask for a new UAID.
    let new = entries.iter().filter(|c| c.uaid.is_none()).count();
    let invalid = entries
        .iter()
        .filter_map(|c| c.uaid.as_deref())
        .filter(|u| Uaid::parse(u).is_err())
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert_eq!(proto::uaids_added(entries, |_| true), new + invalid);
}

/// A WebSocket text frame from a client (`proto::parse_client`, then the checks the session
/// makes on what it parsed).
pub fn client_frame(data: &[u8]) {
    // tungstenite rejects a text frame that is not UTF-8 before the parser sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match proto::parse_client(text) {
        Ok(message) => match message {
            ClientMessage::Hello { uaids, kick, .. } => {
                check_credentials(&uaids);
                let _ = editiond::push::session::validate_kick(kick.as_ref(), 2048);
            }
            ClientMessage::Claim { uaids } => check_credentials(&uaids),
            ClientMessage::Release { uaids } | ClientMessage::Ack { uaids } => {
                uaids.iter().for_each(|u| check_id(u))
            }
            ClientMessage::Register {
                uaid, appid, kick, ..
            } => {
                check_id(&uaid);
                check_id(&appid);
                if let Ok(bytes) = editiond::push::session::validate_kick(kick.as_ref(), 2048) {
                    assert!(bytes.len() <= 2048);
                    if !bytes.is_empty() {
                        let v: serde_json::Value =
                            serde_json::from_slice(&bytes).expect("a stored kick is JSON");
                        assert!(v.is_object());
                    }
                }
            }
            ClientMessage::Unregister { uaid, appid } => {
                check_id(&uaid);
                check_id(&appid);
            }
            ClientMessage::Ping {} => {}
        },
        Err(e) => {
            let frame = e.frame();
            assert!(
                frame.len() <= MAX_ERROR_FRAME,
                "error frame of {} bytes",
                frame.len()
            );
            let v: serde_json::Value = serde_json::from_str(&frame).expect("an error frame is JSON");
            assert_eq!(v["type"], "error");
            let message = v["message"].as_str().expect("a message");
            assert!(
                message.len() <= MAX_ERROR_MESSAGE,
                "message of {} bytes",
                message.len()
            );
            assert_eq!(v["status"], e.status());
            assert!((400..600).contains(&e.status()));
            assert!((1000..5000).contains(&e.close_code()));
        }
    }
}

/// A PUT's body (`endpoint::parse_version`) and its `TTL` header (`endpoint::parse_ttl`).
/// Input: two bytes (the default and maximum TTL), then a `TTL` header value and `\n` (no
/// `\n`: no header), then the body.
pub fn put_request(data: &[u8]) {
    let (bounds, rest) = data.split_at(data.len().min(2));
    let cut = rest.iter().position(|&b| b == b'\n');
    let (header, body) = match cut {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    if let Err(e) = editiond::push::endpoint::parse_version(body) {
        let status = axum::response::IntoResponse::into_response(e).status();
        assert_eq!(status, 400);
    }
    // Round trips: every u64 reads back in both body forms.
    let mut eight = [0u8; 8];
    for (d, s) in eight.iter_mut().zip(body) {
        *d = *s;
    }
    let v = u64::from_le_bytes(eight);
    let parse = editiond::push::endpoint::parse_version;
    assert_eq!(parse(format!("version={v}").as_bytes()).ok(), Some(Some(v)));
    assert_eq!(
        parse(format!("{{\"version\":{v}}}").as_bytes()).ok(),
        Some(Some(v))
    );

    let [default, max] = bounds else {
        return;
    };
    let mut headers = HeaderMap::new();
    if cut.is_some() {
        match HeaderValue::from_bytes(header) {
            Ok(value) => headers.insert("ttl", value),
            Err(_) => return,
        };
    }
    let (default, max) = (u64::from(*default), u64::from(*max));
    if let Ok(ttl) = editiond::push::endpoint::parse_ttl(&headers, default, max) {
        assert!(
            ttl.as_secs() >= 1 && ttl.as_secs() <= max.max(1),
            "{ttl:?} outside [1, {max}]"
        );
    } else {
        assert!(cut.is_some(), "a missing TTL header takes the default");
    }
}

fn fuzz_keys() -> Keys {
    Keys::from_bytes(&[7; 32], &[9; 32])
}

/// An endpoint token from a PUT's path (`Keys::open_token`): only what was sealed opens, and
/// only in the one spelling it was sealed in; any changed character is refused.
pub fn endpoint_token(data: &[u8]) {
    let keys = fuzz_keys();
    if let Ok(segment) = std::str::from_utf8(data) {
        if let Some(id) = keys.open_token(segment) {
            assert_eq!(keys.seal_token(&id), segment, "an opened token has one spelling");
        }
    }
    // Seal an id from the input, then change one character: it must no longer open.
    let mut raw = [0u8; 16];
    for (d, s) in raw.iter_mut().zip(data) {
        *d = *s;
    }
    let id = TokenId(raw);
    let sealed = keys.seal_token(&id);
    assert_eq!(keys.open_token(&sealed), Some(id));
    if let [.., pos, ch] = data {
        let pos = usize::from(*pos) % sealed.len();
        let mut bytes = sealed.clone().into_bytes();
        bytes[pos] = *ch;
        if let Ok(changed) = String::from_utf8(bytes) {
            if changed != sealed {
                assert_eq!(keys.open_token(&changed), None, "{changed} opened");
            }
        }
    }
    // A different key never opens it.
    let other = Keys::from_bytes(&[8; 32], &[9; 32]);
    assert_eq!(other.open_token(&sealed), None);
}

/// `POST /v1/poll` and `POST /v1/ack` bodies, with the checks the handlers make on them.
pub fn poll_ack_body(data: &[u8]) {
    use editiond::push::poll::{parse_json, AckBody, PollBody};
    if let Ok(poll) = parse_json::<PollBody>(data) {
        check_credentials(&poll.uaids);
    }
    match parse_json::<AckBody>(data) {
        Ok(ack) => {
            check_credentials(&ack.uaids);
            for (uaid, apps) in &ack.updates {
                check_id(uaid);
                apps.keys().for_each(|a| check_id(a));
            }
        }
        Err(e) => {
            let status = axum::response::IntoResponse::into_response(e).status();
            assert_eq!(status, 400);
        }
    }
}

/// The configuration: input up to the first NUL is `config.toml`, the rest is environment
/// lines `NAME=VALUE`. Whatever loads must print (as `editiond config` does) and load back
/// to the same configuration.
pub fn config_load(data: &[u8]) {
    let (file, env) = data.split_at(data.iter().position(|&b| b == 0).unwrap_or(data.len()));
    let vars: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                format!("EDITIOND_{}", k.trim_start_matches("EDITIOND_")),
                v.to_owned(),
            )
        })
        .collect();
    let path = Scratch::write(file);
    let Ok(config) = Config::load(Some(&path.0), vars, &Flags::default()) else {
        return;
    };
    let _ = config.public_url();
    let text = toml::to_string_pretty(&config).expect("a loaded config prints");
    let again = Scratch::write(text.as_bytes());
    let reloaded = Config::load(Some(&again.0), Vec::new(), &Flags::default())
        .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{text}"));
    assert_eq!(reloaded, config);
    let mut redacted = config;
    redacted.redact_secrets();
    let _ = toml::to_string_pretty(&redacted).expect("a redacted config prints");
}

/// A per-thread file holding some bytes (Config::load reads a path), removed when dropped, and
/// its per-process directory with the last one, so runs leave nothing in the temp dir.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn write(bytes: &[u8]) -> Scratch {
        let dir = std::env::temp_dir().join(format!("editiond-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let name = format!("{:?}.toml", std::thread::current().id()).replace(['(', ')'], "");
        let scratch = Scratch(dir.join(name));
        let mut f = std::fs::File::create(&scratch.0).expect("create scratch file");
        f.write_all(bytes).expect("write scratch file");
        scratch
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        // Fails while another thread's file is still there; the last one out removes it.
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

// ---- KICK objects and the SSRF guard ----

/// Polls a future that must finish without waiting: the kick validations the harness runs
/// never resolve a name (that needs DNS and a runtime), so they are ready on the first poll.
fn ready<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a kick validation waited (it tried to resolve a name)"),
    }
}

const KICK_ALLOW: &[&str] = &["10.1.0.0/16", "2001:db8:1::/48", "203.0.113.7"];

/// The three built-in drivers, enabled, with `KICK_ALLOW` as each one's allow list.
fn kick_drivers() -> &'static editiond::kick::Drivers {
    use editiond::kick::{Drivers, KickConfig, KickKeys};
    static DRIVERS: std::sync::OnceLock<Drivers> = std::sync::OnceLock::new();
    DRIVERS.get_or_init(|| {
        let allow: Vec<String> = KICK_ALLOW.iter().map(|s| s.to_string()).collect();
        let mut config = KickConfig::default();
        config.webhook.enabled = true;
        config.webhook.allow = allow.clone();
        config.udp.enabled = true;
        config.udp.allow = allow.clone();
        config.webpush.enabled = true;
        config.webpush.allow = allow;
        let stored = KickKeys::generate_text().expect("kick keys");
        let keys = KickKeys::resolve(&config, &stored, "fuzz").expect("kick keys resolve");
        Drivers::from_config(&config, &keys).expect("drivers build")
    })
}

/// The URL a kick object names, when its driver would resolve it (not an IP literal): such
/// objects are not validated here (no network), only their URL parsed.
fn kick_needs_dns(kick: &serde_json::Value) -> bool {
    use editiond::kick::guard;
    let url = match kick.get("driver").and_then(|d| d.as_str()) {
        Some("webhook") => kick.get("url"),
        Some("webpush") => kick.get("subscription").and_then(|s| s.get("endpoint")),
        _ => None,
    };
    match url.and_then(|u| u.as_str()).map(guard::parse_url) {
        Some(Ok(url)) => guard::literal_ip(&url).is_none(),
        _ => false,
    }
}

/// A client's `kick` object (`Drivers::validate`, as hello and register run it) and the SSRF
/// guard's pure parts. Input: the object's JSON text; its first 16 bytes also make an address.
pub fn kick_object(data: &[u8]) {
    use editiond::kick::guard::{self, Allow, Verdict};
    use editiond::kick::{KickError, Target};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    // Addresses: every encoding of an IPv4 address inside IPv6 gets the IPv4 verdict, and
    // whatever the standard library calls non-global is refused.
    let mut raw = [0u8; 16];
    for (d, s) in raw.iter_mut().zip(data) {
        *d = *s;
    }
    let v6 = Ipv6Addr::from(raw);
    let v4 = Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]);
    let [a, b, c, d] = v4.octets();
    let forms = [
        v4.to_ipv6_mapped(),
        v4.to_ipv6_compatible(),
        Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ),
        Ipv6Addr::new(
            0x2002,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
            0,
            0,
            0,
            0,
            1,
        ),
    ];
    let refused4 = guard::special(IpAddr::V4(v4)).is_some();
    for form in forms {
        assert_eq!(
            guard::special(IpAddr::V6(form)).is_some(),
            refused4,
            "{form} and {v4} get different verdicts"
        );
    }
    if v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_multicast()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_unspecified()
    {
        assert!(refused4, "{v4} is not public");
    }
    let s0 = v6.segments()[0];
    if v6.is_loopback()
        || v6.is_multicast()
        || v6.is_unspecified()
        || (s0 & 0xfe00) == 0xfc00
        || (s0 & 0xffc0) == 0xfe80
    {
        assert!(guard::special(IpAddr::V6(v6)).is_some(), "{v6} is not public");
    }
    let allow =
        Allow::parse(&KICK_ALLOW.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("allow list");
    for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
        let verdict = guard::verdict(ip, &allow);
        for https in [false, true] {
            let ok = guard::check_addrs(&[ip], https, &allow).is_ok();
            let expected = verdict == Verdict::Allowed || (https && verdict == Verdict::Public);
            assert_eq!(ok, expected, "{ip} https={https}: {verdict:?}");
        }
    }
    assert_eq!(
        allow.contains(IpAddr::V4(v4)),
        allow.contains(IpAddr::V6(v4.to_ipv6_mapped()))
    );

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(url) = guard::parse_url(text) {
        assert!(matches!(url.scheme(), "http" | "https"));
        assert!(url.host_str().is_some_and(|h| !h.is_empty()));
        assert!(url.username().is_empty() && url.password().is_none());
    }
    let Ok(kick) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    if kick_needs_dns(&kick) {
        return;
    }
    let drivers = kick_drivers();
    match ready(drivers.validate(&kick)) {
        Ok(target) => {
            let stored: serde_json::Value = serde_json::from_str(target.json()).expect("a target is JSON");
            assert_eq!(stored["driver"].as_str(), Some(target.driver()));
            assert_eq!(
                Target::from_stored(target.json().as_bytes()),
                Some(target.clone())
            );
            // The canonical form is a fixed point: validating it again gives the same target.
            assert!(!kick_needs_dns(&stored), "a validated target names a host");
            let again = ready(drivers.validate(&stored))
                .unwrap_or_else(|e| panic!("{} does not validate again: {e}", target.json()));
            assert_eq!(again.json(), target.json());
            // What it will be sent to passed the guard.
            let addr = match target.driver() {
                "udp" => stored["addr"]
                    .as_str()
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .map(|s| (s.ip(), false)),
                "webhook" => stored["url"]
                    .as_str()
                    .and_then(|u| guard::parse_url(u).ok())
                    .and_then(|u| guard::literal_ip(&u).map(|ip| (ip, u.scheme() == "https"))),
                "webpush" => stored["subscription"]["endpoint"]
                    .as_str()
                    .and_then(|u| guard::parse_url(u).ok())
                    .and_then(|u| guard::literal_ip(&u).map(|ip| (ip, u.scheme() == "https"))),
                other => panic!("unknown driver {other}"),
            };
            let (ip, https) = addr.expect("a target names an address");
            match guard::verdict(ip, &allow) {
                Verdict::Allowed => {}
                Verdict::Public => assert!(https, "plain http to a public {ip}"),
                Verdict::Refused(kind) => panic!("a {kind} address {ip} was accepted"),
            }
        }
        Err(e) => {
            let message = e.message();
            assert!(
                message.len() <= MAX_ERROR_MESSAGE,
                "message of {} bytes",
                message.len()
            );
            assert!(matches!(
                (&e, e.status()),
                (KickError::Invalid(_) | KickError::Unsupported(_), 400) | (KickError::Refused(_), 403)
            ));
            let frame = proto::WsError::Kick(e).frame();
            assert!(
                frame.len() <= MAX_ERROR_FRAME,
                "error frame of {} bytes",
                frame.len()
            );
        }
    }
}

// ---- server frames, as a relay parses them ----

/// A server frame (`ServerMessage::parse`, what a relay reads): whatever parses writes back
/// (`ServerMessage::frame`) as text that parses to the same message and writes the same again.
pub fn server_frame(data: &[u8]) {
    use editiond::push::proto::ServerMessage;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(message) = ServerMessage::parse(text) else {
        return;
    };
    let frame = message.frame();
    let again = ServerMessage::parse(&frame).unwrap_or_else(|e| panic!("{frame}: {e}"));
    assert_eq!(again, message, "{frame}");
    assert_eq!(again.frame(), frame);
    let v: serde_json::Value = serde_json::from_str(&frame).expect("a frame is JSON");
    assert!(v["type"].is_string());
}

// ---- the Sync storage API ----

fn storage_config() -> editiond::storage::StorageConfig {
    editiond::storage::StorageConfig {
        master_secret: "fuzz-master-secret".into(),
        max_post_records: 5,
        max_post_bytes: 64,
        max_record_payload_bytes: 32,
        max_total_records: 8,
        max_total_bytes: 100,
        max_ids: 4,
        max_ttl_secs: 1000,
        ..Default::default()
    }
}

const STORAGE_NODE: &str = "https://sync.example";

fn storage() -> std::sync::Arc<editiond::storage::Storage> {
    use editiond::storage::store::MemoryStorage;
    editiond::storage::Storage::new(
        storage_config(),
        STORAGE_NODE,
        std::sync::Arc::new(MemoryStorage::memory()),
    )
}

fn request_parts(uri: &str, headers: &[(&str, &[u8])]) -> Option<axum::http::request::Parts> {
    let mut builder = axum::http::Request::builder().uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, HeaderValue::from_bytes(value).ok()?);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

fn check_storage_error(e: &editiond::storage::error::StorageError, allowed: &[u16]) {
    let status = e.status().as_u16();
    assert!(allowed.contains(&status), "status {status}: {e}");
    // The body is the Sync error code alone.
    assert!(e.weave_code() <= 20, "{e}");
}

/// A `POST`/`PUT` body of the storage API (`body_values`, `sort_records`, `post_body`,
/// `bso::parse_record`). Input: a byte choosing the content type, a byte choosing list or
/// single record, collection and what an open batch holds, then the body.
pub fn storage_body(data: &[u8]) {
    use editiond::storage::bso::{self, RecordLimits};
    use editiond::storage::handlers;
    const TYPES: &[Option<&str>] = &[
        Some("application/json"),
        Some("application/newlines"),
        Some("text/plain"),
        Some("application/json; charset=utf-8"),
        Some("Application/Newlines ;x=1"),
        Some("text/html"),
        None,
    ];
    let [kind, flags, body @ ..] = data else {
        return;
    };
    let content_type = TYPES[usize::from(*kind) % TYPES.len()];
    let list = flags & 1 == 0;
    let collection = if flags & 2 == 0 { "bookmarks" } else { "crypto" };
    let in_batch = (u64::from(flags >> 2 & 7), u64::from(flags >> 5) * 20);
    let headers: Vec<(&str, &[u8])> = content_type
        .map(|t| ("content-type", t.as_bytes()))
        .into_iter()
        .collect();
    let Some(parts) = request_parts("/1/storage/bookmarks", &headers) else {
        return;
    };
    let values = match handlers::body_values(&parts, body, list) {
        Ok(values) => values,
        Err(e) => return check_storage_error(&e, &[400, 415]),
    };
    if !list {
        assert!(values.len() == 1 && values[0].is_object());
    }
    let config = storage_config();
    let limits = RecordLimits {
        max_payload_bytes: config.max_record_payload_bytes,
        max_ttl_secs: config.max_ttl_secs,
    };
    // Every record that validates serialises back to itself.
    for value in &values {
        if let Ok(record) = bso::parse_record(value, limits) {
            let back = serde_json::to_value(&record).expect("a record serialises");
            assert_eq!(bso::parse_record(&back, limits), Ok(record));
        }
    }
    let storage = storage();
    let sorted = match handlers::sort_records(&storage, collection, values, in_batch) {
        Ok(sorted) => sorted,
        Err(e) => return check_storage_error(&e, &[400]),
    };
    let (records, bytes) = (
        sorted.accepted.len(),
        sorted.accepted.iter().map(|r| r.payload_len()).sum::<usize>(),
    );
    assert!(records <= config.max_post_records);
    assert!(bytes <= config.max_post_bytes);
    if records > 0 {
        assert!(in_batch.0 + records as u64 <= config.max_total_records as u64);
        assert!(in_batch.1 + bytes as u64 <= config.max_total_bytes as u64);
    }
    for record in &sorted.accepted {
        assert!(record.id.as_deref().is_some_and(bso::valid_id));
        assert!(record.payload_len() <= config.max_record_payload_bytes);
    }
    let answer = handlers::post_body(Some(1_234_560), Some("0123456789abcdef"), &sorted);
    let v: serde_json::Value = serde_json::from_str(&answer).expect("a POST answer is JSON");
    let success = v["success"].as_array().expect("success");
    let unique: std::collections::HashSet<_> = success.iter().collect();
    assert_eq!(unique.len(), success.len(), "an id succeeds once");
    assert!(v["failed"].is_object());
    assert_eq!(v["modified"].as_f64(), Some(1234.56));
}

/// Query strings and headers of storage reads (`query`, `ts_param`, `ids_param`, offsets,
/// `accept`, `bso::parse_ts`). Input: the query string, then a line with an `Accept` value.
pub fn storage_query(data: &[u8]) {
    use editiond::storage::bso;
    use editiond::storage::handlers::{self, Offset};
    let (query, accept) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    // Timestamps: whatever parses is in range, and Sync's text form reads back to the same
    // time (at its 10 ms resolution).
    if let Ok(text) = std::str::from_utf8(query) {
        if let Some(ms) = bso::parse_ts(text) {
            assert!(ms <= 10_000_000_000_000_000, "{text} → {ms}");
            if ms < 100_000_000_000_000 {
                assert_eq!(bso::parse_ts(&bso::format_ts(ms)), Some(ms - ms % 10), "{ms}");
            }
        }
        if let Some(offset) = Offset::decode(text) {
            assert_eq!(Offset::decode(&offset.encode()), Some(offset));
        }
    }
    let mut eight = [0u8; 16];
    for (d, s) in eight.iter_mut().zip(data) {
        *d = *s;
    }
    let made = Offset {
        bound: u64::from_le_bytes(eight[..8].try_into().expect("8 bytes")),
        key: i64::from_le_bytes(eight[8..].try_into().expect("8 bytes")),
        id: String::from_utf8_lossy(data.get(16..).unwrap_or_default()).into_owned(),
    };
    assert_eq!(Offset::decode(&made.encode()), Some(made));

    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    if let Some(accept) = accept {
        headers.push(("accept", accept));
    }
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let Some(parts) = request_parts(&format!("/1/storage/bookmarks?{query}"), &headers) else {
        return;
    };
    if let Err(e) = handlers::accept(&parts.headers) {
        check_storage_error(&e, &[406]);
    }
    let q = match handlers::query(&parts) {
        Ok(q) => q,
        Err(e) => return check_storage_error(&e, &[400]),
    };
    for name in ["newer", "older"] {
        match handlers::ts_param(&q, name) {
            Ok(Some(ms)) => assert!(ms <= 10_000_000_000_000_000),
            Ok(None) => assert!(!q.contains_key(name)),
            Err(e) => check_storage_error(&e, &[400]),
        }
    }
    let storage = storage();
    match handlers::ids_param(&storage, &q) {
        Ok(Some(ids)) => {
            assert!(ids.len() <= storage.config.max_ids);
            assert!(ids
                .iter()
                .all(|id| !id.is_empty() && id.trim() == id && !id.contains(',')));
        }
        Ok(None) => assert!(!q.contains_key("ids")),
        Err(e) => check_storage_error(&e, &[400]),
    }
    if let Some(offset) = q.get("offset").and_then(|o| Offset::decode(o)) {
        assert_eq!(Offset::decode(&offset.encode()), Some(offset));
    }
}

/// Prints a Hawk header's attributes back in the header syntax.
fn hawk_text(h: &editiond::storage::hawk::HawkHeader) -> String {
    let mut s = format!("Hawk id=\"{}\", ts=\"{}\", nonce=\"{}\"", h.id, h.ts, h.nonce);
    for (name, value) in [
        ("hash", &h.hash),
        ("ext", &h.ext),
        ("app", &h.app),
        ("dlg", &h.dlg),
    ] {
        if let Some(value) = value {
            s.push_str(&format!(", {name}=\"{value}\""));
        }
    }
    s.push_str(&format!(", mac=\"{}\"", h.mac));
    s
}

/// An attribute value from input: printable ASCII without `"` (what a header can carry).
fn hawk_value(bytes: &[u8]) -> Option<String> {
    bytes
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"')
        .then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// `Authorization: Hawk …` on storage requests (`hawk::parse_header`, `Storage::authenticate`).
/// Input: a header value; also, split at `\n`: nonce, ext, query string, body, and two bytes
/// (position, value) of a change. Any header parses back from its printed form; an arbitrary
/// header never authenticates; a correctly signed request does, once; the same request with
/// any attribute changed, or another body under a payload hash, does not.
pub fn hawk_header(data: &[u8]) {
    use editiond::storage::hawk::{self, HawkHeader, Signed};
    let text = String::from_utf8_lossy(data);
    if let Ok(h) = hawk::parse_header(&text) {
        assert!(!h.id.is_empty() && !h.nonce.is_empty() && !h.mac.is_empty());
        assert_eq!(hawk::parse_header(&hawk_text(&h)), Ok(h));
    }
    let storage = storage();
    let uid = 42;
    let (token, key) = storage.mint(uid, 300).expect("mint");
    let host = "sync.example";
    let arbitrary = request_parts(
        "/42/storage/bookmarks",
        &[("authorization", data), ("host", host.as_bytes())],
    );
    if let Some(parts) = arbitrary {
        match storage.authenticate(&parts, b"", uid, false) {
            Ok(_) => panic!("an arbitrary header authenticated"),
            Err(e) => check_storage_error(&e, &[401]),
        }
    }

    let mut fields = data.split(|&b| b == b'\n');
    let (Some(nonce), Some(ext), Some(query), Some(body)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return;
    };
    let change = fields.next().unwrap_or_default();
    let (Some(nonce), Some(ext), Some(query)) = (hawk_value(nonce), hawk_value(ext), hawk_value(query))
    else {
        return;
    };
    if nonce.is_empty() || query.contains(['#', ' ']) {
        return;
    }
    let path = format!("/42/storage/bookmarks?{query}");
    let content_type = "application/json";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut header = HawkHeader {
        id: token,
        ts: now,
        nonce,
        mac: String::new(),
        hash: (!body.is_empty()).then(|| hawk::payload_hash(content_type, body)),
        ext: (!ext.is_empty()).then_some(ext),
        app: None,
        dlg: None,
    };
    let resource = format!("{}{path}", editiond::storage::handlers::PREFIX);
    let signed = Signed {
        method: "POST",
        resource: &resource,
        host,
        port: 443,
    };
    header.mac = hawk::mac(key.as_bytes(), &header, &signed);
    let good = hawk_text(&header);
    let attempt = |authorization: &[u8], body: &[u8]| {
        let parts = request_parts(
            &path,
            &[
                ("authorization", authorization),
                ("host", host.as_bytes()),
                ("content-type", content_type.as_bytes()),
            ],
        )?;
        let mut parts = parts;
        parts.method = axum::http::Method::POST;
        Some(storage.authenticate(&parts, body, uid, false))
    };
    // One changed byte: refused unless the header still says exactly the same (and then it
    // used the nonce).
    let mut nonce_used = false;
    if let [pos, value] = change {
        let mut changed = good.clone().into_bytes();
        let at = usize::from(*pos) * changed.len() / 256;
        changed[at] = *value;
        if changed != good.as_bytes() {
            if let Some(Ok(_)) = attempt(&changed, body) {
                let same = std::str::from_utf8(&changed)
                    .ok()
                    .and_then(|c| hawk::parse_header(c).ok());
                assert_eq!(
                    same.as_ref(),
                    Some(&header),
                    "{} authenticated",
                    String::from_utf8_lossy(&changed)
                );
                nonce_used = true;
            }
        }
        if header.hash.is_some() {
            let mut other = body.to_vec();
            other[at % body.len()] ^= value | 1;
            if let Some(result) = attempt(good.as_bytes(), &other) {
                assert!(result.is_err(), "another body passed the payload hash");
            }
        }
    }
    let Some(result) = attempt(good.as_bytes(), body) else {
        return;
    };
    if nonce_used {
        assert!(result.is_err(), "a replay was not refused");
        return;
    }
    let found = result.unwrap_or_else(|e| panic!("a signed request was refused: {e}"));
    assert_eq!(found, uid);
    match attempt(good.as_bytes(), body) {
        Some(Err(e)) => check_storage_error(&e, &[401]),
        other => panic!("a replay was not refused: {other:?}"),
    }
}

/// Tokenserver tokens (`token::Secrets::parse`): arbitrary text never verifies; a minted
/// token verifies under every secret list that holds its secret, with its data, and with any
/// one character changed it does not (but for white space and padding, the same bytes). Input: text to parse; its bytes also pick the uid, the
/// node, and the change (position, value).
pub fn sync_token(data: &[u8]) {
    use editiond::storage::token::{Secrets, TokenError};
    let rotated = Secrets::new(&["fuzz-new", "fuzz-old"]);
    let now = 1_700_000_000.0;
    if let Ok(text) = std::str::from_utf8(data) {
        match rotated.parse(text, now) {
            Ok(_) | Err(TokenError::Expired(_)) => panic!("an arbitrary token verified"),
            Err(_) => {}
        }
    }
    let mut eight = [0u8; 8];
    for (d, s) in eight.iter_mut().zip(data) {
        *d = *s;
    }
    let uid = u64::from_le_bytes(eight);
    let node = String::from_utf8_lossy(data.get(8..data.len().saturating_sub(2)).unwrap_or_default());
    let old = Secrets::new(&["fuzz-old"]);
    let (token, key) = old.mint(uid, &node, 300, now).expect("mint");
    let (found, index) = rotated.parse(&token, now).expect("a minted token verifies");
    assert_eq!((found.uid, found.node.as_str(), index), (uid, node.as_ref(), 1));
    assert_eq!(rotated.derived_key(index, &token, &found.salt), key);
    assert!(matches!(rotated.parse(&token, now + 301.0), Err(TokenError::Expired(d)) if d == found));
    assert_eq!(
        Secrets::new(&["fuzz-new"]).parse(&token, now),
        Err(TokenError::Signature)
    );
    if let [.., pos, value] = data {
        let mut changed = token.clone().into_bytes();
        let at = usize::from(*pos) * changed.len() / 256;
        changed[at] = *value;
        if let Ok(changed) = String::from_utf8(changed) {
            if changed != token {
                // Only another spelling of the same bytes verifies: surrounding white space
                // and padding, which clients differ in (its Hawk key, derived from the text,
                // is then another key, which only the server can compute).
                if let Ok((data, _)) = rotated.parse(&changed, now) {
                    assert_eq!(data, found);
                    assert_eq!(
                        changed.trim().trim_end_matches('='),
                        token.trim_end_matches('='),
                        "{token} changed at {at} to {changed} still verifies"
                    );
                }
            }
        }
    }
}
