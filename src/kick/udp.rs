//! The `udp` driver: the SimplePush wake-up, one datagram whose payload is the UAID's 36 ASCII
//! characters, sent to `ip:port`. Only to targets inside `[kick.udp] allow`, public or not: UDP
//! has no handshake, so anything else would let a client aim the server at any host.
//! UDP has no answer: the datagram is resent on the backoff schedule while the client stays
//! away, at most [`MAX_DATAGRAMS_PER_EVENT`] times per event.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use serde_json::{json, Map, Value};
use tokio::net::UdpSocket;

use super::guard::Allow;
use super::{EventInfo, KickDriver, KickError, Outcome, Setup, SetupError};
use crate::ids::Uaid;

/// Datagrams sent for one event at most (DESIGN.md: "at most 5 datagrams per event").
pub const MAX_DATAGRAMS_PER_EVENT: u32 = 5;

pub struct Udp {
    allow: Allow,
}

impl Udp {
    pub fn build(setup: &Setup) -> Result<Option<Arc<dyn KickDriver>>, SetupError> {
        let c = &setup.config.udp;
        if !c.enabled {
            return Ok(None);
        }
        let allow = Allow::parse(&c.allow).map_err(|message| SetupError::Config {
            driver: "udp",
            message,
        })?;
        Ok(Some(Arc::new(Udp { allow })))
    }

    fn target(&self, addr: &str) -> Result<SocketAddr, KickError> {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| KickError::Invalid("\"addr\" must be ip:port".into()))?;
        if addr.port() == 0 {
            return Err(KickError::Invalid("\"addr\" needs a port".into()));
        }
        if !self.allow.contains(addr.ip()) {
            return Err(KickError::Refused(
                "UDP goes only to targets inside the driver's allow list".into(),
            ));
        }
        Ok(addr)
    }
}

impl KickDriver for Udp {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn validate<'a>(&'a self, kick: &'a Map<String, Value>) -> BoxFuture<'a, Result<Value, KickError>> {
        let checked = super::string_field(kick, "addr").and_then(|a| self.target(a));
        async move { Ok(json!({"driver": "udp", "addr": checked?.to_string()})) }.boxed()
    }

    fn kick<'a>(
        &'a self,
        target: &'a Map<String, Value>,
        uaid: &'a Uaid,
        _event: EventInfo<'a>,
    ) -> BoxFuture<'a, Outcome> {
        async move {
            // Checked again: the allow list may have changed since the kick was stored.
            let Some(Ok(addr)) = target.get("addr").and_then(Value::as_str).map(|a| self.target(a)) else {
                return Outcome::Rejected;
            };
            let local = match addr.ip() {
                IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            };
            let sent = async {
                let socket = UdpSocket::bind(local).await?;
                socket.send_to(uaid.to_string().as_bytes(), addr).await
            };
            match sent.await {
                Ok(_) => Outcome::Sent,
                Err(e) => {
                    tracing::debug!(error = %e, "udp kick failed");
                    Outcome::RetryAfter(std::time::Duration::ZERO)
                }
            }
        }
        .boxed()
    }

    fn resends(&self) -> u32 {
        MAX_DATAGRAMS_PER_EVENT - 1
    }
}
