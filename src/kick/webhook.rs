//! The `webhook` driver: `POST url` with body `{"uaid":"…"}`, signed per Standard Webhooks 1.0
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`), so a
//! receiver verifies it with any Standard Webhooks library and the server's `whsec_` secret.
//!
//! 2xx: sent. 410: gone (the stored kick is removed). 408, 429 (`Retry-After`), 5xx, timeouts and
//! connection errors: retried. 3xx (never followed) and other 4xx: given up for this event.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

use super::guard::{self, Allow, Clients};
use super::{EventInfo, KickDriver, KickError, Outcome, Setup, SetupError};
use crate::ids::Uaid;

/// The `v1,<base64>` signature of one message: HMAC-SHA256 over `"{id}.{timestamp}.{body}"`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

pub struct Webhook {
    key: Vec<u8>,
    clients: Clients,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Webhook {
    pub fn build(setup: &Setup) -> Result<Option<Arc<dyn KickDriver>>, SetupError> {
        let c = &setup.config.webhook;
        if !c.enabled {
            return Ok(None);
        }
        let err = |message: String| SetupError::Config {
            driver: "webhook",
            message,
        };
        let timeout = Duration::from_millis(c.timeout_ms.max(1));
        let allow = Allow::parse(&c.allow).map_err(err)?;
        let clients = Clients::new(allow, timeout).map_err(|e| err(e.to_string()))?;
        Ok(Some(Arc::new(Webhook {
            key: setup.keys.webhook_key().to_vec(),
            clients,
            timeout,
            max_response_bytes: setup.config.max_response_bytes,
        })))
    }
}

impl KickDriver for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn validate<'a>(&'a self, kick: &'a Map<String, Value>) -> BoxFuture<'a, Result<Value, KickError>> {
        async move {
            let url = super::string_field(kick, "url")?;
            let url = guard::check_url(url, &self.clients.allow, self.timeout).await?;
            Ok(json!({"driver": "webhook", "url": url.as_str()}))
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
            let Some(url) = target.get("url").and_then(Value::as_str) else {
                return Outcome::Rejected;
            };
            let Ok(url) = guard::parse_url(url) else {
                return Outcome::Rejected;
            };
            let Ok(client) = self.clients.for_url(&url) else {
                return Outcome::Rejected;
            };
            let body = json!({ "uaid": uaid.to_string() }).to_string();
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // A fresh timestamp and signature per attempt; the id stays (receivers deduplicate).
            let signature = sign(&self.key, event.id, timestamp, body.as_bytes());
            let sent = client
                .post(url)
                .header("content-type", "application/json")
                .header("webhook-id", event.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await;
            super::answered("webhook", sent, &[], self.max_response_bytes).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks reference libraries publish.
    #[test]
    fn signer_matches_the_standard_webhooks_test_vector() {
        let key =
            super::super::secrets::parse_webhook_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
