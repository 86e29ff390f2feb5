//! editiond: an edition server. App servers PUT a new version to an endpoint; clients holding a
//! WebSocket (or polling) for that user agent get an UPDATE and ACK it.
//!
//! Modules by concern: [`proto`] (WebSocket messages, pure), [`session`] (the protocol rules of
//! one connection, no sockets; [`held`] its UAIDs), [`ws`] (the socket loop), [`endpoint`] (app-server PUTs),
//! [`poll`] (REST clients), [`registry`] (which connection holds which UAID), [`route`] (which node
//! holds it, on Redis), [`store`] (durable
//! state behind a trait), [`keys`] (tokens and secrets), [`ratelimit`] (token buckets), [`config`],
//! [`metrics`], [`http`] (errors and bodies), [`server`] (wiring and shutdown).

pub mod config;
pub mod endpoint;
pub mod held;
pub mod http;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod poll;
pub mod proto;
pub mod ratelimit;
pub mod registry;
pub mod route;
pub mod server;
pub mod session;
pub mod storage;
pub mod store;
pub mod ws;
