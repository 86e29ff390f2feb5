//! The `webpush` driver: wakes a browser or phone whose page is closed through its standard Web
//! Push subscription. One RFC 8030 push per attempt: payload `{"uaid":"…"}` encrypted aes128gcm
//! (RFC 8291, the `ece` crate), signed with VAPID (RFC 8292: an ES256 JWT whose `aud` is the
//! endpoint's origin, port included, and `sub` is `vapid_subject`), `TTL` the event's remaining
//! TTL capped at 28 days. 2xx sent; 404/410 gone; 408/429/5xx retried; other answers rejected.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use serde_json::{json, Map, Value};

use super::guard::{self, Allow, Clients};
use super::{EventInfo, KickDriver, KickError, Outcome, Setup, SetupError};
use crate::ids::Uaid;

/// Longest `TTL` a push asks the push service to keep it (push services cap it there too).
pub const MAX_PUSH_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// Lifetime of a VAPID JWT (RFC 8292 allows at most 24 hours).
const JWT_LIFETIME_SECS: u64 = 12 * 3600;

/// Decodes base64url, with or without padding, also accepting the standard alphabet (some
/// subscriptions are serialised that way).
pub fn decode_b64url(text: &str) -> Option<Vec<u8>> {
    let cleaned: String = text
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(cleaned).ok()
}

/// The `Authorization` header of RFC 8292: `vapid t=<JWT>, k=<public key>`.
pub fn vapid_authorization(
    key: &EcKey<Private>,
    public_key: &str,
    aud: &str,
    sub: &str,
    exp: u64,
) -> Result<String, openssl::error::ErrorStack> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let mut claims = json!({ "aud": aud, "exp": exp });
    if !sub.is_empty() {
        claims["sub"] = Value::from(sub);
    }
    let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let digest = openssl::sha::sha256(signing_input.as_bytes());
    let sig = EcdsaSig::sign(&digest, key)?;
    // JWS ES256 is r || s, 32 bytes each, not DER.
    let mut raw = sig.r().to_vec_padded(32)?;
    raw.extend(sig.s().to_vec_padded(32)?);
    Ok(format!(
        "vapid t={signing_input}.{}, k={public_key}",
        URL_SAFE_NO_PAD.encode(raw)
    ))
}

pub struct Webpush {
    vapid: EcKey<Private>,
    public_key: String,
    subject: String,
    clients: Clients,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Webpush {
    pub fn build(setup: &Setup) -> Result<Option<Arc<dyn KickDriver>>, SetupError> {
        let c = &setup.config.webpush;
        if !c.enabled {
            return Ok(None);
        }
        let err = |message: String| SetupError::Config {
            driver: "webpush",
            message,
        };
        if !(c.vapid_subject.is_empty()
            || c.vapid_subject.starts_with("mailto:")
            || c.vapid_subject.starts_with("https://"))
        {
            return Err(err("vapid_subject must start with mailto: or https://".into()));
        }
        let timeout = Duration::from_millis(c.timeout_ms.max(1));
        let allow = Allow::parse(&c.allow).map_err(err)?;
        let clients = Clients::new(allow, timeout).map_err(|e| err(e.to_string()))?;
        Ok(Some(Arc::new(Webpush {
            vapid: setup.keys.vapid().clone(),
            public_key: setup.keys.vapid_public_key(),
            subject: c.vapid_subject.clone(),
            clients,
            timeout,
            max_response_bytes: setup.config.max_response_bytes,
        })))
    }
}

/// The subscription's keys, decoded and checked: a P-256 point and a 16-byte auth secret.
fn subscription_keys(keys: &Map<String, Value>) -> Result<(Vec<u8>, Vec<u8>), KickError> {
    let p256dh = decode_b64url(super::string_field(keys, "p256dh")?)
        .ok_or_else(|| KickError::Invalid("\"p256dh\" is not base64url".into()))?;
    let auth = decode_b64url(super::string_field(keys, "auth")?)
        .ok_or_else(|| KickError::Invalid("\"auth\" is not base64url".into()))?;
    let on_curve = (|| {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let mut ctx = BigNumContext::new()?;
        EcPoint::from_bytes(&group, &p256dh, &mut ctx)
    })();
    if p256dh.len() != 65 || on_curve.is_err() {
        return Err(KickError::Invalid(
            "\"p256dh\" must be an uncompressed P-256 point".into(),
        ));
    }
    if auth.len() != 16 {
        return Err(KickError::Invalid("\"auth\" must be 16 bytes".into()));
    }
    Ok((p256dh, auth))
}

/// The subscription object of a kick.
fn subscription(kick: &Map<String, Value>) -> Result<(&str, &Map<String, Value>), KickError> {
    let sub = kick
        .get("subscription")
        .and_then(Value::as_object)
        .ok_or_else(|| KickError::Invalid("\"subscription\" must be an object".into()))?;
    let endpoint = super::string_field(sub, "endpoint")?;
    let keys = sub
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| KickError::Invalid("\"subscription.keys\" must be an object".into()))?;
    Ok((endpoint, keys))
}

