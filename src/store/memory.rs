//! The in-memory store: the [`Store`] semantics with nothing behind them, for unit tests of the
//! protocol rules without sockets or disks. Nothing survives the process; `sync` waits for
//! nothing. It passes the same conformance suite as sled and Redis (`tests/store_suite`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::record::{Registration, TokenEntry};
use super::{
    CommitTicket, KickChange, PutOutcome, Registered, Result, Store, StoreError, SweepStats, TokenTarget,
    VersionReq, MAX_SERVER_VERSION, TOUCH_EVERY_MS,
};
use crate::ids::{Appid, TokenId, Uaid};

/// The in-memory store. Clones share one state.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// UAID → last seen (ms).
    uaids: HashMap<Uaid, u64>,
    /// Registrations, ordered by UAID then APPID as in sled.
    regs: BTreeMap<Uaid, BTreeMap<Appid, Registration>>,
    tokens: HashMap<TokenId, TokenEntry>,
    commits: u64,
}

impl State {
    fn reg(&mut self, uaid: &Uaid, appid: &Appid) -> Option<&mut Registration> {
        self.regs.get_mut(uaid)?.get_mut(appid)
    }

    fn unregister(&mut self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> bool {
        let Some(apps) = self.regs.get_mut(&uaid) else {
            return false;
        };
        let Some(reg) = apps.remove(&appid) else {
            return false;
        };
        if apps.is_empty() {
            self.regs.remove(&uaid);
        }
        self.tokens.insert(
            reg.token,
            TokenEntry::Gone {
                until_ms: gone_until_ms,
            },
        );
        true
    }

    fn touch(&mut self, uaid: Uaid, now_ms: u64) -> bool {
        match self.uaids.get_mut(&uaid) {
            None => {
                self.uaids.insert(uaid, now_ms);
                true
            }
            Some(seen) => {
                if *seen + TOUCH_EVERY_MS <= now_ms {
                    *seen = now_ms;
                }
                false
            }
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| StoreError::Io("memory store poisoned by a panic".into()))
    }
}

impl Store for MemoryStore {
    async fn bind_uaid(&self, uaid: Uaid) -> Result<bool> {
        let mut s = self.lock()?;
        if s.uaids.contains_key(&uaid) {
            return Ok(false);
        }
        s.uaids.insert(uaid, super::now_ms());
        Ok(true)
    }

    async fn uaid_bound(&self, uaid: Uaid) -> Result<bool> {
        Ok(self.lock()?.uaids.contains_key(&uaid))
    }

    async fn touch_uaid(&self, uaid: Uaid, now_ms: u64) -> Result<bool> {
        Ok(self.lock()?.touch(uaid, now_ms))
    }

