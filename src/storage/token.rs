//! Tokens in the tokenserver (tokenlib) format, and the Hawk key each one implies.
//!
//! A token is `base64url(payload ‖ HMAC-SHA256(signing_key, payload))` where the payload is JSON
//! (`uid`, `node`, `expires`, `salt`, and whatever else the tokenserver adds) and
//! `signing_key = HKDF-SHA256(master_secret, no salt, info "services.mozilla.com/tokenlib/v1/signing")`.
//! The Hawk key for a token is the base64url (padded) text of
//! `HKDF-SHA256(master_secret, salt = the payload's salt, info = ".../v1/derive/" ‖ token)`;
//! Hawk uses that text's bytes as its key, as tokenlib's clients do.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SIGNING_INFO: &[u8] = b"services.mozilla.com/tokenlib/v1/signing";
const DERIVE_INFO: &[u8] = b"services.mozilla.com/tokenlib/v1/derive/";
const SIG_LEN: usize = 32;

/// Accepts base64url with or without padding (clients differ).
const URL_SAFE_ANY: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenData {
    pub uid: u64,
    pub node: String,
    /// Seconds since the epoch.
    pub expires: f64,
    pub salt: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("token is not base64url")]
    Encoding,
    #[error("token signature does not verify under any master secret")]
    Signature,
    #[error("token payload is malformed")]
    Payload,
    #[error("token has expired")]
    Expired(TokenData),
}

/// The master secrets and the signing keys derived from them.
pub struct Secrets {
    masters: Vec<Vec<u8>>,
    signing: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} keys)", self.masters.len())
    }
}

fn hkdf32(master: &[u8], salt: Option<&[u8]>, info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let hk = hkdf::Hkdf::<Sha256>::new(salt, master);
    // 32 bytes is always a valid HKDF-SHA256 output length.
    if hk.expand_multi_info(info, &mut out).is_err() {
        unreachable!("HKDF-SHA256 expands to 32 bytes");
    }
    out
}

fn sign(key: &[u8; 32], payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload);
    mac
}

impl Secrets {
    /// `masters` in order: the first mints.
    pub fn new<S: AsRef<[u8]>>(masters: &[S]) -> Secrets {
        let masters: Vec<Vec<u8>> = masters.iter().map(|m| m.as_ref().to_vec()).collect();
        let signing = masters.iter().map(|m| hkdf32(m, None, &[SIGNING_INFO])).collect();
        Secrets { masters, signing }
    }

    /// Verifies `token` and returns its data and the index of the secret that signed it.
    /// Expiry is checked against `now` (seconds); an expired token's data comes with the error.
    pub fn parse(&self, token: &str, now: f64) -> Result<(TokenData, usize), TokenError> {
        let raw = URL_SAFE_ANY
            .decode(token.trim())
            .map_err(|_| TokenError::Encoding)?;
        if raw.len() <= SIG_LEN {
            return Err(TokenError::Payload);
        }
        let (payload, sig) = raw.split_at(raw.len() - SIG_LEN);
        let index = self
            .signing
            .iter()
            .position(|key| sign(key, payload).verify_slice(sig).is_ok())
            .ok_or(TokenError::Signature)?;
        // Only parsed after the signature checked out.
        let value: serde_json::Value = serde_json::from_slice(payload).map_err(|_| TokenError::Payload)?;
        let data = TokenData {
            uid: value
                .get("uid")
                .and_then(|v| v.as_u64())
                .ok_or(TokenError::Payload)?,
            node: value
                .get("node")
                .and_then(|v| v.as_str())
                .ok_or(TokenError::Payload)?
                .to_owned(),
            expires: value
                .get("expires")
                .and_then(|v| v.as_f64())
                .ok_or(TokenError::Payload)?,
            salt: value
                .get("salt")
                .and_then(|v| v.as_str())
                .ok_or(TokenError::Payload)?
                .to_owned(),
        };
        if data.expires <= now {
            return Err(TokenError::Expired(data));
        }
        Ok((data, index))
    }

    /// The Hawk key of `token` (signed by secret `index`), as text.
    pub fn derived_key(&self, index: usize, token: &str, salt: &str) -> String {
        let master = &self.masters[index];
        let key = hkdf32(master, Some(salt.as_bytes()), &[DERIVE_INFO, token.as_bytes()]);
        URL_SAFE.encode(key)
    }

    /// A new token for `uid` on `node`, valid for `ttl_secs`, and its Hawk key.
    pub fn mint(&self, uid: u64, node: &str, ttl_secs: u64, now: f64) -> Option<(String, String)> {
        let signing = self.signing.first()?;
        let mut salt = [0u8; 3];
        getrandom::fill(&mut salt).ok()?;
        let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        let payload = serde_json::json!({
            "uid": uid,
            "node": node,
            "expires": (now + ttl_secs as f64).floor(),
            "salt": salt,
        })
        .to_string();
        let mut raw = payload.into_bytes();
        let sig = sign(signing, &raw).finalize().into_bytes();
        raw.extend_from_slice(&sig);
        let token = URL_SAFE.encode(raw);
        let key = self.derived_key(0, &token, &salt);
        Some((token, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_under_any_listed_secret() {
        let old = Secrets::new(&["old"]);
        let (token, key) = old.mint(42, "http://n", 60, 1000.0).unwrap();
        let rotated = Secrets::new(&["new", "old"]);
        let (data, index) = rotated.parse(&token, 1000.0).unwrap();
        assert_eq!((data.uid, data.node.as_str(), index), (42, "http://n", 1));
        assert_eq!(rotated.derived_key(index, &token, &data.salt), key);
        assert_eq!(
            Secrets::new(&["other"]).parse(&token, 1000.0),
            Err(TokenError::Signature)
        );
        assert!(matches!(
            rotated.parse(&token, 1060.0),
            Err(TokenError::Expired(_))
        ));
        let unpadded = token.trim_end_matches('=');
        assert!(rotated.parse(unpadded, 1000.0).is_ok());
        let mut tampered = token.clone().into_bytes();
        tampered[3] ^= 1;
        assert!(rotated
            .parse(std::str::from_utf8(&tampered).unwrap(), 1000.0)
            .is_err());
    }
}
