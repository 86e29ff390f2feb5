//! Push: the edition protocol. App servers PUT a new version to an endpoint ([`endpoint`]); the
//! event is stored and raised ([`events`]); the connection holding its UAID ([`registry`] on
//! this node, [`route`] across nodes on Redis) gets an UPDATE over a WebSocket ([`ws`]) or a
//! long poll ([`poll`]), both driving the protocol rules of [`session`] over the messages of
//! [`proto`]; [`held`] is what one connection holds; [`wake`] kicks the UAIDs nobody holds; [`watch`] raises events for writes to watched
//! Sync storage collections.

pub(crate) mod delivery;
pub mod endpoint;
pub(crate) mod events;
pub(crate) mod held;
pub mod poll;
pub mod proto;
pub(crate) mod registry;
pub(crate) mod route;
pub mod session;
pub(crate) mod wake;
pub mod watch;
pub(crate) mod ws;