impl KickDriver for Webpush {
    fn name(&self) -> &'static str {
        "webpush"
    }

    fn validate<'a>(&'a self, kick: &'a Map<String, Value>) -> BoxFuture<'a, Result<Value, KickError>> {
        async move {
            let (endpoint, keys) = subscription(kick)?;
            subscription_keys(keys)?;
            let url = guard::check_url(endpoint, &self.clients.allow, self.timeout).await?;
            Ok(json!({
                "driver": "webpush",
                "subscription": {
                    "endpoint": url.as_str(),
                    "keys": {"p256dh": keys["p256dh"].clone(), "auth": keys["auth"].clone()},
                },
            }))
        }
        .boxed()
    }

    fn kick<'a>(
        &'a self,
        target: &'a Map<String, Value>,
        uaid: &'a Uaid,
        event: EventInfo<'a>,
    ) -> BoxFuture<'a, Outcome> {
        async move {
            let Ok((endpoint, keys)) = subscription(target) else {
                return Outcome::Rejected;
            };
            let (Ok(url), Ok((p256dh, auth))) = (guard::parse_url(endpoint), subscription_keys(keys)) else {
                return Outcome::Rejected;
            };
            let Ok(client) = self.clients.for_url(&url) else {
                return Outcome::Rejected;
            };
            let payload = json!({ "uaid": uaid.to_string() }).to_string();
            let Ok(body) = ece::encrypt(&p256dh, &auth, payload.as_bytes()) else {
                return Outcome::Rejected;
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aud = url.origin().ascii_serialization();
            let Ok(authorization) = vapid_authorization(
                &self.vapid,
                &self.public_key,
                &aud,
                &self.subject,
                now + JWT_LIFETIME_SECS,
            ) else {
                return Outcome::RetryAfter(Duration::ZERO);
            };
            let ttl = event.remaining_ttl.min(MAX_PUSH_TTL).as_secs();
            let sent = client
                .post(url)
                .header("ttl", ttl.to_string())
                .header("content-encoding", "aes128gcm")
                .header("content-type", "application/octet-stream")
                .header("urgency", "high")
                .header("authorization", authorization)
                .body(body)
                .send()
                .await;
            super::answered("webpush", sent, &[404], self.max_response_bytes).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vapid_header_verifies_with_the_public_key() {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = EcKey::generate(&group).unwrap();
        let header = vapid_authorization(&key, "K", "https://push.example:8443", "mailto:a@b", 99).unwrap();
        let token = header
            .strip_prefix("vapid t=")
            .unwrap()
            .split(", k=")
            .next()
            .unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(input.split('.').nth(1).unwrap()).unwrap())
                .unwrap();
        assert_eq!(
            claims,
            json!({"aud": "https://push.example:8443", "exp": 99, "sub": "mailto:a@b"})
        );
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let r = openssl::bn::BigNum::from_slice(&raw[..32]).unwrap();
        let s = openssl::bn::BigNum::from_slice(&raw[32..]).unwrap();
        let sig = EcdsaSig::from_private_components(r, s).unwrap();
        assert!(sig.verify(&openssl::sha::sha256(input.as_bytes()), &key).unwrap());
    }

    #[test]
    fn subscription_keys_are_checked() {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = EcKey::generate(&group).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let point = key
            .public_key()
            .to_bytes(&group, openssl::ec::PointConversionForm::UNCOMPRESSED, &mut ctx)
            .unwrap();
        let keys = |p: &[u8], a: &[u8]| {
            json!({"p256dh": URL_SAFE_NO_PAD.encode(p), "auth": URL_SAFE_NO_PAD.encode(a)})
                .as_object()
                .unwrap()
                .clone()
        };
        assert!(subscription_keys(&keys(&point, &[1; 16])).is_ok());
        assert!(subscription_keys(&keys(&point, &[1; 15])).is_err());
        assert!(subscription_keys(&keys(&[4; 65], &[1; 16])).is_err());
        assert_eq!(decode_b64url("+/8="), Some(vec![0xfb, 0xff]));
    }
}
