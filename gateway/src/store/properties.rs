//! Property tests of the counting rules over arbitrary request times and costs.
//!
//! Each case drives one client's counters through a random sequence of requests (time gaps,
//! including bursts at one instant, and costs) and checks, after every decision:
//! - the rule's own bound over everything admitted so far;
//! - `remaining` is how many unit requests are admitted back to back at that instant;
//! - a refused request is admitted after exactly its wait, and still refused 1 ms before;
//! - `remaining` first goes up exactly `reset_ms` later.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::counters::{ClientCounters, Limits};
use super::{Algorithm, Window};

/// A start time far from zero, so aligned windows do not all start at it.
const START_MS: u64 = 1_700_000_000_123;

/// Above this many, `remaining` is checked with one request of that cost rather than unit by
/// unit, which is the same test for every rule and keeps the suite fast.
const UNIT_PROBE_MAX: u64 = 40;

fn window(quantity: u64, window_ms: u64, algorithm: Algorithm) -> Window {
    Window {
        name: "p".into(),
        quantity,
        window_ms,
        algorithm,
        variant: 0,
    }
}

fn steps(max_cost: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    let gap = prop_oneof![3 => Just(0u64), 3 => 0u64..60, 4 => 0u64..3_000];
    prop::collection::vec((gap, 1..=max_cost), 1..50)
}

/// One client's counters with the limit table they refer to, as a shard holds them.
#[derive(Clone, Default)]
struct Client {
    limits: Limits,
    counters: ClientCounters,
}

fn decide(client: &mut Client, window: &Window, cost: u64, now_ms: u64) -> bool {
    let windows = std::slice::from_ref(window);
    client
        .counters
        .decide(&mut client.limits, windows, cost, now_ms)
        .admitted
}

/// `remaining` at `now_ms`, read from a request that cannot fit and so records nothing.
fn remaining_at(client: &Client, window: &Window, now_ms: u64) -> u64 {
    let mut probe = client.clone();
    let windows = std::slice::from_ref(window);
    probe
        .counters
        .decide(&mut probe.limits, windows, u64::MAX >> 16, now_ms)
        .states[0]
        .remaining
}

/// How many unit requests are admitted back to back at `now_ms`, stopping after `cap`.
fn back_to_back(client: &Client, window: &Window, now_ms: u64, cap: u64) -> u64 {
    let mut probe = client.clone();
    (0..cap)
        .take_while(|_| decide(&mut probe, window, 1, now_ms))
        .count() as u64
}

/// Runs `steps`, checks each decision, and returns the admitted `(time, cost)` pairs.
fn run(window: &Window, full: u64, steps: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, TestCaseError> {
    let mut client = Client::default();
    let mut now_ms = START_MS;
    let mut admitted = Vec::new();
    for &(gap, cost) in steps {
        now_ms += gap;
        let windows = std::slice::from_ref(window);
        let outcome = client
            .counters
            .decide(&mut client.limits, windows, cost, now_ms);
        let state = &outcome.states[0];
        prop_assert_eq!(state.admits, outcome.admitted);
        prop_assert!(state.reset_ms >= 1);
        if outcome.admitted {
            admitted.push((now_ms, cost));
        }

        if state.remaining <= UNIT_PROBE_MAX {
            let units = back_to_back(&client, window, now_ms, state.remaining + 1);
            prop_assert_eq!(units, state.remaining);
        } else {
            let mut probe = client.clone();
            prop_assert!(decide(&mut probe, window, state.remaining, now_ms));
            prop_assert!(!decide(&mut probe, window, 1, now_ms));
        }

        let wait = state.reset_ms;
        if cost > full {
            // Never fits; the wait only says when the counter will have emptied.
            prop_assert!(!outcome.admitted);
        } else if !outcome.admitted {
            let mut later = client.clone();
            prop_assert!(
                decide(&mut later, window, cost, now_ms + wait),
                "after the wait"
            );
            let mut early = client.clone();
            prop_assert!(
                !decide(&mut early, window, cost, now_ms + wait - 1),
                "1 ms early"
            );
        } else if state.remaining < full {
            prop_assert!(remaining_at(&client, window, now_ms + wait) > state.remaining);
            prop_assert_eq!(
                remaining_at(&client, window, now_ms + wait - 1),
                state.remaining
            );
        }
    }
    Ok(admitted)
}

/// The most units admitted in any span `(t - span_ms, t]`.
fn busiest_span(admitted: &[(u64, u64)], span_ms: u64) -> u64 {
    (0..admitted.len())
        .map(|last| {
            let end = admitted[last].0;
            admitted[..=last]
                .iter()
                .filter(|(at, _)| at + span_ms > end)
                .map(|(_, cost)| cost)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

/// The most units admitted in one aligned window.
fn busiest_aligned(admitted: &[(u64, u64)], window_ms: u64) -> u64 {
    let mut per_window = std::collections::HashMap::new();
    for (at, cost) in admitted {
        *per_window.entry(at / window_ms).or_insert(0) += cost;
    }
    per_window.into_values().max().unwrap_or(0)
}

proptest! {
    // Failures are reported, not written to a regressions file in the source tree.
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_exact_log_never_admits_more_than_the_quantity_in_any_span(
        quantity in 1u64..8,
        window_ms in 1u64..4_000,
        steps in steps(3),
    ) {
        let window = window(quantity, window_ms, Algorithm::SlidingWindow);
        let admitted = run(&window, quantity, &steps)?;
        prop_assert!(busiest_span(&admitted, window_ms) <= quantity);
    }

    #[test]
    fn a_fixed_window_never_admits_more_than_the_quantity_per_aligned_window(
        quantity in 1u64..8,
        window_ms in 1u64..4_000,
        steps in steps(3),
    ) {
        let window = window(quantity, window_ms, Algorithm::FixedWindow);
        let admitted = run(&window, quantity, &steps)?;
        prop_assert!(busiest_aligned(&admitted, window_ms) <= quantity);
    }

    #[test]
    fn a_bucket_never_admits_more_than_its_burst_plus_its_rate(
        quantity in 1u64..12,
        window_ms in 1u64..4_000,
        burst in 1u64..6,
        steps in steps(3),
    ) {
        let window = window(quantity, window_ms, Algorithm::TokenBucket { burst });
        let admitted = run(&window, burst, &steps)?;
        // Units in [t_i, t_j] <= burst + (t_j - t_i) / T, with T = window_ms / quantity.
        for first in 0..admitted.len() {
            let mut units = 0u128;
            for &(at, cost) in &admitted[first..] {
                units += u128::from(cost);
                let span_ms = u128::from(at - admitted[first].0);
                let allowed = u128::from(burst) * u128::from(window_ms)
                    + span_ms * u128::from(quantity);
                prop_assert!(units * u128::from(window_ms) <= allowed);
            }
        }
    }

    #[test]
    fn the_weighted_estimate_stays_within_its_stated_bound(
        quantity in 1_025u64..1_300,
        window_ms in 1u64..4_000,
        steps in steps(700),
    ) {
        let window = window(quantity, window_ms, Algorithm::SlidingWindow);
        let admitted = run(&window, quantity, &steps)?;
        prop_assert!(busiest_aligned(&admitted, window_ms) <= quantity);
        prop_assert!(busiest_span(&admitted, window_ms) < 2 * quantity);
    }
}
