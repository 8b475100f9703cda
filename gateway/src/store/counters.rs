//! One client's counters, and the all-or-nothing rule across a request's windows.
//!
//! The store keeps one [`ClientCounters`] per client and one [`Limits`] per shard, and calls
//! them under the shard lock; nothing here locks. A counter that has gone idle holds nothing a
//! fresh one would not, so idle counters are dropped freely, and a client with none left can be
//! forgotten.

use std::sync::Arc;

use super::fixed::FixedCount;
use super::gcra::TokenBucket;
use super::sliding::{self, SlidingLog, WeightedEstimate};
use super::{Algorithm, Window, WindowState};

/// Above this many windows in one request, [`ClientCounters::decide`] keeps its working notes
/// on the heap rather than the stack. Requests match a handful of limits at most.
const STACK_WINDOWS: usize = 8;

/// The limits a shard has seen, each named by a small [`LimitId`], so that a counter carries
/// four bytes of identity instead of a shared name and a window length.
///
/// A limit is `(name, window_ms, kind of algorithm)`; a configuration reload that keeps those
/// gets the same id and so keeps its counts, whatever its quantity or burst. The variant is
/// not part of it: it can be a fingerprint hash, of which there is no bound, so each counter
/// keeps its own.
#[derive(Clone, Debug, Default)]
pub(super) struct Limits {
    known: Vec<Limit>,
}

/// An index into [`Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LimitId(u32);

#[derive(Clone, Debug)]
struct Limit {
    /// The newest `Arc` seen for the name, so that requests under the current configuration
    /// match it by pointer.
    name: Arc<str>,
    /// Window length, ms.
    window_ms: u64,
    kind: Kind,
}

/// The algorithm without its parameters: what a counter's state means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sliding,
    Fixed,
    Bucket,
}

/// Every live counter of one client.
///
/// One counter is kept inline, which is the common case of a client under one limit, so such
/// a client costs no allocation at all; two or more move to a vector.
#[derive(Clone, Debug)]
pub(super) enum ClientCounters {
    One(Counter),
    /// Never exactly one counter; empty when the client has none yet.
    Many(Vec<Counter>),
}

/// One window's count for one client, with the identity it is found by.
#[derive(Clone, Debug)]
pub(super) struct Counter {
    variant: u64,
    limit: LimitId,
    /// The count; its variant is always of the limit's kind.
    rule: Rule,
}

#[derive(Clone, Debug)]
enum Rule {
    Log(SlidingLog),
    /// Boxed: only limits above the exact range use it, and inline it would make every
    /// counter 8 bytes larger.
    Estimate(Box<WeightedEstimate>),
    Fixed(FixedCount),
    Bucket(TokenBucket),
}

/// The outcome of [`ClientCounters::decide`].
pub(super) struct Outcome {
    pub(super) admitted: bool,
    pub(super) states: Vec<WindowState>,
}

// ---- Limits ---------------------------------------------------------------------------------

impl Limits {
    /// The id of `window`'s limit, learnt now if it is new.
    ///
    /// A linear search: a configuration holds tens of limits at most, and under an unchanged
    /// configuration the name is found by pointer, without comparing strings.
    fn id_of(&mut self, window: &Window) -> LimitId {
        let kind = Kind::of(window.algorithm);
        let found = self.known.iter_mut().position(|limit| {
            limit.window_ms == window.window_ms
                && limit.kind == kind
                && (Arc::ptr_eq(&limit.name, &window.name) || limit.name == window.name)
        });
        let index = match found {
            Some(index) => {
                // After a reload, keep the new configuration's name so pointers match again
                // and the old one can be freed.
                let limit = &mut self.known[index];
                if !Arc::ptr_eq(&limit.name, &window.name) {
                    limit.name = window.name.clone();
                }
                index
            }
            None => {
                self.known.push(Limit {
                    name: window.name.clone(),
                    window_ms: window.window_ms,
                    kind,
                });
                self.known.len() - 1
            }
        };
        // Limitation: limits are never forgotten, so a process that is reloaded with ever
        // new limit names grows by one small entry per shard and name. Ids are 32 bits, far
        // beyond what any configuration history reaches.
        LimitId(index as u32)
    }

    /// Window length of `limit`, ms.
    fn window_ms(&self, limit: LimitId) -> u64 {
        self.known
            .get(limit.0 as usize)
            .map_or(0, |limit| limit.window_ms)
    }
}

impl Kind {
    fn of(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::SlidingWindow => Self::Sliding,
            Algorithm::FixedWindow => Self::Fixed,
            Algorithm::TokenBucket { .. } => Self::Bucket,
        }
    }
}

// ---- ClientCounters -------------------------------------------------------------------------

impl Default for ClientCounters {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

impl ClientCounters {
    /// Decides a request of `cost` units at `now_ms` against `windows`: admitted only if every
    /// window admits it, and then recorded in all of them. A refused request changes no count.
    /// The windows are expected to be distinct: two with the same identity share one counter,
    /// and each is checked against it before either records.
    pub(super) fn decide(
        &mut self,
        limits: &mut Limits,
        windows: &[Window],
        cost: u64,
        now_ms: u64,
    ) -> Outcome {
        // Which counter each window uses, and whether it admits; on the stack when it fits.
        if windows.len() <= STACK_WINDOWS {
            let mut notes = [(0, false); STACK_WINDOWS];
            self.decide_noting(limits, windows, cost, now_ms, &mut notes[..windows.len()])
        } else {
            let mut notes = vec![(0, false); windows.len()];
            self.decide_noting(limits, windows, cost, now_ms, &mut notes)
        }
    }

