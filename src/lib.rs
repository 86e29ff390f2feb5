//! editiond: an edition server. App servers PUT a new version to an endpoint; clients holding a
//! WebSocket (or polling) for that user agent get an UPDATE and ACK it.
//!
//! Folders by capability: [`push`] (the edition protocol: messages, session rules, WebSocket,
//! poll, PUT endpoint, raising events, who holds which UAID) and [`store`] (durable state behind
//! a trait: sled, Redis, memory). Beside them, shared plumbing: [`state`] (what handlers share),
//! [`config`], [`ids`], [`keys`] (tokens and secrets), [`kick`] (waking clients that are away),
//! [`storage`] (the Sync 1.5 storage API), [`relay`] (one client of an upstream editiond for all
//! its own clients), [`ratelimit`] (token buckets),
//! [`metrics`], [`http`] (errors and bodies), [`web`] (the browser client, the demo page, CORS),
//! [`accept`] (connections: timeouts, the cap, the bounded drain), and [`server`] (wiring and
//! shutdown; nothing imports it back).
#![forbid(unsafe_code)]

pub(crate) mod accept;
pub mod config;
pub(crate) mod http;
pub mod ids;
pub mod keys;
pub mod kick;
pub(crate) mod metrics;
pub mod push;
pub(crate) mod ratelimit;
pub mod relay;
pub mod server;
pub(crate) mod state;
pub mod storage;
pub mod store;
pub(crate) mod web;
