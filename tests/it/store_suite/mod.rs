//! The conformance suite every [`Store`] implementation passes: the semantics documented on the
//! trait (src/store/mod.rs), one case per rule, written against the trait only.
//!
//! Use it from a test file that declares this module at its root and instantiates the suite once
//! per backend with an async function that returns a fresh, isolated [`Fixture`]:
//!
//! ```ignore
//! mod store_suite;
//! use store_suite::Fixture;
//!
//! async fn sled_store() -> Fixture<SledStore> { /* open in a tempdir */ }
//! store_suite!(sled, sled_store);
//! // another backend: one more line
//! store_suite!(redis, redis_store);
//! ```
//!
//! Each instantiation is a module with one `#[tokio::test]` per case, so `cargo test sled::` or
//! `cargo test redis::ack_is_compare_and_delete` runs a selection. Each case gets its own store
//! and may assume it is empty (counts in `pending_count` are taken as deltas all the same).
//! Times are real milliseconds (`now_ms()`) with margins of an hour, so a backend that keeps
//! expiry in wall-clock terms passes too; no case waits for time to pass.
#![allow(dead_code)]

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use editiond::ids::TokenId;
use editiond::ids::{Appid, Uaid};
use editiond::store::{
    now_ms, KickChange, PutOutcome, Registered, Store, TokenTarget, VersionReq, MAX_SERVER_VERSION,
};

/// A fresh store, with whatever must live as long as it (a temporary directory, a key prefix to
/// delete, a container handle).
pub struct Fixture<S> {
    pub store: Arc<S>,
    _keep: Box<dyn Any + Send>,
}

impl<S: Store> Fixture<S> {
    pub fn new(store: S, keep: impl Any + Send) -> Fixture<S> {
        Fixture {
            store: Arc::new(store),
            _keep: Box::new(keep),
        }
    }
}

/// Expands to a module `$name` with one test per case, each on a store made by `$make`
/// (an `async fn() -> Fixture<S>` in scope where the macro is invoked). With `if $ready`, each
/// case first calls `$ready(case_name) -> bool` and returns early (skips) when it is false, for a
/// backend that needs a server which may be missing on a developer's machine.
#[macro_export]
macro_rules! store_suite {
    ($name:ident, $make:path) => {
        $crate::store_suite!($name, $make, if $crate::store_suite::always);
    };
    ($name:ident, $make:path, if $ready:path) => {
        mod $name {
            use super::*;
            $crate::store_suite!(@cases $make, $ready;
                bind_uaid_is_true_once,
                concurrent_binds_have_one_winner,
                uaid_bound_follows_bind,
                touch_binds_once_and_reports_it,
                idle_uaids_lose_their_registrations_but_keep_their_binding,
                a_touch_keeps_a_uaid_for_another_idle_period,
                register_is_idempotent_per_pair,
                register_sets_replaces_keeps_and_clears_the_kick,
                remove_kick_removes_only_that_kick,
                register_gives_distinct_pairs_distinct_tokens,
                concurrent_registers_agree_on_one_token,
                register_stops_at_the_limit,
                lookup_token_is_active_gone_or_unknown,
                put_raises_only_newer_versions,
                first_put_of_any_version_raises,
                clock_versions_go_above_the_last_known,
                clock_versions_stay_below_2_pow_53,
                put_without_registration_is_gone,
                last_version_survives_ack,
                pending_skips_expired_and_orders_by_appid,
                ack_is_compare_and_delete,
                unregister_removes_pending_and_leaves_a_tombstone,
                reregister_after_unregister_starts_fresh,
                sweep_deletes_expired_events_only,
                pending_count_tracks_every_change,
                sync_succeeds,
                a_fresh_store_is_healthy,
                concurrent_puts_end_at_the_max,
                concurrent_puts_and_acks_lose_nothing,
            );
        }
    };
    (@cases $make:path, $ready:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if !$ready(stringify!($case)) {
                    return;
                }
                let fixture = $make().await;
                $crate::store_suite::$case(fixture.store.clone()).await;
                drop(fixture);
            }
        )*
    };
}

/// The readiness check of backends that need nothing.
pub fn always(_case: &str) -> bool {
    true
}

const HOUR_MS: u64 = 3_600_000;
/// A per-UAID limit high enough not to matter, except where a case tests it.
const NO_LIMIT: usize = 1000;

fn in_an_hour() -> u64 {
    now_ms() + HOUR_MS
}