    async fn expire_idle(
        &self,
        now_ms: u64,
        idle_before_ms: u64,
        gone_until_ms: u64,
        held: &(dyn Fn(&Uaid) -> bool + Sync),
    ) -> Result<u64> {
        let mut s = self.lock()?;
        let idle: Vec<Uaid> = s
            .uaids
            .iter()
            .filter(|(_, seen)| **seen < idle_before_ms)
            .map(|(uaid, _)| *uaid)
            .collect();
        let mut expired = 0;
        for uaid in idle {
            if held(&uaid) {
                s.touch(uaid, now_ms);
                continue;
            }
            let appids: Vec<Appid> = s
                .regs
                .get(&uaid)
                .map_or(Vec::new(), |apps| apps.keys().copied().collect());
            if appids.is_empty() {
                continue;
            }
            for appid in appids {
                s.unregister(uaid, appid, gone_until_ms);
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
        let mut s = self.lock()?;
        if let Some(reg) = s.reg(&uaid, &appid) {
            match kick {
                KickChange::Keep => {}
                KickChange::Set(bytes) => reg.kick = bytes.to_vec(),
                KickChange::Clear => reg.kick.clear(),
            }
            return Ok(Registered::Token(reg.token));
        }
        if s.regs.get(&uaid).map_or(0, BTreeMap::len) >= max_per_uaid {
            return Ok(Registered::TooMany);
        }
        if s.tokens.contains_key(&candidate) {
            // 128 random bits collided: astronomically unlikely, but never overwrite.
            return Err(StoreError::Corrupt("token id collision"));
        }
        let stored = match kick {
            KickChange::Set(bytes) => bytes,
            KickChange::Keep | KickChange::Clear => &[],
        };
        s.tokens.insert(candidate, TokenEntry::Active(uaid, appid));
        s.regs
            .entry(uaid)
            .or_default()
            .insert(appid, Registration::new(candidate, stored));
        Ok(Registered::Token(candidate))
    }

    async fn kick(&self, uaid: Uaid, appid: Appid) -> Result<Option<Vec<u8>>> {
        let mut s = self.lock()?;
        Ok(s.reg(&uaid, &appid)
            .filter(|reg| !reg.kick.is_empty())
            .map(|reg| reg.kick.clone()))
    }

    async fn kicks(&self, uaid: Uaid) -> Result<Vec<(Appid, Vec<u8>)>> {
        let s = self.lock()?;
        Ok(s.regs.get(&uaid).map_or(Vec::new(), |apps| {
            apps.iter()
                .filter(|(_, reg)| !reg.kick.is_empty())
                .map(|(appid, reg)| (*appid, reg.kick.clone()))
                .collect()
        }))
    }

    async fn remove_kick(&self, uaid: Uaid, kick: &[u8]) -> Result<u64> {
        let mut s = self.lock()?;
        let mut removed = 0;
        for reg in s
            .regs
            .get_mut(&uaid)
            .into_iter()
            .flat_map(|apps| apps.values_mut())
        {
            if !kick.is_empty() && reg.kick == kick {
                reg.kick.clear();
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn unregister(&self, uaid: Uaid, appid: Appid, gone_until_ms: u64) -> Result<bool> {
        Ok(self.lock()?.unregister(uaid, appid, gone_until_ms))
    }

    async fn lookup_token(&self, id: TokenId) -> Result<TokenTarget> {
        Ok(match self.lock()?.tokens.get(&id) {
            None => TokenTarget::Unknown,
            Some(TokenEntry::Active(u, a)) => TokenTarget::Active(*u, *a),
            Some(TokenEntry::Gone { .. }) => TokenTarget::Gone,
        })
    }

    async fn put_version(
        &self,
        uaid: Uaid,
        appid: Appid,
        version: VersionReq,
        expires_at_ms: u64,
    ) -> Result<PutOutcome> {
        let mut s = self.lock()?;
        let Some(reg) = s.reg(&uaid, &appid) else {
            return Ok(PutOutcome::Gone);
        };
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
                    _ => return Ok(PutOutcome::Exhausted),
                }
            }
        };
        if let Some(last) = reg.last_version.filter(|&last| v <= last) {
            return Ok(PutOutcome::Superseded(last));
        }
        reg.last_version = Some(v);
        reg.pending = Some((v, expires_at_ms));
        Ok(PutOutcome::Raised(v))
    }

    async fn pending(&self, uaid: Uaid, now_ms: u64) -> Result<Vec<(Appid, u64)>> {
        let s = self.lock()?;
        Ok(s.regs.get(&uaid).map_or(Vec::new(), |apps| {
            apps.iter()
                .filter_map(|(appid, reg)| {
                    let (version, expires) = reg.pending?;
                    (expires > now_ms).then_some((*appid, version))
                })
                .collect()
        }))
    }

    async fn ack(&self, uaid: Uaid, appid: Appid, version: u64) -> Result<bool> {
        let mut s = self.lock()?;
        match s.reg(&uaid, &appid) {
            Some(reg) if reg.pending.is_some_and(|(v, _)| v == version) => {
                reg.pending = None;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn request_commit(&self) -> CommitTicket {
        // Nothing to make durable; a poisoned lock only means no ticket number grows.
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        s.commits += 1;
        CommitTicket(s.commits)
    }

    async fn committed(&self, _ticket: CommitTicket) -> Result<()> {
        Ok(())
    }

    async fn sweep(&self, now_ms: u64) -> Result<SweepStats> {
        let mut s = self.lock()?;
        let mut stats = SweepStats::default();
        for reg in s.regs.values_mut().flat_map(BTreeMap::values_mut) {
            if reg.pending.is_some_and(|(_, exp)| exp <= now_ms) {
                reg.pending = None;
                stats.expired_events += 1;
            }
        }
        s.tokens.retain(|_, entry| match entry {
            TokenEntry::Gone { until_ms } if *until_ms <= now_ms => {
                stats.expired_tombstones += 1;
                false
            }
            _ => true,
        });
        Ok(stats)
    }

    fn pending_count(&self) -> u64 {
        self.state.lock().map_or(0, |s| {
            s.regs
                .values()
                .flat_map(BTreeMap::values)
                .filter(|reg| reg.pending.is_some())
                .count() as u64
        })
    }

    async fn health(&self) -> Result<()> {
        self.lock().map(|_| ())
    }
}
