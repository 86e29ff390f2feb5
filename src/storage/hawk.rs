//! Hawk request authentication (the header scheme, version 1) with HMAC-SHA256: header parsing,
//! the MAC over the normalised request, the payload hash, and a nonce cache against replays.
//!
//! Pure code but for the cache's lock; the caller supplies the time.

use std::collections::{BTreeMap, HashSet};
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
///
/// Sharded by nonce digest; each shard files nonces by their request second, so forgetting the
/// ones whose second has left the window drops whole buckets: the cost per request stays
/// constant however many nonces are held (what repeated load runs showed a single map with a
/// periodic sweep does not do).
pub struct NonceCache {
    shards: Box<[Mutex<Shard>]>,
    max_per_shard: usize,
    skew: u64,
}

#[derive(Default)]
struct Shard {
    /// Request second (`ts`) → digests of (id, nonce) seen with it.
    by_ts: BTreeMap<u64, HashSet<u128>>,
    len: usize,
}

const NONCE_SHARDS: usize = 16;

#[derive(Debug, PartialEq)]
pub enum NonceError {
    Replayed,
    Full,
}

impl NonceCache {
    /// Holds at most about `max` nonces; a nonce is kept while its `ts` is within `skew` of now.
    pub fn new(max: usize, skew: u64) -> NonceCache {
        NonceCache {
            shards: (0..NONCE_SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_per_shard: max.div_ceil(NONCE_SHARDS).max(1),
            skew,
        }
    }

    /// Records (`id`, `nonce`) for `header.ts`; fails if it was already seen.
    pub fn check(&self, header: &HawkHeader, now: u64) -> Result<(), NonceError> {
        let mut h = Sha256::new();
        for part in [header.id.as_bytes(), header.nonce.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let digest: [u8; 32] = h.finalize().into();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        let key = u128::from_be_bytes(first);
        let shard = &self.shards[(key % NONCE_SHARDS as u128) as usize];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = now.saturating_sub(self.skew);
        while let Some(entry) = shard.by_ts.first_entry() {
            if *entry.key() >= oldest {
                break;
            }
            let gone = entry.remove().len();
            shard.len -= gone;
        }
        if shard
            .by_ts
            .get(&header.ts)
            .is_some_and(|seen| seen.contains(&key))
        {
            return Err(NonceError::Replayed);
        }
        if shard.len >= self.max_per_shard {
            return Err(NonceError::Full);
        }
        shard.by_ts.entry(header.ts).or_default().insert(key);
        shard.len += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |s| s.len)).sum()
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
        let cache = NonceCache::new(1600, 60);
        let h = |nonce: &str, ts: u64| HawkHeader {
            id: "i".into(),
            ts,
            nonce: nonce.into(),
            mac: "m".into(),
            ..HawkHeader::default()
        };
        assert_eq!(cache.check(&h("a", 10), 10), Ok(()));
        assert_eq!(cache.check(&h("a", 10), 60), Err(NonceError::Replayed));
        assert_eq!(cache.check(&h("b", 10), 11), Ok(()));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.check(&h("c", 80), 80), Ok(()));
        assert_eq!(cache.check(&h("c", 80), 81), Err(NonceError::Replayed));
        // One per shard: a shard that is full refuses, until its entries age out.
        let tiny = NonceCache::new(1, 60);
        let full = (0..64)
            .map(|i| tiny.check(&h(&format!("n{i}"), 10), 10))
            .filter(|r| *r == Err(NonceError::Full))
            .count();
        assert!(full > 0);
        assert_eq!(tiny.check(&h("late", 200), 200), Ok(()));
    }
}
