//! The sliding-window rule: an exact log for small quantities, a weighted estimate above.
//!
//! Both count the span `(now - window_ms, now]` that ends at the request. Which one a window
//! uses depends on its quantity only; `counters` converts between them when a reload moves a
//! quantity across [`SLIDING_LOG_MAX_QUANTITY`].

use std::collections::VecDeque;

use super::{Window, WindowState, SLIDING_LOG_MAX_QUANTITY};

/// Whether a sliding window of `quantity` keeps an exact log.
pub(super) fn is_exact(quantity: u64) -> bool {
    quantity <= SLIDING_LOG_MAX_QUANTITY
}

/// The exact sliding window: when each unit still inside the window was admitted.
///
/// With `counted` units admitted in `(now - W, now]` (`W` being `window_ms`), a request of
/// `cost` units at `now` is admitted when
///
/// ```text
/// counted + cost <= quantity
/// ```
///
/// The unit admitted at `t` leaves the window at `t + W`. So `remaining` is
/// `quantity - counted`; `reset_ms` is the wait for the oldest unit to leave; and a refused
/// request waits for the unit at position `counted + cost - quantity` (from 1, oldest first),
/// after which exactly enough room is free. Example, 3 per 10 s with requests at 0, 4 and 6 s:
/// at 7 s a fourth is refused and must wait 3 s, until the one from 0 s leaves.
///
/// A request of cost `c` is logged as `c` entries, so the log never holds more than
/// [`SLIDING_LOG_MAX_QUANTITY`] entries. Admission times are kept in ms, oldest first; a clock
/// that steps back is logged at the newest time already held, which keeps the order.
///
/// Storage. Most clients of a small quota hold a few entries, so up to [`INLINE_ENTRIES`] live
/// inside the counter itself, as 32-bit offsets from a base time: no allocation, and the whole
/// log fits in 24 bytes. Every entry of a log lies within one window of the newest, so the
/// offsets fit whenever the window is shorter than 2^32 ms (about 49 days). A longer log, or
/// one whose entries are too far apart, moves to a heap ring of full timestamps, and moves
/// back once it has shrunk. Both forms hold the same times, so the choice never changes a
/// decision.
#[derive(Clone, Debug)]
pub(super) enum SlidingLog {
    /// The first `len` of `offsets_ms`, each added to `base_ms` (Unix ms).
    Inline {
        len: u8,
        offsets_ms: [u32; INLINE_ENTRIES],
        base_ms: u64,
    },
    /// Admission times, Unix ms.
    #[expect(
        clippy::box_collection,
        reason = "a bare ring would make every log, and so every counter, 8 bytes larger"
    )]
    Spilled(Box<VecDeque<u64>>),
}

/// How many entries a sliding log holds without allocating. Three keeps the whole log in 24
/// bytes, and so a one-limit client in a 57-byte map slot (see `MemoryStore`).
const INLINE_ENTRIES: usize = 3;

impl Default for SlidingLog {
    fn default() -> Self {
        Self::Inline {
            len: 0,
            offsets_ms: [0; INLINE_ENTRIES],
            base_ms: 0,
        }
    }
}

impl SlidingLog {
    /// Forgets units that have left the window at `now_ms`.
    pub(super) fn advance(&mut self, window: &Window, now_ms: u64) {
        let length_ms = window.length_ms();
        while let Some(oldest) = self.front() {
            if oldest.saturating_add(length_ms) > now_ms {
                break;
            }
            self.pop_front();
        }
        self.move_inline_if_short();
    }

    pub(super) fn admits(&self, window: &Window, cost: u64) -> bool {
        self.counted().saturating_add(cost) <= window.quantity
    }

    pub(super) fn record(&mut self, cost: u64, now_ms: u64) {
        let at = self.back().map_or(now_ms, |newest| newest.max(now_ms));
        for _ in 0..cost {
            self.push_back(at);
        }
    }

