//! The in-memory store: every client's counters in a bounded, sharded map.
//!
//! Client keys are HMAC outputs, uniformly random and unknown to anyone without the identity
//! key, so the store uses their bytes directly: no hashing per request, and no way for a client
//! to aim at one bucket of the map.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::counters::{ClientCounters, Limits, Outcome};
use super::{CounterStore, StoreError, Verdict, Window};
use crate::identity::ClientKey;

/// Number of independently locked shards (fewer when the store holds fewer clients).
const SHARDS: usize = 64;

/// How many clients [`MemoryStore::default`] tracks.
const DEFAULT_MAX_CLIENTS: usize = 1_000_000;

/// Counters in process memory, for a single gateway instance.
///
/// Clients are spread over shards by their key; one shard lock covers a client's whole
/// decision, so it is atomic across the request's windows, and different clients rarely wait on
/// each other. A client is forgotten as soon as all of its counters are idle (they hold nothing
/// a fresh counter would not), at the latest by the next [`MemoryStore::sweep`].
///
/// Memory is bounded by `max_clients`, split evenly over the shards. When a new client arrives
/// at a full shard, the shard first forgets its idle clients. If it is still full, the
/// request is decided against fresh counters and, if admitted, not recorded: the store fails
/// open rather than refuse someone it cannot count, and says so in [`Verdict::untracked`] so
/// that the gateway can count such decisions. Clients already tracked are never evicted, so a
/// flood of new addresses cannot reset anyone's count. Because the cap is per shard, a shard
/// can fill slightly before the store as a whole does.
///
/// A client under one limit costs one 57-byte map slot and nothing else: 16 bytes of key, a
/// 40-byte counter held inline (identity, and a sliding log of up to three entries), and one
/// control byte. The map is between 7/16 and 7/8 full, so that is 65 to 131 bytes per client,
/// and a million clients take 65 to 131 MB. Sliding logs of more entries, weighted estimates
/// and clients under several limits also use the heap. The test `memory_per_client_is_small`
/// checks the sizes, and the `memory_per_client` benchmark measures resident memory.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Vec<PaddedShard>,
}

/// A shard on cache lines of its own, so that threads deciding for clients of neighbouring
/// shards do not slow each other down by writing to the same line.
#[derive(Debug)]
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

#[derive(Debug)]
struct Shard {
    clients: HashMap<StoredKey, ClientCounters, KeyBits>,
    /// The limits this shard's counters refer to.
    limits: Limits,
    /// The most clients this shard tracks: its share of `max_clients`.
    capacity: usize,
    /// No tracked client can be idle before this time (Unix ms), so a full shard skips the
    /// scan for idle clients until then. Set by every scan to the earliest time a survivor goes
    /// idle; counters only go idle later as they record more, so it stays a lower bound. (A
    /// reload that converts a sliding counter can move it earlier; the scan then comes late,
    /// and new clients meanwhile go untracked.)
    next_idle_ms: u64,
}

/// The first 16 bytes of a [`ClientKey`], which is all the map keeps of it.
///
/// Two clients of one shard are confused only if 128 uniformly random bits agree: with a
/// million clients tracked, the chance that any two do is about 10^-27, far below the odds of
/// a memory error. It halves the key's share of a map slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StoredKey([u64; 2]);

/// Hashes a [`StoredKey`] to its first word, which is already uniformly random.
#[derive(Clone, Copy, Debug, Default)]
struct KeyBits;

/// The hasher [`KeyBits`] builds: keeps the last word written.
#[derive(Default)]
struct KeyBitsHasher(u64);

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
                PaddedShard(Mutex::new(Shard {
                    clients: HashMap::default(),
                    limits: Limits::default(),
                    capacity: max_clients / shard_count + extra,
                    next_idle_ms: 0,
                }))
            })
            .collect();
        Self { shards }
    }

    /// Decides one request of `client` costing `cost` units (0 counts as 1) in every one of
    /// `windows`, at `now_ms` (Unix ms): admitted only if every window admits it, and then
    /// recorded in all of them; a refused request records nothing.
    pub fn decide(&self, client: ClientKey, windows: &[Window], cost: u64, now_ms: u64) -> Verdict {
        let cost = cost.max(1);
        let key = StoredKey::of(&client);
        let mut guard = self.lock(self.shard_of(&client));
        let shard = &mut *guard;

        if let Some(counters) = shard.clients.get_mut(&key) {
            let outcome = counters.decide(&mut shard.limits, windows, cost, now_ms);
            if counters.is_empty() {
                shard.clients.remove(&key);
            }
            return verdict(outcome, false);
        }

        // A new client: decide against fresh counters, and keep them only if the request was
        // admitted and counted somewhere (a refusal records nothing) and the shard has room.
        let mut counters = ClientCounters::default();
        let outcome = counters.decide(&mut shard.limits, windows, cost, now_ms);
        if !outcome.admitted || counters.is_empty() {
            return verdict(outcome, false);
        }
        if !shard.make_room(now_ms) {
            return verdict(outcome, true);
        }
        shard.clients.insert(key, counters);
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

    /// The shard of `client`, chosen by bytes the map does not hash, so that the keys within
    /// one shard still spread over the whole of its map.
    fn shard_of(&self, client: &ClientKey) -> &PaddedShard {
        let bits = key_word(client, 3);
        let index = (u128::from(bits) * self.shards.len() as u128) >> 64;
        &self.shards[index as usize]
    }

    /// Locks a shard. A panic while a shard was locked cannot leave a client's counters half
    /// updated in a way that matters more than losing the request, so poisoning is ignored.
    fn lock<'a>(&self, shard: &'a PaddedShard) -> MutexGuard<'a, Shard> {
        shard.0.lock().unwrap_or_else(|poison| poison.into_inner())
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
        let limits = &self.limits;
        self.clients
            .retain(|_, counters| counters.forget_idle(limits, now_ms));
        self.next_idle_ms = self
            .clients
            .values()
            .map(|counters| counters.idle_at(limits))
            .min()
            .unwrap_or(0);
    }
}

impl StoredKey {
    fn of(client: &ClientKey) -> Self {
        Self([key_word(client, 0), key_word(client, 1)])
    }
}

impl Hash for StoredKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
    }
}

impl BuildHasher for KeyBits {
    type Hasher = KeyBitsHasher;

    fn build_hasher(&self) -> KeyBitsHasher {
        KeyBitsHasher::default()
    }
}

impl Hasher for KeyBitsHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }

    /// Only [`StoredKey`] is hashed, and it writes one `u64`; other input is folded in all the
    /// same, so that the hasher stays correct if that ever changes.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// The `index`-th little-endian 64-bit word of a client key, for `index` below 4.
fn key_word(client: &ClientKey, index: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&client.as_bytes()[index * 8..index * 8 + 8]);
    u64::from_le_bytes(word)
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
        let mut limits = Limits::default();
        let mut counters = ClientCounters::default();
        for at in 0..3 {
            let windows = std::slice::from_ref(&window);
            assert!(counters.decide(&mut limits, windows, 1, at).admitted);
        }

        // A map slot is the entry plus one control byte, and nothing is on the heap. The map
        // is between 7/16 and 7/8 full, so 65 to 131 bytes per client.
        let slot = size_of::<(StoredKey, ClientCounters)>() + 1;
        assert_eq!((slot, counters.heap_bytes()), (57, 0));
        let sparse = slot * 16 / 7;
        assert!(sparse <= 150, "{sparse} bytes per client");
    }
}
