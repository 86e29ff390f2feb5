//! Durable state: UAID bindings, registrations, pending events.
//!
//! One small trait, [`Store`], with the embedded sled implementation ([`SledStore`]) for one node
//! and the Redis implementation ([`RedisStore`]) for several; [`AnyStore`] picks one at start-up
//! from config and dispatches statically (no boxed futures on the hot path). Mutating
//! methods change state in memory order; [`Store::sync`] is the durability barrier: when it
//! returns `Ok`, every change made before the call survives a crash. Callers sync before they
//! answer (a 2xx to a PUT, a hello reply with a new secret, the frame after an ACK), and before
//! they pass on what they read (an UPDATE): a read may see another caller's uncommitted write.
//! On Redis every write is acknowledged by the primary before its call returns, so `sync` has
//! nothing to wait for, and "survives a crash" means what Redis's persistence policy gives (see
//! [`redis`]: `appendfsync always` for the sled guarantee).
//!
//! Semantics every implementation keeps:
//! * a registration remembers the last known version for as long as it exists, pending or not;
//! * `put_version` raises an event only for a version greater than the last known one;
//! * `ack` clears a pending event only if its version is exactly the acknowledged one: an ACK
//!   names what the client received, never more.

mod memory;
mod record;
pub mod redis;
mod sled;
pub mod sled_db;

use std::future::Future;

pub use self::memory::MemoryStore;
pub use self::record::Registration;
pub use self::redis::{RedisStore, RedisTarget, StoredKeys};
pub use self::sled::SledStore;
pub use self::sled_db::SledDb;
use crate::ids::TokenId;
use crate::ids::{Appid, Uaid};

/// How stale a UAID's "last seen" may get before a touch writes it again: one write a day per
/// UAID at most, whatever the client's reconnect rate.
pub const TOUCH_EVERY_MS: u64 = 24 * 3600 * 1000;