    pub(super) fn state(
        &self,
        window: &Window,
        cost: u64,
        now_ms: u64,
        admits: bool,
    ) -> WindowState {
        let counted = self.counted();
        let until_leaves = |at: u64| at.saturating_add(window.length_ms()).saturating_sub(now_ms);

        // The entry whose departure frees enough room: for a refusal, the (excess)-th oldest;
        // otherwise the oldest, whose departure is when `remaining` next goes up. A cost above
        // the quantity never fits; its wait is until the log is empty.
        let excess = counted.saturating_add(cost).saturating_sub(window.quantity);
        let freeing = if admits {
            self.front()
        } else {
            let position = usize::try_from(excess).unwrap_or(usize::MAX);
            self.get(position.saturating_sub(1)).or(self.back())
        };
        WindowState {
            admits,
            remaining: window.quantity.saturating_sub(counted),
            reset_ms: freeing.map_or(window.length_ms(), until_leaves).max(1),
        }
    }

    /// When the last unit leaves, Unix ms; 0 for an empty log.
    pub(super) fn idle_at(&self, window_ms: u64) -> u64 {
        self.back()
            .map_or(0, |newest| newest.saturating_add(window_ms.max(1)))
    }

    /// Converts an estimate to a log when a reload lowers the quantity to the exact range: the
    /// estimated count, capped at the new quantity, is logged as admitted now. That never
    /// admits more than the new quantity, at the price of a longer wait for this client.
    pub(super) fn from_estimate(estimate: &WeightedEstimate, window: &Window, now_ms: u64) -> Self {
        let units = estimate.count_ceil(window, now_ms).min(window.quantity);
        let mut log = Self::default();
        log.record(units, now_ms);
        log
    }

    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Self::Inline { .. } => 0,
            Self::Spilled(ring) => {
                std::mem::size_of::<VecDeque<u64>>() + ring.capacity() * std::mem::size_of::<u64>()
            }
        }
    }

    fn counted(&self) -> u64 {
        self.len() as u64
    }

    fn len(&self) -> usize {
        match self {
            Self::Inline { len, .. } => usize::from(*len),
            Self::Spilled(ring) => ring.len(),
        }
    }

    /// The `index`-th admission time, oldest first.
    fn get(&self, index: usize) -> Option<u64> {
        match self {
            Self::Inline {
                len,
                offsets_ms,
                base_ms,
            } => offsets_ms[..usize::from(*len)]
                .get(index)
                .map(|&offset_ms| base_ms + u64::from(offset_ms)),
            Self::Spilled(ring) => ring.get(index).copied(),
        }
    }

    fn front(&self) -> Option<u64> {
        self.get(0)
    }

    fn back(&self) -> Option<u64> {
        self.len().checked_sub(1).and_then(|last| self.get(last))
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).filter_map(|index| self.get(index))
    }

    fn pop_front(&mut self) {
        match self {
            Self::Inline {
                len, offsets_ms, ..
            } => {
                if *len > 0 {
                    offsets_ms.copy_within(1..usize::from(*len), 0);
                    *len -= 1;
                }
            }
            Self::Spilled(ring) => {
                ring.pop_front();
            }
        }
    }

    /// Appends `at`, which is at least the newest time held.
    fn push_back(&mut self, at: u64) {
        if let Self::Inline {
            len,
            offsets_ms,
            base_ms,
        } = self
        {
            let held = usize::from(*len);
            if held == 0 {
                *base_ms = at;
            }
            // Rebase on the oldest entry when the newest would not fit as an offset.
            if at - *base_ms > u64::from(u32::MAX) {
                let oldest_ms = offsets_ms[0];
                *base_ms += u64::from(oldest_ms);
                for offset_ms in &mut offsets_ms[..held] {
                    *offset_ms -= oldest_ms;
                }
            }
            if held < INLINE_ENTRIES {
                if let Ok(offset_ms) = u32::try_from(at - *base_ms) {
                    offsets_ms[held] = offset_ms;
                    *len += 1;
                    return;
                }
            }
            self.spill();
        }
        if let Self::Spilled(ring) = self {
            ring.push_back(at);
        }
    }

    /// Moves an inline log to the heap, where it can grow without bound on spread or length.
    fn spill(&mut self) {
        let mut ring = VecDeque::with_capacity(INLINE_ENTRIES + 1);
        ring.extend(self.iter());
        *self = Self::Spilled(Box::new(ring));
    }

    /// Moves a heap log back inline once it fits again, so memory follows the client's
    /// activity.
    fn move_inline_if_short(&mut self) {
        let Self::Spilled(ring) = self else {
            return;
        };
        if ring.len() > INLINE_ENTRIES {
            return;
        }
        let base_ms = ring.front().copied().unwrap_or(0);
        let mut offsets_ms = [0; INLINE_ENTRIES];
        for (offset_ms, &at) in offsets_ms.iter_mut().zip(ring.iter()) {
            let Ok(offset) = u32::try_from(at - base_ms) else {
                return;
            };
            *offset_ms = offset;
        }
        *self = Self::Inline {
            // At most `INLINE_ENTRIES`, checked above.
            len: ring.len() as u8,
            offsets_ms,
            base_ms,
        };
    }
}

