//! The embedded store: sled trees on one machine, made durable by group commit.
//!
//! Trees: `uaids` (UAID → bound-at ms), `regs` (UAID‖APPID → [`Registration`]), `tokens`
//! (token id → UAID‖APPID, or a tombstone). Every read-modify-write is a sled compare-and-swap
//! loop on one key, so concurrent PUTs and ACKs on a registration never lose an update.
//!
//! Durability comes from the shared [`SledDb`] these trees live in: [`Store::sync`] is its group
//! commit. Reads take no part: a caller that answers with what it read (an UPDATE, a 200
//! "already known") syncs first, because the value may come from another caller's write that
//! is not yet committed.
//!
//! Whole-tree scans (the pending count at open, the sweep, idle expiry) run on the blocking
//! pool in batches of [`SCAN_BATCH`] keys, so a large tree never holds an async worker.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::record::{appid_of_key, registration_key, Registration, TokenEntry};
use super::sled_db::SledDb;
use super::MAX_SERVER_VERSION;
use super::{
    CommitTicket, KickChange, PutOutcome, Registered, Result, Store, StoreError, SweepStats, TokenTarget,
    VersionReq,
};
use crate::ids::TokenId;
use crate::ids::{Appid, Uaid};

/// The sled-backed store. Clones share one database.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: SledDb,
    uaids: sled::Tree,
    regs: sled::Tree,
    tokens: sled::Tree,
    /// Pending events, kept in memory for `/metrics` (counted once at open).
    pending: AtomicI64,
}

/// Keys one blocking-pool job of a whole-tree scan visits before the scan yields.
pub const SCAN_BATCH: usize = 1024;

