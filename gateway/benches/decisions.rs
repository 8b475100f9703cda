//! Micro-benchmarks of the per-request work the gateway adds: deriving a client key (HMAC) and
//! deciding a request on the memory store, from one and from two threads, over a million
//! distinct clients. Run with `cargo bench -p gateway --bench decisions`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::config::{ForwardedHeader, IdentityConfig};
use gateway::identity::{ClientKey, Identifier, IdentityKey};
use gateway::store::{Algorithm, MemoryStore, Window};
use http::HeaderMap;

const CLIENTS: u32 = 1_000_000;

fn identifier() -> Identifier {
    let config = IdentityConfig {
        trusted_proxies: Vec::new(),
        forwarded_header: ForwardedHeader::XForwardedFor,
        ipv6_prefix: 64,
        fingerprint_header: None,
    };
    Identifier::new(IdentityKey::new(b"bench-key".to_vec()), None, config)
}

fn address(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn client_keys() -> Vec<ClientKey> {
    let identifier = identifier();
    let headers = HeaderMap::new();
    (0..CLIENTS)
        .map(|n| identifier.identify(address(n), &headers).caller.key())
        .collect()
}

fn limit() -> Vec<Window> {
    vec![Window {
        name: "anonymous-generate".into(),
        quantity: 3,
        window_ms: 86_400_000,
        algorithm: Algorithm::SlidingWindow,
        variant: 0,
    }]
}

fn identity(c: &mut Criterion) {
    let identifier = identifier();
    let headers = HeaderMap::new();
    let mut n = 0u32;
    c.bench_function("identify anonymous client (HMAC-SHA256)", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            identifier.identify(address(n), &headers)
        })
    });
}

fn decisions(c: &mut Criterion) {
    let keys = Arc::new(client_keys());
    let windows = Arc::new(limit());
    let mut group = c.benchmark_group("memory decision, 1M clients");
    group.throughput(Throughput::Elements(1));

    group.bench_function("1 thread", |b| {
        let store = MemoryStore::new(2 * CLIENTS as usize);
        let mut i = 0usize;
        let mut now = 1_000_000u64;
        b.iter(|| {
            i = (i + 1) % keys.len();
            now += 1;
            store.decide(keys[i], &windows, 1, now)
        })
    });

    group.bench_function("2 threads", |b| {
        b.iter_custom(|iterations| {
            let store = Arc::new(MemoryStore::new(2 * CLIENTS as usize));
            let started = Instant::now();
            let workers: Vec<_> = (0..2u64)
                .map(|worker| {
                    let (store, keys, windows) = (store.clone(), keys.clone(), windows.clone());
                    std::thread::spawn(move || {
                        let mut i = worker as usize * keys.len() / 2;
                        for step in 0..iterations / 2 {
                            i = (i + 1) % keys.len();
                            store.decide(keys[i], &windows, 1, 1_000_000 + step);
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.join().expect("benchmark worker");
            }
            started.elapsed()
        })
    });

    group.bench_function("refusal of a full client", |b| {
        let store = MemoryStore::new(16);
        for _ in 0..3 {
            store.decide(keys[0], &windows, 1, 1_000);
        }
        b.iter_batched(
            || 2_000u64,
            |now| store.decide(keys[0], &windows, 1, now),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = identity, decisions
}
criterion_main!(benches);
