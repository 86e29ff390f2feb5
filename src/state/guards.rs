//! The per-node rate guards in front of the store: PUTs per registration and new UAIDs per
//! client address.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Limits;
use crate::ids::TokenId;
use crate::ratelimit::{Buckets, Rate};

/// Owned by the HTTP and socket front doors (PUT, hello, poll); pruned by the sweeper.
/// A cheap handle: clones share the same buckets.
#[derive(Clone)]
pub struct Guards {
    /// PUT rate limit per registration, keyed by endpoint token, on this node only (nodes do not
    /// share it: a registration PUT to through N nodes may get up to N times the rate). `None`
    /// when `put_rate_per_sec` is 0. Pruned by the sweeper, so it holds only recent PUTs.
    pub put: Option<Arc<Buckets<TokenId>>>,
    /// New UAIDs per client address (`uaid_rate_per_sec`), on this node only; `None` when 0.
    /// Pruned with `put`.
    pub uaids: Option<Arc<Buckets<IpAddr>>>,
}

impl Guards {
    /// The guards `limits` asks for.
    pub fn new(limits: &Limits) -> Guards {
        Guards {
            put: (limits.put_rate_per_sec > 0)
                .then(|| Arc::new(Buckets::new(Rate::new(limits.put_rate_per_sec, limits.put_burst)))),
            uaids: (limits.uaid_rate_per_sec > 0).then(|| {
                Arc::new(Buckets::new(Rate::new(
                    limits.uaid_rate_per_sec,
                    limits.uaid_burst,
                )))
            }),
        }
    }

    /// Lets `client` create `n` new UAIDs, or says in how many seconds it may (`Retry-After`).
    /// A client whose address is unknown is not limited.
    pub fn admit_new_uaids(&self, client: Option<IpAddr>, n: usize) -> Result<(), u64> {
        let (Some(buckets), Some(ip), true) = (&self.uaids, client, n > 0) else {
            return Ok(());
        };
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        buckets.take_n(ip, n, Instant::now()).map_err(|wait| {
            tracing::debug!(%ip, n, "new UAIDs refused: over limits.uaid_rate_per_sec");
            crate::ratelimit::retry_after_secs(wait)
        })
    }
}