/// Largest version the server picks from its clock: JavaScript reads integers exactly below 2^53.
pub const MAX_SERVER_VERSION: u64 = (1 << 53) - 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O: {0}")]
    Io(String),
    #[error("store record is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("store did not complete the operation within the time limit")]
    Timeout,
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which version a PUT asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionReq {
    /// The app server named it.
    Exact(u64),
    /// Empty body: the server picks this clock reading (milliseconds) or, when the last known
    /// version is not below it, one above that; [`PutOutcome::Exhausted`] when the pick would
    /// exceed [`MAX_SERVER_VERSION`].
    Clock(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new pending event with this version.
    Raised(u64),
    /// Nothing changed: a version at least this new is already known.
    Superseded(u64),
    /// The registration no longer exists.
    Gone,
    /// A server-picked version would leave the range JavaScript reads exactly.
    Exhausted,
}

/// What a register does to the registration's stored KICK settings (DESIGN.md "KICK drivers").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickChange<'a> {
    /// Neither the register nor hello named one: keep what is stored.
    Keep,
    /// The register carried one, or inherited hello's: replace what is stored.
    Set(&'a [u8]),
    /// The register said `"kick":null`: remove what is stored.
    Clear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// The registration's token (new or, for a repeated register, the existing one).
    Token(TokenId),
    /// The UAID already holds the maximum number of registrations.
    TooMany,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenTarget {
    Active(Uaid, Appid),
    /// Unregistered; the endpoint answers 410 until the tombstone expires.
    Gone,
    Unknown,
}

/// A requested commit; see [`Store::request_commit`]. Tickets only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CommitTicket(pub u64);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStats {
    pub expired_events: u64,
    pub expired_tombstones: u64,
}

/// The state editiond keeps. Implementations are cheap to share (`&self` everywhere).
pub trait Store: Send + Sync + 'static {
    /// Binds a UAID on first use. `true` if this call bound it (the caller may issue its secret),
    /// `false` if it was bound already. Atomic: two racing callers never both get `true`.
    fn bind_uaid(&self, uaid: Uaid) -> impl Future<Output = Result<bool>> + Send;

    /// Whether the UAID has been bound.
    fn uaid_bound(&self, uaid: Uaid) -> impl Future<Output = Result<bool>> + Send;

    /// A client proved the UAID is its own (its secret): binds it again if it is not bound (its
    /// record expired or was lost) and records that it was seen at `now_ms`, writing at most
    /// once per [`TOUCH_EVERY_MS`]. `true` if this call bound it.
    fn touch_uaid(&self, uaid: Uaid, now_ms: u64) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes the registrations of the UAIDs last seen before `idle_before_ms` that `held`
    /// does not claim (nor, on Redis, any node's route), each as by [`Store::unregister`] (its
    /// token answers Gone until `gone_until_ms`). The binding stays, so the UAID and its secret
    /// remain its owner's; a few bytes per abandoned UAID is what is kept. A held UAID is touched
    /// at `now_ms` instead, so a connection that stays up longer than the idle period leaves it a
    /// whole period. A UAID that no client named for that long is abandoned; without this the
    /// store would only grow. Returns how many UAIDs lost registrations.
    fn expire_idle(
        &self,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Creates the registration with `candidate` as its token, or returns the existing token;
    /// either way applies `kick` to its stored KICK settings.
    fn register(
        &self,
        uaid: Uaid,
        appid: Appid,
        candidate: TokenId,
        kick: KickChange<'_>,
        max_per_uaid: usize,
    ) -> impl Future<Output = Result<Registered>> + Send;

    /// The registration's stored KICK settings (JSON), `None` when it has none or does not exist.
    fn kick(&self, uaid: Uaid, appid: Appid) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;

    /// The stored KICK settings of every registration of the UAID that has some, ordered by
    /// APPID (DESIGN.md: an unheard raise kicks each distinct target of the UAID's registrations).
    fn kicks(&self, uaid: Uaid) -> impl Future<Output = Result<Vec<(Appid, Vec<u8>)>>> + Send;

    /// Removes the stored KICK settings equal to `kick` from every registration of the UAID
    /// (a driver reported the target gone); a registration whose kick was replaced meanwhile
    /// keeps the new one. Returns how many were removed.
    fn remove_kick(&self, uaid: Uaid, kick: &[u8]) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes the registration and its pending event; its token answers Gone until
    /// `gone_until_ms`. `false` if there was no such registration.
    fn unregister(
        &self,
        uaid: Uaid,
        appid: Appid,
        gone_until_ms: u64,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Where a token points. An unregistered token is `Gone` until a sweep after its
    /// `gone_until_ms` deletes the tombstone, then `Unknown`.
    fn lookup_token(&self, id: TokenId) -> impl Future<Output = Result<TokenTarget>> + Send;

    /// Compare-and-set: raises a pending event if the version is newer than the last known one.
    fn put_version(
        &self,
        uaid: Uaid,
        appid: Appid,
        version: VersionReq,
        expires_at_ms: u64,
    ) -> impl Future<Output = Result<PutOutcome>> + Send;

    /// The UAID's pending events that have not expired at `now_ms`, ordered by APPID.
    fn pending(&self, uaid: Uaid, now_ms: u64) -> impl Future<Output = Result<Vec<(Appid, u64)>>> + Send;

    /// Compare-and-delete: clears the pending event if its version equals `version`.
    fn ack(&self, uaid: Uaid, appid: Appid, version: u64) -> impl Future<Output = Result<bool>> + Send;

    /// Asks for a commit of every change made so far and returns at once. A caller with nothing
    /// to answer yet (an ACK that no frame follows) takes a ticket now and waits for it with
    /// [`Store::committed`] only before it next answers, so it never blocks on a commit that
    /// nobody is waiting to see.
    fn request_commit(&self) -> CommitTicket;

    /// Waits until the commit asked for by `ticket` has finished; `Ok` means every change made
    /// before [`Store::request_commit`] returned it survives a crash.
    fn committed(&self, ticket: CommitTicket) -> impl Future<Output = Result<()>> + Send;

    /// Durability barrier ([`Store::request_commit`] then [`Store::committed`]); see the module
    /// documentation.
    fn sync(&self) -> impl Future<Output = Result<()>> + Send {
        self.committed(self.request_commit())
    }

    /// Deletes events and tombstones that expired before `now_ms`.
    fn sweep(&self, now_ms: u64) -> impl Future<Output = Result<SweepStats>> + Send;

    /// Pending events held now (for metrics; may lag by a sweep).
    fn pending_count(&self) -> u64;

    /// Whether the store answers now, within its usual time bound (for `GET /health`).
    fn health(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The store chosen by `store.backend`. An enum, not a trait object: the trait's methods return
/// `impl Future`, and a `match` per call costs nothing next to the I/O behind it, where a trait
/// object would box a future per call (three or four per PUT). Nor a type parameter: it would
/// run through every part of the state and every handler. The price is one forwarding line per
/// method below.
#[derive(Clone)]
pub enum AnyStore {
    Sled(SledStore),
    Redis(RedisStore),
    /// Not selectable by config: for tests of the protocol core without a disk.
    Memory(MemoryStore),
}

/// Forwards one call to whichever store is in use.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sled($s) => $call,
            AnyStore::Redis($s) => $call,
            AnyStore::Memory($s) => $call,
        }
    };
}

impl AnyStore {
    /// The backend's name, as in `store.backend`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sled(_) => "sled",
            AnyStore::Redis(_) => "redis",
            AnyStore::Memory(_) => "memory",
        }
    }

    /// Makes everything written so far durable, synchronously; used at shutdown.
    pub fn flush_now(&self) -> Result<()> {
        match self {
            AnyStore::Sled(s) => s.flush_now(),
            // Every Redis write was acknowledged by the primary when it returned.
            AnyStore::Redis(_) => Ok(()),
            AnyStore::Memory(_) => Ok(()),
        }
    }
}