/// Visits up to [`SCAN_BATCH`] entries of `tree` after the key `after` (from the start if
/// `None`) on the blocking pool; returns what `visit` kept and the key to continue after, or
/// `None` when the tree is done.
async fn scan_batch<T: Send + 'static>(
    tree: &sled::Tree,
    after: Option<sled::IVec>,
    mut visit: impl FnMut(&sled::IVec, sled::IVec) -> Result<Option<T>> + Send + 'static,
) -> Result<(Vec<T>, Option<sled::IVec>)> {
    let tree = tree.clone();
    let job = move || -> Result<(Vec<T>, Option<sled::IVec>)> {
        let range = match after {
            Some(key) => {
                tree.range::<&[u8], _>((std::ops::Bound::Excluded(&key[..]), std::ops::Bound::Unbounded))
            }
            None => tree.iter(),
        };
        let mut kept = Vec::new();
        let mut last = None;
        for (visited, item) in range.enumerate() {
            if visited == SCAN_BATCH {
                return Ok((kept, last));
            }
            let (key, value) = item?;
            if let Some(t) = visit(&key, value)? {
                kept.push(t);
            }
            last = Some(key);
        }
        Ok((kept, None))
    };
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl SledStore {
    /// Opens (or creates) a database in `dir` with only this store in it. Blocking.
    pub fn open(dir: &std::path::Path, cache_bytes: u64, write_timeout: Duration) -> Result<SledStore> {
        SledStore::on(SledDb::open(dir, cache_bytes, write_timeout)?)
    }

    /// The edition store's trees on a shared database. Blocking: counts pending events with a
    /// scan of every registration.
    pub fn on(db: SledDb) -> Result<SledStore> {
        let uaids = db.tree("uaids")?;
        let regs = db.tree("regs")?;
        let tokens = db.tree("tokens")?;
        let mut pending = 0i64;
        for item in regs.iter() {
            let (_, v) = item?;
            if Registration::decode(&v)?.pending.is_some() {
                pending += 1;
            }
        }
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                uaids,
                regs,
                tokens,
                pending: AtomicI64::new(pending),
            }),
        })
    }

    /// The database these trees live in, to share with another state family.
    pub fn db(&self) -> &SledDb {
        &self.inner.db
    }

    /// Commits synchronously (blocking); used at shutdown.
    pub fn flush_now(&self) -> Result<()> {
        self.inner.db.flush_now()
    }

    /// Compare-and-swap loop over one registration. `f` returns the new record (or `None` to
    /// leave it) and a result; it may run more than once under contention.
    fn update_reg<T>(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<Registration>) -> Result<(Option<Option<Registration>>, T)>,
    ) -> Result<T> {
        loop {
            let old = self.inner.regs.get(key)?;
            let decoded = old.as_deref().map(Registration::decode).transpose()?;
            let (new, out) = f(decoded)?;
            let Some(new) = new else {
                return Ok(out);
            };
            let new_bytes = new.as_ref().map(Registration::encode);
            match self.inner.regs.compare_and_swap(key, old, new_bytes)? {
                Ok(()) => return Ok(out),
                Err(_) => continue,
            }
        }
    }

    /// Applies a register's `kick` to an existing registration; its token, or `None` if the
    /// registration does not exist (any more).
    fn apply_kick(&self, key: &[u8], kick: KickChange<'_>) -> Result<Option<TokenId>> {
        self.update_reg(key, |old| {
            let Some(mut reg) = old else {
                return Ok((None, None));
            };
            let token = reg.token;
            let new = match kick {
                KickChange::Keep => return Ok((None, Some(token))),
                KickChange::Set(bytes) if reg.kick == bytes => return Ok((None, Some(token))),
                KickChange::Clear if reg.kick.is_empty() => return Ok((None, Some(token))),
                KickChange::Set(bytes) => bytes.to_vec(),
                KickChange::Clear => Vec::new(),
            };
            reg.kick = new;
            Ok((Some(Some(reg)), Some(token)))
        })
    }

    fn count_pending(&self, before: bool, after: bool) {
        match (before, after) {
            (false, true) => self.inner.pending.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.inner.pending.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// A binding's value: `SEEN_TAG` and when the UAID was last seen (first bound, or touched), in
/// ms, big-endian.
fn seen_value(ms: u64) -> [u8; 9] {
    let mut value = [SEEN_TAG; 9];
    value[1..].copy_from_slice(&ms.to_be_bytes());
    value
}

/// Tags a binding written since "last seen" was kept. Older bindings hold their bind time (8
/// bytes), which says nothing about when the UAID was last seen: `None`.
const SEEN_TAG: u8 = 1;

fn last_seen(value: &[u8]) -> Option<u64> {
    match value {
        [SEEN_TAG, ms @ ..] => <[u8; 8]>::try_from(ms).ok().map(u64::from_be_bytes),
        _ => None,
    }
}

impl Store for SledStore {
    async fn bind_uaid(&self, uaid: Uaid) -> Result<bool> {
        let now = seen_value(super::now_ms());
        let swapped =
            self.inner
                .uaids
                .compare_and_swap(uaid.as_bytes(), None as Option<&[u8]>, Some(&now[..]))?;
        Ok(swapped.is_ok())
    }

    async fn uaid_bound(&self, uaid: Uaid) -> Result<bool> {
        Ok(self.inner.uaids.contains_key(uaid.as_bytes())?)
    }

    async fn touch_uaid(&self, uaid: Uaid, now_ms: u64) -> Result<bool> {
        let now = seen_value(now_ms);
        let uaids = &self.inner.uaids;
        let current = match uaids.compare_and_swap(uaid.as_bytes(), None as Option<&[u8]>, Some(&now[..]))? {
            Ok(()) => return Ok(true),
            Err(e) => e.current,
        };
        let stale = |v: &sled::IVec| last_seen(v).is_none_or(|seen| seen + super::TOUCH_EVERY_MS <= now_ms);
        if let Some(seen) = current.filter(stale) {
            // Lost to a concurrent touch at worst, which wrote the same news (bindings are
            // never deleted).
            let _ = uaids.compare_and_swap(uaid.as_bytes(), Some(seen), Some(&now[..]))?;
        }
        Ok(false)
    }

    async fn expire_idle(
        &self,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> Result<u64> {
        let mut expired = 0;
        let mut after = None;
        loop {
            let inner = self.inner.clone();
            // Idle candidates only; bindings from before "last seen" was kept are counted seen
            // now, once, in the same pass.
            let (candidates, next) = scan_batch(&self.inner.uaids, after, move |key, seen| {
                let uaid = <[u8; 16]>::try_from(&key[..])
                    .map(Uaid)
                    .map_err(|_| StoreError::Corrupt("uaid key"))?;
                let Some(last) = last_seen(&seen) else {
                    let _ = inner
                        .uaids
                        .compare_and_swap(key, Some(seen), Some(&seen_value(now_ms)[..]))?;
                    return Ok(None);
                };
                Ok((last < idle_before_ms).then_some(uaid))
            })
            .await?;
            for uaid in candidates {
                if held(&uaid) {
                    // In use all along: seen now, so it gets a whole idle period after it is let go.
                    self.touch_uaid(uaid, now_ms).await?;
                    continue;
                }
                // The binding stays (the UAID and its secret remain its owner's); its
                // registrations go. A failure midway leaves the binding stale, so the next sweep
                // goes on.
                let mut appids = Vec::new();
                for reg in self.inner.regs.scan_prefix(uaid.as_bytes()) {
                    appids.push(appid_of_key(&reg?.0)?);
                }
                if appids.is_empty() {
                    continue;
                }
                for appid in appids {
                    self.unregister(uaid, appid, gone_until_ms).await?;
                }
                expired += 1;
            }
            match next {
                Some(key) => after = Some(key),
                None => return Ok(expired),
            }
        }
    }

    async fn register(
        &self,
        uaid: Uaid,
        appid: Appid,
        candidate: TokenId,
        kick: KickChange<'_>,
        max_per_uaid: usize,
    ) -> Result<Registered> {
        let key = registration_key(&uaid, &appid);
        if self.inner.regs.get(key)?.is_some() {
            if let Some(token) = self.apply_kick(&key, kick)? {
                return Ok(Registered::Token(token));
            }
        }
        // One connection holds a UAID at a time and handles its frames in order, so this count
        // is not raced by another register for the same UAID.
        if self.inner.regs.scan_prefix(uaid.as_bytes()).count() >= max_per_uaid {
            return Ok(Registered::TooMany);
        }
        self.inner
            .tokens
            .insert(candidate.0, TokenEntry::Active(uaid, appid).encode())?;
        let stored = match kick {
            KickChange::Set(bytes) => bytes,
            KickChange::Keep | KickChange::Clear => &[],
        };
        let record = Registration::new(candidate, stored).encode();
        match self
            .inner
            .regs
            .compare_and_swap(key, None as Option<&[u8]>, Some(record))?
        {
            Ok(()) => Ok(Registered::Token(candidate)),
            Err(_) => {
                self.inner.tokens.remove(candidate.0)?;
                let token = self.apply_kick(&key, kick)?;
                Ok(Registered::Token(
                    token.ok_or(StoreError::Corrupt("registration"))?,
                ))
            }
        }
    }

    async fn kick(&self, uaid: Uaid, appid: Appid) -> Result<Option<Vec<u8>>> {
        let key = registration_key(&uaid, &appid);
        let Some(bytes) = self.inner.regs.get(key)? else {
            return Ok(None);
        };
        let reg = Registration::decode(&bytes)?;
        Ok((!reg.kick.is_empty()).then_some(reg.kick))
    }

    async fn kicks(&self, uaid: Uaid) -> Result<Vec<(Appid, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.inner.regs.scan_prefix(uaid.as_bytes()) {
            let (key, value) = item?;
            let reg = Registration::decode(&value)?;
            if !reg.kick.is_empty() {
                out.push((appid_of_key(&key)?, reg.kick));
            }
        }
        Ok(out)
    }

    async fn remove_kick(&self, uaid: Uaid, kick: &[u8]) -> Result<u64> {
        if kick.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        for key in self.inner.regs.scan_prefix(uaid.as_bytes()).keys() {
            let key = key?;
            // Compare-and-swap per registration: a register that replaced the kick meanwhile wins.
            let cleared = self.update_reg(&key, |old| match old {
                Some(mut reg) if reg.kick == kick => {
                    reg.kick.clear();
                    Ok((Some(Some(reg)), true))
                }
                _ => Ok((None, false)),
            })?;
            removed += u64::from(cleared);
        }
        Ok(removed)
    }

    async fn unregister(&self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> Result<bool> {
        let key = registration_key(&uaid, &appid);
        let removed = self.update_reg(&key, |old| match old {
            Some(reg) => Ok((Some(None), Some(reg))),
            None => Ok((None, None)),
        })?;
        let Some(reg) = removed else { return Ok(false) };
        self.count_pending(reg.pending.is_some(), false);
        self.inner.tokens.insert(
            reg.token.0,
            TokenEntry::Gone {
                until_ms: gone_until_ms,
            }
            .encode(),
        )?;
        Ok(true)
    }

    async fn lookup_token(&self, id: TokenId) -> Result<TokenTarget> {
        match self.inner.tokens.get(id.0)? {
            None => Ok(TokenTarget::Unknown),
            Some(bytes) => Ok(match TokenEntry::decode(&bytes)? {
                TokenEntry::Active(u, a) => TokenTarget::Active(u, a),
                TokenEntry::Gone { .. } => TokenTarget::Gone,
            }),
        }
    }

    async fn put_version(
        &self,
        uaid: Uaid,
        appid: Appid,
        version: VersionReq,
        expires_at_ms: u64,
    ) -> Result<PutOutcome> {
        let key = registration_key(&uaid, &appid);
        let (outcome, had_pending) = self.update_reg(&key, |old| {
            let Some(mut reg) = old else {
                return Ok((None, (PutOutcome::Gone, false)));
            };
            let had = reg.pending.is_some();
            let v = match version {
                VersionReq::Exact(v) => v,
                VersionReq::Clock(now) => {
                    // The clock, or one above the last known version when that is ahead of it.
                    let next = match reg.last_version {
                        Some(last) if last >= now => last.checked_add(1),
                        _ => Some(now),
                    };
                    match next {
                        Some(next) if next <= MAX_SERVER_VERSION => next,
                        _ => return Ok((None, (PutOutcome::Exhausted, had))),
                    }
                }
            };
            if let Some(last) = reg.last_version.filter(|&last| v <= last) {
                return Ok((None, (PutOutcome::Superseded(last), had)));
            }
            reg.last_version = Some(v);
            reg.pending = Some((v, expires_at_ms));
            Ok((Some(Some(reg)), (PutOutcome::Raised(v), had)))
        })?;
        if let PutOutcome::Raised(_) = outcome {
            self.count_pending(had_pending, true);
        }
        Ok(outcome)
    }

    async fn pending(&self, uaid: Uaid, now_ms: u64) -> Result<Vec<(Appid, u64)>> {
        let mut out = Vec::new();
        for item in self.inner.regs.scan_prefix(uaid.as_bytes()) {
            let (key, value) = item?;
            if let Some((version, expires)) = Registration::decode(&value)?.pending {
                if expires > now_ms {
                    out.push((appid_of_key(&key)?, version));
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, uaid: Uaid, appid: Appid, version: u64) -> Result<bool> {
        let key = registration_key(&uaid, &appid);
        let cleared = self.update_reg(&key, |old| match old {
            Some(mut reg) if reg.pending.is_some_and(|(v, _)| v == version) => {
                reg.pending = None;
                Ok((Some(Some(reg)), true))
            }
            _ => Ok((None, false)),
        })?;
        if cleared {
            self.count_pending(true, false);
        }
        Ok(cleared)
    }

    fn request_commit(&self) -> CommitTicket {
        self.inner.db.request_commit()
    }

    async fn committed(&self, ticket: CommitTicket) -> Result<()> {
        self.inner.db.committed(ticket).await
    }

    async fn sweep(&self, now_ms: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        let mut after = None;
        loop {
            let store = self.clone();
            let (cleared, next) = scan_batch(&self.inner.regs, after, move |key, _| {
                let cleared = store.update_reg(key, |old| match old {
                    Some(mut reg) if reg.pending.is_some_and(|(_, exp)| exp <= now_ms) => {
                        reg.pending = None;
                        Ok((Some(Some(reg)), true))
                    }
                    _ => Ok((None, false)),
                })?;
                if cleared {
                    store.count_pending(true, false);
                }
                Ok(cleared.then_some(()))
            })
            .await?;
            stats.expired_events += cleared.len() as u64;
            after = next;
            if after.is_none() {
                break;
            }
        }
        loop {
            let tokens = self.inner.tokens.clone();
            let (removed, next) = scan_batch(&self.inner.tokens, after, move |key, value| {
                let TokenEntry::Gone { until_ms } = TokenEntry::decode(&value)? else {
                    return Ok(None);
                };
                let removed = until_ms <= now_ms
                    && tokens
                        .compare_and_swap(key, Some(value), None as Option<&[u8]>)?
                        .is_ok();
                Ok(removed.then_some(()))
            })
            .await?;
            stats.expired_tombstones += removed.len() as u64;
            after = next;
            if after.is_none() {
                return Ok(stats);
            }
        }
    }

    fn pending_count(&self) -> u64 {
        self.inner.pending.load(Ordering::Relaxed).max(0) as u64
    }

    async fn health(&self) -> Result<()> {
        self.inner.db.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans run in batches on the blocking pool: a tree larger than a batch is visited whole,
    /// each entry once.
    #[tokio::test]
    async fn sweeps_and_idle_expiry_cross_batch_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20, Duration::from_secs(30)).unwrap();
        let n = SCAN_BATCH * 2 + 7;
        let now = super::super::now_ms();
        for _ in 0..n {
            let (uaid, appid) = (Uaid::random(), Appid::random());
            assert!(store.bind_uaid(uaid).await.unwrap());
            store
                .register(uaid, appid, TokenId::random(), KickChange::Keep, 10)
                .await
                .unwrap();
            let put = store.put_version(uaid, appid, VersionReq::Exact(1), now - 1);
            assert_eq!(put.await.unwrap(), PutOutcome::Raised(1));
        }
        assert_eq!(store.pending_count(), n as u64);
        let stats = store.sweep(now).await.unwrap();
        assert_eq!(stats.expired_events, n as u64);
        assert_eq!(store.pending_count(), 0);
        // Every binding was seen at or before `later`.
        let later = super::super::now_ms() + 1;
        let expired = store.expire_idle(later, later, later + 1000, &|_| false);
        assert_eq!(expired.await.unwrap(), n as u64);
        let stats = store.sweep(later + 2000).await.unwrap();
        assert_eq!(stats.expired_tombstones, n as u64);
    }

    /// Bindings written before "last seen" was kept hold their bind time: the first idle sweep
    /// counts them seen then, instead of taking a years-old bind time for abandonment.
    #[tokio::test]
    async fn old_bindings_count_as_seen_at_the_first_idle_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 8 << 20, Duration::from_secs(30)).unwrap();
        let old = Uaid::random();
        store
            .inner
            .uaids
            .insert(old.as_bytes(), &1u64.to_be_bytes()[..])
            .unwrap();
        store
            .register(
                old,
                Appid::random(),
                TokenId::random(),
                super::KickChange::Keep,
                10,
            )
            .await
            .unwrap();
        let now = super::super::now_ms();
        assert_eq!(
            store.expire_idle(now, now - 1000, now, &|_| false).await.unwrap(),
            0
        );
        let value = store.inner.uaids.get(old.as_bytes()).unwrap().unwrap();
        assert_eq!(last_seen(&value), Some(now));
        assert_eq!(store.expire_idle(now, now + 1, now, &|_| false).await.unwrap(), 1);
    }
}
