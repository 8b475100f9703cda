//! Scenario tests of the store through its public API, with a fake clock in Unix ms.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::config::{ForwardedHeader, IdentityConfig};
use crate::identity::{ClientKey, Identifier, IdentityKey};

const DAY_MS: u64 = 86_400_000;

/// An even epoch second, far from zero, as a base for window-aligned scenarios.
const EPOCH_T: u64 = 1_700_000_000_000;

/// The key of the n-th anonymous client address, counting from 192.0.2.0.
pub(super) fn client(n: u32) -> ClientKey {
    let config = IdentityConfig {
        trusted_proxies: Vec::new(),
        forwarded_header: ForwardedHeader::XForwardedFor,
        ipv6_prefix: 64,
        fingerprint_header: None,
    };
    let identifier = Identifier::new(IdentityKey::new(b"test".to_vec()), None, config);
    let address = IpAddr::V4(Ipv4Addr::from(0xC000_0200 + n));
    identifier
        .identify(address, &http::HeaderMap::new())
        .caller
        .key()
}

pub(super) fn limit(name: &str, quantity: u64, window_ms: u64, algorithm: Algorithm) -> Window {
    Window {
        name: name.into(),
        quantity,
        window_ms,
        algorithm,
        variant: 0,
    }
}

fn sliding(name: &str, quantity: u64, window_ms: u64) -> Window {
    limit(name, quantity, window_ms, Algorithm::SlidingWindow)
}

fn fixed(name: &str, quantity: u64, window_ms: u64) -> Window {
    limit(name, quantity, window_ms, Algorithm::FixedWindow)
}

fn bucket(quantity: u64, window_ms: u64, burst: u64) -> Window {
    limit(
        "bucket",
        quantity,
        window_ms,
        Algorithm::TokenBucket { burst },
    )
}

/// `(admitted, remaining, reset_ms)` of a one-window decision of cost 1.
#[track_caller]
fn one(store: &MemoryStore, who: ClientKey, window: &Window, now_ms: u64) -> (bool, u64, u64) {
    let verdict = store.decide(who, std::slice::from_ref(window), 1, now_ms);
    let state = &verdict.states[0];
    (verdict.admitted, state.remaining, state.reset_ms)
}

/// What a client is told in whole seconds, as the limiter rounds it.
fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

// ---- Sliding window -------------------------------------------------------------------------

#[test]
fn a_burst_on_the_day_limit_matches_the_header_table() {
    // CASE-07 step 1: 3 per 24 h, five requests within a second.
    let store = MemoryStore::default();
    let day = sliding("anonymous-daily", 3, DAY_MS);
    let seen: Vec<_> = (0..5)
        .map(|i| one(&store, client(1), &day, 1_000 + i))
        .collect();
    assert_eq!(
        seen,
        [
            (true, 2, DAY_MS),
            (true, 1, DAY_MS - 1),
            (true, 0, DAY_MS - 2),
            (false, 0, DAY_MS - 3),
            (false, 0, DAY_MS - 4),
        ]
    );
    assert!(seen.iter().all(|&(_, _, reset)| secs(reset) == 86_400));
}

#[test]
fn spaced_requests_follow_the_oldest_admission() {
    // CASE-07 step 2: 3 per 10 s at t = 0, 4, 6, 7 and 10.5 s.
    let store = MemoryStore::default();
    let window = sliding("w", 3, 10_000);
    let at = |ms| one(&store, client(2), &window, ms);
    assert_eq!(at(0), (true, 2, 10_000));
    assert_eq!(at(4_000), (true, 1, 6_000));
    assert_eq!(at(6_000), (true, 0, 4_000));
    assert_eq!(at(7_000), (false, 0, 3_000));
    assert_eq!(at(10_500), (true, 0, 3_500));
}

#[test]
fn waiting_the_advertised_retry_after_is_enough() {
    // CASE-07 step 3: 3 per 2 s, a 4th request 1.95 s after the first.
    let store = MemoryStore::default();
    let window = sliding("w", 3, 2_000);
    for t in [0, 10, 20] {
        assert!(one(&store, client(3), &window, t).0);
    }
    let (admitted, _, wait_ms) = one(&store, client(3), &window, 1_950);
    assert!(!admitted);
    assert_eq!(wait_ms, 50);
    assert_eq!(secs(wait_ms), 1);
    assert_eq!(
        one(&store, client(3), &window, 1_950 + 1_000),
        (true, 2, 2_000)
    );
}

