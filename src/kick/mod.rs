//! KICK drivers: ways to wake a user agent that has no connection, so that it connects and takes
//! its pending events. A kick carries no app data, only the UAID.
//!
//! * [`KickDriver`]: validates a client's `kick` object into a [`Target`] (at hello/register) and
//!   makes one attempt to kick a target, answering an [`Outcome`].
//! * [`Drivers`]: the enabled drivers, built from `[kick.*]` config; a new driver is one file and
//!   one line in [`BUILT_IN`].
//! * [`scheduler`]: runs kicks off the PUT's path, debounced per UAID, retried with backoff.
//! * [`guard`]: the SSRF guard every driver's target goes through.
//!
//! `proto/kick.md` is the wire contract.

pub mod config;
pub mod guard;
pub mod metrics;
pub mod scheduler;
pub mod secrets;
pub mod udp;
pub mod webhook;
pub mod webpush;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};

pub use config::KickConfig;
pub use metrics::KickMetrics;
pub use scheduler::Scheduler;
pub use secrets::KickKeys;

use crate::ids::Uaid;

/// A kick object refused at hello or register. Statuses and slugs are chosen here only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KickError {
    /// Malformed: not an object, no `driver`, a missing or badly typed field.
    #[error("invalid kick: {0}")]
    Invalid(String),
    /// The named driver is unknown or not enabled on this server.
    #[error("kick driver {0:?} is not enabled on this server")]
    Unsupported(String),
    /// The SSRF guard refused the target.
    #[error("kick target refused: {0}")]
    Refused(String),
}

impl KickError {
    pub fn status(&self) -> u16 {
        match self {
            KickError::Invalid(_) | KickError::Unsupported(_) => 400,
            KickError::Refused(_) => 403,
        }
    }

    pub fn slug(&self) -> &'static str {
        match self {
            KickError::Invalid(_) => "invalid_kick",
            KickError::Unsupported(_) => "kick_unsupported",
            KickError::Refused(_) => "kick_refused",
        }
    }

    /// The human-readable message, cut on a character boundary: it may quote client input.
    pub fn message(&self) -> String {
        crate::push::proto::cap_message(self.to_string())
    }
}

impl From<guard::GuardError> for KickError {
    fn from(e: guard::GuardError) -> KickError {
        match e {
            guard::GuardError::Invalid(m) => KickError::Invalid(m),
            guard::GuardError::Refused(m) => KickError::Refused(m),
        }
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered: kicking ends for this event (drivers without answers repeat, see
    /// [`KickDriver::resends`]).
    Sent,
    /// Failed for now: try again no sooner than this (zero: the backoff alone decides).
    RetryAfter(Duration),
    /// The target no longer exists: the stored kick is removed.
    Gone,
    /// The receiver refused it or the guard did: give up for this event, keep the kick.
    Rejected,
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::RetryAfter(_) => "retry",
            Outcome::Gone => "gone",
            Outcome::Rejected => "rejected",
        }
    }
}

/// The event a kick is for, as a driver sees it.
#[derive(Debug, Clone, Copy)]
pub struct EventInfo<'a> {
    /// Random, the same for every attempt of one event (the webhook's `webhook-id`).
    pub id: &'a str,
    /// Time until the event expires (webpush's `TTL`).
    pub remaining_ttl: Duration,
}

/// A kick object that a driver accepted, in its canonical JSON form (only the fields the driver
/// uses, keys sorted): what the store keeps and the scheduler kicks. Two registrations with the
/// same target compare equal, so a UAID's target is kicked once.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Target {
    driver: Arc<str>,
    json: Arc<str>,
}

/// Targets hold capability URLs (webpush endpoints, webhook tokens): never in logs.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({} ..)", self.driver)
    }
}

impl Target {
    fn from_value(value: &Value) -> Option<Target> {
        let driver = value.get("driver")?.as_str()?;
        Some(Target {
            driver: driver.into(),
            json: value.to_string().into(),
        })
    }

    /// A target as stored (the JSON text a validation produced); `None` if it is not one.
    pub fn from_stored(bytes: &[u8]) -> Option<Target> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        Target::from_value(&value).filter(|_| value.is_object())
    }

    /// The driver's name.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// The JSON text to store.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The target's fields.
    pub fn fields(&self) -> Map<String, Value> {
        match serde_json::from_str(&self.json) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }
}

/// A way to wake a user agent. Object-safe, so that drivers live in a table.
pub trait KickDriver: Send + Sync + 'static {
    /// The `"driver"` value that selects it.
    fn name(&self) -> &'static str;

    /// Checks a client's kick object (which names this driver) and returns the canonical object
    /// to store, `driver` included. May resolve names (the SSRF guard); never contacts a target.
    fn validate<'a>(&'a self, kick: &'a Map<String, Value>) -> BoxFuture<'a, Result<Value, KickError>>;

    /// One attempt to wake `uaid` through `target` (fields as `validate` returned them).
    fn kick<'a>(
        &'a self,
        target: &'a Map<String, Value>,
        uaid: &'a Uaid,
        event: EventInfo<'a>,
    ) -> BoxFuture<'a, Outcome>;

    /// Times a `Sent` is repeated on the backoff schedule while the client stays away: for
    /// drivers that get no answer (UDP), one send may be lost.
    fn resends(&self) -> u32 {
        0
    }
}

