//! Hawk request authentication (the header scheme, version 1) with HMAC-SHA256: header parsing,
//! the MAC over the normalised request, the payload hash, and a nonce cache against replays.
//!
//! Pure code but for the cache's lock; the caller supplies the time.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The attributes of an `Authorization: Hawk …` header.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HawkHeader {
    pub id: String,
    pub ts: u64,
    pub nonce: String,
    pub mac: String,
    pub hash: Option<String>,
    pub ext: Option<String>,
    pub app: Option<String>,
    pub dlg: Option<String>,
}

/// Parses `Hawk id="…", ts="…", nonce="…", mac="…"[, hash="…"][, ext="…"]`.
pub fn parse_header(value: &str) -> Result<HawkHeader, &'static str> {
    let rest = value
        .strip_prefix("Hawk ")
        .or_else(|| value.strip_prefix("hawk "))
        .ok_or("not a Hawk header")?;
    let mut header = HawkHeader::default();
    let mut ts = None;
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=').ok_or("malformed attribute")?;
        let name = name.trim();
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or("attribute value not quoted")?;
        let (value, after) = after.split_once('"').ok_or("unterminated attribute value")?;
        let value = value.to_owned();
        let slot = match name {
            "id" => &mut header.id,
            "nonce" => &mut header.nonce,
            "mac" => &mut header.mac,
            "ts" => {
                ts = Some(value.parse::<u64>().map_err(|_| "ts is not an integer")?);
                rest = after.trim_start().trim_start_matches(',').trim_start();
                continue;
            }
            "hash" => header.hash.insert(String::new()),
            "ext" => header.ext.insert(String::new()),
            "app" => header.app.insert(String::new()),
            "dlg" => header.dlg.insert(String::new()),
            _ => return Err("unknown attribute"),
        };
        *slot = value;
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    header.ts = ts.ok_or("ts missing")?;
    if header.id.is_empty() || header.nonce.is_empty() || header.mac.is_empty() {
        return Err("id, nonce or mac missing");
    }
    Ok(header)
}

/// What the MAC covers besides the header's own attributes.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub method: &'a str,
    /// Path and query, exactly as sent.
    pub resource: &'a str,
    /// Lowercase host name, without the port.
    pub host: &'a str,
    pub port: u16,
}

fn normalized(header: &HawkHeader, req: &Signed<'_>) -> String {
    let mut s = format!(
        "hawk.1.header\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
        header.ts,
        header.nonce,
        req.method.to_ascii_uppercase(),
        req.resource,
        req.host.to_ascii_lowercase(),
        req.port,
        header.hash.as_deref().unwrap_or(""),
        header.ext.as_deref().unwrap_or(""),
    );
    if let Some(app) = &header.app {
        s.push_str(app);
        s.push('\n');
        s.push_str(header.dlg.as_deref().unwrap_or(""));
        s.push('\n');
    }
    s
}

/// The MAC a client holding `key` computes for `header` on `req` (base64).
pub fn mac(key: &[u8], header: &HawkHeader, req: &Signed<'_>) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(normalized(header, req).as_bytes());
    STANDARD.encode(m.finalize().into_bytes())
}

/// Whether `header.mac` is right for `key`, compared in constant time.
pub fn verify_mac(key: &[u8], header: &HawkHeader, req: &Signed<'_>) -> bool {
    let Ok(given) = STANDARD.decode(&header.mac) else {
        return false;
    };
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(normalized(header, req).as_bytes());
    m.verify_slice(&given).is_ok()
}

/// Hawk's payload hash (base64): the media type is lowercased and stripped of parameters.
pub fn payload_hash(content_type: &str, body: &[u8]) -> String {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut h = Sha256::new();
    h.update(b"hawk.1.payload\n");
    h.update(media.as_bytes());
    h.update(b"\n");
    h.update(body);
    h.update(b"\n");
    STANDARD.encode(h.finalize())
}

/// Nonces seen within the skew window, so a captured request cannot be replayed.
pub struct NonceCache {
    seen: Mutex<Seen>,
    max: usize,
}

