//! The token-bucket rule, as the generic cell rate algorithm (GCRA).

use super::{Window, WindowState};

/// Nanoseconds per millisecond: the bucket keeps time in ns, the rest of the store in ms.
const NS_PER_MS: u128 = 1_000_000;

/// A token bucket kept as one timestamp, following GCRA's virtual scheduling
/// (<https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm>).
///
/// One unit is earned every emission interval `T = window_ms / quantity`, and a rested bucket
/// holds `burst` units, which GCRA expresses as a tolerance `tau = T × (burst - 1)`. The only
/// state is the theoretical arrival time `TAT`: when the bucket would be back to rested if
/// nothing else arrived, less one unit. A request of `cost` units at `now` is admitted when its
/// last unit conforms:
///
/// ```text
/// max(TAT, now) + (cost - 1) × T - now <= tau
/// ```
///
/// and then `TAT` becomes `max(TAT, now) + cost × T`. With `backlog = max(TAT, now) - now`:
/// - `remaining` is the largest `n` with `backlog + (n - 1) × T <= tau`, that is
///   `floor((tau - backlog) / T) + 1`, or 0 when `backlog > tau`;
/// - it next goes up when `backlog` has fallen to `tau - remaining × T`, so `reset_ms` is
///   `backlog + remaining × T - tau`;
/// - a refused request is admitted once `backlog` has fallen to `tau - (cost - 1) × T`, after
///   `backlog + (cost - 1) × T - tau`.
///
/// Example: 10 per second with a burst of 3 (`T` = 100 ms, `tau` = 200 ms). Three requests at
/// 0 ms pass and leave `TAT` at 300 ms; a fourth at 0 ms has a backlog of 300 ms > 200 ms and
/// waits 100 ms. A request of a cost above `burst` never conforms; it is told to wait until
/// the bucket has rested.
///
/// `T` is seldom a whole number of milliseconds (3 per 10 s gives 3333.3 ms), so `TAT` is kept
/// in nanoseconds and `T` rounded up to the next nanosecond: the bucket runs slower than the
/// configured rate by under 1 ns per unit, never faster. Waits are rounded up to whole ms.
#[derive(Clone, Debug, Default)]
pub(super) struct TokenBucket {
    /// Theoretical arrival time, Unix ns (a `u64` reaches the year 2554).
    tat_ns: u64,
}

/// `T` and `tau` of one window, in ns.
struct Rate {
    interval_ns: u128,
    tolerance_ns: u128,
}

impl Rate {
    fn of(window: &Window, burst: u64) -> Self {
        let length_ns = u128::from(window.length_ms()) * NS_PER_MS;
        let interval_ns = length_ns.div_ceil(u128::from(window.quantity.max(1)));
        Self {
            interval_ns,
            tolerance_ns: interval_ns * u128::from(burst.max(1) - 1),
        }
    }
}

impl TokenBucket {
    pub(super) fn admits(&self, window: &Window, burst: u64, cost: u64, now_ms: u64) -> bool {
        let rate = Rate::of(window, burst);
        self.backlog_ns(now_ms) + units(cost.saturating_sub(1)) * rate.interval_ns
            <= rate.tolerance_ns
    }

    pub(super) fn record(&mut self, window: &Window, burst: u64, cost: u64, now_ms: u64) {
        let rate = Rate::of(window, burst);
        let start_ns = u128::from(self.tat_ns).max(ns(now_ms));
        let tat_ns = start_ns + units(cost) * rate.interval_ns;
        self.tat_ns = u64::try_from(tat_ns).unwrap_or(u64::MAX);
    }

    pub(super) fn state(
        &self,
        window: &Window,
        burst: u64,
        cost: u64,
        now_ms: u64,
        admits: bool,
    ) -> WindowState {
        let rate = Rate::of(window, burst);
        let backlog_ns = self.backlog_ns(now_ms);
        let remaining = match rate.tolerance_ns.checked_sub(backlog_ns) {
            Some(spare_ns) => spare_ns / rate.interval_ns + 1,
            None => 0,
        };

        // The backlog must fall to `tau - ahead × T`, with `ahead` = `remaining` units for one
        // unit more of room, or `cost - 1` for a refused request to fit. A rested bucket has
        // no more room to gain, and a cost above `burst` never fits: that one is told to wait
        // until the bucket has rested, and both report the window length if it already has.
        let wait_ns = if admits {
            (backlog_ns + remaining * rate.interval_ns)
                .checked_sub(rate.tolerance_ns)
                .filter(|_| backlog_ns > 0)
        } else if cost <= burst.max(1) {
            let ahead_ns = units(cost.saturating_sub(1)) * rate.interval_ns;
            (backlog_ns + ahead_ns).checked_sub(rate.tolerance_ns)
        } else {
            Some(backlog_ns)
        };
        let reset_ms = match wait_ns {
            Some(wait_ns) if wait_ns > 0 => {
                u64::try_from(wait_ns.div_ceil(NS_PER_MS)).unwrap_or(u64::MAX)
            }
            _ => window.length_ms(),
        };
        WindowState {
            admits,
            remaining: u64::try_from(remaining).unwrap_or(u64::MAX),
            reset_ms,
        }
    }

    /// When the bucket has rested, Unix ms (rounded up).
    pub(super) fn idle_at(&self) -> u64 {
        self.tat_ns.div_ceil(NS_PER_MS as u64)
    }

    /// `max(TAT, now) - now`, in ns.
    fn backlog_ns(&self, now_ms: u64) -> u128 {
        u128::from(self.tat_ns).saturating_sub(ns(now_ms))
    }
}

fn ns(ms: u64) -> u128 {
    u128::from(ms) * NS_PER_MS
}

fn units(count: u64) -> u128 {
    u128::from(count)
}