/// DESIGN.md "KICK drivers": a register that carries a kick replaces the stored one, `null`
/// removes it, neither keeps it; the token never changes.
pub async fn register_sets_replaces_keeps_and_clears_the_kick<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = (Uaid::random(), Appid::random(), TokenId::random());
    assert!(s.bind_uaid(uaid).await.unwrap());
    let first = br#"{"driver":"webhook","url":"http://a/"}"#;
    let second = br#"{"driver":"udp","host":"b","port":1}"#;
    let again = |kick| s.register(uaid, appid, TokenId::random(), kick, NO_LIMIT);
    assert_eq!(
        s.register(uaid, appid, token, KickChange::Set(first), NO_LIMIT)
            .await
            .unwrap(),
        Registered::Token(token)
    );
    assert_eq!(s.kick(uaid, appid).await.unwrap().as_deref(), Some(&first[..]));
    assert_eq!(again(KickChange::Keep).await.unwrap(), Registered::Token(token));
    assert_eq!(s.kick(uaid, appid).await.unwrap().as_deref(), Some(&first[..]));
    assert_eq!(
        again(KickChange::Set(second)).await.unwrap(),
        Registered::Token(token)
    );
    assert_eq!(s.kick(uaid, appid).await.unwrap().as_deref(), Some(&second[..]));
    assert_eq!(again(KickChange::Clear).await.unwrap(), Registered::Token(token));
    assert_eq!(s.kick(uaid, appid).await.unwrap(), None);
    // Another pair, and a pair never registered, have none.
    let other = Appid::random();
    let registered = s.register(uaid, other, TokenId::random(), KickChange::Keep, NO_LIMIT);
    assert!(matches!(registered.await.unwrap(), Registered::Token(_)));
    assert_eq!(s.kick(uaid, other).await.unwrap(), None);
    assert_eq!(s.kick(Uaid::random(), appid).await.unwrap(), None);
    assert_eq!(s.kicks(uaid).await.unwrap(), vec![]);
    // Every registration's kick, by APPID, for a raise nobody hears.
    let third = Appid::random();
    let registered = s.register(uaid, third, TokenId::random(), KickChange::Set(second), NO_LIMIT);
    assert!(matches!(registered.await.unwrap(), Registered::Token(_)));
    assert_eq!(
        again(KickChange::Set(first)).await.unwrap(),
        Registered::Token(token)
    );
    let mut expected = vec![(appid, first.to_vec()), (third, second.to_vec())];
    expected.sort_unstable_by_key(|(a, _)| *a);
    assert_eq!(s.kicks(uaid).await.unwrap(), expected);
    assert_eq!(s.kicks(Uaid::random()).await.unwrap(), vec![]);
    assert_eq!(again(KickChange::Clear).await.unwrap(), Registered::Token(token));
    // Unregistering drops it: registering the pair again starts without one.
    assert_eq!(
        again(KickChange::Set(first)).await.unwrap(),
        Registered::Token(token)
    );
    assert!(s.unregister(uaid, appid, in_an_hour()).await.unwrap());
    assert_eq!(s.kick(uaid, appid).await.unwrap(), None);
    let fresh = TokenId::random();
    assert_eq!(
        s.register(uaid, appid, fresh, KickChange::Keep, NO_LIMIT)
            .await
            .unwrap(),
        Registered::Token(fresh)
    );
    assert_eq!(s.kick(uaid, appid).await.unwrap(), None);
}

/// A target a driver reported gone leaves every registration of the UAID that carried it, and
/// nothing else: other kicks, other UAIDs and the registrations themselves stay.
pub async fn remove_kick_removes_only_that_kick<S: Store>(s: Arc<S>) {
    let (uaid, other_uaid) = (Uaid::random(), Uaid::random());
    let gone = br#"{"driver":"webhook","url":"http://a/"}"#;
    let kept = br#"{"driver":"udp","addr":"10.0.0.1:9"}"#;
    let (a, b, c) = (Appid::random(), Appid::random(), Appid::random());
    for (u, appid, kick) in [
        (uaid, a, &gone[..]),
        (uaid, b, &gone[..]),
        (uaid, c, &kept[..]),
        (other_uaid, a, &gone[..]),
    ] {
        let registered = s.register(u, appid, TokenId::random(), KickChange::Set(kick), NO_LIMIT);
        assert!(matches!(registered.await.unwrap(), Registered::Token(_)));
    }
    assert_eq!(s.remove_kick(uaid, gone).await.unwrap(), 2);
    assert_eq!(s.kicks(uaid).await.unwrap(), vec![(c, kept.to_vec())]);
    assert_eq!(s.kick(other_uaid, a).await.unwrap().as_deref(), Some(&gone[..]));
    assert_eq!(
        s.remove_kick(uaid, gone).await.unwrap(),
        0,
        "nothing left to remove"
    );
    assert_eq!(s.remove_kick(Uaid::random(), gone).await.unwrap(), 0);
    assert_eq!(s.remove_kick(uaid, b"").await.unwrap(), 0);
    // The registration itself stays, and takes a kick anew.
    let again = s.register(uaid, a, TokenId::random(), KickChange::Set(kept), NO_LIMIT);
    assert!(matches!(again.await.unwrap(), Registered::Token(_)));
    assert_eq!(s.kick(uaid, a).await.unwrap().as_deref(), Some(&kept[..]));
}

