//! The in-memory store: every client's counters in a bounded, sharded map.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::counters::{ClientCounters, Outcome};
use super::{CounterStore, StoreError, Verdict, Window};
use crate::identity::ClientKey;

/// Number of independently locked shards (fewer when the store holds fewer clients).
const SHARDS: usize = 64;

/// How many clients [`MemoryStore::default`] tracks.
const DEFAULT_MAX_CLIENTS: usize = 1_000_000;

/// Counters in process memory, for a single gateway instance.
///
/// Clients are spread over shards by a hash of their key; one shard lock covers a client's
/// whole decision, so it is atomic across the request's windows, and different clients rarely
/// wait on each other. A client is forgotten as soon as all of its counters are idle (they
/// hold nothing a fresh counter would not), at the latest by the next [`MemoryStore::sweep`].
///
/// Memory is bounded by `max_clients`, split evenly over the shards. When a new client arrives
/// at a full shard, the shard first forgets its idle clients. If it is still full, the
/// request is decided against fresh counters and, if admitted, not recorded: the store fails
/// open rather than refuse someone it cannot count, and says so in [`Verdict::untracked`] so
/// that the gateway can count such decisions. Clients already tracked are never evicted, so a
/// flood of new addresses cannot reset anyone's count. Because the cap is per shard, a shard
/// can fill slightly before the store as a whole does.
///
/// A client with one sliding window of quantity 3 costs 190 to 260 bytes: a 57-byte map slot
/// (32-byte key, 24-byte counter list, 1 control byte) in a map between 7/16 and 7/8 full, a
/// 64-byte counter (shared name, window, variant, the log's ring header), the ring's 32 bytes
/// of timestamps, and about 32 bytes of allocator overhead on those two allocations. A
/// million such clients take about 250 MB. The test `memory_per_client_is_small` measures it.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
}

#[derive(Debug)]
struct Shard {
    clients: HashMap<ClientKey, ClientCounters>,
    /// The most clients this shard tracks: its share of `max_clients`.
    capacity: usize,
    /// No tracked client can be idle before this time (Unix ms), so a full shard skips the
    /// scan for idle clients until then. Set by every scan to the earliest time a survivor goes
    /// idle; counters only go idle later as they record more, so it stays a lower bound. (A
    /// reload that converts a sliding counter can move it earlier; the scan then comes late,
    /// and new clients meanwhile go untracked.)
    next_idle_ms: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CLIENTS)
    }
}

impl MemoryStore {
    /// A store that tracks at most `max_clients` clients at once (0 tracks none, so every
    /// request is decided against fresh counters).
    pub fn new(max_clients: usize) -> Self {
        let shard_count = max_clients.clamp(1, SHARDS);
        let shards = (0..shard_count)
            .map(|index| {
                let extra = usize::from(index < max_clients % shard_count);
                Mutex::new(Shard {
                    clients: HashMap::new(),
                    capacity: max_clients / shard_count + extra,
                    next_idle_ms: 0,
                })
            })
            .collect();
        Self { shards }
    }

    /// Decides one request of `client` costing `cost` units (0 counts as 1) in every one of
    /// `windows`, at `now_ms` (Unix ms): admitted only if every window admits it, and then
    /// recorded in all of them; a refused request records nothing.
    pub fn decide(&self, client: ClientKey, windows: &[Window], cost: u64, now_ms: u64) -> Verdict {
        let cost = cost.max(1);
        let mut shard = self.lock(self.shard_of(client));

        if let Some(counters) = shard.clients.get_mut(&client) {
            let outcome = counters.decide(windows, cost, now_ms);
            if counters.is_empty() {
                shard.clients.remove(&client);
            }
            return verdict(outcome, false);
        }

        // A new client: decide against fresh counters, and keep them only if the request was
        // admitted and counted somewhere (a refusal records nothing) and the shard has room.
        let mut counters = ClientCounters::default();
        let outcome = counters.decide(windows, cost, now_ms);
        if !outcome.admitted || counters.is_empty() {
            return verdict(outcome, false);
        }
        if !shard.make_room(now_ms) {
            return verdict(outcome, true);
        }
        shard.clients.insert(client, counters);
        verdict(outcome, false)
    }

    /// Forgets every client whose counters are all idle at `now_ms`; returns how many clients
    /// are still tracked. The gateway calls this periodically, so memory follows the clients
    /// that are active within their windows.
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = self.lock(shard);
                shard.forget_idle(now_ms);
                shard.clients.len()
            })
            .sum()
    }

    /// How many clients have counters right now, idle or not.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| self.lock(shard).clients.len())
            .sum()
    }

    fn shard_of(&self, client: ClientKey) -> &Mutex<Shard> {
        let mut hasher = DefaultHasher::new();
        client.hash(&mut hasher);
        let index = (hasher.finish() % self.shards.len() as u64) as usize;
        &self.shards[index]
    }

    /// Locks a shard. A panic while a shard was locked cannot leave a client's counters half
    /// updated in a way that matters more than losing the request, so poisoning is ignored.
    fn lock<'a>(&self, shard: &'a Mutex<Shard>) -> MutexGuard<'a, Shard> {
        shard.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

#[async_trait]
impl CounterStore for MemoryStore {
    async fn decide(
        &self,
        client: ClientKey,
        windows: &[Window],
        cost: u64,
        now_ms: u64,
    ) -> Result<Verdict, StoreError> {
        Ok(MemoryStore::decide(self, client, windows, cost, now_ms))
    }

    /// Process memory is always there.
    fn is_ready(&self) -> bool {
        true
    }
}

impl Shard {
    /// Whether one more client fits, after forgetting idle ones if the shard is full.
    fn make_room(&mut self, now_ms: u64) -> bool {
        if self.clients.len() < self.capacity {
            return true;
        }
        if now_ms < self.next_idle_ms {
            return false;
        }
        self.forget_idle(now_ms);
        self.clients.len() < self.capacity
    }

    fn forget_idle(&mut self, now_ms: u64) {
        self.clients
            .retain(|_, counters| counters.forget_idle(now_ms));
        self.next_idle_ms = self
            .clients
            .values()
            .map(ClientCounters::idle_at)
            .min()
            .unwrap_or(0);
    }
}

fn verdict(outcome: Outcome, untracked: bool) -> Verdict {
    Verdict {
        admitted: outcome.admitted,
        untracked,
        states: outcome.states,
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;
    use crate::store::Algorithm;

    #[test]
    fn memory_per_client_is_small() {
        // One sliding window of quantity 3, full.
        let window = Window {
            name: "anonymous-daily".into(),
            quantity: 3,
            window_ms: 86_400_000,
            algorithm: Algorithm::SlidingWindow,
            variant: 0,
        };
        let mut counters = ClientCounters::default();
        for at in 0..3 {
            assert!(
                counters
                    .decide(std::slice::from_ref(&window), 1, at)
                    .admitted
            );
        }

        // A map slot is the entry plus one control byte (57 bytes), and the map is between 7/16
        // and 7/8 full. The heap holds the 64-byte counter and the log's 32 bytes. So 161 to
        // 226 bytes, and about 32 more of allocator overhead on the two allocations.
        let slot = size_of::<(ClientKey, ClientCounters)>() + 1;
        let heap = counters.heap_bytes();
        assert_eq!((slot, heap), (57, 96));
        let sparse = slot * 16 / 7 + heap;
        assert!(sparse <= 256, "{sparse} bytes per client");
    }
}
