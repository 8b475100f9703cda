//! One client's counters, and the all-or-nothing rule across a request's windows.
//!
//! The store keeps one [`ClientCounters`] per client and calls it under the client's shard
//! lock; nothing here locks. A counter that has gone idle holds nothing a fresh one would not,
//! so idle counters are dropped freely, and a client with none left can be forgotten.

use std::sync::Arc;

use super::fixed::FixedCount;
use super::gcra::TokenBucket;
use super::sliding::{self, SlidingLog, WeightedEstimate};
use super::{Algorithm, Window, WindowState};

/// Every live counter of one client.
#[derive(Clone, Debug, Default)]
pub(super) struct ClientCounters {
    /// A handful at most (one per limit and variant that the client touched within a window),
    /// so a linear search beats a map.
    counters: Vec<Counter>,
}

/// One window's count for one client, with the identity it is found by.
#[derive(Clone, Debug)]
struct Counter {
    name: Arc<str>,
    /// Window length, ms.
    window_ms: u64,
    variant: u64,
    /// The count; its variant also names the kind of algorithm.
    rule: Rule,
}

#[derive(Clone, Debug)]
enum Rule {
    Log(SlidingLog),
    Estimate(WeightedEstimate),
    Fixed(FixedCount),
    Bucket(TokenBucket),
}

/// The outcome of [`ClientCounters::decide`].
pub(super) struct Outcome {
    pub(super) admitted: bool,
    pub(super) states: Vec<WindowState>,
}

impl ClientCounters {
    /// Decides a request of `cost` units at `now_ms` against `windows`: admitted only if every
    /// window admits it, and then recorded in all of them. A refused request changes no count.
    /// The windows are expected to be distinct: two with the same identity share one counter,
    /// and each is checked against it before either records.
    pub(super) fn decide(&mut self, windows: &[Window], cost: u64, now_ms: u64) -> Outcome {
        let slots: Vec<usize> = windows
            .iter()
            .map(|window| self.find_or_add(window, now_ms))
            .collect();
        for (window, &slot) in windows.iter().zip(&slots) {
            self.counters[slot].rule.advance(window, now_ms);
        }

        let admits: Vec<bool> = windows
            .iter()
            .zip(&slots)
            .map(|(window, &slot)| self.counters[slot].rule.admits(window, cost, now_ms))
            .collect();
        let admitted = admits.iter().all(|&admits| admits);
        if admitted {
            for (window, &slot) in windows.iter().zip(&slots) {
                self.counters[slot].rule.record(window, cost, now_ms);
            }
        }

        let states = windows
            .iter()
            .zip(&slots)
            .zip(admits)
            .map(|((window, &slot), admits)| {
                self.counters[slot].rule.state(window, cost, now_ms, admits)
            })
            .collect();
        self.forget_idle(now_ms);
        Outcome { admitted, states }
    }

    /// When every counter has gone idle, Unix ms; 0 when none is left.
    pub(super) fn idle_at(&self) -> u64 {
        self.counters
            .iter()
            .map(Counter::idle_at)
            .max()
            .unwrap_or(0)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// Bytes this client holds on the heap, allocator overhead aside.
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        let own = self.counters.capacity() * std::mem::size_of::<Counter>();
        own + self
            .counters
            .iter()
            .map(|counter| counter.rule.heap_bytes())
            .sum::<usize>()
    }

    /// Drops the counters that are idle at `now_ms`; says whether any is left.
    pub(super) fn forget_idle(&mut self, now_ms: u64) -> bool {
        self.counters.retain(|counter| counter.idle_at() > now_ms);
        !self.counters.is_empty()
    }

