//! Counter storage: where each client's counts live, and the all-or-nothing decision.
//!
//! A request names a client, the windows it falls under and its cost; a [`CounterStore`] checks
//! every window and records the request in all of them or in none, atomically. How a window
//! counts is its [`Algorithm`]. The memory store takes time as Unix milliseconds from its caller,
//! so tests drive it with a fake clock; the Redis store reads Redis's clock instead, so that
//! every gateway sharing it agrees. Rendering headers and failure policies are the limiter's.
//!
//! Layout: `memory` is the sharded, bounded [`MemoryStore`]; `counters` holds one client's
//! counters and the all-or-nothing rule; `sliding`, `fixed` and `gcra` are the counting rules;
//! `redis` is the shared [`RedisStore`], which runs the same rules in one script per decision.

mod counters;
mod fixed;
mod gcra;
mod memory;
mod redis;
mod sliding;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod redis_tests;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::identity::ClientKey;

pub use memory::MemoryStore;
pub use redis::{RedisSettings, RedisStore, RedisTarget};

/// Where a request's counts are decided.
///
/// Two implementations: [`MemoryStore`] for one gateway, [`RedisStore`] for many sharing a
/// Redis or Redis Cluster. The limiter calls [`CounterStore::decide`] once per request (and
/// once more when shadow limits also match).
#[async_trait]
pub trait CounterStore: Send + Sync {
    /// Decides one request of `client` costing `cost` units (0 counts as 1) in every one of
    /// `windows`: admitted only if every window admits it, and then recorded in all of them; a
    /// refused request records nothing. `now_ms` is the caller's clock (Unix ms); a store with a
    /// clock of its own ignores it. An error means nothing is known about the counts, and the
    /// limiter applies each limit's failure policy.
    async fn decide(
        &self,
        client: ClientKey,
        windows: &[Window],
        cost: u64,
        now_ms: u64,
    ) -> Result<Verdict, StoreError>;

    /// Whether the store can take decisions now; `/readyz` answers 503 when it cannot.
    fn is_ready(&self) -> bool;
}

/// The stores a gateway decides with: the configured one, and process memory for the limits
/// whose failure policy is `local`. With the memory backend both are the same store.
#[derive(Clone)]
pub struct Stores {
    pub shared: Arc<dyn CounterStore>,
    pub local: Arc<MemoryStore>,
}

impl Stores {
    /// Both roles played by one memory store.
    pub fn memory(store: Arc<MemoryStore>) -> Self {
        Self {
            shared: store.clone(),
            local: store,
        }
    }
}

/// Why a store could not decide. The limiter never shows these to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The circuit breaker is open (or the first connection is not up yet): the store was not
    /// called at all.
    #[error("store circuit is open")]
    CircuitOpen,
    /// No answer within the configured timeout.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis call failed")]
    Redis(#[from] ::redis::RedisError),
    /// The decision script answered something other than its documented reply.
    #[error("decision script reply has an unexpected shape")]
    Reply,
}

impl StoreError {
    /// A short, bounded name for metrics: `circuit_open`, `timeout`, `connection`, `server` or
    /// `reply`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CircuitOpen => "circuit_open",
            Self::Timeout(_) => "timeout",
            Self::Redis(error)
                if error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout() =>
            {
                "connection"
            }
            Self::Redis(_) => "server",
            Self::Reply => "reply",
        }
    }
}

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
    /// One state per window passed to [`CounterStore::decide`], in the same order.
    pub states: Vec<WindowState>,
}

impl Window {
    /// The window length, never zero, so no rule divides by zero on a request path.
    fn length_ms(&self) -> u64 {
        self.window_ms.max(1)
    }
}