#[test]
fn two_limits_decide_together_and_a_refusal_consumes_neither() {
    // CASE-05 step 5: "short" 1 per 2 s and "long" 3 per 10 s.
    let store = MemoryStore::default();
    let limits = [sliding("short", 1, 2_000), sliding("long", 3, 10_000)];
    let who = client(4);

    // t = 0: ten concurrent requests, exactly one admitted.
    let verdicts: Vec<Verdict> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| store.decide(who, &limits, 1, 0)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("no panic"))
            .collect()
    });
    assert_eq!(
        verdicts.iter().filter(|verdict| verdict.admitted).count(),
        1
    );
    for refused in verdicts.iter().filter(|verdict| !verdict.admitted) {
        assert!(!refused.states[0].admits);
        assert!(matches!(secs(refused.states[0].reset_ms), 1 | 2));
        assert!(refused.states[1].admits);
        assert_eq!(refused.states[1].remaining, 2);
    }

    let at = |ms| {
        let verdict = store.decide(who, &limits, 1, ms);
        let states: Vec<_> = verdict
            .states
            .iter()
            .map(|state| (state.admits, state.remaining, state.reset_ms))
            .collect();
        (verdict.admitted, states)
    };
    assert_eq!(at(2_500), (true, vec![(true, 0, 2_000), (true, 1, 7_500)]));
    assert_eq!(at(5_000), (true, vec![(true, 0, 2_000), (true, 0, 5_000)]));
    let (admitted, states) = at(7_500);
    assert!(!admitted);
    assert!(states[0].0, "short admits, so its wait does not count");
    assert_eq!(states[1], (false, 0, 2_500));
    assert_eq!(secs(states[1].2), 3, "Retry-After names long's wait");
    assert!(at(10_500).0);
}

#[test]
fn a_rolling_day_ignores_midnight() {
    // CASE-06 step 2: 3 at 23:59:50 UTC, a 4th at 00:00:10 UTC.
    let store = MemoryStore::default();
    let day = sliding("anonymous-daily", 3, DAY_MS);
    let midnight = 19_800 * DAY_MS;
    for _ in 0..3 {
        assert!(one(&store, client(5), &day, midnight - 10_000).0);
    }
    let (admitted, _, wait_ms) = one(&store, client(5), &day, midnight + 10_000);
    assert!(!admitted);
    assert_eq!(secs(wait_ms), 86_380);
}

#[test]
fn costs_are_counted_in_units() {
    let store = MemoryStore::default();
    let window = sliding("w", 3, 1_000);
    let costly = |cost, ms| {
        let verdict = store.decide(client(6), std::slice::from_ref(&window), cost, ms);
        (
            verdict.admitted,
            verdict.states[0].remaining,
            verdict.states[0].reset_ms,
        )
    };
    assert_eq!(costly(2, 0), (true, 1, 1_000));
    assert_eq!(
        costly(2, 100),
        (false, 1, 900),
        "waits for one unit of the first to leave"
    );
    assert_eq!(costly(1, 200), (true, 0, 800));
    assert_eq!(
        costly(3, 1_000),
        (false, 2, 200),
        "needs the unit from 200 ms to leave"
    );
    assert_eq!(costly(3, 1_200), (true, 0, 1_000));
    assert_eq!(
        costly(4, 5_000),
        (false, 3, 1_000),
        "never fits: told the window length"
    );
}

#[test]
fn a_log_longer_than_its_inline_range_stays_exact() {
    // 3 per 200 days: entries more than 2^32 ms apart cannot be kept as 32-bit offsets, so the
    // log moves to the heap, and back once one entry is left.
    let store = MemoryStore::default();
    let window = sliding("long", 3, 200 * DAY_MS);
    let at = |days| one(&store, client(30), &window, days * DAY_MS);
    assert_eq!(at(0), (true, 2, 200 * DAY_MS));
    assert_eq!(at(60), (true, 1, 140 * DAY_MS));
    assert_eq!(at(120), (true, 0, 80 * DAY_MS));
    assert_eq!(at(130), (false, 0, 70 * DAY_MS));
    assert_eq!(at(200), (true, 0, 60 * DAY_MS));
    assert_eq!(at(321), (true, 1, 79 * DAY_MS));
}

#[test]
fn a_log_rebases_its_offsets_as_old_entries_leave() {
    // 3 per 40 days: the entry at 50 days is over 2^32 ms after the first, which has left.
    let store = MemoryStore::default();
    let window = sliding("month", 3, 40 * DAY_MS);
    let at = |days| one(&store, client(31), &window, days * DAY_MS);
    assert_eq!(at(0), (true, 2, 40 * DAY_MS));
    assert_eq!(at(30), (true, 1, 10 * DAY_MS));
    assert_eq!(at(41), (true, 1, 29 * DAY_MS));
    assert_eq!(at(50), (true, 0, 20 * DAY_MS));
    assert_eq!(at(51), (false, 0, 19 * DAY_MS));
}

// ---- Fixed window ---------------------------------------------------------------------------

