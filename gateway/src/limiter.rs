//! Quota policy: which limits a request falls under, and what the gateway tells the client.
//!
//! A [`Limiter`] is built from one configuration generation. For each request it picks the
//! limits whose method, path and audience match, asks the store for an all-or-nothing verdict,
//! and renders it as a [`Decision`]: the rate-limit headers of every response on a limited
//! route, and for a refusal the wait before a retry can succeed. A refusal is a value, not an
//! error.

use std::sync::Arc;

use crate::config::{Audience, LimitConfig, PathMatch};
use crate::identity::Caller;
use crate::store::{MemoryStore, Verdict, Window};

/// The limits of one configuration generation, ready to decide requests.
pub struct Limiter {
    limits: Vec<(LimitConfig, Window)>,
    store: Arc<MemoryStore>,
}

/// How one limit stands after a decision, in whole seconds as the headers carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub name: Arc<str>,
    pub quantity: u64,
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until `remaining` next goes up, rounded up, at least 1.
    pub reset_secs: u64,
    /// Whether this limit refused the request.
    pub refused: bool,
}

/// The outcome for one request on a limited route.
#[derive(Clone, Debug)]
pub struct Decision {
    pub admitted: bool,
    /// One entry per matching limit, in configuration order.
    pub limits: Vec<LimitStatus>,
}

impl Limiter {
    pub fn new(limits: &[LimitConfig], store: Arc<MemoryStore>) -> Self {
        let limits = limits
            .iter()
            .map(|limit| {
                let window = Window {
                    name: limit.name.as_str().into(),
                    quantity: limit.quantity,
                    window_ms: limit.window_secs * 1000,
                };
                (limit.clone(), window)
            })
            .collect();
        Self { limits, store }
    }

    /// Decides a request, or returns `None` when no limit covers it (no headers are added then).
    pub fn decide(
        &self,
        method: &str,
        path: &str,
        caller: &Caller,
        now_ms: u64,
    ) -> Option<Decision> {
        let is_user = matches!(caller, Caller::User { .. });
        let matching: Vec<&(LimitConfig, Window)> = self
            .limits
            .iter()
            .filter(|(limit, _)| applies(limit, method, path, is_user))
            .collect();
        if matching.is_empty() {
            return None;
        }

        let windows: Vec<Window> = matching.iter().map(|(_, window)| window.clone()).collect();
        let Verdict { admitted, states } = self.store.decide(caller.key(), &windows, now_ms);
        let limits = matching
            .iter()
            .zip(states)
            .map(|((limit, window), state)| LimitStatus {
                name: window.name.clone(),
                quantity: limit.quantity,
                window_secs: limit.window_secs,
                remaining: state.remaining,
                reset_secs: state.reset_ms.div_ceil(1000).max(1),
                refused: !state.admits,
            })
            .collect();
        Some(Decision { admitted, limits })
    }

    /// Drops idle counters; see [`MemoryStore::sweep`].
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.store.sweep(now_ms)
    }
}

fn applies(limit: &LimitConfig, method: &str, path: &str, is_user: bool) -> bool {
    let audience = match limit.applies_to {
        Audience::Anonymous => !is_user,
        Audience::Authenticated => is_user,
        Audience::Everyone => true,
    };
    let method = limit.matcher.methods.is_empty()
        || limit
            .matcher
            .methods
            .iter()
            .any(|allowed| allowed == method);
    let path = match &limit.matcher.path {
        PathMatch::Exact(exact) => path == exact,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
    };
    audience && method && path
}

impl Decision {
    /// The limit that `X-RateLimit-*` describe: on a refusal, the refusing limit with the
    /// longest wait; otherwise the one with the fewest requests left (the longer reset on a tie).
    pub fn most_restrictive(&self) -> &LimitStatus {
        let by_wait = |status: &&LimitStatus| (status.refused, status.reset_secs);
        let by_room =
            |status: &&LimitStatus| (std::cmp::Reverse(status.remaining), status.reset_secs);
        let chosen = if self.admitted {
            self.limits.iter().max_by_key(by_room)
        } else {
            self.limits
                .iter()
                .filter(|status| status.refused)
                .max_by_key(by_wait)
        };
        chosen.unwrap_or(&self.limits[0])
    }

    /// Seconds before a retry can succeed: every refusing limit must have room again.
    pub fn retry_after_secs(&self) -> u64 {
        self.limits
            .iter()
            .filter(|status| status.refused)
            .map(|status| status.reset_secs)
            .max()
            .unwrap_or(1)
    }

    /// `(name, value)` pairs of the rate-limit headers, each name once.
    ///
    /// `RateLimit-Policy` and `RateLimit` follow draft-ietf-httpapi-ratelimit-headers: one list
    /// member per limit, `"name";q=<quantity>;w=<window>` and `"name";r=<remaining>;t=<reset>`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let main = self.most_restrictive();
        let policy = self
            .limits
            .iter()
            .map(|s| format!("\"{}\";q={};w={}", s.name, s.quantity, s.window_secs))
            .collect::<Vec<_>>()
            .join(", ");
        let current = self
            .limits
            .iter()
            .map(|s| format!("\"{}\";r={};t={}", s.name, s.remaining, s.reset_secs))
            .collect::<Vec<_>>()
            .join(", ");
        let mut headers = vec![
            ("x-ratelimit-limit", main.quantity.to_string()),
            ("x-ratelimit-remaining", main.remaining.to_string()),
            ("x-ratelimit-reset", main.reset_secs.to_string()),
            ("ratelimit-policy", policy),
            ("ratelimit", current),
        ];
        if !self.admitted {
            headers.push(("retry-after", self.retry_after_secs().to_string()));
        }
        headers
    }
}
