//! A Sync 1.5 client for the storage tests: mints tokenserver-format tokens and signs requests
//! with Hawk, written here from the published formats (tokenlib, the Hawk specification) with
//! hmac/sha2/hkdf directly, never with the server's own code.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn hkdf(master: &[u8], salt: Option<&[u8]>, info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(salt, master)
        .expand(info, &mut out)
        .unwrap();
    out
}

/// tokenlib's `make_token` + `get_derived_secret`: `(token, hawk key)`.
pub fn make_token(secret: &str, payload: &Value) -> (String, String) {
    let signing = hkdf(
        secret.as_bytes(),
        None,
        b"services.mozilla.com/tokenlib/v1/signing",
    );
    let body = payload.to_string().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&signing).unwrap();
    mac.update(&body);
    let mut raw = body;
    raw.extend_from_slice(&mac.finalize().into_bytes());
    let token = URL_SAFE.encode(raw);
    let salt = payload["salt"].as_str().unwrap_or("");
    let mut info = b"services.mozilla.com/tokenlib/v1/derive/".to_vec();
    info.extend_from_slice(token.as_bytes());
    let key = URL_SAFE.encode(hkdf(secret.as_bytes(), Some(salt.as_bytes()), &info));
    (token, key)
}

pub fn token_for(secret: &str, uid: u64, node: &str, expires: f64) -> (String, String) {
    make_token(
        secret,
        &serde_json::json!({"uid": uid, "node": node, "expires": expires, "salt": "a1b2c3",
                            "hashed_fxa_uid": "0123456789abcdef", "fxa_uid": "f", "fxa_kid": "k"}),
    )
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A timestamp header as ms.
    pub fn ts(&self, name: &str) -> u64 {
        let text = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} in {self:?}"));
        (text.parse::<f64>().unwrap() * 1000.0).round() as u64
    }
}

/// How to sign one request (the defaults are a correct signature).
#[derive(Clone, Default)]
pub struct Tweak {
    pub ts_offset: i64,
    pub nonce: Option<String>,
    pub wrong_mac: bool,
    pub wrong_hash: bool,
    pub no_auth: bool,
}

/// One user's signed client.
#[derive(Clone)]
pub struct Sync {
    pub http: reqwest::Client,
    pub base: String,
    pub uid: u64,
    pub token: String,
    pub key: String,
}

impl Sync {
    /// A client for `uid` on the server at `base` (`http://127.0.0.1:port`, also the node).
    pub fn new(base: &str, secret: &str, uid: u64) -> Sync {
        let (token, key) = token_for(secret, uid, base, now_secs() + 3600.0);
        Sync::with_token(base, uid, token, key)
    }

    pub fn with_token(base: &str, uid: u64, token: String, key: String) -> Sync {
        Sync {
            http: reqwest::Client::new(),
            base: base.to_owned(),
            uid,
            token,
            key,
        }
    }

    pub fn root(&self) -> String {
        format!("/1.5/{}", self.uid)
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
        tweak: &Tweak,
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let parsed = reqwest::Url::parse(&url).unwrap();
        let host = parsed.host_str().unwrap().to_owned();
        let port = parsed.port_or_known_default().unwrap();
        let resource = match parsed.query() {
            Some(q) => format!("{}?{}", parsed.path(), q),
            None => parsed.path().to_owned(),
        };
        let ts = (now_secs() as i64 + tweak.ts_offset).to_string();
        let nonce = tweak.nonce.clone().unwrap_or_else(|| {
            let mut n = [0u8; 6];
            getrandom::fill(&mut n).unwrap();
            URL_SAFE.encode(n)
        });
        let hash = body.as_ref().map(|(ct, bytes)| {
            let mut h = Sha256::new();
            h.update(format!(
                "hawk.1.payload\n{}\n",
                ct.split(';').next().unwrap().trim()
            ));
            h.update(bytes);
            h.update(b"\n");
            let mut hash = STANDARD.encode(h.finalize());
            if tweak.wrong_hash {
                hash = STANDARD.encode([0u8; 32]);
            }
            hash
        });
        let normalized = format!(
            "hawk.1.header\n{ts}\n{nonce}\n{method}\n{resource}\n{host}\n{port}\n{}\n\n",
            hash.clone().unwrap_or_default()
        );
        let mut mac = HmacSha256::new_from_slice(self.key.as_bytes()).unwrap();
        mac.update(normalized.as_bytes());
        let mut mac = STANDARD.encode(mac.finalize().into_bytes());
        if tweak.wrong_mac {
            mac = STANDARD.encode([1u8; 32]);
        }
        let mut auth = format!(
            r#"Hawk id="{}", ts="{ts}", nonce="{nonce}", mac="{mac}""#,
            self.token
        );
        if let Some(hash) = hash {
            auth.push_str(&format!(r#", hash="{hash}""#));
        }
        let mut rb = self
            .http
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), &url);
        if !tweak.no_auth {
            rb = rb.header("authorization", auth);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some((ct, bytes)) = body {
            rb = rb.header("content-type", ct).body(bytes);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap();
        assert!(
            headers.contains_key("x-weave-timestamp"),
            "every answer has X-Weave-Timestamp: {path}"
        );
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send("GET", &self.full(path), None, &[], &Tweak::default())
            .await
    }

    pub async fn get_h(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("GET", &self.full(path), None, headers, &Tweak::default())
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.put_h(path, body, &[]).await
    }

    pub async fn put_h(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Resp {
        let body = Some(("application/json", body.to_string().into_bytes()));
        self.send("PUT", &self.full(path), body, headers, &Tweak::default())
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.post_h(path, body, &[]).await
    }

    pub async fn post_h(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Resp {
        let body = Some(("application/json", body.to_string().into_bytes()));
        self.send("POST", &self.full(path), body, headers, &Tweak::default())
            .await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: &str) -> Resp {
        let body = Some((content_type, body.as_bytes().to_vec()));
        self.send("POST", &self.full(path), body, &[], &Tweak::default())
            .await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.delete_h(path, &[]).await
    }

    pub async fn delete_h(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.send("DELETE", &self.full(path), None, headers, &Tweak::default())
            .await
    }

    /// `path` relative to the user's root unless it starts with `/`.
    fn full(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("{}/{}", self.root(), path)
        }
    }
}