/// A bound UAID with one registration: (uaid, appid, token).
async fn registration<S: Store>(s: &S) -> (Uaid, Appid, TokenId) {
    let (uaid, appid, token) = (Uaid::random(), Appid::random(), TokenId::random());
    assert!(s.bind_uaid(uaid).await.unwrap());
    register(s, uaid, appid, token).await;
    (uaid, appid, token)
}

async fn register<S: Store>(s: &S, uaid: Uaid, appid: Appid, token: TokenId) {
    assert_eq!(
        s.register(uaid, appid, token, KickChange::Keep, NO_LIMIT)
            .await
            .unwrap(),
        Registered::Token(token)
    );
}

async fn put<S: Store>(s: &S, uaid: Uaid, appid: Appid, version: u64) -> PutOutcome {
    s.put_version(uaid, appid, VersionReq::Exact(version), in_an_hour())
        .await
        .unwrap()
}

async fn clock<S: Store>(s: &S, uaid: Uaid, appid: Appid, now: u64) -> PutOutcome {
    s.put_version(uaid, appid, VersionReq::Clock(now), in_an_hour())
        .await
        .unwrap()
}

async fn pending<S: Store>(s: &S, uaid: Uaid) -> Vec<(Appid, u64)> {
    s.pending(uaid, now_ms()).await.unwrap()
}

pub async fn bind_uaid_is_true_once<S: Store>(s: Arc<S>) {
    let uaid = Uaid::random();
    assert!(s.bind_uaid(uaid).await.unwrap());
    assert!(!s.bind_uaid(uaid).await.unwrap());
    assert!(!s.bind_uaid(uaid).await.unwrap());
    assert!(
        s.bind_uaid(Uaid::random()).await.unwrap(),
        "UAIDs are independent"
    );
}

pub async fn concurrent_binds_have_one_winner<S: Store>(s: Arc<S>) {
    for _ in 0..5 {
        let uaid = Uaid::random();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.bind_uaid(uaid).await.unwrap() })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "exactly one racing bind returns true");
    }
}

pub async fn uaid_bound_follows_bind<S: Store>(s: Arc<S>) {
    let uaid = Uaid::random();
    assert!(!s.uaid_bound(uaid).await.unwrap());
    s.bind_uaid(uaid).await.unwrap();
    assert!(s.uaid_bound(uaid).await.unwrap());
    assert!(!s.uaid_bound(Uaid::random()).await.unwrap());
}

pub async fn touch_binds_once_and_reports_it<S: Store>(s: Arc<S>) {
    let uaid = Uaid::random();
    assert!(
        s.touch_uaid(uaid, now_ms()).await.unwrap(),
        "an unbound UAID is bound"
    );
    assert!(!s.touch_uaid(uaid, now_ms()).await.unwrap());
    assert!(s.uaid_bound(uaid).await.unwrap());
    assert!(!s.bind_uaid(uaid).await.unwrap());
}

const DAY_MS: u64 = 24 * HOUR_MS;

pub async fn idle_uaids_lose_their_registrations_but_keep_their_binding<S: Store>(s: Arc<S>) {
    let now = now_ms();
    let (idle, idle_app, idle_token) = registration(&*s).await;
    assert_eq!(put(&*s, idle, idle_app, 5).await, PutOutcome::Raised(5));
    let (held, _, held_token) = registration(&*s).await;
    let recent = Uaid::random();
    s.touch_uaid(recent, now + 2 * HOUR_MS).await.unwrap();
    let only_held = move |u: &Uaid| *u == held;

    let gone_until = now + 3 * HOUR_MS;
    let expired = s
        .expire_idle(now + 2 * DAY_MS, now + HOUR_MS, gone_until, &only_held)
        .await
        .unwrap();
    assert_eq!(expired, 1, "only the idle, unheld UAID");
    // Still bound: its secret stays its owner's (nobody can bind it anew without it).
    assert!(s.uaid_bound(idle).await.unwrap());
    assert!(!s.bind_uaid(idle).await.unwrap());
    assert_eq!(s.lookup_token(idle_token).await.unwrap(), TokenTarget::Gone);
    assert_eq!(put(&*s, idle, idle_app, 6).await, PutOutcome::Gone);
    assert!(pending(&*s, idle).await.is_empty());
    assert!(s.uaid_bound(held).await.unwrap(), "held UAIDs stay");
    assert!(matches!(
        s.lookup_token(held_token).await.unwrap(),
        TokenTarget::Active(..)
    ));
    assert!(s.uaid_bound(recent).await.unwrap(), "recently seen UAIDs stay");
    // The held one was touched (at the sweep's "now", two days on): let go, it stays.
    let idle_before = now + HOUR_MS;
    assert_eq!(
        s.expire_idle(now, idle_before, gone_until, &|_| false)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.expire_idle(now + 2 * DAY_MS, now + HOUR_MS, gone_until, &only_held)
            .await
            .unwrap(),
        0
    );
    // The owner may come back, with nothing registered; registering starts afresh.
    assert!(!s.touch_uaid(idle, now_ms()).await.unwrap());
    let fresh = TokenId::random();
    register(&*s, idle, idle_app, fresh).await;
    assert_eq!(put(&*s, idle, idle_app, 1).await, PutOutcome::Raised(1));
}

