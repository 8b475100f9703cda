//! Quota policy: which limits a request falls under, and what the gateway tells the client.
//!
//! A [`Limiter`] is built from one configuration generation. For each request it picks the
//! limits whose method, path and audience match, turns them into store windows (a limit split by
//! fingerprint becomes two: one per fingerprint and a ceiling for the whole address), asks the
//! store for an all-or-nothing verdict, and renders it as a [`Decision`]: the rate-limit headers
//! of every response on a limited route and, for a refusal, the wait before a retry can
//! succeed. A refusal is a value, not an error. Shadow limits are decided apart, so they can
//! never refuse a request or consume an enforced limit. When the store cannot decide, each
//! limit's [`FailurePolicy`] says what happens instead, and the decision records it.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, RETRY_AFTER};
use http::HeaderValue;

use crate::config::{Audience, FailurePolicy, LimitConfig, LimitMode, PathMatch};
use crate::identity::Caller;
use crate::store::{StoreError, Stores, Verdict, Window};

/// The rate-limit response fields, as ready names: the IETF draft's two and the widespread
/// `X-RateLimit-*` three. The gateway owns them on limited routes.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Suffix of the per-fingerprint member of a limit split by fingerprint.
const FINGERPRINT_SUFFIX: &str = "-per-fingerprint";

/// The limits of one configuration generation, ready to decide requests.
pub struct Limiter {
    limits: Vec<CompiledLimit>,
    stores: Stores,
    fingerprints_on: bool,
}

struct CompiledLimit {
    config: LimitConfig,
    /// The window of the client (or address) as a whole.
    whole: Window,
    /// With fingerprints on, the window of one fingerprint of an address.
    per_fingerprint: Option<Window>,
}

/// How one limit stands after a decision, in whole seconds as the headers carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub name: Arc<str>,
    pub quantity: u64,
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until `remaining` next goes up, rounded up, at least 1. For a limit that
    /// refused, the wait until a retry can succeed.
    pub reset_secs: u64,
    /// Whether this limit refused the request.
    pub refused: bool,
}

/// The outcome for one request.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    pub admitted: bool,
    /// One entry per enforced window that matched, in configuration order. Empty when no
    /// enforced limit covers the request; no headers are sent then.
    pub limits: Vec<LimitStatus>,
    /// Shadow limits that matched, with whether each would have refused.
    pub shadow: Vec<(Arc<str>, bool)>,
    /// The memory store was full and did not record this request (see
    /// [`crate::store::MemoryStore`]).
    pub untracked: bool,
    /// The store could not decide, and this policy did instead (the strictest among the
    /// matching enforced limits). With `deny` the request is not admitted and `limits` is empty;
    /// with `allow`, `limits` is empty too, so no rate-limit headers are sent; with `local`,
    /// `limits` holds the local numbers of the `local` limits only.
    pub store_failure: Option<StoreFailure>,
}

/// What the store failed with and which policy decided the request instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreFailure {
    pub policy: FailurePolicy,
    /// The error's bounded kind (see [`StoreError::kind`]).
    pub kind: &'static str,
}

impl Limiter {
    /// `fingerprints_on` says whether a fingerprint header is configured.
    pub fn new(limits: &[LimitConfig], stores: Stores, fingerprints_on: bool) -> Self {
        let limits = limits
            .iter()
            .map(|limit| {
                let window = |name: String, quantity| Window {
                    name: name.into(),
                    quantity,
                    window_ms: limit.window_secs * 1000,
                    algorithm: limit.algorithm,
                    variant: 0,
                };
                let per_fingerprint =
                    limit
                        .fingerprint_quantity
                        .filter(|_| fingerprints_on)
                        .map(|quantity| {
                            window(format!("{}{FINGERPRINT_SUFFIX}", limit.name), quantity)
                        });
                CompiledLimit {
                    config: limit.clone(),
                    whole: window(limit.name.clone(), limit.quantity),
                    per_fingerprint,
                }
            })
            .collect();
        Self {
            limits,
            stores,
            fingerprints_on,
        }
    }

    /// Whether any limit, enforced or shadow, could apply to this method and path for some
    /// caller. When none can, the caller need not be identified at all.
    pub fn covers(&self, method: &str, path: &str) -> bool {
        self.limits
            .iter()
            .any(|limit| matches_request(&limit.config, method, path))
    }

