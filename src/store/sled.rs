//! The embedded store: sled trees on one machine, made durable by group commit.
//!
//! Trees: `uaids` (UAID → bound-at ms), `regs` (UAID‖APPID → [`Registration`]), `tokens`
//! (token id → UAID‖APPID, or a tombstone). Every read-modify-write is a sled compare-and-swap
//! loop on one key, so concurrent PUTs and ACKs on a registration never lose an update.
//!
//! Durability (fsync policy): [`Store::sync`] waits for a commit that *started after* the
//! caller's writes. A commit is `Db::flush` (which writes sled's log buffers to `<dir>/db`)
//! followed by `fsync` (`File::sync_all`) of that file. The fsync is ours because on Linux
//! sled's flush ends with `sync_file_range`, which neither flushes the drive's write cache nor
//! the file's metadata: enough to survive a killed process, not a power cut. One flusher thread
//! runs commits back to back; every caller that arrives while one runs shares the next, so N
//! concurrent PUTs cost about two fsyncs, not N. The thread is a plain OS thread, not a task
//! plus `spawn_blocking` per commit: a commit then costs one wake-up of the thread and one
//! broadcast to its waiters, and no hop through the runtime's blocking pool. Reads take no part: a caller that answers with
//! what it read (an UPDATE, a 200 "already known") syncs first, because the value may come from
//! another caller's write that is not yet committed. sled's own periodic flush (every 500 ms,
//! also with fsync) is left on as a second line only.
//!
//! A commit that fails (or panics) is final: tickets it or any later commit covers report the
//! failure, `/health` turns 503, and the server must be restarted (see `Committed`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::record::{appid_of_key, registration_key, Registration, TokenEntry};
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
    db: sled::Db,
    /// sled's log file (`<dir>/db`), opened once so every commit can fsync it.
    log: std::fs::File,
    uaids: sled::Tree,
    regs: sled::Tree,
    tokens: sled::Tree,
    commit: GroupCommit,
    /// Pending events, kept in memory for `/metrics` (counted once at open).
    pending: AtomicI64,
    write_timeout: Duration,
}

/// Tickets and the flush that covers them. See the module documentation.
struct GroupCommit {
    /// Highest ticket handed out; a ticket is taken after the caller's writes.
    requested: AtomicU64,
    /// Which tickets finished commits cover; see [`Committed`].
    done: watch::Sender<Committed>,
    /// The flusher thread, unparked for each ticket (a no-op while it is busy committing).
    flusher: std::sync::OnceLock<std::thread::Thread>,
}

/// What the commits so far have made durable.
#[derive(Clone, Copy, Default)]
struct Committed {
    /// Highest ticket covered by a finished commit.
    covered: u64,
    /// Set by the first commit that failed: tickets above this one are not known to be durable,
    /// now or later. After a failed fsync the kernel may have dropped the dirty pages, so a
    /// later fsync that succeeds proves nothing about them: like PostgreSQL, the store stops
    /// promising durability until it is restarted (and `/health` says so).
    failed_above: Option<u64>,
}