pub async fn a_touch_keeps_a_uaid_for_another_idle_period<S: Store>(s: Arc<S>) {
    let now = now_ms();
    let uaid = Uaid::random();
    assert!(s.bind_uaid(uaid).await.unwrap());
    register(&*s, uaid, Appid::random(), TokenId::random()).await;
    // Seen two days later: kept by an expiry of what was last seen before a day later.
    assert!(!s.touch_uaid(uaid, now + 2 * DAY_MS).await.unwrap());
    let kept = s.expire_idle(now, now + DAY_MS, now + DAY_MS, &|_| false).await;
    assert_eq!(kept.unwrap(), 0);
    // A touch within a day of the last one writes nothing: the UAID still counts as seen then.
    assert!(!s.touch_uaid(uaid, now + 2 * DAY_MS + HOUR_MS).await.unwrap());
    let cutoff = now + 2 * DAY_MS + HOUR_MS / 2;
    assert_eq!(s.expire_idle(now, cutoff, cutoff, &|_| false).await.unwrap(), 1);
}

pub async fn register_is_idempotent_per_pair<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = registration(&*s).await;
    for _ in 0..3 {
        let again = s
            .register(uaid, appid, TokenId::random(), KickChange::Keep, NO_LIMIT)
            .await
            .unwrap();
        assert_eq!(again, Registered::Token(token), "the same pair keeps its token");
    }
    assert_eq!(
        s.lookup_token(token).await.unwrap(),
        TokenTarget::Active(uaid, appid)
    );
}

pub async fn register_gives_distinct_pairs_distinct_tokens<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = registration(&*s).await;
    let (other_appid, other_token) = (Appid::random(), TokenId::random());
    register(&*s, uaid, other_appid, other_token).await;
    let (other_uaid, third_token) = (Uaid::random(), TokenId::random());
    s.bind_uaid(other_uaid).await.unwrap();
    // The same APPID under another UAID is another registration.
    register(&*s, other_uaid, appid, third_token).await;
    let tokens: HashSet<_> = [token, other_token, third_token].into_iter().collect();
    assert_eq!(tokens.len(), 3);
    assert_eq!(
        s.lookup_token(other_token).await.unwrap(),
        TokenTarget::Active(uaid, other_appid)
    );
    assert_eq!(
        s.lookup_token(third_token).await.unwrap(),
        TokenTarget::Active(other_uaid, appid)
    );
}

