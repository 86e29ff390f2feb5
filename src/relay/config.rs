//! The `[relay]` configuration section. A node is a relay when `upstream` is set (by config or
//! by `editiond relay --upstream URL`); `config.toml` documents each key, DESIGN.md fixes the
//! names of `upstream` and `transport`.

use serde::{Deserialize, Serialize};

/// How a relay reaches its upstream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One WebSocket (`/v1/ws`): hello, then claims, UPDATEs and ACKs both ways.
    #[default]
    Ws,
    /// Outbound HTTP only: long polls (`/v1/poll`), `/v1/ack`, `/v1/register`, `/v1/unregister`.
    Poll,
}

impl Transport {
    /// The name, as in `relay.transport`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Poll => "poll",
        }
    }
}

/// `[relay]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The upstream's base URL (`ws://`, `wss://`, `http://` or `https://` host and port); empty:
    /// this node is no relay.
    pub upstream: String,
    /// `ws` or `poll`.
    pub transport: Transport,
    /// First reconnect delay after the upstream link fails, in milliseconds; doubles per failed
    /// attempt, with jitter.
    pub reconnect_min_ms: u64,
    /// Longest delay between two reconnect attempts, in seconds.
    pub reconnect_max_secs: u64,
    /// Seconds between pings on an idle upstream WebSocket; no frame for twice that drops the link.
    pub ping_interval_secs: u64,
    /// Seconds one request to the upstream (connect, hello, a forwarded claim or register) may
    /// take before it fails: the downstream request then gets 503.
    pub request_timeout_secs: u64,
    /// `?wait=` of each upstream long poll (transport `poll`), in seconds.
    pub poll_wait_secs: u64,
    /// Frames per second the relay sends on its upstream WebSocket at most (on average); keeps
    /// it under the upstream's `limits.ws_frames_per_sec`. Claims waiting meanwhile share a frame.
    pub upstream_frames_per_sec: u32,
    /// Frames the relay may send upstream in a burst above that average.
    pub upstream_frames_burst: u32,
    /// Seconds sent in `Retry-After` (and `retry_after`) when the upstream is unreachable.
    pub retry_after_secs: u64,
    /// Downstream requests (claims, registers, unregisters) that may wait for the upstream
    /// WebSocket at once; more answer 503 at once instead of queueing without bound.
    pub max_queued_requests: usize,
    /// Seconds a UAID may go unseen by the relay (no downstream hello, claim or poll with its
    /// secret) and unheld before the relay forgets it: drops it and its secret from its book and
    /// releases it upstream. 0 follows `limits.uaid_idle_days` (0 there: never).
    pub book_idle_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            upstream: String::new(),
            transport: Transport::Ws,
            reconnect_min_ms: 500,
            reconnect_max_secs: 30,
            ping_interval_secs: 30,
            request_timeout_secs: 10,
            poll_wait_secs: 30,
            upstream_frames_per_sec: 50,
            upstream_frames_burst: 100,
            retry_after_secs: 5,
            max_queued_requests: 4096,
            book_idle_secs: 0,
        }
    }
}

impl RelayConfig {
    /// Whether this node is a relay.
    pub fn enabled(&self) -> bool {
        !self.upstream.is_empty()
    }

    /// How long a UAID may go unseen before the relay forgets it, in ms; 0: never.
    pub fn book_idle_ms(&self, uaid_idle_days: u64) -> u64 {
        match self.book_idle_secs {
            0 => uaid_idle_days.saturating_mul(24 * 3600 * 1000),
            secs => secs.saturating_mul(1000),
        }
    }

    /// What is wrong with the section, if anything.
    pub fn check(&self) -> Result<(), &'static str> {
        let u = &self.upstream;
        let schemes = ["ws://", "wss://", "http://", "https://"];
        if !u.is_empty() && !schemes.iter().any(|s| u.starts_with(s)) {
            return Err("relay.upstream must start with ws://, wss://, http:// or https:// (or be empty)");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_secs == 0 {
            return Err("relay.reconnect_min_ms and relay.reconnect_max_secs must be at least 1");
        }
        if self.ping_interval_secs == 0 || self.request_timeout_secs == 0 {
            return Err("relay.ping_interval_secs and relay.request_timeout_secs must be at least 1");
        }
        if self.max_queued_requests == 0 {
            return Err("relay.max_queued_requests must be at least 1");
        }
        if self.upstream_frames_per_sec == 0 {
            return Err("relay.upstream_frames_per_sec must be at least 1");
        }
        Ok(())
    }

    /// The upstream's base URL in the scheme `transport` speaks, without a trailing slash:
    /// `ws(s)://` for the WebSocket, `http(s)://` for poll (either form is accepted in config).
    pub fn base_url(&self) -> String {
        let u = self.upstream.trim_end_matches('/');
        let swap = |from: &str, to: &str| u.strip_prefix(from).map(|rest| format!("{to}{rest}"));
        let converted = match self.transport {
            Transport::Ws => swap("http://", "ws://").or_else(|| swap("https://", "wss://")),
            Transport::Poll => swap("ws://", "http://").or_else(|| swap("wss://", "https://")),
        };
        converted.unwrap_or_else(|| u.to_owned())
    }
}
