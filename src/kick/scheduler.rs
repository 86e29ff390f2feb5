//! When to kick: the wiring calls [`Scheduler::raised`] when a PUT raised an event for a UAID that
//! no connection holds, and [`Scheduler::connected`] when a connection claims a UAID.
//!
//! * Off the caller's path: `raised` only records the event and spawns (or feeds) the UAID's
//!   task; a hung receiver never delays a PUT, nor another UAID's kicks.
//! * Per UAID at most one kick per `kick.min_interval_secs` (a [`crate::ratelimit`] bucket of one
//!   token): a raise inside the interval is deferred to its end, merged with any others, not
//!   dropped. Raises while an event is being kicked become the next event.
//! * Every distinct target of the event is kicked concurrently; a failed attempt is retried with
//!   jittered exponential backoff (`Retry-After` honoured) until it is sent, the client connects
//!   (`connected` cancels), or the event expires. `Gone` calls the removal hook.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{Drivers, EventInfo, KickConfig, KickMetrics, Outcome, Target};
use crate::ids::Uaid;
use crate::ratelimit::{Buckets, Rate};

/// Called with a target a driver reported gone; the wiring removes that stored kick from the
/// UAID's registrations. Runs on the UAID's kick task: it may spawn, it must not block.
pub type GoneHook = Arc<dyn Fn(Uaid, &Target) + Send + Sync>;

/// Asked before every attempt (the first, a deferred one, each retry): is the UAID still away
/// with an event pending? `false` ends kicking for it. This is what stops a node's kicks when
/// the client connects to another node (on Redis: it has a route) or its events were taken.
/// On an error the wiring should answer `true`: a needless kick is cheaper than a missed one.
pub type AwayCheck = Arc<dyn Fn(Uaid) -> BoxFuture<'static, bool> + Send + Sync>;

/// What the scheduler calls back into the wiring.
#[derive(Clone)]
pub struct Hooks {
    pub on_gone: GoneHook,
    pub still_away: AwayCheck,
}

impl Default for Hooks {
    /// Removes nothing; takes every UAID as away (`connected` still cancels).
    fn default() -> Hooks {
        Hooks {
            on_gone: Arc::new(|_, _| {}),
            still_away: Arc::new(|_| Box::pin(async { true })),
        }
    }
}