impl Store for AnyStore {
    async fn bind_uaid(&self, uaid: Uaid) -> Result<bool> {
        delegate!(self, s => s.bind_uaid(uaid).await)
    }

    async fn uaid_bound(&self, uaid: Uaid) -> Result<bool> {
        delegate!(self, s => s.uaid_bound(uaid).await)
    }

    async fn touch_uaid(&self, uaid: Uaid, now_ms: u64) -> Result<bool> {
        delegate!(self, s => s.touch_uaid(uaid, now_ms).await)
    }

    async fn expire_idle(
        &self,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> Result<u64> {
        delegate!(self, s => s.expire_idle(now_ms, idle_before_ms, gone_until_ms, held).await)
    }

    async fn register(
        &self,
        uaid: Uaid,
        appid: Appid,
        candidate: TokenId,
        kick: KickChange<'_>,
        max_per_uaid: usize,
    ) -> Result<Registered> {
        delegate!(self, s => s.register(uaid, appid, candidate, kick, max_per_uaid).await)
    }

    async fn kick(&self, uaid: Uaid, appid: Appid) -> Result<Option<Vec<u8>>> {
        delegate!(self, s => s.kick(uaid, appid).await)
    }

    async fn kicks(&self, uaid: Uaid) -> Result<Vec<(Appid, Vec<u8>)>> {
        delegate!(self, s => s.kicks(uaid).await)
    }

    async fn remove_kick(&self, uaid: Uaid, kick: &[u8]) -> Result<u64> {
        delegate!(self, s => s.remove_kick(uaid, kick).await)
    }

    async fn unregister(&self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> Result<bool> {
        delegate!(self, s => s.unregister(uaid, appid, gone_until_ms).await)
    }

    async fn lookup_token(&self, id: TokenId) -> Result<TokenTarget> {
        delegate!(self, s => s.lookup_token(id).await)
    }

    async fn put_version(
        &self,
        uaid: Uaid,
        appid: Appid,
        version: VersionReq,
        expires_at_ms: u64,
    ) -> Result<PutOutcome> {
        delegate!(self, s => s.put_version(uaid, appid, version, expires_at_ms).await)
    }

    async fn pending(&self, uaid: Uaid, now_ms: u64) -> Result<Vec<(Appid, u64)>> {
        delegate!(self, s => s.pending(uaid, now_ms).await)
    }

    async fn ack(&self, uaid: Uaid, appid: Appid, version: u64) -> Result<bool> {
        delegate!(self, s => s.ack(uaid, appid, version).await)
    }

    fn request_commit(&self) -> CommitTicket {
        delegate!(self, s => s.request_commit())
    }

    async fn committed(&self, ticket: CommitTicket) -> Result<()> {
        delegate!(self, s => s.committed(ticket).await)
    }

    async fn sweep(&self, now_ms: u64) -> Result<SweepStats> {
        delegate!(self, s => s.sweep(now_ms).await)
    }

    fn pending_count(&self) -> u64 {
        delegate!(self, s => s.pending_count())
    }

    async fn health(&self) -> Result<()> {
        delegate!(self, s => s.health().await)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
