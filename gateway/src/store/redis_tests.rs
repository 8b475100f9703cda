//! The Redis store against the memory store: one table of scenarios, run on both with the same
//! fake clock, must give identical verdicts. Needs the Redis at 127.0.0.1:6379 (database 9,
//! with a key prefix per test that is deleted afterwards).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::{client, limit as window};
use super::*;
use crate::metrics::Metrics;

const REDIS_URL: &str = "redis://127.0.0.1:6379/9";

/// An even epoch second, far from zero.
const T0: u64 = 1_700_000_000_000;

/// A Redis store under `prefix`, connected and ready.
async fn redis_store(prefix: &str) -> RedisStore {
    let settings = RedisSettings {
        target: RedisTarget::Standalone(REDIS_URL.into()),
        key_prefix: prefix.into(),
        timeout: Duration::from_millis(500),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(200),
    };
    let store = RedisStore::start(settings, Arc::new(Metrics::new())).expect("store starts");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_ready() {
        assert!(
            Instant::now() < deadline,
            "redis at {REDIS_URL} is not reachable"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store
}

async fn connection() -> ::redis::aio::MultiplexedConnection {
    let client = ::redis::Client::open(REDIS_URL).expect("valid url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("redis at 127.0.0.1:6379")
}

/// Every key under `prefix`.
async fn keys(prefix: &str) -> Vec<String> {
    let mut connection = connection().await;
    ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .expect("KEYS")
}

async fn delete_all(prefix: &str) {
    let mut connection = connection().await;
    for key in keys(prefix).await {
        let _: i64 = ::redis::cmd("DEL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("DEL");
    }
}

/// One step of a scenario: at `at_ms` after [`T0`], a request of `cost`.
struct Step {
    at_ms: u64,
    cost: u64,
}

fn steps(list: &[(u64, u64)]) -> Vec<Step> {
    list.iter()
        .map(|&(at_ms, cost)| Step { at_ms, cost })
        .collect()
}

/// The scenarios: windows of a request and its steps, covering each rule's admit, refusal,
/// wait and window-crossing arithmetic.
fn scenarios() -> Vec<(&'static str, Vec<Window>, Vec<Step>)> {
    let sliding = Algorithm::SlidingWindow;
    let fixed = Algorithm::FixedWindow;
    vec![
        (
            "sliding log, 3 per 10 s",
            vec![window("log", 3, 10_000, sliding)],
            steps(&[
                (0, 1),
                (4_000, 1),
                (6_000, 1),
                (7_000, 1),
                (10_000, 1),
                (10_001, 1),
            ]),
        ),
        (
            "sliding log with costs and a cost above the quantity",
            vec![window("log-cost", 5, 60_000, sliding)],
            steps(&[
                (0, 2),
                (1_000, 3),
                (2_000, 1),
                (3_000, 9),
                (61_000, 4),
                (61_500, 2),
            ]),
        ),
        (
            "weighted estimate, 2000 per 10 s",
            vec![window("estimate", 2_000, 10_000, sliding)],
            steps(&[
                (9_000, 1_500),
                (9_900, 600),
                (12_000, 600),
                (14_000, 700),
                (19_999, 3_000),
                (31_000, 1),
            ]),
        ),
        (
            "fixed window across a boundary",
            vec![window("fixed", 3, 2_000, fixed)],
            steps(&[
                (1_700, 1),
                (1_800, 1),
                (1_900, 1),
                (1_950, 1),
                (2_100, 2),
                (2_200, 2),
            ]),
        ),
        (
            "token bucket, 10 per s with a burst of 3",
            vec![window(
                "bucket",
                10,
                1_000,
                Algorithm::TokenBucket { burst: 3 },
            )],
            steps(&[
                (0, 1),
                (0, 1),
                (0, 1),
                (0, 1),
                (100, 1),
                (150, 2),
                (450, 2),
                (450, 5),
            ]),
        ),
        (
            "token bucket with a period that is not whole ms",
            vec![window(
                "bucket-odd",
                3,
                10_000,
                Algorithm::TokenBucket { burst: 2 },
            )],
            steps(&[(0, 1), (1, 1), (2, 1), (3_334, 1), (6_000, 1), (9_999, 1)]),
        ),
        (
            "two limits, all or nothing",
            vec![
                window("burst", 1, 10_000, sliding),
                window("daily", 3, 86_400_000, sliding),
            ],
            steps(&[
                (0, 1),
                (5_000, 1),
                (10_000, 1),
                (20_000, 1),
                (30_000, 1),
                (40_000, 1),
            ]),
        ),
    ]
}

#[tokio::test]
async fn same_scenarios_give_the_same_verdicts_on_memory_and_redis() {
    let prefix = "tollgate-test:parity:";
    delete_all(prefix).await;
    let redis = redis_store(prefix).await;
    redis.use_caller_clock();

    for (index, (name, windows, steps)) in scenarios().into_iter().enumerate() {
        let memory = MemoryStore::default();
        let who = client(index as u32);
        let mut outcomes = Vec::new();
        for (number, step) in steps.iter().enumerate() {
            let now = T0 + step.at_ms;
            let expected = MemoryStore::decide(&memory, who, &windows, step.cost, now);
            let actual = CounterStore::decide(&redis, who, &windows, step.cost, now)
                .await
                .expect("redis decides");
            assert_eq!(actual, expected, "{name}, step {number}");
            outcomes.push(actual.admitted);
        }
        // Each scenario both admits and refuses, so both paths are compared.
        assert!(
            outcomes.contains(&true) && outcomes.contains(&false),
            "{name}: {outcomes:?}"
        );
    }
    delete_all(prefix).await;
}

#[tokio::test]
async fn redis_time_decides_so_skewed_gateways_agree() {
    // Two gateways whose clocks are an hour apart: with Redis's clock they count as one.
    let prefix = "tollgate-test:skew:";
    delete_all(prefix).await;
    let (fast, slow) = (redis_store(prefix).await, redis_store(prefix).await);
    let limit = [window("skew", 3, 60_000, Algorithm::SlidingWindow)];
    let who = client(200);

    let mut seen = Vec::new();
    for (store, now_ms) in [
        (&fast, T0 + 3_600_000),
        (&slow, T0),
        (&fast, 1),
        (&slow, T0),
    ] {
        let verdict = store.decide(who, &limit, 1, now_ms).await.expect("decides");
        seen.push((verdict.admitted, verdict.states[0].remaining));
    }
    assert_eq!(seen, [(true, 2), (true, 1), (true, 0), (false, 0)]);
    delete_all(prefix).await;
}

#[tokio::test]
async fn keys_expire_within_their_window_and_hide_the_address() {
    let prefix = "tollgate-test:ttl:";
    delete_all(prefix).await;
    let store = redis_store(prefix).await;
    let windows = [
        window("w-log", 3, 2_000, Algorithm::SlidingWindow),
        window("w-fixed", 3, 2_000, Algorithm::FixedWindow),
        window("w-bucket", 3, 2_000, Algorithm::TokenBucket { burst: 3 }),
    ];
    let who = client(7);
    store.decide(who, &windows, 1, 0).await.expect("decides");

    let mut connection = connection().await;
    let keys = keys(prefix).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    let tag = format!("{{{}}}", hex::encode(who.as_bytes()));
    for key in &keys {
        assert!(key.contains(&tag), "{key} lacks the client hash tag");
        assert!(!key.contains("198.51.100"), "{key} holds an address");
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 2_000, "{key} has PTTL {ttl}");
    }
    delete_all(prefix).await;
}
