//! Real receivers for KICK drivers on 127.0.0.1, shared by the driver tests (`kick`) and the
//! end-to-end tests through the server (`kick_e2e`): an HTTP receiver answering from a script
//! (a Standard Webhooks receiver or a Web Push service), the Standard Webhooks check written
//! from the spec, and a push subscription that holds its private key, checks the VAPID JWT and
//! decrypts the RFC 8291 payload with its own code (OpenSSL primitives, not the `ece` crate the
//! sender uses).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use openssl::bn::{BigNum, BigNumContext};
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

/// The secret of the Standard Webhooks test vector, which the tests configure.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Waits (bounded) until `done` holds.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request a receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An HTTP receiver answering the statuses in `script` in turn, then 200.
pub struct Receiver {
    pub addr: SocketAddr,
    pub got: Arc<Mutex<Vec<Got>>>,
}

/// An answer: status and extra headers.
pub type Answer = (u16, Vec<(&'static str, String)>);

#[derive(Clone)]
struct ReceiverState {
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<Vec<Answer>>>,
}

async fn record(
    State(s): State<ReceiverState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    s.got.lock().unwrap().push(Got {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let mut script = s.script.lock().unwrap();
    let (status, extra) = if script.is_empty() {
        (200, Vec::new())
    } else {
        script.remove(0)
    };
    let mut h = HeaderMap::new();
    for (k, v) in extra {
        h.insert(k, v.parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), h, "receiver says hi")
}

pub async fn receiver(ip: &str, script: Vec<Answer>) -> Receiver {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let state = ReceiverState {
        got: got.clone(),
        script: Arc::new(Mutex::new(script)),
    };
    let app = Router::new().fallback(record).with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { addr, got }
}

impl Receiver {
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

pub fn header<'a>(g: &'a Got, name: &str) -> &'a str {
    g.headers.get(name).unwrap().to_str().unwrap()
}

/// Standard Webhooks verification, written from the spec (not with the sender's signer).
pub fn verify_webhook(g: &Got) -> bool {
    let key = STANDARD
        .decode(WEBHOOK_SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let signed = format!(
        "{}.{}.{}",
        header(g, "webhook-id"),
        header(g, "webhook-timestamp"),
        std::str::from_utf8(&g.body).unwrap()
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    header(g, "webhook-signature")
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// A browser's push subscription: the private key stays here, with the receiver.
pub struct Subscription {
    pub key: EcKey<Private>,
    pub public: Vec<u8>,
    pub auth: [u8; 16],
}

pub fn subscription() -> Subscription {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = EcKey::generate(&group).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let public = key
        .public_key()
        .to_bytes(&group, PointConversionForm::UNCOMPRESSED, &mut ctx)
        .unwrap();
    let mut auth = [0u8; 16];
    openssl::rand::rand_bytes(&mut auth).unwrap();
    Subscription { key, public, auth }
}

impl Subscription {
    pub fn json(&self, endpoint: &str) -> Value {
        json!({
            "endpoint": endpoint,
            "keys": {"p256dh": URL_SAFE_NO_PAD.encode(&self.public), "auth": URL_SAFE_NO_PAD.encode(self.auth)},
        })
    }

    /// RFC 8291 decryption of one aes128gcm record, from the RFC's steps.
    pub fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().unwrap());
        assert!(rs >= 18);
        let idlen = body[20] as usize;
        assert_eq!(idlen, 65, "keyid is the sender's public key");
        let as_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let point = EcPoint::from_bytes(&group, as_public, &mut ctx).unwrap();
        let peer = PKey::from_ec_key(EcKey::from_public_key(&group, &point).unwrap()).unwrap();
        let mine = PKey::from_ec_key(self.key.clone()).unwrap();
        let mut deriver = Deriver::new(&mine).unwrap();
        deriver.set_peer(&peer).unwrap();
        let ecdh = deriver.derive_to_vec().unwrap();
        let hmac = |key: &[u8], parts: &[&[u8]]| {
            let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        };
        let prk_key = hmac(&self.auth, &[&ecdh]);
        let ikm = hmac(&prk_key, &[b"WebPush: info\0", &self.public, as_public, &[1]]);
        let prk = hmac(salt, &[&ikm]);
        let cek = &hmac(&prk, &[b"Content-Encoding: aes128gcm\0", &[1]])[..16];
        let nonce = &hmac(&prk, &[b"Content-Encoding: nonce\0", &[1]])[..12];
        let (data, tag) = ciphertext.split_at(ciphertext.len() - 16);
        let mut plain = openssl::symm::decrypt_aead(
            openssl::symm::Cipher::aes_128_gcm(),
            cek,
            Some(nonce),
            &[],
            data,
            tag,
        )
        .expect("the payload decrypts with the subscription's keys");
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "one record, the last, padding delimiter 2");
        plain
    }
}

/// Checks a VAPID `Authorization` header with `public_key` (base64url point); returns the claims.
pub fn verify_vapid(authorization: &str, public_key: &str) -> Value {
    let rest = authorization.strip_prefix("vapid ").expect("vapid scheme");
    let mut t = None;
    let mut k = None;
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=').unwrap();
        match name {
            "t" => t = Some(value),
            "k" => k = Some(value),
            _ => {}
        }
    }
    assert_eq!(k, Some(public_key), "k is the server's VAPID public key");
    let jwt = t.expect("t=");
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    let (head, claims) = input.split_once('.').unwrap();
    let head: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap();
    assert_eq!(head["alg"], "ES256");
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    assert_eq!(sig.len(), 64);
    let sig = EcdsaSig::from_private_components(
        BigNum::from_slice(&sig[..32]).unwrap(),
        BigNum::from_slice(&sig[32..]).unwrap(),
    )
    .unwrap();
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, &URL_SAFE_NO_PAD.decode(public_key).unwrap(), &mut ctx).unwrap();
    let key = EcKey::from_public_key(&group, &point).unwrap();
    let digest = openssl::sha::sha256(input.as_bytes());
    assert!(
        sig.verify(&digest, &key).unwrap(),
        "the VAPID JWT signature verifies"
    );
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap()
}

/// A TCP receiver that accepts connections and never answers; says so on `accepted` each time.
pub async fn hanging_receiver() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hang.local_addr().unwrap();
    let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    (addr, accepted)
}