#[test]
fn a_fixed_window_resets_on_its_aligned_edge() {
    // CASE-06 step 3: 3 per 2 s from an even epoch second t.
    let store = MemoryStore::default();
    let window = fixed("w", 3, 2_000);
    let at = |ms| one(&store, client(7), &window, EPOCH_T + ms);
    assert_eq!(at(1_700), (true, 2, 300));
    assert_eq!(at(1_700), (true, 1, 300));
    assert_eq!(at(1_700), (true, 0, 300));
    assert_eq!(secs(300), 1);
    assert_eq!(at(1_800), (false, 0, 200));
    assert_eq!(at(2_100), (true, 2, 1_900));
    assert_eq!(secs(1_900), 2);
}

#[test]
fn a_fixed_day_window_resets_at_midnight_utc() {
    // CASE-06 step 4, and the reset around 00:00 UTC.
    let store = MemoryStore::default();
    let day = fixed("daily", 3, DAY_MS);
    let midnight = 19_800 * DAY_MS;
    let some_time = midnight - DAY_MS + 12_345_678;
    assert_eq!(
        one(&store, client(8), &day, some_time),
        (true, 2, DAY_MS - 12_345_678)
    );
    for _ in 0..2 {
        assert!(one(&store, client(8), &day, midnight - 10_000).0);
    }
    assert_eq!(one(&store, client(8), &day, midnight - 1), (false, 0, 1));
    assert_eq!(one(&store, client(8), &day, midnight), (true, 2, DAY_MS));
}

// ---- Token bucket ---------------------------------------------------------------------------

#[test]
fn a_bucket_allows_its_burst_then_one_per_interval() {
    // 10 per second (one per 100 ms) with a burst of 3.
    let store = MemoryStore::default();
    let window = bucket(10, 1_000, 3);
    let at = |ms| one(&store, client(9), &window, ms);
    assert_eq!(at(0), (true, 2, 100));
    assert_eq!(at(0), (true, 1, 100));
    assert_eq!(at(0), (true, 0, 100));
    assert_eq!(at(0), (false, 0, 100));
    assert_eq!(at(99), (false, 0, 1));
    assert_eq!(at(100), (true, 0, 100));
    assert_eq!(
        at(350),
        (true, 1, 50),
        "150 ms of backlog: one more fits, 50 ms to the next"
    );
}

#[test]
fn a_bucket_holds_its_steady_rate() {
    // Twice the rate for 10 s: the burst, then one per 100 ms.
    let store = MemoryStore::default();
    let window = bucket(10, 1_000, 3);
    let admitted = (0..200)
        .filter(|i| one(&store, client(10), &window, i * 50).0)
        .count();
    assert_eq!(admitted, 3 + 99);

    // Exactly the rate is always admitted.
    let steady = (0..1_000).all(|i| one(&store, client(11), &window, i * 100).0);
    assert!(steady);
}

#[test]
fn a_bucket_with_an_uneven_interval_never_admits_early() {
    // 3 per 10 s: one unit every 3333.3 ms, burst 1.
    let store = MemoryStore::default();
    let window = bucket(3, 10_000, 1);
    assert_eq!(one(&store, client(12), &window, 0), (true, 0, 3_334));
    assert_eq!(one(&store, client(12), &window, 3_333), (false, 0, 1));
    assert!(one(&store, client(12), &window, 3_334).0);
}

// ---- Weighted estimate ----------------------------------------------------------------------

#[test]
fn the_weighted_estimate_discounts_the_previous_window() {
    // 2000 per 10 s is above the exact range; requests of 500 units act as "4 per 10 s".
    let store = MemoryStore::default();
    let window = sliding("big", 2_000, 10_000);
    let who = client(13);
    let costly = |cost, ms| {
        let verdict = store.decide(who, std::slice::from_ref(&window), cost, ms);
        (
            verdict.admitted,
            verdict.states[0].remaining,
            verdict.states[0].reset_ms,
        )
    };
    for _ in 0..4 {
        assert!(costly(500, 9_900).0);
    }
    assert!(!costly(1, 9_900).0);

    // At 18 s the previous window weighs 20 %: 400 of 2000 are taken, one unit less every
    // 5 ms (2000 units over 10 s).
    assert_eq!(costly(500, 18_000), (true, 1_100, 5));
    assert_eq!(costly(500, 18_000), (true, 600, 5));
    assert_eq!(costly(500, 18_000), (true, 100, 5));
    // The span (9.5 s, 19.5 s] now holds 3500 units: within the bound of 2 × 2000 - 1.
    assert_eq!(costly(500, 18_000), (false, 100, 2_000));
    assert_eq!(costly(500, 19_999), (false, 499, 1));
    assert_eq!(
        costly(500, 20_000),
        (true, 0, 7),
        "1500 from the previous window, fading"
    );
}