impl Committed {
    /// `Some(durable?)` once `ticket` is decided.
    fn outcome(&self, ticket: u64) -> Option<bool> {
        match self.failed_above {
            Some(above) if ticket > above => Some(false),
            _ if ticket <= self.covered => Some(true),
            _ => None,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The flusher holds only a weak reference: wake it to see the store is gone and exit.
        if let Some(thread) = self.commit.flusher.get() {
            thread.unpark();
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir` and starts its flusher task.
    pub fn open(dir: &std::path::Path, cache_bytes: u64, write_timeout: Duration) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let uaids = db.open_tree("uaids")?;
        let regs = db.open_tree("regs")?;
        let tokens = db.open_tree("tokens")?;
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", dir.display()));
        let log = std::fs::File::open(dir.join("db")).map_err(|e| io("open log file in", e))?;
        // The log file's directory entry must be durable too (it is new on first start).
        #[cfg(unix)]
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync directory", e))?;
        let mut pending = 0i64;
        for item in regs.iter() {
            let (_, v) = item?;
            if Registration::decode(&v)?.pending.is_some() {
                pending += 1;
            }
        }
        let inner = Arc::new(Inner {
            db,
            log,
            uaids,
            regs,
            tokens,
            commit: GroupCommit {
                requested: AtomicU64::new(0),
                done: watch::Sender::new(Committed::default()),
                flusher: std::sync::OnceLock::new(),
            },
            pending: AtomicI64::new(pending),
            write_timeout,
        });
        let weak = Arc::downgrade(&inner);
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || flusher(weak))
            .map_err(|e| StoreError::Io(format!("start the commit thread: {e}")))?;
        let _ = inner.commit.flusher.set(thread.thread().clone());
        Ok(SledStore { inner })
    }

    /// Commits synchronously; used at shutdown.
    pub fn flush_now(&self) -> Result<()> {
        self.inner.commit()
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

impl Inner {
    /// One commit (blocking): sled's flush, then fsync of its log file. See the module doc.
    fn commit(&self) -> Result<()> {
        self.db.flush()?;
        self.log
            .sync_all()
            .map_err(|e| StoreError::Io(format!("fsync: {e}")))
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

/// Runs commits while tickets are waiting; ends when the store is dropped.
fn flusher(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let commit = &inner.commit;
        let target = commit.requested.load(Ordering::SeqCst);
        let before = *commit.done.borrow();
        if target <= before.covered {
            drop(inner);
            // A ticket taken after the load above unparked this thread, so park returns at once.
            std::thread::park();
            continue;
        }
        // A panic in sled must not end the thread (every ticket would then time out unanswered).
        let ok = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.commit())) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store commit failed; durability is no longer promised until restart");
                false
            }
            Err(_) => {
                tracing::error!("store commit panicked; durability is no longer promised until restart");
                false
            }
        };
        commit.done.send_modify(|done| {
            if !ok {
                done.failed_above.get_or_insert(before.covered);
            }
            done.covered = target;
        });
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
        for item in self.inner.uaids.iter() {
            let (key, seen) = item?;
            let uaid = <[u8; 16]>::try_from(&key[..])
                .map(Uaid)
                .map_err(|_| StoreError::Corrupt("uaid key"))?;
            let Some(last) = last_seen(&seen) else {
                // A binding from before "last seen" was kept: count it seen now, once.
                let _ = self
                    .inner
                    .uaids
                    .compare_and_swap(&key, Some(seen), Some(&seen_value(now_ms)[..]))?;
                continue;
            };
            if last >= idle_before_ms {
                continue;
            }
            if held(&uaid) {
                // In use all along: seen now, so it gets a whole idle period after it is let go.
                self.touch_uaid(uaid, now_ms).await?;
                continue;
            }
            // The binding stays (the UAID and its secret remain its owner's); its registrations
            // go. A failure midway leaves the binding stale, so the next sweep goes on.
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
        Ok(expired)
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
        let commit = &self.inner.commit;
        let ticket = commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(thread) = commit.flusher.get() {
            thread.unpark();
        }
        CommitTicket(ticket)
    }

    async fn committed(&self, CommitTicket(ticket): CommitTicket) -> Result<()> {
        let mut done = self.inner.commit.done.subscribe();
        let decided = async {
            let d = done.wait_for(|d| d.outcome(ticket).is_some()).await;
            d.map(|d| d.outcome(ticket))
        };
        match tokio::time::timeout(self.inner.write_timeout, decided).await {
            Ok(Ok(Some(true))) => Ok(()),
            Ok(Ok(_)) => Err(StoreError::Io("a commit failed; restart the server".into())),
            Ok(Err(_)) => Err(StoreError::Io("store closed".into())),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    async fn sweep(&self, now_ms: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        for item in self.inner.regs.iter() {
            let (key, _) = item?;
            let cleared = self.update_reg(&key, |old| match old {
                Some(mut reg) if reg.pending.is_some_and(|(_, exp)| exp <= now_ms) => {
                    reg.pending = None;
                    Ok((Some(Some(reg)), true))
                }
                _ => Ok((None, false)),
            })?;
            if cleared {
                self.count_pending(true, false);
                stats.expired_events += 1;
            }
        }
        for item in self.inner.tokens.iter() {
            let (key, value) = item?;
            if let TokenEntry::Gone { until_ms } = TokenEntry::decode(&value)? {
                if until_ms <= now_ms
                    && self
                        .inner
                        .tokens
                        .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                        .is_ok()
                {
                    stats.expired_tombstones += 1;
                }
            }
        }
        Ok(stats)
    }

    fn pending_count(&self) -> u64 {
        self.inner.pending.load(Ordering::Relaxed).max(0) as u64
    }

    async fn health(&self) -> Result<()> {
        // Embedded: nothing to reach, but a failed commit is for good (see `Committed`).
        match self.inner.commit.done.borrow().failed_above {
            None => Ok(()),
            Some(_) => Err(StoreError::Io("a commit failed; restart the server".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_failed_commit_fails_its_tickets_and_every_later_one_but_not_earlier_ones() {
        let mut done = Committed::default();
        assert_eq!(done.outcome(1), None);
        done.covered = 5;
        assert_eq!(done.outcome(5), Some(true));
        assert_eq!(done.outcome(6), None);
        // The commit covering 6..=8 fails, a later one covering 9..=12 succeeds.
        done.failed_above = Some(5);
        done.covered = 12;
        assert_eq!(done.outcome(3), Some(true), "committed before the failure");
        assert_eq!(done.outcome(7), Some(false));
        assert_eq!(done.outcome(11), Some(false), "not proven by a later fsync");
        assert_eq!(done.outcome(20), Some(false), "decided at once, no wait");
    }
}