/// What a driver is built from.
pub struct Setup<'a> {
    pub config: &'a KickConfig,
    pub keys: &'a KickKeys,
}

/// Builds a driver from config, or `None` when it is not enabled.
pub type Build = fn(&Setup) -> Result<Option<Arc<dyn KickDriver>>, SetupError>;

/// Every driver this build knows, by name. Adding a driver: its file, and one line here.
pub const BUILT_IN: &[(&str, Build)] = &[
    ("webhook", webhook::Webhook::build),
    ("udp", udp::Udp::build),
    ("webpush", webpush::Webpush::build),
];

/// A driver's configuration cannot be used: the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("kick.{driver}: {message}")]
    Config { driver: &'static str, message: String },
    #[error("kick keys: {0}")]
    Keys(String),
    #[error("kick metrics: {0}")]
    Metrics(String),
}

/// The enabled drivers, by name.
#[derive(Clone, Default)]
pub struct Drivers {
    by_name: HashMap<&'static str, Arc<dyn KickDriver>>,
    vapid_public_key: Option<String>,
}

impl Drivers {
    /// Builds every enabled driver from `[kick.*]`.
    pub fn from_config(config: &KickConfig, keys: &KickKeys) -> Result<Drivers, SetupError> {
        let setup = Setup { config, keys };
        let mut drivers = Drivers::default();
        for (name, build) in BUILT_IN {
            if let Some(driver) = build(&setup)? {
                drivers.by_name.insert(name, driver);
            }
        }
        if drivers.by_name.contains_key("webpush") {
            drivers.vapid_public_key = Some(keys.vapid_public_key());
        }
        Ok(drivers)
    }

    /// Adds a driver (tests, or drivers built elsewhere).
    pub fn insert(&mut self, driver: Arc<dyn KickDriver>) {
        self.by_name.insert(driver.name(), driver);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn KickDriver>> {
        self.by_name.get(name)
    }

    /// Whether any driver is enabled (if none, every kick is `kick_unsupported`).
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Validates a client's `kick` object into the target to store.
    pub async fn validate(&self, kick: &Value) -> Result<Target, KickError> {
        let Value::Object(map) = kick else {
            return Err(KickError::Invalid("\"kick\" must be a JSON object".into()));
        };
        let Some(name) = map.get("driver").and_then(Value::as_str) else {
            return Err(KickError::Invalid("\"driver\" must be a string".into()));
        };
        let driver = self
            .get(name)
            .ok_or_else(|| KickError::Unsupported(name.to_owned()))?;
        let canonical = driver.validate(map).await?;
        Target::from_value(&canonical).ok_or_else(|| KickError::Invalid("driver returned no driver".into()))
    }

    /// The body of `GET /v1/kick/webpush`, or `None` when webpush is not enabled (404).
    pub fn webpush_key_body(&self) -> Option<String> {
        let key = self.vapid_public_key.as_ref()?;
        Some(serde_json::json!({ "vapid_public_key": key }).to_string())
    }
}

/// What the wiring holds: the drivers (validation at hello/register, the VAPID key route), the
/// scheduler (raised / connected) and their metrics.
#[derive(Clone)]
pub struct Kicks {
    pub drivers: Arc<Drivers>,
    pub scheduler: Scheduler,
    pub metrics: KickMetrics,
}

impl Kicks {
    /// Builds the enabled drivers and a scheduler, and adds the kick metrics to `metrics`.
    /// Spawns nothing: kick tasks start with the first `raised`.
    pub fn new(
        config: &KickConfig,
        keys: &KickKeys,
        metrics: &crate::metrics::Metrics,
        hooks: scheduler::Hooks,
    ) -> Result<Kicks, SetupError> {
        let drivers = Arc::new(Drivers::from_config(config, keys)?);
        let kick_metrics = KickMetrics::default();
        kick_metrics
            .register(metrics)
            .map_err(|e| SetupError::Metrics(e.to_string()))?;
        let scheduler = Scheduler::new(drivers.clone(), config, kick_metrics.clone(), hooks);
        Ok(Kicks {
            drivers,
            scheduler,
            metrics: kick_metrics,
        })
    }
}

/// `GET /v1/kick/webpush` → `{"vapid_public_key":"…"}` (404 while webpush is not enabled):
/// pages need it to subscribe. Merge into the server's router.
pub fn routes<S: Clone + Send + Sync + 'static>(drivers: Arc<Drivers>) -> axum::Router<S> {
    use axum::response::IntoResponse as _;
    let handler = move || {
        let body = drivers.webpush_key_body();
        async move {
            match body {
                Some(body) => {
                    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
                }
                None => crate::http::HttpError::NotFound.into_response(),
            }
        }
    };
    axum::Router::new().route("/v1/kick/webpush", axum::routing::get(handler))
}