    /// When every counter has gone idle, Unix ms; 0 when none is left.
    pub(super) fn idle_at(&self, limits: &Limits) -> u64 {
        self.as_slice()
            .iter()
            .map(|counter| counter.idle_at(limits))
            .max()
            .unwrap_or(0)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Bytes this client holds on the heap, allocator overhead aside.
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        let own = match self {
            Self::One(_) => 0,
            Self::Many(counters) => counters.capacity() * std::mem::size_of::<Counter>(),
        };
        own + self
            .as_slice()
            .iter()
            .map(|counter| counter.rule.heap_bytes())
            .sum::<usize>()
    }

    /// Drops the counters that are idle at `now_ms`; says whether any is left.
    pub(super) fn forget_idle(&mut self, limits: &Limits, now_ms: u64) -> bool {
        match self {
            Self::One(counter) if counter.idle_at(limits) <= now_ms => {
                *self = Self::default();
            }
            Self::One(_) => {}
            Self::Many(counters) => {
                counters.retain(|counter| counter.idle_at(limits) > now_ms);
                if counters.len() == 1 {
                    if let Some(last) = counters.pop() {
                        *self = Self::One(last);
                    }
                }
            }
        }
        !self.is_empty()
    }

    /// [`Self::decide`] with `notes`, one `(counter index, admits)` per window, to fill in.
    fn decide_noting(
        &mut self,
        limits: &mut Limits,
        windows: &[Window],
        cost: u64,
        now_ms: u64,
        notes: &mut [(usize, bool)],
    ) -> Outcome {
        for (window, note) in windows.iter().zip(notes.iter_mut()) {
            note.0 = self.find_or_add(limits.id_of(window), window, now_ms);
        }
        let counters = self.as_mut_slice();
        for (window, note) in windows.iter().zip(notes.iter_mut()) {
            let rule = &mut counters[note.0].rule;
            rule.advance(window, now_ms);
            note.1 = rule.admits(window, cost, now_ms);
        }

        let admitted = notes.iter().all(|&(_, admits)| admits);
        if admitted {
            for (window, &(slot, _)) in windows.iter().zip(notes.iter()) {
                counters[slot].rule.record(window, cost, now_ms);
            }
        }

        let states = windows
            .iter()
            .zip(notes.iter())
            .map(|(window, &(slot, admits))| {
                counters[slot].rule.state(window, cost, now_ms, admits)
            })
            .collect();
        self.forget_idle(limits, now_ms);
        Outcome { admitted, states }
    }

    /// The index of `window`'s counter, added fresh if the client has none. A sliding counter
    /// whose quantity moved across the exact range is converted in place.
    fn find_or_add(&mut self, limit: LimitId, window: &Window, now_ms: u64) -> usize {
        let found = self
            .as_slice()
            .iter()
            .position(|counter| counter.limit == limit && counter.variant == window.variant);
        let Some(slot) = found else {
            self.push(Counter {
                variant: window.variant,
                limit,
                rule: Rule::fresh(window),
            });
            return self.as_slice().len() - 1;
        };

        let rule = &mut self.as_mut_slice()[slot].rule;
        let exact = sliding::is_exact(window.quantity);
        match rule {
            Rule::Log(log) if !exact => {
                log.advance(window, now_ms);
                let estimate = WeightedEstimate::from_log(log, window, now_ms);
                *rule = Rule::Estimate(Box::new(estimate));
            }
            Rule::Estimate(estimate) if exact => {
                estimate.advance(window, now_ms);
                *rule = Rule::Log(SlidingLog::from_estimate(estimate, window, now_ms));
            }
            _ => {}
        }
        slot
    }

    fn as_slice(&self) -> &[Counter] {
        match self {
            Self::One(counter) => std::slice::from_ref(counter),
            Self::Many(counters) => counters,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Counter] {
        match self {
            Self::One(counter) => std::slice::from_mut(counter),
            Self::Many(counters) => counters,
        }
    }

    fn push(&mut self, counter: Counter) {
        match self {
            Self::Many(counters) if counters.is_empty() => *self = Self::One(counter),
            Self::Many(counters) => {
                // Exactly one more slot: the vector's default growth would reserve more.
                counters.reserve_exact(1);
                counters.push(counter);
            }
            Self::One(_) => {
                let Self::One(first) = std::mem::take(self) else {
                    return;
                };
                *self = Self::Many(vec![first, counter]);
            }
        }
    }
}

impl Counter {
    fn idle_at(&self, limits: &Limits) -> u64 {
        let window_ms = limits.window_ms(self.limit);
        match &self.rule {
            Rule::Log(log) => log.idle_at(window_ms),
            Rule::Estimate(estimate) => estimate.idle_at(window_ms),
            Rule::Fixed(fixed) => fixed.idle_at(window_ms),
            Rule::Bucket(bucket) => bucket.idle_at(),
        }
    }
}

// ---- Rule -----------------------------------------------------------------------------------

impl Rule {
    fn fresh(window: &Window) -> Self {
        match window.algorithm {
            Algorithm::SlidingWindow if sliding::is_exact(window.quantity) => {
                Self::Log(SlidingLog::default())
            }
            Algorithm::SlidingWindow => Self::Estimate(Box::default()),
            Algorithm::FixedWindow => Self::Fixed(FixedCount::default()),
            Algorithm::TokenBucket { .. } => Self::Bucket(TokenBucket::default()),
        }
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        match self {
            Self::Log(log) => log.heap_bytes(),
            Self::Estimate(_) => std::mem::size_of::<WeightedEstimate>(),
            Self::Fixed(_) | Self::Bucket(_) => 0,
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