pub async fn concurrent_registers_agree_on_one_token<S: Store>(s: Arc<S>) {
    let (uaid, appid) = (Uaid::random(), Appid::random());
    s.bind_uaid(uaid).await.unwrap();
    let candidates: Vec<TokenId> = (0..8).map(|_| TokenId::random()).collect();
    let tasks: Vec<_> = candidates
        .iter()
        .map(|&candidate| {
            let s = s.clone();
            tokio::spawn(async move {
                s.register(uaid, appid, candidate, KickChange::Keep, NO_LIMIT)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut tokens = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Registered::Token(token) => tokens.insert(token),
            Registered::TooMany => panic!("far below the limit"),
        };
    }
    assert_eq!(tokens.len(), 1, "every racing register returns the one token");
    let winner = *tokens.iter().next().unwrap();
    for candidate in candidates {
        let expected = if candidate == winner {
            TokenTarget::Active(uaid, appid)
        } else {
            TokenTarget::Unknown
        };
        assert_eq!(
            s.lookup_token(candidate).await.unwrap(),
            expected,
            "a losing candidate must not point anywhere"
        );
    }
}

pub async fn register_stops_at_the_limit<S: Store>(s: Arc<S>) {
    let uaid = Uaid::random();
    s.bind_uaid(uaid).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (appid, token) = (Appid::random(), TokenId::random());
        assert_eq!(
            s.register(uaid, appid, token, KickChange::Keep, 3).await.unwrap(),
            Registered::Token(token)
        );
        held.push((appid, token));
    }
    let (extra, extra_token) = (Appid::random(), TokenId::random());
    assert_eq!(
        s.register(uaid, extra, extra_token, KickChange::Keep, 3)
            .await
            .unwrap(),
        Registered::TooMany
    );
    assert_eq!(s.lookup_token(extra_token).await.unwrap(), TokenTarget::Unknown);
    assert_eq!(
        put(&*s, uaid, extra, 1).await,
        PutOutcome::Gone,
        "a refused register creates nothing"
    );
    // At the limit, an existing pair still gets its token.
    assert_eq!(
        s.register(uaid, held[0].0, TokenId::random(), KickChange::Keep, 3)
            .await
            .unwrap(),
        Registered::Token(held[0].1)
    );
    // The limit is per UAID.
    let other = Uaid::random();
    s.bind_uaid(other).await.unwrap();
    let token = TokenId::random();
    assert_eq!(
        s.register(other, Appid::random(), token, KickChange::Keep, 3)
            .await
            .unwrap(),
        Registered::Token(token)
    );
    // Unregistering frees a place.
    assert!(s.unregister(uaid, held[1].0, in_an_hour()).await.unwrap());
    assert_eq!(
        s.register(uaid, extra, extra_token, KickChange::Keep, 3)
            .await
            .unwrap(),
        Registered::Token(extra_token)
    );
}

pub async fn lookup_token_is_active_gone_or_unknown<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = registration(&*s).await;
    assert_eq!(
        s.lookup_token(token).await.unwrap(),
        TokenTarget::Active(uaid, appid)
    );
    assert_eq!(
        s.lookup_token(TokenId::random()).await.unwrap(),
        TokenTarget::Unknown
    );
    assert!(s.unregister(uaid, appid, in_an_hour()).await.unwrap());
    assert_eq!(s.lookup_token(token).await.unwrap(), TokenTarget::Gone);
}

pub async fn put_raises_only_newer_versions<S: Store>(s: Arc<S>) {
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(put(&*s, uaid, appid, 10).await, PutOutcome::Raised(10));
    assert_eq!(put(&*s, uaid, appid, 10).await, PutOutcome::Superseded(10));
    assert_eq!(put(&*s, uaid, appid, 3).await, PutOutcome::Superseded(10));
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 10)]);
    assert_eq!(put(&*s, uaid, appid, 11).await, PutOutcome::Raised(11));
    assert_eq!(
        put(&*s, uaid, appid, 10).await,
        PutOutcome::Superseded(11),
        "Superseded names the current version"
    );
    assert_eq!(
        pending(&*s, uaid).await,
        vec![(appid, 11)],
        "only the newest is kept"
    );
}

pub async fn first_put_of_any_version_raises<S: Store>(s: Arc<S>) {
    for version in [0, 1, MAX_SERVER_VERSION, MAX_SERVER_VERSION + 1, u64::MAX] {
        let (uaid, appid, _) = registration(&*s).await;
        assert_eq!(put(&*s, uaid, appid, version).await, PutOutcome::Raised(version));
        assert_eq!(pending(&*s, uaid).await, vec![(appid, version)]);
        assert_eq!(
            put(&*s, uaid, appid, version).await,
            PutOutcome::Superseded(version)
        );
    }
}

pub async fn clock_versions_go_above_the_last_known<S: Store>(s: Arc<S>) {
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(clock(&*s, uaid, appid, 5_000).await, PutOutcome::Raised(5_000));
    // A clock that did not move, or went back, still raises: one above the last known.
    assert_eq!(clock(&*s, uaid, appid, 5_000).await, PutOutcome::Raised(5_001));
    assert_eq!(clock(&*s, uaid, appid, 4_000).await, PutOutcome::Raised(5_002));
    assert_eq!(put(&*s, uaid, appid, 7_000).await, PutOutcome::Raised(7_000));
    assert_eq!(clock(&*s, uaid, appid, 6_000).await, PutOutcome::Raised(7_001));
    assert_eq!(clock(&*s, uaid, appid, 9_000).await, PutOutcome::Raised(9_000));
    assert_eq!(put(&*s, uaid, appid, 9_000).await, PutOutcome::Superseded(9_000));
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 9_000)]);
}