/// A field of a kick object that must be a string.
pub(crate) fn string_field<'a>(map: &'a Map<String, Value>, name: &str) -> Result<&'a str, KickError> {
    map.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| KickError::Invalid(format!("\"{name}\" must be a string")))
}

/// A `Retry-After` header in seconds (HTTP dates are ignored: the backoff decides).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// The shared HTTP answer rules: 2xx sent, 410 (and `gone` extras) gone, 408/429/5xx retry
/// (honouring `Retry-After`), anything else (3xx never followed, other 4xx) rejected.
pub(crate) fn http_outcome(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    gone: &[u16],
) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Sent
    } else if code == 410 || gone.contains(&code) {
        Outcome::Gone
    } else if code == 408 || code == 429 || status.is_server_error() {
        Outcome::RetryAfter(retry_after(headers))
    } else {
        Outcome::Rejected
    }
}

/// The outcome of an HTTP kick's answer (see [`http_outcome`]); the body of an answer that is
/// not a success is read, capped at `max_body`, for the debug log only.
pub(crate) async fn answered(
    driver: &'static str,
    sent: Result<reqwest::Response, reqwest::Error>,
    gone: &[u16],
    max_body: usize,
) -> Outcome {
    match sent {
        Ok(response) => {
            let outcome = http_outcome(response.status(), response.headers(), gone);
            if outcome != Outcome::Sent {
                let status = response.status().as_u16();
                let body = guard::read_capped(response, max_body).await;
                tracing::debug!(driver, status, body = %String::from_utf8_lossy(&body), "kick answered");
            }
            outcome
        }
        Err(e) => error_outcome(driver, &e),
    }
}

/// The outcome of a request that got no answer.
pub(crate) fn error_outcome(driver: &str, error: &reqwest::Error) -> Outcome {
    if guard::is_refusal(error) {
        tracing::info!(driver, "kick target refused by the guard at connect time");
        Outcome::Rejected
    } else {
        tracing::debug!(driver, timeout = error.is_timeout(), "kick attempt failed");
        Outcome::RetryAfter(Duration::ZERO)
    }
}

/// A random id, base64url: 16 bytes.
pub(crate) fn random_id() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 16];
    // The OS generator failing means the machine cannot do cryptography at all.
    getrandom::fill(&mut bytes).expect("operating system random number generator failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_know_status_and_slug_and_cap_messages() {
        assert_eq!(KickError::Invalid("x".into()).status(), 400);
        assert_eq!(KickError::Invalid("x".into()).slug(), "invalid_kick");
        assert_eq!(KickError::Unsupported("x".into()).slug(), "kick_unsupported");
        assert_eq!(KickError::Refused("x".into()).status(), 403);
        assert_eq!(KickError::Refused("x".into()).slug(), "kick_refused");
        let long = KickError::Unsupported("é".repeat(500)).message();
        assert!(long.len() <= crate::push::proto::MAX_ERROR_MESSAGE && long.ends_with('…'));
    }

    #[test]
    fn http_answers_map_to_outcomes() {
        let mut h = reqwest::header::HeaderMap::new();
        let s = |c: u16| reqwest::StatusCode::from_u16(c).unwrap();
        assert_eq!(http_outcome(s(200), &h, &[]), Outcome::Sent);
        assert_eq!(http_outcome(s(204), &h, &[]), Outcome::Sent);
        assert_eq!(http_outcome(s(410), &h, &[]), Outcome::Gone);
        assert_eq!(http_outcome(s(404), &h, &[]), Outcome::Rejected);
        assert_eq!(http_outcome(s(404), &h, &[404]), Outcome::Gone);
        assert_eq!(http_outcome(s(301), &h, &[]), Outcome::Rejected);
        assert_eq!(http_outcome(s(400), &h, &[]), Outcome::Rejected);
        assert_eq!(http_outcome(s(500), &h, &[]), Outcome::RetryAfter(Duration::ZERO));
        assert_eq!(http_outcome(s(408), &h, &[]), Outcome::RetryAfter(Duration::ZERO));
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(
            http_outcome(s(429), &h, &[]),
            Outcome::RetryAfter(Duration::from_secs(7))
        );
    }

    #[tokio::test]
    async fn unknown_drivers_and_malformed_objects_are_told_apart() {
        let d = Drivers::default();
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(d.validate(&v("[1]")).await.unwrap_err().slug(), "invalid_kick");
        assert_eq!(
            d.validate(&v(r#"{"url":"x"}"#)).await.unwrap_err().slug(),
            "invalid_kick"
        );
        assert_eq!(
            d.validate(&v(r#"{"driver":"webhook"}"#))
                .await
                .unwrap_err()
                .slug(),
            "kick_unsupported"
        );
        assert_eq!(d.webpush_key_body(), None);
        assert!(Target::from_stored(b"{\"driver\":\"udp\",\"addr\":\"1.2.3.4:5\"}").is_some());
        assert!(Target::from_stored(b"[]").is_none());
        assert!(Target::from_stored(b"").is_none());
    }
}