/// The sliding window estimated from two aligned fixed windows, in constant memory, for
/// quantities above [`SLIDING_LOG_MAX_QUANTITY`].
///
/// Time is cut into windows `[k·W, (k+1)·W)` aligned to the Unix epoch. Let `current` be the
/// units admitted in the window holding `now`, `previous` those of the window before, and
/// `elapsed = now - k·W`. The previous window still overlaps the span `(now - W, now]` for
/// `W - elapsed` of its `W` milliseconds; if its units were spread evenly, the span holds
///
/// ```text
/// estimate = previous × (W - elapsed) / W + current
/// ```
///
/// and a request of `cost` units is admitted when `estimate + cost <= quantity`, compared
/// exactly in integers as `previous × (W - elapsed) + (current + cost) × W <= quantity × W`.
/// The estimate falls steadily with time and never jumps, so `remaining` and every wait are the
/// first whole millisecond at which it has fallen far enough.
///
/// Error bound. An aligned window never admits more than `quantity`. A span of `W` overlaps
/// two aligned windows; say the earlier one admitted `p` units in all, and the span's last
/// admission came at `elapsed = e <= W - 1` of the later one. That admission passed the test
/// above, so the later window had admitted at most `quantity - p × (W - e) / W` by then, and
/// the span holds at most
///
/// ```text
/// p + quantity - p × (W - e) / W  =  quantity + p × e / W  <  2 × quantity
/// ```
///
/// so at most `quantity - 1` units beyond the quantity, `2 × quantity - 1` in all. That needs
/// the earlier window's units bunched at its very end and the later window's near its end:
/// with 4 per 10 s, 4 units at 9.9 s leave an estimate of `4 × 0.2 + current` at 18 s, where 3
/// more are admitted, and the span (9 s, 19 s] holds 7. Traffic spread over the window is
/// counted almost exactly, and bunching at the start of a window errs the other way: the
/// estimate then refuses units that the exact log would admit.
#[derive(Clone, Debug, Default)]
pub(super) struct WeightedEstimate {
    /// The aligned window that `current` counts, `floor(time_ms / window_ms)`.
    window_index: u64,
    /// Units admitted in window `window_index`.
    current: u64,
    /// Units admitted in window `window_index - 1`.
    previous: u64,
}

impl WeightedEstimate {
    /// Moves to the aligned window holding `now_ms`. A clock that steps back stays put.
    pub(super) fn advance(&mut self, window: &Window, now_ms: u64) {
        let index = now_ms / window.length_ms();
        if index == self.window_index.saturating_add(1) {
            self.previous = self.current;
            self.current = 0;
        } else if index > self.window_index {
            self.previous = 0;
            self.current = 0;
        } else {
            return;
        }
        self.window_index = index;
    }

    pub(super) fn admits(&self, window: &Window, cost: u64, now_ms: u64) -> bool {
        let length = u128::from(window.length_ms());
        let used = self.weighted_previous(window, now_ms)
            + (u128::from(self.current) + u128::from(cost)) * length;
        used <= u128::from(window.quantity) * length
    }

    pub(super) fn record(&mut self, cost: u64) {
        self.current = self.current.saturating_add(cost);
    }