pub async fn clock_versions_stay_below_2_pow_53<S: Store>(s: Arc<S>) {
    assert_eq!(MAX_SERVER_VERSION, (1 << 53) - 1);
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(
        put(&*s, uaid, appid, MAX_SERVER_VERSION - 1).await,
        PutOutcome::Raised(MAX_SERVER_VERSION - 1)
    );
    assert_eq!(
        clock(&*s, uaid, appid, 1).await,
        PutOutcome::Raised(MAX_SERVER_VERSION)
    );
    assert_eq!(clock(&*s, uaid, appid, 1).await, PutOutcome::Exhausted);
    assert_eq!(
        pending(&*s, uaid).await,
        vec![(appid, MAX_SERVER_VERSION)],
        "Exhausted changes nothing"
    );
    // App servers may name larger versions; the clock then has nowhere to go.
    assert_eq!(
        put(&*s, uaid, appid, u64::MAX).await,
        PutOutcome::Raised(u64::MAX)
    );
    assert_eq!(clock(&*s, uaid, appid, 1).await, PutOutcome::Exhausted);

    // A clock reading beyond the range is refused too, even with no version known.
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(
        clock(&*s, uaid, appid, MAX_SERVER_VERSION + 1).await,
        PutOutcome::Exhausted
    );
    assert_eq!(pending(&*s, uaid).await, vec![]);
    assert_eq!(
        clock(&*s, uaid, appid, MAX_SERVER_VERSION).await,
        PutOutcome::Raised(MAX_SERVER_VERSION)
    );
}

pub async fn put_without_registration_is_gone<S: Store>(s: Arc<S>) {
    let (uaid, appid) = (Uaid::random(), Appid::random());
    assert_eq!(put(&*s, uaid, appid, 1).await, PutOutcome::Gone);
    assert_eq!(clock(&*s, uaid, appid, 1).await, PutOutcome::Gone);
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(put(&*s, uaid, Appid::random(), 1).await, PutOutcome::Gone);
    assert_eq!(put(&*s, uaid, appid, 1).await, PutOutcome::Raised(1));
    assert!(s.unregister(uaid, appid, in_an_hour()).await.unwrap());
    assert_eq!(put(&*s, uaid, appid, 2).await, PutOutcome::Gone);
    assert_eq!(clock(&*s, uaid, appid, 5).await, PutOutcome::Gone);
    assert_eq!(pending(&*s, uaid).await, vec![]);
}

pub async fn last_version_survives_ack<S: Store>(s: Arc<S>) {
    let (uaid, appid, _) = registration(&*s).await;
    assert_eq!(put(&*s, uaid, appid, 5).await, PutOutcome::Raised(5));
    assert!(s.ack(uaid, appid, 5).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![]);
    assert_eq!(put(&*s, uaid, appid, 5).await, PutOutcome::Superseded(5));
    assert_eq!(put(&*s, uaid, appid, 4).await, PutOutcome::Superseded(5));
    assert_eq!(
        pending(&*s, uaid).await,
        vec![],
        "a seen version never raises again"
    );
    assert_eq!(clock(&*s, uaid, appid, 1).await, PutOutcome::Raised(6));
    assert_eq!(put(&*s, uaid, appid, 7).await, PutOutcome::Raised(7));
}

pub async fn pending_skips_expired_and_orders_by_appid<S: Store>(s: Arc<S>) {
    let uaid = Uaid::random();
    s.bind_uaid(uaid).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..6u64 {
        let appid = Appid::random();
        register(&*s, uaid, appid, TokenId::random()).await;
        let expires = if i % 3 == 0 {
            now_ms() - 1 // already expired
        } else {
            in_an_hour()
        };
        let raised = s
            .put_version(uaid, appid, VersionReq::Exact(100 + i), expires)
            .await
            .unwrap();
        assert_eq!(raised, PutOutcome::Raised(100 + i));
        if i % 3 != 0 {
            expected.push((appid, 100 + i));
        }
    }
    // Another UAID's events are not this one's.
    let (other, other_appid, _) = registration(&*s).await;
    put(&*s, other, other_appid, 1).await;
    expected.sort_by_key(|(appid, _)| *appid);
    assert_eq!(pending(&*s, uaid).await, expected);
    assert_eq!(pending(&*s, other).await, vec![(other_appid, 1)]);
    assert_eq!(pending(&*s, Uaid::random()).await, vec![]);
    // Expiry is judged at the `now_ms` the caller gives.
    assert_eq!(
        s.pending(uaid, in_an_hour() + HOUR_MS).await.unwrap(),
        vec![],
        "events are not pending after they expire"
    );
}

