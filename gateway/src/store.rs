//! Counter storage: the in-memory store that decides a request against all of its limits.
//!
//! Each client's counters sit together in one entry of a sharded map, so a request's limits
//! are checked and updated under a single shard lock: either every limit records the request
//! or none does. Different clients mostly hit different shards, so no lock serialises all
//! traffic. Time is passed in by the caller (milliseconds since the Unix epoch), which keeps
//! the arithmetic testable with a fake clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::identity::ClientKey;

/// Number of independently locked shards.
const SHARDS: usize = 64;

/// The largest quantity a sliding window may have: the exact log keeps one timestamp per
/// admitted request, so its memory grows with the quantity.
pub const SLIDING_LOG_MAX_QUANTITY: u64 = 1024;

/// One limit as the store sees it. Counters are kept per `(name, window)`, so a new
/// configuration that keeps both keeps the counts.
#[derive(Clone, Debug)]
pub struct Window {
    pub name: Arc<str>,
    /// Requests admitted per window; at least 1.
    pub quantity: u64,
    /// Window length in milliseconds; at least 1.
    pub window_ms: u64,
}

/// The state of one limit after a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowState {
    /// Whether this limit alone would have admitted the request.
    pub admits: bool,
    /// Requests still allowed now, never negative.
    pub remaining: u64,
    /// Milliseconds until `remaining` next goes up; for a limit that refused, the wait until a
    /// retry can succeed.
    pub reset_ms: u64,
}

/// A request's fate: admitted only if every limit admits it, and then counted by all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// One state per window passed to [`MemoryStore::decide`], in the same order.
    pub states: Vec<WindowState>,
}

/// Admission times of one client under one limit, oldest first, in milliseconds.
#[derive(Debug)]
struct SlidingLog {
    name: Arc<str>,
    window_ms: u64,
    admitted_at: VecDeque<u64>,
}

impl SlidingLog {
    fn prune(&mut self, now_ms: u64) {
        while let Some(&oldest) = self.admitted_at.front() {
            if oldest + self.window_ms > now_ms {
                break;
            }
            self.admitted_at.pop_front();
        }
    }

    /// A request at `now_ms` is admitted when fewer than `quantity` admitted requests fall in
    /// the window `(now_ms - window_ms, now_ms]`; the oldest one leaves at `oldest + window_ms`.
    fn state(&self, window: &Window, now_ms: u64, admitted_now: bool) -> WindowState {
        let counted = self.admitted_at.len() as u64;
        let admits = counted < window.quantity || admitted_now;
        let reset_ms = match self.admitted_at.front() {
            Some(&oldest) => oldest + window.window_ms - now_ms,
            None => window.window_ms,
        };
        WindowState {
            admits,
            remaining: window.quantity.saturating_sub(counted),
            reset_ms,
        }
    }
}

#[derive(Debug, Default)]
struct ClientCounters {
    logs: Vec<SlidingLog>,
}

impl ClientCounters {
    fn log_mut(&mut self, window: &Window) -> &mut SlidingLog {
        let found = self
            .logs
            .iter()
            .position(|log| log.name == window.name && log.window_ms == window.window_ms);
        let index = found.unwrap_or_else(|| {
            self.logs.push(SlidingLog {
                name: window.name.clone(),
                window_ms: window.window_ms,
                admitted_at: VecDeque::new(),
            });
            self.logs.len() - 1
        });
        &mut self.logs[index]
    }

    fn is_idle(&mut self, now_ms: u64) -> bool {
        for log in &mut self.logs {
            log.prune(now_ms);
        }
        self.logs.iter().all(|log| log.admitted_at.is_empty())
    }
}