    /// Decides a request of `cost` units. Returns `None` when no limit, enforced or shadow,
    /// covers it; the store is not called then.
    pub async fn decide(
        &self,
        method: &str,
        path: &str,
        cost: u64,
        caller: &Caller,
        now_ms: u64,
    ) -> Option<Decision> {
        let mut enforced = Vec::new();
        let mut shadow = Vec::new();
        for limit in self
            .limits
            .iter()
            .filter(|limit| applies(&limit.config, method, path, caller))
        {
            let windows = match limit.config.mode {
                LimitMode::Enforce => &mut enforced,
                LimitMode::Shadow => &mut shadow,
            };
            let fingerprint = match caller {
                Caller::Anonymous { fingerprint, .. } => *fingerprint,
                Caller::User { .. } => None,
            };
            match (&limit.per_fingerprint, caller) {
                (Some(per), Caller::Anonymous { .. }) if self.fingerprints_on => {
                    let mut per = per.clone();
                    per.variant = fingerprint.unwrap_or(0);
                    windows.push((&limit.config, per));
                }
                _ => {}
            }
            windows.push((&limit.config, limit.whole.clone()));
        }
        if enforced.is_empty() && shadow.is_empty() {
            return None;
        }

        let mut decision = Decision {
            admitted: true,
            ..Decision::default()
        };
        // Limitation: shadow and enforced limits are two store calls, so a request matching
        // both costs two Redis round trips; merging them would need a script with two groups.
        let store = &self.stores.shared;
        if !shadow.is_empty() {
            let windows: Vec<Window> = shadow.iter().map(|(_, window)| window.clone()).collect();
            // A shadow limit only measures: when the store fails there is nothing to measure.
            if let Ok(verdict) = store.decide(caller.key(), &windows, cost, now_ms).await {
                decision.shadow = windows
                    .into_iter()
                    .zip(verdict.states)
                    .map(|(window, state)| (window.name, !state.admits))
                    .collect();
            }
        }
        if enforced.is_empty() {
            return Some(decision);
        }

        let windows: Vec<Window> = enforced.iter().map(|(_, window)| window.clone()).collect();
        match store.decide(caller.key(), &windows, cost, now_ms).await {
            Ok(verdict) => decision.apply(&enforced, verdict),
            Err(error) => self.degrade(&mut decision, &enforced, &error, caller, cost, now_ms),
        }
        Some(decision)
    }

    /// Decides a request the store could not decide, by the strictest failure policy among the
    /// matching enforced limits.
    fn degrade(
        &self,
        decision: &mut Decision,
        enforced: &[(&LimitConfig, Window)],
        error: &StoreError,
        caller: &Caller,
        cost: u64,
        now_ms: u64,
    ) {
        let policy = enforced
            .iter()
            .map(|(limit, _)| limit.on_store_failure)
            .max()
            .unwrap_or_default();
        decision.store_failure = Some(StoreFailure {
            policy,
            kind: error.kind(),
        });
        match policy {
            FailurePolicy::Allow => decision.admitted = true,
            FailurePolicy::Deny => decision.admitted = false,
            FailurePolicy::Local => {
                let local: Vec<(&LimitConfig, Window)> = enforced
                    .iter()
                    .filter(|(limit, _)| limit.on_store_failure == FailurePolicy::Local)
                    .map(|(limit, window)| (*limit, window.clone()))
                    .collect();
                let windows: Vec<Window> = local.iter().map(|(_, window)| window.clone()).collect();
                let verdict = self
                    .stores
                    .local
                    .decide(caller.key(), &windows, cost, now_ms);
                decision.apply(&local, verdict);
            }
        }
    }
}

fn applies(limit: &LimitConfig, method: &str, path: &str, caller: &Caller) -> bool {
    let is_user = matches!(caller, Caller::User { .. });
    let audience = match limit.applies_to {
        Audience::Anonymous => !is_user,
        Audience::Authenticated => is_user,
        Audience::Everyone => true,
    };
    audience && matches_request(limit, method, path)
}

/// Methods are case-sensitive, but many apps upper-case them, so `post` meets the limits
/// that `POST` meets.
fn matches_request(limit: &LimitConfig, method: &str, path: &str) -> bool {
    let method = limit.matcher.methods.is_empty()
        || limit
            .matcher
            .methods
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(method));
    let path = match &limit.matcher.path {
        PathMatch::Exact(exact) => path == exact,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
    };
    method && path
}

impl Decision {
    /// Takes the store's verdict on `enforced`, window by window.
    fn apply(&mut self, enforced: &[(&LimitConfig, Window)], verdict: Verdict) {
        let Verdict {
            admitted,
            states,
            untracked,
        } = verdict;
        self.admitted = admitted;
        self.untracked = untracked;
        self.limits = enforced
            .iter()
            .zip(states)
            .map(|((limit, window), state)| LimitStatus {
                name: window.name.clone(),
                quantity: window.quantity,
                window_secs: limit.window_secs,
                remaining: state.remaining,
                reset_secs: state.reset_ms.div_ceil(1000).max(1),
                refused: !state.admits,
            })
            .collect();
    }

    /// The limit that `X-RateLimit-*` describe: on a refusal, the refusing limit with the
    /// longest wait; otherwise the one with the fewest requests left (the longer reset on a
    /// tie). `None` when no enforced limit matched.
    pub fn most_restrictive(&self) -> Option<&LimitStatus> {
        if self.admitted {
            let by_room = |s: &&LimitStatus| (std::cmp::Reverse(s.remaining), s.reset_secs);
            self.limits.iter().max_by_key(by_room)
        } else {
            let refusing = self.limits.iter().filter(|status| status.refused);
            refusing.max_by_key(|status| status.reset_secs)
        }
    }