pub async fn ack_is_compare_and_delete<S: Store>(s: Arc<S>) {
    let (uaid, appid, _) = registration(&*s).await;
    assert!(!s.ack(uaid, appid, 5).await.unwrap(), "nothing pending");
    assert_eq!(put(&*s, uaid, appid, 5).await, PutOutcome::Raised(5));
    assert!(
        !s.ack(uaid, appid, 4).await.unwrap(),
        "an older ACK clears nothing"
    );
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 5)]);
    assert!(s.ack(uaid, appid, 5).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![]);
    assert!(
        !s.ack(uaid, appid, 5).await.unwrap(),
        "a repeated ACK is harmless"
    );
    // A newer version raised while an older one was in flight survives the older ACK.
    assert_eq!(put(&*s, uaid, appid, 6).await, PutOutcome::Raised(6));
    assert_eq!(put(&*s, uaid, appid, 7).await, PutOutcome::Raised(7));
    assert!(!s.ack(uaid, appid, 6).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 7)]);
    // An ACK names exactly what was received: one naming a version never sent clears nothing.
    assert!(!s.ack(uaid, appid, 9).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 7)]);
    assert!(s.ack(uaid, appid, 7).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![]);
    // Unknown registrations: nothing to clear.
    assert!(!s.ack(uaid, Appid::random(), 1).await.unwrap());
    assert!(!s.ack(Uaid::random(), appid, 1).await.unwrap());
}

pub async fn unregister_removes_pending_and_leaves_a_tombstone<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = registration(&*s).await;
    let (kept, kept_token) = (Appid::random(), TokenId::random());
    register(&*s, uaid, kept, kept_token).await;
    put(&*s, uaid, appid, 3).await;
    put(&*s, uaid, kept, 4).await;
    let now = now_ms();
    let gone_until = now + HOUR_MS;
    assert!(s.unregister(uaid, appid, gone_until).await.unwrap());
    assert!(
        !s.unregister(uaid, appid, gone_until).await.unwrap(),
        "already gone"
    );
    assert!(!s.unregister(uaid, Appid::random(), gone_until).await.unwrap());
    assert_eq!(pending(&*s, uaid).await, vec![(kept, 4)]);
    assert_eq!(s.lookup_token(token).await.unwrap(), TokenTarget::Gone);
    // Before its time, a sweep keeps the tombstone.
    let stats = s.sweep(now).await.unwrap();
    assert_eq!(stats.expired_tombstones, 0);
    assert_eq!(s.lookup_token(token).await.unwrap(), TokenTarget::Gone);
    // After it, the token is unknown; the other registration is untouched.
    let stats = s.sweep(gone_until + 1).await.unwrap();
    assert_eq!(stats.expired_tombstones, 1);
    assert_eq!(s.lookup_token(token).await.unwrap(), TokenTarget::Unknown);
    assert_eq!(
        s.lookup_token(kept_token).await.unwrap(),
        TokenTarget::Active(uaid, kept)
    );
}

pub async fn reregister_after_unregister_starts_fresh<S: Store>(s: Arc<S>) {
    let (uaid, appid, token) = registration(&*s).await;
    put(&*s, uaid, appid, 50).await;
    assert!(s.unregister(uaid, appid, in_an_hour()).await.unwrap());
    let new_token = TokenId::random();
    register(&*s, uaid, appid, new_token).await;
    assert_ne!(new_token, token);
    assert_eq!(s.lookup_token(token).await.unwrap(), TokenTarget::Gone);
    assert_eq!(
        s.lookup_token(new_token).await.unwrap(),
        TokenTarget::Active(uaid, appid)
    );
    assert_eq!(
        pending(&*s, uaid).await,
        vec![],
        "the old event went with the old registration"
    );
    assert_eq!(
        put(&*s, uaid, appid, 1).await,
        PutOutcome::Raised(1),
        "versions are monotonic per registration"
    );
}

pub async fn sweep_deletes_expired_events_only<S: Store>(s: Arc<S>) {
    let (uaid, expired, _) = registration(&*s).await;
    let live = Appid::random();
    register(&*s, uaid, live, TokenId::random()).await;
    let now = now_ms();
    let raised = s
        .put_version(uaid, expired, VersionReq::Exact(8), now - 1)
        .await
        .unwrap();
    assert_eq!(raised, PutOutcome::Raised(8));
    put(&*s, uaid, live, 9).await;
    let stats = s.sweep(now).await.unwrap();
    assert_eq!(stats.expired_events, 1);
    assert_eq!(stats.expired_tombstones, 0);
    assert_eq!(
        s.pending(uaid, 0).await.unwrap(),
        vec![(live, 9)],
        "swept, not only hidden"
    );
    assert_eq!(s.sweep(now).await.unwrap().expired_events, 0, "nothing twice");
    // The registration and its last known version outlive the event.
    assert_eq!(put(&*s, uaid, expired, 8).await, PutOutcome::Superseded(8));
    assert_eq!(put(&*s, uaid, expired, 10).await, PutOutcome::Raised(10));
}