    /// The index of `window`'s counter, added fresh if the client has none. A sliding counter
    /// whose quantity moved across the exact range is converted in place.
    fn find_or_add(&mut self, window: &Window, now_ms: u64) -> usize {
        let found = self.counters.iter().position(|counter| {
            counter.window_ms == window.window_ms
                && counter.variant == window.variant
                && counter.rule.is_kind_of(window.algorithm)
                && counter.name == window.name
        });
        let Some(slot) = found else {
            // Exactly one more slot: the vector's default growth would reserve four.
            self.counters.reserve_exact(1);
            self.counters.push(Counter {
                name: window.name.clone(),
                window_ms: window.window_ms,
                variant: window.variant,
                rule: Rule::fresh(window),
            });
            return self.counters.len() - 1;
        };

        let rule = &mut self.counters[slot].rule;
        let exact = sliding::is_exact(window.quantity);
        match rule {
            Rule::Log(log) if !exact => {
                log.advance(window, now_ms);
                *rule = Rule::Estimate(WeightedEstimate::from_log(log, window, now_ms));
            }
            Rule::Estimate(estimate) if exact => {
                estimate.advance(window, now_ms);
                *rule = Rule::Log(SlidingLog::from_estimate(estimate, window, now_ms));
            }
            _ => {}
        }
        slot
    }
}

impl Counter {
    fn idle_at(&self) -> u64 {
        match &self.rule {
            Rule::Log(log) => log.idle_at(self.window_ms),
            Rule::Estimate(estimate) => estimate.idle_at(self.window_ms),
            Rule::Fixed(fixed) => fixed.idle_at(self.window_ms),
            Rule::Bucket(bucket) => bucket.idle_at(),
        }
    }
}

impl Rule {
    fn fresh(window: &Window) -> Self {
        match window.algorithm {
            Algorithm::SlidingWindow if sliding::is_exact(window.quantity) => {
                Self::Log(SlidingLog::default())
            }
            Algorithm::SlidingWindow => Self::Estimate(WeightedEstimate::default()),
            Algorithm::FixedWindow => Self::Fixed(FixedCount::default()),
            Algorithm::TokenBucket { .. } => Self::Bucket(TokenBucket::default()),
        }
    }

    /// Whether this count serves `algorithm`. The burst is not part of the identity: a bucket's
    /// arrival time keeps its meaning under a new burst.
    fn is_kind_of(&self, algorithm: Algorithm) -> bool {
        matches!(
            (self, algorithm),
            (Self::Log(_) | Self::Estimate(_), Algorithm::SlidingWindow)
                | (Self::Fixed(_), Algorithm::FixedWindow)
                | (Self::Bucket(_), Algorithm::TokenBucket { .. })
        )
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match self {
            Self::Log(log) => log.heap_bytes(),
            Self::Estimate(_) | Self::Fixed(_) | Self::Bucket(_) => 0,
        }
    }

    /// Brings the count to `now_ms`: forgets what has left the window.
    fn advance(&mut self, window: &Window, now_ms: u64) {
        match self {
            Self::Log(log) => log.advance(window, now_ms),
            Self::Estimate(estimate) => estimate.advance(window, now_ms),
            Self::Fixed(fixed) => fixed.advance(window, now_ms),
            Self::Bucket(_) => {}
        }
    }

    fn admits(&self, window: &Window, cost: u64, now_ms: u64) -> bool {
        match self {
            Self::Log(log) => log.admits(window, cost),
            Self::Estimate(estimate) => estimate.admits(window, cost, now_ms),
            Self::Fixed(fixed) => fixed.admits(window, cost),
            Self::Bucket(bucket) => bucket.admits(window, burst(window), cost, now_ms),
        }
    }

    fn record(&mut self, window: &Window, cost: u64, now_ms: u64) {
        match self {
            Self::Log(log) => log.record(cost, now_ms),
            Self::Estimate(estimate) => estimate.record(cost),
            Self::Fixed(fixed) => fixed.record(cost),
            Self::Bucket(bucket) => bucket.record(window, burst(window), cost, now_ms),
        }
    }

    fn state(&self, window: &Window, cost: u64, now_ms: u64, admits: bool) -> WindowState {
        match self {
            Self::Log(log) => log.state(window, cost, now_ms, admits),
            Self::Estimate(estimate) => estimate.state(window, cost, now_ms, admits),
            Self::Fixed(fixed) => fixed.state(window, now_ms, admits),
            Self::Bucket(bucket) => bucket.state(window, burst(window), cost, now_ms, admits),
        }
    }
}

/// The burst of a token-bucket window. Only buckets are asked, so the fallback is never used.
fn burst(window: &Window) -> u64 {
    match window.algorithm {
        Algorithm::TokenBucket { burst } => burst,
        Algorithm::SlidingWindow | Algorithm::FixedWindow => 1,
    }
}
