//! The fixed-window rule: one count per window aligned to the Unix epoch.

use super::{Window, WindowState};

/// A count for the aligned window holding the latest request.
///
/// Window `k` covers `[k·W, (k+1)·W)` in Unix ms (`W` being `window_ms`). A request of `cost`
/// units at `now`, in window `k = floor(now / W)`, is admitted when
///
/// ```text
/// count_k + cost <= quantity
/// ```
///
/// `remaining` is `quantity - count_k`, and `reset_ms` is the time left in window `k`,
/// `(k+1)·W - now`, whether the request was admitted or refused: the next window starts
/// empty. Unix time has no leap seconds and 00:00 UTC is a multiple of 86 400 000 ms, so a day
/// window resets at midnight UTC whatever the process's time zone.
///
/// The known edge: a client can spend `quantity` at the end of one window and `quantity` again
/// at the start of the next, so up to `2 × quantity` pass within a span shorter than `W`. With
/// 3 per 2 s, 3 requests at 1.7 s and 3 at 2.1 s all pass.
#[derive(Clone, Debug, Default)]
pub(super) struct FixedCount {
    /// The aligned window that `count` belongs to, `floor(time_ms / window_ms)`.
    window_index: u64,
    /// Units admitted in window `window_index`.
    count: u64,
}

impl FixedCount {
    /// Moves to the aligned window holding `now_ms`. A clock that steps back stays put.
    pub(super) fn advance(&mut self, window: &Window, now_ms: u64) {
        let index = now_ms / window.length_ms();
        if index > self.window_index {
            self.window_index = index;
            self.count = 0;
        }
    }

    pub(super) fn admits(&self, window: &Window, cost: u64) -> bool {
        self.count.saturating_add(cost) <= window.quantity
    }

    pub(super) fn record(&mut self, cost: u64) {
        self.count = self.count.saturating_add(cost);
    }

    pub(super) fn state(&self, window: &Window, now_ms: u64, admits: bool) -> WindowState {
        WindowState {
            admits,
            remaining: window.quantity.saturating_sub(self.count),
            reset_ms: self.end_ms(window.window_ms).saturating_sub(now_ms).max(1),
        }
    }

    /// When the count stops mattering, Unix ms; 0 if it is empty.
    pub(super) fn idle_at(&self, window_ms: u64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        self.end_ms(window_ms)
    }

    fn end_ms(&self, window_ms: u64) -> u64 {
        self.window_index
            .saturating_add(1)
            .saturating_mul(window_ms.max(1))
    }
}
