//! Resident memory per tracked client: the growth of the process's RSS while one million
//! distinct clients each make one request, divided by a million. Run with
//! `cargo bench -p gateway --bench memory_per_client`.

use std::net::{IpAddr, Ipv4Addr};

use gateway::config::{ForwardedHeader, IdentityConfig};
use gateway::identity::{Identifier, IdentityKey};
use gateway::store::{Algorithm, MemoryStore, Window};
use http::HeaderMap;

const CLIENTS: u32 = 1_000_000;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("number");
    kib * 1024
}

fn main() {
    let config = IdentityConfig {
        trusted_proxies: Vec::new(),
        forwarded_header: ForwardedHeader::XForwardedFor,
        ipv6_prefix: 64,
        fingerprint_header: None,
    };
    let identifier = Identifier::new(IdentityKey::new(b"bench".to_vec()), None, config);
    let headers = HeaderMap::new();
    let windows = [Window {
        name: "anonymous-generate".into(),
        quantity: 3,
        window_ms: 86_400_000,
        algorithm: Algorithm::SlidingWindow,
        variant: 0,
    }];
    // Keys are derived one at a time so that only the store's own memory grows. The cap is
    // per shard, and a million random keys never spread perfectly evenly over the shards, so
    // the store gets twice the room it needs: every client is then tracked.
    let store = MemoryStore::new(2 * CLIENTS as usize);
    let before = rss_bytes();
    for n in 0..CLIENTS {
        let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        let key = identifier.identify(address, &headers).caller.key();
        store.decide(key, &windows, 1, 1_000_000 + u64::from(n));
    }
    let after = rss_bytes();
    let per_client = after.saturating_sub(before) as f64 / f64::from(CLIENTS);
    println!("tracked clients: {}", store.tracked());
    println!(
        "RSS growth: {:.1} MiB",
        after.saturating_sub(before) as f64 / 1048576.0
    );
    println!("bytes per tracked client: {per_client:.0}");
    assert_eq!(store.tracked(), CLIENTS as usize, "every client is tracked");
}