    pub(super) fn state(
        &self,
        window: &Window,
        cost: u64,
        now_ms: u64,
        admits: bool,
    ) -> WindowState {
        let length = u128::from(window.length_ms());
        let room = (u128::from(window.quantity) * length)
            .saturating_sub(self.weighted_previous(window, now_ms))
            .saturating_sub(u128::from(self.current) * length);
        let remaining = u64::try_from(room / length).unwrap_or(u64::MAX);

        // A refused request waits until the estimate leaves room for its cost; otherwise
        // `remaining` goes up when the estimate leaves room for one unit more.
        let needed = if admits {
            remaining.saturating_add(1)
        } else {
            cost
        };
        let reset_ms = match window.quantity.checked_sub(needed) {
            Some(ceiling) => self
                .first_at_most(window, now_ms, ceiling)
                .saturating_sub(now_ms),
            None if admits => window.length_ms(),
            // A cost above the quantity never fits: wait until the estimate is empty.
            None => match self.idle_at(window.window_ms).checked_sub(now_ms) {
                Some(until_empty) if until_empty > 0 => until_empty,
                _ => window.length_ms(),
            },
        };
        WindowState {
            admits,
            remaining,
            reset_ms: reset_ms.max(1),
        }
    }

    /// When the estimate reaches zero, Unix ms; 0 if it already has.
    pub(super) fn idle_at(&self, window_ms: u64) -> u64 {
        let later = if self.current > 0 {
            2
        } else if self.previous > 0 {
            1
        } else {
            return 0;
        };
        self.window_index
            .saturating_add(later)
            .saturating_mul(window_ms.max(1))
    }

    /// Converts a log to an estimate when a reload raises the quantity above the exact range.
    /// Every logged unit lies in the aligned window of `now_ms` or the one before, so the
    /// counts are exact.
    pub(super) fn from_log(log: &SlidingLog, window: &Window, now_ms: u64) -> Self {
        let length_ms = window.length_ms();
        let window_index = now_ms / length_ms;
        let start_ms = window_index.saturating_mul(length_ms);
        let current = log.iter().filter(|&at| at >= start_ms).count() as u64;
        Self {
            window_index,
            current,
            previous: log.counted() - current,
        }
    }

    /// The estimate at `now_ms`, rounded up.
    fn count_ceil(&self, window: &Window, now_ms: u64) -> u64 {
        let length = u128::from(window.length_ms());
        let scaled = self.weighted_previous(window, now_ms) + u128::from(self.current) * length;
        u64::try_from(scaled.div_ceil(length)).unwrap_or(u64::MAX)
    }

    /// `previous × (W - elapsed)`: the previous window's share of the estimate, times `W`.
    fn weighted_previous(&self, window: &Window, now_ms: u64) -> u128 {
        u128::from(self.previous) * u128::from(window.length_ms() - self.elapsed(window, now_ms))
    }

    /// Milliseconds since the start of window `window_index`, below `W`; 0 for a clock that
    /// stepped back before it.
    fn elapsed(&self, window: &Window, now_ms: u64) -> u64 {
        let length_ms = window.length_ms();
        now_ms
            .saturating_sub(self.window_index.saturating_mul(length_ms))
            .min(length_ms - 1)
    }

    /// The first millisecond, from `now_ms` on, at which `estimate <= ceiling` with nothing
    /// more admitted.
    ///
    /// While `current <= ceiling` that happens in this window once
    /// `previous × (W - elapsed) <= (ceiling - current) × W`. Otherwise it happens in the next
    /// one, where `current` has become the previous window: once
    /// `current × (W - elapsed) <= ceiling × W`.
    fn first_at_most(&self, window: &Window, now_ms: u64, ceiling: u64) -> u64 {
        let length = u128::from(window.length_ms());
        let start_ms = self.window_index.saturating_mul(window.length_ms());
        let (weight, spare, start_ms) = match ceiling.checked_sub(self.current) {
            Some(spare) => (self.previous, spare, start_ms),
            None => (
                self.current,
                ceiling,
                start_ms.saturating_add(window.length_ms()),
            ),
        };
        if weight == 0 {
            return now_ms;
        }
        // The largest `W - elapsed` allowed, capped at `W`.
        let overlap = (u128::from(spare) * length / u128::from(weight)).min(length);
        let elapsed = u64::try_from(length - overlap).unwrap_or(u64::MAX);
        start_ms.saturating_add(elapsed).max(now_ms)
    }
}