/// Counters in process memory, for a single gateway instance.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<ClientKey, ClientCounters>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl MemoryStore {
    /// Decides one request of `client` against `windows` at `now_ms`, all or nothing.
    pub fn decide(&self, client: ClientKey, windows: &[Window], now_ms: u64) -> Verdict {
        let mut shard = self
            .shard(client)
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let counters = shard.entry(client).or_default();

        let mut admitted = true;
        for window in windows {
            let log = counters.log_mut(window);
            log.prune(now_ms);
            admitted &= (log.admitted_at.len() as u64) < window.quantity;
        }

        let states = windows
            .iter()
            .map(|window| {
                let log = counters.log_mut(window);
                if admitted {
                    log.admitted_at.push_back(now_ms);
                }
                log.state(window, now_ms, admitted)
            })
            .collect();
        if counters.is_idle(now_ms) {
            shard.remove(&client);
        }
        Verdict { admitted, states }
    }

    /// Drops every client whose windows have all emptied; returns how many are still tracked.
    /// The gateway calls this periodically so that memory follows active clients only.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut tracked = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poison| poison.into_inner());
            shard.retain(|_, counters| !counters.is_idle(now_ms));
            tracked += shard.len();
        }
        tracked
    }

    fn shard(&self, client: ClientKey) -> &Mutex<HashMap<ClientKey, ClientCounters>> {
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&client, &mut hasher);
        let index = std::hash::Hasher::finish(&hasher) as usize % SHARDS;
        &self.shards[index]
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::identity::{Identifier, IdentityKey};

    fn client(n: u8) -> ClientKey {
        let identifier = Identifier::new(IdentityKey::new(b"test".to_vec()), None);
        identifier
            .identify(IpAddr::from([192, 0, 2, n]), None)
            .key()
    }

    fn window(name: &str, quantity: u64, window_secs: u64) -> Window {
        Window {
            name: name.into(),
            quantity,
            window_ms: window_secs * 1000,
        }
    }

    #[test]
    fn burst_is_admitted_up_to_the_quantity() {
        let store = MemoryStore::default();
        let day = [window("day", 3, 86_400)];
        let remaining: Vec<_> = (0..5)
            .map(|i| {
                let verdict = store.decide(client(1), &day, 1_000 + i);
                (verdict.admitted, verdict.states[0].remaining)
            })
            .collect();
        assert_eq!(
            remaining,
            [(true, 2), (true, 1), (true, 0), (false, 0), (false, 0)]
        );
    }

    #[test]
    fn spaced_requests_follow_the_oldest_admission() {
        // 3 per 10 s at t = 0, 4, 6, 7 and 10.5 s.
        let store = MemoryStore::default();
        let limit = [window("w", 3, 10)];
        let at = |secs: f64| {
            let verdict = store.decide(client(2), &limit, (secs * 1000.0) as u64);
            (
                verdict.admitted,
                verdict.states[0].remaining,
                verdict.states[0].reset_ms,
            )
        };
        assert_eq!(at(0.0), (true, 2, 10_000));
        assert_eq!(at(4.0), (true, 1, 6_000));
        assert_eq!(at(6.0), (true, 0, 4_000));
        assert_eq!(at(7.0), (false, 0, 3_000));
        assert_eq!(at(10.5), (true, 0, 3_500));
    }

    #[test]
    fn a_refused_request_consumes_no_limit() {
        // "short" 1 per 2 s and "long" 3 per 10 s.
        let store = MemoryStore::default();
        let limits = [window("short", 1, 2), window("long", 3, 10)];
        let first = store.decide(client(3), &limits, 0);
        assert!(first.admitted);
        for _ in 0..9 {
            let refused = store.decide(client(3), &limits, 10);
            assert!(!refused.admitted);
            assert!(!refused.states[0].admits);
            assert_eq!(refused.states[1].remaining, 2);
        }
        let later = store.decide(client(3), &limits, 2_500);
        assert!(later.admitted);
        assert_eq!(later.states[1].remaining, 1);
    }

    #[test]
    fn clients_do_not_share_counters() {
        let store = MemoryStore::default();
        let limit = [window("w", 1, 60)];
        assert!(store.decide(client(4), &limit, 0).admitted);
        assert!(store.decide(client(5), &limit, 0).admitted);
        assert!(!store.decide(client(4), &limit, 1).admitted);
    }

    #[test]
    fn sweeping_forgets_clients_whose_windows_emptied() {
        let store = MemoryStore::default();
        let limit = [window("w", 3, 2)];
        for n in 0..100 {
            store.decide(client(n), &limit, 0);
        }
        assert_eq!(store.sweep(1_999), 100);
        assert_eq!(store.sweep(2_000), 0);
    }

    #[test]
    fn waiting_the_advertised_reset_is_enough() {
        let store = MemoryStore::default();
        let limit = [window("w", 3, 2)];
        for t in [0, 10, 20] {
            assert!(store.decide(client(6), &limit, t).admitted);
        }
        let refused = store.decide(client(6), &limit, 1_950);
        assert!(!refused.admitted);
        let wait = refused.states[0].reset_ms;
        assert!(wait > 0);
        assert!(store.decide(client(6), &limit, 1_950 + wait).admitted);
    }
}