    /// Seconds before a retry can succeed: every refusing limit must have room again.
    pub fn retry_after_secs(&self) -> u64 {
        let refusing = self.limits.iter().filter(|status| status.refused);
        refusing.map(|status| status.reset_secs).max().unwrap_or(1)
    }

    /// `(name, value)` pairs of the rate-limit headers, each name once; empty when no enforced
    /// limit matched.
    ///
    /// `RateLimit-Policy` and `RateLimit` follow draft-ietf-httpapi-ratelimit-headers: one list
    /// member per limit, `"name";q=<quantity>;w=<window>` and `"name";r=<remaining>;t=<reset>`.
    /// Every admitted request on a limited route pays for these, so all values are written
    /// into one buffer and handed out as slices of it: one allocation for the text, not one
    /// per field.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let Some(main) = self.most_restrictive() else {
            return Vec::new();
        };
        let mut text = String::with_capacity(32 + 96 * self.limits.len());
        let mut digits = itoa::Buffer::new();
        // Where each field's value ends in `text`, in the order of `names`.
        let mut ends = [0; 6];
        for (end, number) in ends
            .iter_mut()
            .zip([main.quantity, main.remaining, main.reset_secs])
        {
            text.push_str(digits.format(number));
            *end = text.len();
        }
        type Pair = fn(&LimitStatus) -> (u64, u64);
        let lists: [(&str, &str, Pair); 2] = [
            (";q=", ";w=", |s| (s.quantity, s.window_secs)),
            (";r=", ";t=", |s| (s.remaining, s.reset_secs)),
        ];
        for (end, (first, second, numbers)) in ends[3..5].iter_mut().zip(lists) {
            for (index, s) in self.limits.iter().enumerate() {
                let (a, b) = numbers(s);
                if index > 0 {
                    text.push_str(", ");
                }
                text.push('"');
                text.push_str(&s.name);
                text.push('"');
                for (key, number) in [(first, a), (second, b)] {
                    text.push_str(key);
                    text.push_str(digits.format(number));
                }
            }
            *end = text.len();
        }
        ends[5] = text.len();
        if !self.admitted {
            text.push_str(digits.format(self.retry_after_secs()));
            ends[5] = text.len();
        }

        let names = [
            X_RATELIMIT_LIMIT,
            X_RATELIMIT_REMAINING,
            X_RATELIMIT_RESET,
            RATELIMIT_POLICY,
            RATELIMIT,
            RETRY_AFTER,
        ];
        let fields = if self.admitted { 5 } else { 6 };
        let text = Bytes::from(text);
        let mut headers = Vec::with_capacity(fields);
        let mut start = 0;
        for (name, end) in names.into_iter().zip(ends).take(fields) {
            // Limit names are validated as header-safe tokens when the configuration loads.
            if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
                headers.push((name, value));
            }
            start = end;
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, quantity: u64, remaining: u64, reset_secs: u64) -> LimitStatus {
        LimitStatus {
            name: name.into(),
            quantity,
            window_secs: 86_400,
            remaining,
            reset_secs,
            refused: remaining == 0,
        }
    }

    fn rendered(decision: &Decision) -> Vec<(String, String)> {
        let text = |value: &HeaderValue| value.to_str().unwrap().to_owned();
        decision
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), text(value)))
            .collect()
    }

    fn fields(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn headers_describe_every_limit_and_the_tightest_in_x_ratelimit() {
        let decision = Decision {
            admitted: true,
            limits: vec![status("daily", 3, 2, 40_000), status("burst", 10, 1, 7)],
            ..Decision::default()
        };
        assert_eq!(
            rendered(&decision),
            fields(&[
                ("x-ratelimit-limit", "10"),
                ("x-ratelimit-remaining", "1"),
                ("x-ratelimit-reset", "7"),
                (
                    "ratelimit-policy",
                    "\"daily\";q=3;w=86400, \"burst\";q=10;w=86400"
                ),
                ("ratelimit", "\"daily\";r=2;t=40000, \"burst\";r=1;t=7"),
            ])
        );
    }

    #[test]
    fn a_refusal_adds_retry_after_from_the_longest_refusing_wait() {
        let decision = Decision {
            admitted: false,
            limits: vec![status("daily", 3, 0, 40_000), status("burst", 10, 0, 7)],
            ..Decision::default()
        };
        let headers = rendered(&decision);
        assert_eq!(headers[0], fields(&[("x-ratelimit-limit", "3")])[0]);
        assert_eq!(
            headers.last().unwrap(),
            &fields(&[("retry-after", "40000")])[0]
        );
        assert!(rendered(&Decision::default()).is_empty());
    }
}