pub async fn pending_count_tracks_every_change<S: Store>(s: Arc<S>) {
    let base = s.pending_count();
    let count = || s.pending_count() - base;
    let (uaid, a, _) = registration(&*s).await;
    let b = Appid::random();
    register(&*s, uaid, b, TokenId::random()).await;
    assert_eq!(count(), 0, "a registration is not an event");
    put(&*s, uaid, a, 1).await;
    assert_eq!(count(), 1);
    put(&*s, uaid, a, 2).await;
    assert_eq!(count(), 1, "a newer version replaces the pending one");
    put(&*s, uaid, a, 1).await;
    assert_eq!(count(), 1, "a superseded PUT adds nothing");
    put(&*s, uaid, b, 1).await;
    assert_eq!(count(), 2);
    assert!(!s.ack(uaid, a, 1).await.unwrap());
    assert_eq!(count(), 2, "an older ACK clears nothing");
    assert!(s.ack(uaid, a, 2).await.unwrap());
    assert_eq!(count(), 1);
    assert!(s.unregister(uaid, b, in_an_hour()).await.unwrap());
    assert_eq!(count(), 0);
    let now = now_ms();
    s.put_version(uaid, a, VersionReq::Exact(3), now - 1)
        .await
        .unwrap();
    assert_eq!(count(), 1, "counted until swept");
    s.sweep(now).await.unwrap();
    assert_eq!(count(), 0);
}

pub async fn sync_succeeds<S: Store>(s: Arc<S>) {
    s.sync().await.unwrap();
    let (uaid, appid, _) = registration(&*s).await;
    put(&*s, uaid, appid, 1).await;
    s.sync().await.unwrap();
    // Many callers at once share commits and all succeed.
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                put(&*s, uaid, appid, 2 + i).await;
                s.sync().await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(pending(&*s, uaid).await, vec![(appid, 33)]);
}

pub async fn a_fresh_store_is_healthy<S: Store>(s: Arc<S>) {
    s.health().await.unwrap();
}

pub async fn concurrent_puts_end_at_the_max<S: Store>(s: Arc<S>) {
    const TASKS: u64 = 8;
    const TOP: u64 = 400;
    let (uaid, appid, _) = registration(&*s).await;
    // Task t sends t+1, t+1+TASKS, …: every version once, interleaved across tasks.
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut raised = 0;
                for v in (t + 1..=TOP).step_by(TASKS as usize) {
                    match put(&*s, uaid, appid, v).await {
                        PutOutcome::Raised(r) => {
                            assert_eq!(r, v);
                            raised += 1;
                        }
                        PutOutcome::Superseded(current) => assert!(current >= v),
                        other => panic!("{other:?}"),
                    }
                }
                raised
            })
        })
        .collect();
    let mut raised = 0;
    for t in tasks {
        raised += t.await.unwrap();
    }
    assert!(raised >= 1);
    assert_eq!(pending(&*s, uaid).await, vec![(appid, TOP)], "no lost update");
    assert_eq!(put(&*s, uaid, appid, TOP).await, PutOutcome::Superseded(TOP));
}

pub async fn concurrent_puts_and_acks_lose_nothing<S: Store>(s: Arc<S>) {
    const TOP: u64 = 300;
    let (uaid, appid, _) = registration(&*s).await;
    let done = Arc::new(AtomicBool::new(false));
    let putter = {
        let (s, done) = (s.clone(), done.clone());
        tokio::spawn(async move {
            for v in 1..=TOP {
                // ACKs never lower the last known version, so every PUT is newer.
                assert_eq!(put(&*s, uaid, appid, v).await, PutOutcome::Raised(v));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // A client that ACKs whatever it sees: an ACK clears only what it names, so once the PUTs
    // are over the last version must have been seen.
    let acker = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut acked = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                match pending(&*s, uaid).await.first() {
                    Some(&(_, v)) => {
                        assert!(v > acked, "an ACKed version came back");
                        s.ack(uaid, appid, v).await.unwrap();
                        acked = v;
                    }
                    None if finished => return acked,
                    None => {}
                }
                tokio::task::yield_now().await;
            }
        })
    };
    putter.await.unwrap();
    assert_eq!(acker.await.unwrap(), TOP, "no PUT was cleared unseen");
    assert_eq!(put(&*s, uaid, appid, TOP).await, PutOutcome::Superseded(TOP));
}
