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
    let path = scratch_file(file);
    let Ok(config) = Config::load(Some(&path), vars, &Flags::default()) else {
        return;
    };
    let _ = config.public_url();
    let text = toml::to_string_pretty(&config).expect("a loaded config prints");
    let again = scratch_file(text.as_bytes());
    let reloaded = Config::load(Some(&again), Vec::new(), &Flags::default())
        .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{text}"));
    assert_eq!(reloaded, config);
    let mut redacted = config;
    redacted.redact_secrets();
    let _ = toml::to_string_pretty(&redacted).expect("a redacted config prints");
}

/// A per-thread file holding `bytes` (Config::load reads a path).
fn scratch_file(bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("editiond-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let path = dir.join(format!("{:?}.toml", std::thread::current().id()).replace(['(', ')'], ""));
    let mut f = std::fs::File::create(&path).expect("create scratch file");
    f.write_all(bytes).expect("write scratch file");
    path
}