// ---- Identity of counters -------------------------------------------------------------------

#[test]
fn clients_variants_and_algorithms_do_not_share_counters() {
    let store = MemoryStore::default();
    let whole = sliding("w", 1, 60_000);
    let per_fingerprint = Window {
        variant: 7,
        ..whole.clone()
    };
    let fixed_twin = fixed("w", 1, 60_000);
    assert!(one(&store, client(14), &whole, 0).0);
    assert!(one(&store, client(15), &whole, 0).0);
    assert!(one(&store, client(14), &per_fingerprint, 0).0);
    assert!(one(&store, client(14), &fixed_twin, 0).0);
    assert!(!one(&store, client(14), &whole, 1).0);
    assert!(!one(&store, client(14), &per_fingerprint, 1).0);
}

#[test]
fn a_reload_keeps_counts_when_name_and_window_stay() {
    let store = MemoryStore::default();
    let who = client(16);
    for _ in 0..3 {
        assert!(one(&store, who, &sliding("w", 3, 10_000), 0).0);
    }
    assert_eq!(
        one(&store, who, &sliding("w", 5, 10_000), 1),
        (true, 1, 9_999)
    );
    assert!(
        one(&store, who, &sliding("w", 5, 20_000), 2).0,
        "a new window is a new counter"
    );

    // A new burst keeps the bucket's arrival time.
    for _ in 0..2 {
        assert!(one(&store, who, &bucket(10, 1_000, 2), 0).0);
    }
    assert_eq!(one(&store, who, &bucket(10, 1_000, 3), 0), (true, 0, 100));

    // Across the exact range and back, nothing is forgotten.
    let big = sliding("x", 2_000, 10_000);
    assert!(
        store
            .decide(who, std::slice::from_ref(&big), 1_000, 0)
            .admitted
    );
    assert!(!one(&store, who, &sliding("x", 1_000, 10_000), 1).0);
    let back = store
        .decide(who, std::slice::from_ref(&big), 1_000, 2)
        .states[0]
        .clone();
    assert_eq!(
        back.remaining, 0,
        "1000 units in the log became 1000 in the estimate"
    );
}

// ---- Concurrency and memory -----------------------------------------------------------------

#[test]
fn concurrent_requests_never_exceed_the_quantity() {
    // CASE-05 step 3: 2 threads × 200 requests from one client, 20 allowed.
    let store = MemoryStore::default();
    let window = sliding("w", 20, DAY_MS);
    let mut remaining: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    (0..200)
                        .map(|i| store.decide(client(17), std::slice::from_ref(&window), 1, i))
                        .filter(|verdict| verdict.admitted)
                        .map(|verdict| verdict.states[0].remaining)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("no panic"))
            .collect()
    });
    remaining.sort_unstable();
    assert_eq!(remaining, (0..20).collect::<Vec<_>>());
}

#[test]
fn sweeping_forgets_clients_whose_windows_emptied() {
    // CASE-04 step 7: 100 000 clients, then two windows of quiet.
    let store = MemoryStore::default();
    let window = sliding("w", 3, 2_000);
    for n in 0..100_000 {
        assert!(one(&store, client(n), &window, 0).0);
    }
    assert_eq!(store.tracked(), 100_000);
    assert_eq!(store.sweep(1_999), 100_000);
    assert_eq!(store.sweep(4_000), 0);
    assert_eq!(store.tracked(), 0);
}

#[test]
fn sweeping_waits_for_a_bucket_to_rest() {
    let store = MemoryStore::default();
    let window = bucket(10, 1_000, 5);
    for _ in 0..3 {
        assert!(one(&store, client(18), &window, 0).0);
    }
    assert_eq!(store.sweep(299), 1);
    assert_eq!(store.sweep(300), 0);
}

#[test]
fn a_full_store_fails_open_for_new_clients_and_says_so() {
    let store = MemoryStore::new(1);
    let window = sliding("w", 1, 1_000);
    let decide = |who, ms| store.decide(client(who), std::slice::from_ref(&window), 1, ms);
    assert!(decide(20, 0).admitted);

    // A second client finds no room: decided as fresh, admitted, not recorded, flagged.
    for ms in 0..3 {
        let verdict = decide(21, ms);
        assert!(verdict.admitted && verdict.untracked);
    }
    assert_eq!(store.tracked(), 1);
    assert!(
        !decide(20, 10).admitted,
        "the tracked client keeps its count"
    );

    // Once the first client has gone idle, the newcomer takes its place without a sweep.
    let verdict = decide(21, 1_000);
    assert!(verdict.admitted && !verdict.untracked);
    assert!(!decide(21, 1_001).admitted);
    assert_eq!(store.tracked(), 1);
}