/// The delay before retry number `attempt` (0-based): `min · 2^attempt`, capped at `max`, times
/// a factor in [0.5, 1] picked by `jitter` in [0, 1], so that kicks failing together spread out.
pub fn backoff(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let base = min.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    // Jitter needs no cryptographic strength; a failed read spreads nothing, which is harmless.
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Events raised and not yet kicked, merged: their targets and the latest expiry.
struct Event {
    targets: Vec<Target>,
    expires_at: Instant,
}

impl Event {
    fn merge(&mut self, targets: Vec<Target>, expires_at: Instant) {
        for t in targets {
            if !self.targets.contains(&t) {
                self.targets.push(t);
            }
        }
        self.expires_at = self.expires_at.max(expires_at);
    }
}

/// One UAID with kicking to do; its task runs while the slot exists.
struct Slot {
    /// Tells this task's slot from a later one for the same UAID.
    id: u64,
    /// Raised, not yet taken by the task.
    pending: Option<Event>,
    task: AbortHandle,
}

struct Inner {
    drivers: Arc<Drivers>,
    /// One token per `min_interval` per UAID; `None` when the interval is 0.
    limiter: Option<Buckets<Uaid>>,
    retry_min: Duration,
    retry_max: Duration,
    max_pending: usize,
    /// A std mutex: held for a few map operations, never across an await.
    slots: Mutex<HashMap<Uaid, Slot>>,
    next_id: AtomicU64,
    hooks: Hooks,
    metrics: KickMetrics,
}

/// Cheap to clone; every clone schedules into the same state.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    pub fn new(drivers: Arc<Drivers>, config: &KickConfig, metrics: KickMetrics, hooks: Hooks) -> Scheduler {
        let interval = Duration::from_secs(config.min_interval_secs);
        Scheduler {
            inner: Arc::new(Inner {
                drivers,
                limiter: (!interval.is_zero()).then(|| Buckets::new(Rate::every(interval))),
                retry_min: Duration::from_millis(config.retry_min_ms.max(1)),
                retry_max: Duration::from_secs(config.retry_max_secs.max(1)),
                max_pending: config.max_pending,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                hooks,
                metrics,
            }),
        }
    }

    /// A PUT raised an event for `uaid`, which no connection holds: kick `targets` (the distinct
    /// stored kicks of its registrations) until one attempt each succeeds, the client connects,
    /// or `expires_in` (the event's remaining TTL) has passed. Returns at once. Must be called
    /// inside the Tokio runtime.
    pub fn raised(&self, uaid: Uaid, targets: Vec<Target>, expires_in: Duration) {
        if targets.is_empty() || expires_in.is_zero() {
            return;
        }
        let inner = &self.inner;
        let expires_at = Instant::now() + expires_in;
        let mut slots = inner.lock();
        if let Some(slot) = slots.get_mut(&uaid) {
            match &mut slot.pending {
                Some(event) => event.merge(targets, expires_at),
                None => slot.pending = Some(Event { targets, expires_at }),
            }
            return;
        }
        if slots.len() >= inner.max_pending {
            for t in &targets {
                inner.metrics.count(t.driver(), "dropped");
            }
            return;
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut event = Event {
            targets: Vec::new(),
            expires_at,
        };
        event.merge(targets, expires_at);
        // The task cannot see its slot before this lock is released: it is inserted first.
        let task = tokio::spawn(run(inner.clone(), uaid, id));
        slots.insert(
            uaid,
            Slot {
                id,
                pending: Some(event),
                task: task.abort_handle(),
            },
        );
        inner.metrics.pending.set(slots.len() as i64);
    }

    /// A connection now holds `uaid`: stop kicking it (pending and deferred kicks included).
    pub fn connected(&self, uaid: &Uaid) {
        let mut slots = self.inner.lock();
        if let Some(slot) = slots.remove(uaid) {
            slot.task.abort();
            self.inner.metrics.pending.set(slots.len() as i64);
        }
    }

    /// UAIDs with kicking to do.
    pub fn pending(&self) -> usize {
        self.inner.lock().len()
    }

    /// Forgets debounce state that no longer limits anything (call from the sweeper).
    pub fn prune(&self) {
        if let Some(limiter) = &self.inner.limiter {
            limiter.prune(Instant::now().into_std());
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Uaid, Slot>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether slot `id` has an event to kick; if not, the slot goes (in the same lock, so a
    /// raise either finds the slot with its task still running, or starts a new one).
    fn keep_or_remove(&self, uaid: &Uaid, id: u64) -> bool {
        let mut slots = self.lock();
        match slots.get(uaid) {
            Some(slot) if slot.id == id && slot.pending.is_some() => true,
            Some(slot) if slot.id == id => {
                slots.remove(uaid);
                self.metrics.pending.set(slots.len() as i64);
                false
            }
            _ => false,
        }
    }

    /// Takes the pending event of slot `id` (`None` if `connected` removed the slot).
    fn take_event(&self, uaid: &Uaid, id: u64) -> Option<Event> {
        let mut slots = self.lock();
        slots.get_mut(uaid).filter(|s| s.id == id)?.pending.take()
    }
}

/// The task of one UAID's slot: kicks event after event, each no sooner than the interval.
async fn run(inner: Arc<Inner>, uaid: Uaid, id: u64) {
    while inner.keep_or_remove(&uaid, id) {
        if let Some(limiter) = &inner.limiter {
            while let Err(wait) = limiter.take(uaid, Instant::now().into_std()) {
                tokio::time::sleep(wait).await;
            }
        }
        // Raises during the wait merged into this event.
        let Some(event) = inner.take_event(&uaid, id) else {
            return;
        };
        let event_id = format!("msg_{}", super::random_id());
        let kicks = event
            .targets
            .iter()
            .map(|t| kick_target(&inner, uaid, t, &event_id, event.expires_at));
        futures_util::future::join_all(kicks).await;
    }
}

/// Kicks one target for one event, retrying until a final outcome or the expiry.
async fn kick_target(inner: &Inner, uaid: Uaid, target: &Target, event_id: &str, expires_at: Instant) {
    let Some(driver) = inner.drivers.get(target.driver()).cloned() else {
        tracing::debug!(driver = target.driver(), "kick for a driver that is not enabled");
        return;
    };
    let name = driver.name();
    let fields = target.fields();
    let (mut attempt, mut sends) = (0u32, 0u32);
    loop {
        let now = Instant::now();
        if now >= expires_at {
            inner.metrics.count(name, "expired");
            return;
        }
        if !(inner.hooks.still_away)(uaid).await {
            inner.metrics.count(name, "cancelled");
            return;
        }
        let event = EventInfo {
            id: event_id,
            remaining_ttl: expires_at - now,
        };
        let outcome = driver.kick(&fields, &uaid, event).await;
        inner.metrics.count(name, outcome.label());
        let delay = backoff(inner.retry_min, inner.retry_max, attempt, jitter());
        attempt = attempt.saturating_add(1);
        let wait = match outcome {
            Outcome::Sent => {
                sends += 1;
                if sends > driver.resends() {
                    return;
                }
                delay
            }
            Outcome::Gone => {
                (inner.hooks.on_gone)(uaid, target);
                return;
            }
            Outcome::Rejected => return,
            Outcome::RetryAfter(hint) => delay.max(hint.min(inner.retry_max)),
        };
        if Instant::now() + wait >= expires_at {
            inner.metrics.count(name, "expired");
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kick::{KickDriver, KickError};
    use futures_util::FutureExt as _;
    use serde_json::{json, Map, Value};

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(min, max, 0, 1.0), min);
        assert_eq!(backoff(min, max, 0, 0.0), min / 2);
        assert_eq!(backoff(min, max, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(min, max, 10, 1.0), max);
        assert_eq!(backoff(min, max, u32::MAX, 1.0), max);
        assert_eq!(backoff(min, max, 10, 0.0), max / 2);
    }

    /// A driver that records when it was called and answers from a script.
    struct Scripted {
        calls: Mutex<Vec<(Instant, String)>>,
        script: Mutex<Vec<Outcome>>,
        resends: u32,
    }

    impl Scripted {
        fn new(script: Vec<Outcome>, resends: u32) -> Arc<Scripted> {
            Arc::new(Scripted {
                calls: Mutex::new(Vec::new()),
                script: Mutex::new(script),
                resends,
            })
        }
        fn calls(&self) -> Vec<(Instant, String)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl KickDriver for Arc<Scripted> {
        fn name(&self) -> &'static str {
            "test"
        }
        fn validate<'a>(&'a self, _: &'a Map<String, Value>) -> BoxFuture<'a, Result<Value, KickError>> {
            async { Ok(json!({"driver": "test"})) }.boxed()
        }
        fn kick<'a>(
            &'a self,
            _: &'a Map<String, Value>,
            _: &'a Uaid,
            e: EventInfo<'a>,
        ) -> BoxFuture<'a, Outcome> {
            self.calls.lock().unwrap().push((Instant::now(), e.id.to_owned()));
            let mut script = self.script.lock().unwrap();
            let outcome = if script.is_empty() {
                Outcome::Sent
            } else {
                script.remove(0)
            };
            async move { outcome }.boxed()
        }
        fn resends(&self) -> u32 {
            self.resends
        }
    }

    fn setup(driver: Arc<Scripted>, interval: u64) -> (Scheduler, KickMetrics, Arc<Mutex<Vec<Uaid>>>) {
        let mut drivers = Drivers::default();
        drivers.insert(Arc::new(driver));
        let config = KickConfig {
            min_interval_secs: interval,
            retry_min_ms: 1000,
            retry_max_secs: 60,
            ..KickConfig::default()
        };
        let gone = Arc::new(Mutex::new(Vec::new()));
        let g = gone.clone();
        let metrics = KickMetrics::default();
        let hooks = Hooks {
            on_gone: Arc::new(move |u, _| g.lock().unwrap().push(u)),
            ..Hooks::default()
        };
        (
            Scheduler::new(Arc::new(drivers), &config, metrics.clone(), hooks),
            metrics,
            gone,
        )
    }

    fn target() -> Vec<Target> {
        vec![Target::from_stored(br#"{"driver":"test"}"#).unwrap()]
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Lets spawned tasks run up to their next timer without moving the paused clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_raise_inside_the_interval_is_deferred_to_its_end_not_dropped() {
        let d = Scripted::new(vec![], 0);
        let (s, metrics, _) = setup(d.clone(), 30);
        let start = Instant::now();
        let u = Uaid::random();
        s.raised(u, target(), HOUR);
        settle().await;
        assert_eq!(d.calls().len(), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        s.raised(u, target(), HOUR);
        s.raised(u, target(), HOUR);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(d.calls().len(), 1, "deferred, not sent inside the interval");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let calls = d.calls();
        assert_eq!(
            calls.len(),
            2,
            "two raises inside the interval make one kick at its end"
        );
        assert_eq!(calls[1].0 - start, Duration::from_secs(30));
        assert_ne!(calls[0].1, calls[1].1, "a new event has a new id");
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(d.calls().len(), 2);
        assert_eq!(s.pending(), 0);
        assert_eq!(metrics.get("test", "sent"), 2);
        assert_eq!(metrics.pending.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_retry_with_the_same_id_until_sent() {
        let retry = Outcome::RetryAfter(Duration::ZERO);
        let d = Scripted::new(
            vec![retry, Outcome::RetryAfter(Duration::from_secs(20)), Outcome::Sent],
            0,
        );
        let (s, metrics, _) = setup(d.clone(), 30);
        let start = Instant::now();
        s.raised(Uaid::random(), target(), HOUR);
        tokio::time::sleep(Duration::from_secs(100)).await;
        let calls = d.calls();
        assert_eq!(calls.len(), 3);
        assert!(
            calls.iter().all(|c| c.1 == calls[0].1),
            "webhook-id kept across retries"
        );
        let first_wait = calls[1].0 - calls[0].0;
        assert!(first_wait >= Duration::from_millis(500) && first_wait <= Duration::from_secs(1));
        assert!(
            calls[2].0 - calls[1].0 >= Duration::from_secs(20),
            "Retry-After honoured"
        );
        assert!(calls[0].0 == start);
        assert_eq!(metrics.get("test", "retry"), 2);
        assert_eq!(s.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn connecting_cancels_retries_and_deferred_kicks() {
        let d = Scripted::new(vec![Outcome::RetryAfter(Duration::ZERO); 100], 0);
        let (s, _, _) = setup(d.clone(), 30);
        let u = Uaid::random();
        s.raised(u, target(), HOUR);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = d.calls().len();
        assert!(before >= 2);
        s.connected(&u);
        assert_eq!(s.pending(), 0);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(d.calls().len(), before);

        // A deferred raise is cancelled too.
        let d = Scripted::new(vec![], 0);
        let (s, _, _) = setup(d.clone(), 30);
        s.raised(u, target(), HOUR);
        settle().await;
        s.raised(u, target(), HOUR);
        s.connected(&u);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(d.calls().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_ends_retries_gone_calls_the_hook_and_resends_are_capped() {
        let d = Scripted::new(vec![Outcome::RetryAfter(Duration::ZERO); 100], 0);
        let (s, metrics, _) = setup(d.clone(), 0);
        s.raised(Uaid::random(), target(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(600)).await;
        let n = d.calls().len();
        assert!(
            (3..=5).contains(&n),
            "{n} attempts within 10 s of backoff from 1 s"
        );
        assert_eq!(metrics.get("test", "expired"), 1);
        assert_eq!(s.pending(), 0);

        let d = Scripted::new(vec![Outcome::Gone], 0);
        let (s, _, gone) = setup(d.clone(), 0);
        let u = Uaid::random();
        s.raised(u, target(), HOUR);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(*gone.lock().unwrap(), vec![u]);
        assert_eq!(d.calls().len(), 1);

        let d = Scripted::new(vec![], 4);
        let (s, _, _) = setup(d.clone(), 0);
        s.raised(Uaid::random(), target(), HOUR);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            d.calls().len(),
            5,
            "a driver without answers sends 1 + resends times"
        );
    }
}

#[cfg(test)]
mod away_tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Always fails, counting attempts.
    struct Failing(AtomicU64);

    impl crate::kick::KickDriver for Failing {
        fn name(&self) -> &'static str {
            "test"
        }
        fn validate<'a>(
            &'a self,
            _: &'a serde_json::Map<String, serde_json::Value>,
        ) -> BoxFuture<'a, Result<serde_json::Value, crate::kick::KickError>> {
            Box::pin(async { Ok(serde_json::json!({"driver": "test"})) })
        }
        fn kick<'a>(
            &'a self,
            _: &'a serde_json::Map<String, serde_json::Value>,
            _: &'a Uaid,
            _: EventInfo<'a>,
        ) -> BoxFuture<'a, Outcome> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Outcome::RetryAfter(Duration::ZERO) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_back_elsewhere_stops_the_retries() {
        let driver = Arc::new(Failing(AtomicU64::new(0)));
        let mut drivers = Drivers::default();
        drivers.insert(driver.clone());
        let away = Arc::new(AtomicBool::new(true));
        let a = away.clone();
        let hooks = Hooks {
            still_away: Arc::new(move |_| {
                let away = a.load(Ordering::SeqCst);
                Box::pin(async move { away })
            }),
            ..Hooks::default()
        };
        let metrics = KickMetrics::default();
        let s = Scheduler::new(Arc::new(drivers), &KickConfig::default(), metrics.clone(), hooks);
        let target = Target::from_stored(br#"{"driver":"test"}"#).unwrap();
        s.raised(Uaid::random(), vec![target], Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let tried = driver.0.load(Ordering::SeqCst);
        assert!(tried >= 2);
        away.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(driver.0.load(Ordering::SeqCst) <= tried + 1);
        assert_eq!(s.pending(), 0);
        assert_eq!(metrics.get("test", "cancelled"), 1);
    }
}