struct Seen {
    /// (id, ts, nonce) digest → second after which it may be forgotten.
    until: HashMap<[u8; 32], u64>,
    /// Second of the last pruning: expired entries go at most once a second, so a full cache
    /// costs one pass a second, not one per request.
    pruned: u64,
}

#[derive(Debug, PartialEq)]
pub enum NonceError {
    Replayed,
    Full,
}

impl NonceCache {
    pub fn new(max: usize) -> NonceCache {
        NonceCache {
            seen: Mutex::new(Seen {
                until: HashMap::new(),
                pruned: 0,
            }),
            max,
        }
    }

    /// Records (`id`, `ts`, `nonce`) until `forget_at` (seconds); fails if it was already seen.
    pub fn check(&self, header: &HawkHeader, now: u64, forget_at: u64) -> Result<(), NonceError> {
        let mut h = Sha256::new();
        for part in [header.id.as_bytes(), header.nonce.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(header.ts.to_be_bytes());
        let key: [u8; 32] = h.finalize().into();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.pruned != now {
            seen.pruned = now;
            seen.until.retain(|_, until| *until > now);
        }
        match seen.until.get(&key) {
            Some(until) if *until > now => return Err(NonceError::Replayed),
            _ => {}
        }
        if seen.until.len() >= self.max {
            return Err(NonceError::Full);
        }
        seen.until.insert(key, forget_at);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.lock().map_or(0, |s| s.until.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Hawk specification's README: credentials `dh37fgj492je` /
    /// `werxhqb98rpaxn39848xrunpaw3489ruxnpa98w4rxn`, GET
    /// `/resource/1?b=1&a=2` on example.com:8000, ts 1353832234, nonce `j4h3g2`, ext `some-app-ext-data`.
    #[test]
    fn mac_matches_the_hawk_specification_example() {
        let header = parse_header(
            r#"Hawk id="dh37fgj492je", ts="1353832234", nonce="j4h3g2", ext="some-app-ext-data", mac="6R4rV5iE+NPoym+WwjeHzjAGXUtLNIxmo1vpMofpLAE=""#,
        )
        .unwrap();
        let req = Signed {
            method: "GET",
            resource: "/resource/1?b=1&a=2",
            host: "example.com",
            port: 8000,
        };
        let key = b"werxhqb98rpaxn39848xrunpaw3489ruxnpa98w4rxn";
        assert_eq!(
            mac(key, &header, &req),
            "6R4rV5iE+NPoym+WwjeHzjAGXUtLNIxmo1vpMofpLAE="
        );
        assert!(verify_mac(key, &header, &req));
        assert!(!verify_mac(b"wrong", &header, &req));
    }

    /// Payload example of the Hawk README: POST of "Thank you for flying Hawk" as text/plain.
    #[test]
    fn payload_hash_matches_the_hawk_specification_example() {
        assert_eq!(
            payload_hash("text/plain; charset=utf-8", b"Thank you for flying Hawk"),
            "Yi9LfIIFRtBEPt74PVmbTF/xVAwPn7ub15ePICfgnuY="
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            "Basic abc",
            r#"Hawk id="a", nonce="n", mac="m""#,
            r#"Hawk id="a", ts="x", nonce="n", mac="m""#,
            r#"Hawk id="a", ts="1", nonce="n", mac="m", evil="1""#,
            r#"Hawk id="a, ts="1""#,
        ] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nonces_are_single_use_within_their_window() {
        let cache = NonceCache::new(2);
        let h = |nonce: &str| HawkHeader {
            id: "i".into(),
            ts: 10,
            nonce: nonce.into(),
            mac: "m".into(),
            ..HawkHeader::default()
        };
        assert_eq!(cache.check(&h("a"), 10, 70), Ok(()));
        assert_eq!(cache.check(&h("a"), 11, 71), Err(NonceError::Replayed));
        assert_eq!(cache.check(&h("b"), 11, 71), Ok(()));
        assert_eq!(cache.check(&h("c"), 12, 72), Err(NonceError::Full));
        assert_eq!(cache.check(&h("c"), 80, 140), Ok(()), "expired entries make room");
    }
}
