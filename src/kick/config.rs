//! The `[kick]` configuration sections: one struct per driver, every key optional, drivers off
//! until enabled. `config.toml` documents each key; DESIGN.md fixes their names.

use serde::{Deserialize, Serialize};

/// `[kick]` and its driver sub-tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KickConfig {
    /// At most one kick per UAID per this many seconds; a raise inside it is deferred, not dropped.
    pub min_interval_secs: u64,
    /// First retry delay of a failed kick, in milliseconds; doubles per attempt, with jitter.
    pub retry_min_ms: u64,
    /// Longest delay between two attempts of one kick, in seconds.
    pub retry_max_secs: u64,
    /// UAIDs with a kick pending or being retried on this node; raises beyond it are dropped
    /// (and counted), so a PUT storm for away clients cannot grow memory without bound.
    pub max_pending: usize,
    /// Bytes of a receiver's response body read at most (for the log); the rest is discarded.
    pub max_response_bytes: usize,
    pub webhook: WebhookConfig,
    pub udp: UdpConfig,
    pub webpush: WebpushConfig,
}

/// `[kick.webhook]`: Standard Webhooks 1.0 POSTs.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub enabled: bool,
    /// CIDRs allowed although private (and the only ones where `http` is accepted).
    pub allow: Vec<String>,
    /// `whsec_<standard base64 of 24-64 bytes>`; empty: generated once, kept with the other keys.
    pub secret: String,
    /// Milliseconds one POST (connect, send, answer) may take before it counts as a timeout.
    pub timeout_ms: u64,
}

/// `[kick.udp]`: the SimplePush wake-up datagram.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UdpConfig {
    pub enabled: bool,
    /// UDP goes only to targets inside these CIDRs, public or not.
    pub allow: Vec<String>,
}

/// `[kick.webpush]`: RFC 8030 push with VAPID and an aes128gcm payload.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebpushConfig {
    pub enabled: bool,
    /// CIDRs allowed although private (and the only ones where `http` is accepted).
    pub allow: Vec<String>,
    /// base64url of the raw 32-byte P-256 scalar; empty: generated once, kept with the other keys.
    pub vapid_private_key: String,
    /// `mailto:…` or `https://…`, the `sub` claim of the VAPID JWT.
    pub vapid_subject: String,
    /// Milliseconds one push (connect, send, answer) may take before it counts as a timeout.
    pub timeout_ms: u64,
}

impl Default for KickConfig {
    fn default() -> Self {
        KickConfig {
            min_interval_secs: 30,
            retry_min_ms: 1000,
            retry_max_secs: 300,
            max_pending: 100_000,
            max_response_bytes: 4096,
            webhook: WebhookConfig::default(),
            udp: UdpConfig::default(),
            webpush: WebpushConfig::default(),
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            enabled: false,
            allow: Vec::new(),
            secret: String::new(),
            timeout_ms: 5000,
        }
    }
}

impl Default for WebpushConfig {
    fn default() -> Self {
        WebpushConfig {
            enabled: false,
            allow: Vec::new(),
            vapid_private_key: String::new(),
            vapid_subject: String::new(),
            timeout_ms: 5000,
        }
    }
}

/// Secrets stay out of `editiond config` output and logs.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("enabled", &self.enabled)
            .field("allow", &self.allow)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WebpushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebpushConfig")
            .field("enabled", &self.enabled)
            .field("allow", &self.allow)
            .field("vapid_subject", &self.vapid_subject)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

impl KickConfig {
    /// Blanks the secrets, for printing the effective configuration.
    pub fn redact_secrets(&mut self) {
        crate::config::redact(&mut self.webhook.secret);
        crate::config::redact(&mut self.webpush.vapid_private_key);
    }
}
