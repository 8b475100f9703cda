//! Counter storage: where each client's counts live, and the all-or-nothing decision.
//!
//! A request names a client, the windows it falls under and its cost; the store checks every
//! window and records the request in all of them or in none, under one lock. How a window
//! counts is its [`Algorithm`]. Time is always passed in as Unix milliseconds, so tests drive it
//! with a fake clock; nothing here reads the system clock. Rendering headers is the limiter's.
//!
//! Layout: `memory` is the sharded, bounded [`MemoryStore`]; `counters` holds one client's
//! counters and the all-or-nothing rule; `sliding`, `fixed` and `gcra` are the counting rules.

mod counters;
mod fixed;
mod gcra;
mod memory;
mod sliding;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use memory::MemoryStore;

/// The largest quantity for which a sliding window keeps an exact log; above it the window
/// switches to the weighted two-window estimate.
///
/// The log costs 8 bytes per unit still inside the window, so a client at this quantity holds
/// 8 KiB per limit. Only a client that really sent that many requests pays it, and the estimate
/// above it is constant-size but may admit up to twice the quantity (see `WeightedEstimate`).
pub const SLIDING_LOG_MAX_QUANTITY: u64 = 1024;

/// How a window counts. Each rule is explained, with its inequality, on the counter type that
/// implements it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// At most `quantity` units in any span of `window_ms` ending now: an exact log up to
    /// [`SLIDING_LOG_MAX_QUANTITY`], the weighted two-window estimate above it.
    SlidingWindow,
    /// At most `quantity` units per window aligned to the Unix epoch (a day window starts at
    /// 00:00 UTC). Up to twice the quantity can pass across a boundary.
    FixedWindow,
    /// GCRA: one unit every `window_ms / quantity` ms on average, with up to `burst` (at least
    /// 1) units at once from a rested bucket.
    TokenBucket { burst: u64 },
}

/// One limit as the store sees it.
///
/// A counter belongs to `(name, window_ms, kind of algorithm, variant)`. A configuration reload
/// that keeps those keeps the count, even if `quantity` or `burst` changed.
#[derive(Clone, Debug)]
pub struct Window {
    /// The limit's configured name.
    pub name: Arc<str>,
    /// Units admitted per window; at least 1 (configuration validation guarantees it).
    pub quantity: u64,
    /// Window length in milliseconds; at least 1.
    pub window_ms: u64,
    /// The counting rule.
    pub algorithm: Algorithm,
    /// A budget inside the client: 0 is the client as a whole; the limiter uses other values
    /// for, say, one fingerprint's share of an address.
    pub variant: u64,
}

/// How one window stands after a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Whether this window alone would have admitted the request.
    pub admits: bool,
    /// Unit requests this window would still admit back to back at this instant, after the
    /// request was recorded (if it was); never negative.
    pub remaining: u64,
    /// Milliseconds until `remaining` next goes up, at least 1. For a window that refused, the
    /// wait after which the same request would be admitted, if nothing else is recorded
    /// meanwhile. A window that holds nothing reports its full length.
    pub reset_ms: u64,
}

/// A request's fate: admitted only if every window admits it, and then counted by all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// The store was full, so this admitted request of a new client was decided as if its
    /// counters were fresh and not recorded (see [`MemoryStore`]).
    pub untracked: bool,
    /// One state per window passed to [`MemoryStore::decide`], in the same order.
    pub states: Vec<WindowState>,
}

impl Window {
    /// The window length, never zero, so no rule divides by zero on a request path.
    fn length_ms(&self) -> u64 {
        self.window_ms.max(1)
    }
}
