//! `[storage]`: the Sync 1.5 storage API's configuration, one struct mounted in [`crate::config`].
//!
//! The API is on when `master_secret` is set. The size limits are the ones `info/configuration`
//! reports to clients, so they are named exactly as the 1.5 specification names them.

use serde::{Deserialize, Serialize};

/// Everything the storage API reads at start-up. See config.toml for each key's meaning.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The tokenserver's shared secret(s), separated by spaces: the first mints tokens
    /// (`editiond token`), every one verifies them (so a new secret can be rolled out before the
    /// old one is retired). Empty: the storage API is off.
    pub master_secret: String,
    /// With `store.backend = "redis"`, storage (which lives in this node's sled) runs only if the
    /// operator affirms that every storage request reaches this one node.
    pub pinned: bool,
    /// Seconds a Hawk timestamp may differ from the server clock.
    pub hawk_skew_secs: u64,
    /// Hawk nonces remembered (for replay detection) at most; beyond it requests get 503.
    pub max_nonces: usize,
    /// Seconds after its expiry a token may still read `info/collections` (as the reference
    /// server allows, so a client can decide whether to sync before it gets a new token).
    pub expired_token_grace_secs: u64,
    /// Largest request body, in bytes (413 beyond).
    pub max_request_bytes: usize,
    /// Records one POST may carry; more fail with "retry bso".
    pub max_post_records: usize,
    /// Payload bytes one POST may carry; records beyond fail with "retry bytes".
    pub max_post_bytes: usize,
    /// Records one batch may collect; more fail with "retry bso".
    pub max_total_records: usize,
    /// Payload bytes one batch may collect; records beyond fail with "retry bytes".
    pub max_total_bytes: usize,
    /// Largest payload of one record, in bytes.
    pub max_record_payload_bytes: usize,
    /// Ids one `ids=` query parameter may name.
    pub max_ids: usize,
    /// Largest record ttl, in seconds.
    pub max_ttl_secs: u64,
    /// Seconds an uncommitted batch lives.
    pub batch_ttl_secs: u64,
    /// Bytes of payload one user may store; 0: no quota.
    pub quota_bytes: u64,
    /// Milliseconds a write may wait for durability (or for the user's other writes) before
    /// the request gets 503 with Retry-After and X-Weave-Backoff.
    pub write_timeout_ms: u64,
    /// Seconds sent in Retry-After and X-Weave-Backoff with such a 503, and in the
    /// X-Weave-Backoff of answers under load.
    pub backoff_secs: u64,
    /// Storage requests in flight (the new one included) above which answers carry
    /// X-Weave-Backoff; 0: never.
    pub backoff_in_flight: usize,
    /// Storage requests in flight (the new one included) above which a request is refused
    /// with 503, Retry-After and X-Weave-Backoff; 0: never.
    pub shed_in_flight: usize,
    /// Seconds between sweeps that delete expired records and batches.
    pub sweep_interval_secs: u64,
    /// End of life: "" (in service), "soft" (an X-Weave-Alert on every answer) or "hard" (513).
    pub eol: String,
    /// Message of the end-of-life alert.
    pub eol_message: String,
    /// Link of the end-of-life alert.
    pub eol_url: String,
    /// `Access-Control-Max-Age` of CORS preflight answers, in seconds.
    pub cors_max_age_secs: u64,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            master_secret: String::new(),
            pinned: false,
            hawk_skew_secs: 60,
            max_nonces: 4_000_000,
            expired_token_grace_secs: 7200,
            max_request_bytes: 2_101_248,
            max_post_records: 100,
            max_post_bytes: 2_097_152,
            max_total_records: 10_000,
            max_total_bytes: 209_715_200,
            max_record_payload_bytes: 2_097_152,
            max_ids: 100,
            max_ttl_secs: 31_536_000,
            batch_ttl_secs: 7200,
            quota_bytes: 0,
            write_timeout_ms: 5000,
            backoff_secs: 5,
            backoff_in_flight: 256,
            shed_in_flight: 1024,
            sweep_interval_secs: 600,
            eol: String::new(),
            eol_message: String::new(),
            eol_url: String::new(),
            cors_max_age_secs: 555,
        }
    }
}

impl StorageConfig {
    /// Whether the storage API is served.
    pub fn enabled(&self) -> bool {
        !self.master_secret.trim().is_empty()
    }

    /// The master secrets, first (minting) one first.
    pub fn secrets(&self) -> Vec<&str> {
        self.master_secret.split_whitespace().collect()
    }

    pub fn redact_secrets(&mut self) {
        if self.enabled() {
            self.master_secret = "***".into();
        }
    }

    pub(crate) fn validate(&self, backend: &crate::config::Backend) -> Result<(), &'static str> {
        if !self.enabled() {
            return Ok(());
        }
        if *backend == crate::config::Backend::Redis && !self.pinned {
            return Err(
                "storage lives in this node's sled: with store.backend = \"redis\" set \
                        storage.pinned = true once every storage request reaches this one node",
            );
        }
        if !matches!(self.eol.as_str(), "" | "soft" | "hard") {
            return Err("storage.eol must be \"\", \"soft\" or \"hard\"");
        }
        if self.max_post_records == 0 || self.max_ids == 0 || self.sweep_interval_secs == 0 {
            return Err("storage.max_post_records, max_ids and sweep_interval_secs must be at least 1");
        }
        if self.max_request_bytes < self.max_post_bytes {
            return Err("storage.max_request_bytes must be at least storage.max_post_bytes");
        }
        Ok(())
    }
}
