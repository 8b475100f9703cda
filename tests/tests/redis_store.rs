//! Shared limits on Redis end to end: the same answers as memory, one quota across gateways, a
//! three-node Cluster, failure policies while Redis is frozen and recovery after, key expiry,
//! and one round trip per decision. Uses the Redis on 127.0.0.1:6379 (databases 10 and 11,
//! with a key prefix per test) and redis-server processes that the tests start and kill.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    client_from, header_values, redis_cli, redis_cluster, repo_root, RedisServer, Stack,
    StackOptions,
};
use futures_util::stream::{self, StreamExt};

const SHARED_PORT: u16 = 6379;

fn shipped() -> String {
    std::fs::read_to_string(repo_root().join("config/gateway.toml")).unwrap()
}

/// The shipped file with `store` lines added to `[store]` and `extra` appended.
fn config(store: &str, extra: &str) -> String {
    let shipped = shipped().replace("[store]\n", &format!("[store]\n{store}\n"));
    format!("{shipped}\n{extra}\n")
}

/// A key prefix unique to this test run and `test`.
fn prefix(test: &str) -> String {
    format!("tollgate-e2e:{}:{test}:", std::process::id())
}

async fn start(config: String, env: Vec<(&str, String)>) -> Stack {
    let stack = Stack::start(StackOptions {
        gateway_config: Some(config),
        env: env
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
        capture_gateway_log: true,
        ..StackOptions::default()
    })
    .await;
    stack.wait_ready(Duration::from_secs(10)).await;
    stack
}

/// Keys under `prefix` in database `db` of the Redis on `port`.
fn keys(port: u16, db: u32, prefix: &str) -> Vec<String> {
    let pattern = format!("{prefix}*");
    let listed = redis_cli(
        port,
        &["-n", &db.to_string(), "--scan", "--pattern", &pattern],
    );
    listed.lines().map(str::to_owned).collect()
}

fn delete_keys(port: u16, db: u32, prefix: &str) {
    for key in keys(port, db, prefix) {
        redis_cli(port, &["-n", &db.to_string(), "DEL", &key]);
    }
}

fn header(response: &reqwest::Response, name: &str) -> String {
    header_values(response, name).join("|")
}

/// Status and every rate-limit header of a response, for comparing stores.
fn summary(response: &reqwest::Response) -> Vec<String> {
    let mut seen = vec![response.status().as_str().to_owned()];
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit-policy",
        "ratelimit",
        "retry-after",
    ] {
        seen.push(format!("{name}: {}", header(response, name)));
    }
    seen
}

const TWO_LIMITS: &str = r#"
[[limits]]
name = "generate-bucket"
methods = ["POST"]
path = "/api/v1/generate"
quantity = 2
window_secs = 60
algorithm = "token_bucket"
burst = 2
"#;

#[tokio::test]
async fn memory_and_redis_send_the_same_statuses_and_headers() {
    let prefix = prefix("parity");
    let memory = start(config("", TWO_LIMITS), vec![]).await;
    let redis_env = vec![("REDIS_URL", "redis://127.0.0.1:6379/10".to_owned())];
    let store = format!("key_prefix = \"{prefix}\"");
    let redis = start(config(&store, TWO_LIMITS), redis_env).await;

    let client = client_from([127, 0, 60, 1]);
    for attempt in 0..4 {
        let on_memory = client.post(memory.url("/api/v1/generate")).send().await;
        let on_redis = client.post(redis.url("/api/v1/generate")).send().await;
        let (on_memory, on_redis) = (on_memory.unwrap(), on_redis.unwrap());
        assert_eq!(summary(&on_redis), summary(&on_memory), "request {attempt}");
    }
    delete_keys(SHARED_PORT, 10, &prefix);
}

#[tokio::test]
async fn two_gateways_on_one_redis_admit_exactly_the_quota() {
    let prefix = prefix("two-gateways");
    let env = || {
        vec![
            ("REDIS_URL", "redis://127.0.0.1:6379/10".to_owned()),
            ("ANONYMOUS_DAILY_LIMIT", "20".to_owned()),
        ]
    };
    let store = format!("key_prefix = \"{prefix}\"");
    let first = start(config(&store, ""), env()).await;
    let second = start(config(&store, ""), env()).await;
    let urls = [
        first.url("/api/v1/generate"),
        second.url("/api/v1/generate"),
    ];

    // 20 connections from one address, half to each gateway, 10 requests each.
    let outcomes: Vec<(u16, Option<u64>)> = stream::iter(0..20)
        .map(|connection| {
            let url = urls[connection % 2].clone();
            async move {
                let client = client_from([127, 0, 61, 1]);
                let mut outcomes = Vec::new();
                for _ in 0..10 {
                    let response = client.post(&url).send().await.unwrap();
                    let remaining = header(&response, "x-ratelimit-remaining").parse().ok();
                    outcomes.push((response.status().as_u16(), remaining));
                }
                outcomes
            }
        })
        .buffer_unordered(20)
        .flat_map(stream::iter)
        .collect()
        .await;

    let admitted: Vec<u64> = outcomes
        .iter()
        .filter(|(status, _)| *status == 200)
        .filter_map(|(_, remaining)| *remaining)
        .collect();
    let refused = outcomes.iter().filter(|(status, _)| *status == 429).count();
    assert_eq!((outcomes.len(), admitted.len(), refused), (200, 20, 180));
    let mut remaining = admitted;
    remaining.sort_unstable();
    assert_eq!(remaining, (0..20).collect::<Vec<u64>>());
    delete_keys(SHARED_PORT, 10, &prefix);
}

const HOURLY: &str = r#"
[[limits]]
name = "generate-hourly"
methods = ["POST"]
path = "/api/v1/generate"
quantity = 5
window_secs = 3600
"#;

#[tokio::test]
async fn a_three_node_cluster_enforces_two_limits_without_crossing_slots() {
    let nodes = redis_cluster();
    let urls: Vec<String> = nodes
        .iter()
        .map(|node| format!("\"{}\"", node.url()))
        .collect();
    let store = format!("cluster_nodes = [{}]", urls.join(", "));
    let stack = start(config(&store, HOURLY), vec![]).await;

    let client = client_from([127, 0, 62, 1]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let response = client
            .post(stack.url("/api/v1/generate"))
            .send()
            .await
            .unwrap();
        seen.push((response.status().as_u16(), header(&response, "ratelimit")));
    }
    let expected = |r: u64, hourly: u64| {
        format!("\"anonymous-generate\";r={r};t=86400, \"generate-hourly\";r={hourly};t=3600")
    };
    assert_eq!(
        seen,
        [
            (200, expected(2, 4)),
            (200, expected(1, 3)),
            (200, expected(0, 2)),
            (429, expected(0, 2)),
        ]
    );
    let errors = stack
        .metric("gateway_store_errors_total{kind=\"server\"}")
        .await;
    assert_eq!(errors, 0.0, "a CROSSSLOT or other server error was counted");

    // Both of the client's keys sit on one node: they share a hash slot.
    let holding: Vec<usize> = nodes
        .iter()
        .map(|node| {
            node.cli(&["--scan", "--pattern", "tollgate:*"])
                .lines()
                .count()
        })
        .collect();
    let mut sorted = holding.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 0, 2], "keys per node: {holding:?}");
}

const POLICIES: &str = r#"
[[limits]]
name = "fail-open"
methods = ["POST"]
path = "/api/v1/allow"
quantity = 3
window_secs = 60
on_store_failure = "allow"

[[limits]]
name = "fail-closed"
methods = ["POST"]
path = "/api/v1/deny"
quantity = 3
window_secs = 60
on_store_failure = "deny"

[[limits]]
name = "fail-local"
methods = ["POST"]
path = "/api/v1/local"
quantity = 3
window_secs = 60
on_store_failure = "local"
"#;

#[tokio::test]
async fn a_frozen_redis_follows_each_policy_and_recovery_needs_no_restart() {
    let redis = RedisServer::start();
    let store = "timeout_ms = 50\nbreaker_failures = 3\nbreaker_cooldown_ms = 500";
    let env = vec![("REDIS_URL", redis.url()), ("RUST_LOG", "info".to_owned())];
    let stack = start(config(store, POLICIES), env).await;
    let post = |client: &reqwest::Client, path: &str| client.post(stack.url(path)).send();

    let before = post(&client_from([127, 0, 63, 1]), "/api/v1/allow")
        .await
        .unwrap();
    assert_eq!(header(&before, "x-ratelimit-remaining"), "2");
    redis.freeze();

    // allow: every request passes, none waits longer than the timeout and a margin, and once the
    // breaker has opened none waits at all. No numbers are sent that the gateway did not compute.
    let open_client = client_from([127, 0, 63, 2]);
    let mut waits = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        let response = post(&open_client, "/api/v1/allow").await.unwrap();
        waits.push(started.elapsed());
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-remaining"), "");
        assert_eq!(header(&response, "ratelimit"), "");
    }
    println!("latencies with redis frozen: {waits:?}");
    let slowest = waits.iter().max().unwrap();
    assert!(*slowest < Duration::from_millis(50 + 100), "{waits:?}");
    let after_open = waits[3..].iter().max().unwrap();
    assert!(*after_open < Duration::from_millis(25), "{waits:?}");

    // deny: 503 with a problem body, never 429 or 500.
    let denied = post(&client_from([127, 0, 63, 3]), "/api/v1/deny")
        .await
        .unwrap();
    assert_eq!(denied.status(), 503);
    assert_eq!(header(&denied, "content-type"), "application/problem+json");

    // local: the limit still holds on this instance.
    let local = client_from([127, 0, 63, 4]);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            post(&local, "/api/v1/local")
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);

    let readyz = reqwest::get(stack.admin_url("/readyz")).await.unwrap();
    let healthz = reqwest::get(stack.admin_url("/healthz")).await.unwrap();
    assert_eq!(
        (readyz.status().as_u16(), healthz.status().as_u16()),
        (503, 200)
    );
    assert_ne!(stack.metric("gateway_store_breaker_state").await, 0.0);
    assert!(
        stack
            .metric("gateway_store_errors_total{kind=\"timeout\"}")
            .await
            >= 3.0
    );
    assert!(
        stack
            .metric("gateway_store_fallbacks_total{policy=\"deny\"}")
            .await
            >= 1.0
    );

    // Redis comes back: shared counting resumes by itself.
    redis.thaw();
    stack.wait_ready(Duration::from_secs(5)).await;
    assert_eq!(stack.metric("gateway_store_breaker_state").await, 0.0);
    let fresh = client_from([127, 0, 63, 5]);
    let mut remaining = Vec::new();
    for _ in 0..2 {
        let response = post(&fresh, "/api/v1/allow").await.unwrap();
        remaining.push(header(&response, "x-ratelimit-remaining"));
    }
    assert_eq!(remaining, ["2", "1"]);

    // One line per change: unavailable once; available at the first connection and on recovery.
    let log = stack.gateway_log();
    assert_eq!(log.matches("redis store unavailable").count(), 1, "{log}");
    assert_eq!(log.matches("redis store available").count(), 2, "{log}");
}

const SHORT: &str = r#"
[[limits]]
name = "short"
methods = ["POST"]
path = "/api/v1/short"
quantity = 3
window_secs = 2
"#;

#[tokio::test]
async fn keys_expire_within_their_window_and_hold_no_address() {
    let prefix = prefix("expiry");
    let env = vec![("REDIS_URL", "redis://127.0.0.1:6379/11".to_owned())];
    let stack = start(config(&format!("key_prefix = \"{prefix}\""), SHORT), env).await;
    let url = stack.url("/api/v1/short");

    // 1,000 distinct client addresses, one request each.
    let addresses: Vec<[u8; 4]> = (0..1000u32)
        .map(|n| [127, 1, (n / 250) as u8, (n % 250 + 1) as u8])
        .collect();
    let statuses: Vec<u16> = stream::iter(addresses)
        .map(|address| {
            let url = url.clone();
            async move {
                let response = client_from(address).post(url).send().await.unwrap();
                response.status().as_u16()
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(statuses.iter().all(|&status| status == 200));

    // One key per client, each expiring within the 2 s window, none naming an address.
    let survey = "local ks = redis.call('KEYS', ARGV[1]) local low, high = 1e18, -2 \
         for _, k in ipairs(ks) do local t = redis.call('PTTL', k) \
         if t < low then low = t end if t > high then high = t end end \
         return {#ks, low, high}";
    let pattern = format!("{prefix}*");
    let answer = redis_cli(SHARED_PORT, &["-n", "11", "EVAL", survey, "0", &pattern]);
    let numbers: Vec<i64> = answer
        .lines()
        .filter_map(|line| line.parse().ok())
        .collect();
    let [count, low, high] = numbers[..] else {
        panic!("survey answered {answer:?}");
    };
    assert_eq!(count, 1000);
    assert!(low > 0 && high <= 2000, "PTTL from {low} to {high}");
    let listed = keys(SHARED_PORT, 11, &prefix);
    assert!(
        listed.iter().all(|key| !key.contains("127.")),
        "a key holds an address"
    );
    let usage = redis_cli(SHARED_PORT, &["-n", "11", "MEMORY", "USAGE", &listed[0]]);
    println!("redis memory for one client's key: {} bytes", usage.trim());

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        keys(SHARED_PORT, 11, &prefix).len(),
        0,
        "keys outlived their window"
    );

    // A key that lost its TTL gets it back on the next decision, which counts what it holds.
    let client = client_from([127, 0, 64, 1]);
    for _ in 0..2 {
        assert_eq!(client.post(&url).send().await.unwrap().status(), 200);
    }
    let key = keys(SHARED_PORT, 11, &prefix)
        .pop()
        .expect("the client's key");
    redis_cli(SHARED_PORT, &["-n", "11", "PERSIST", &key]);
    assert_eq!(
        redis_cli(SHARED_PORT, &["-n", "11", "PTTL", &key]).trim(),
        "-1"
    );
    let third = client.post(&url).send().await.unwrap();
    assert_eq!(header(&third, "x-ratelimit-remaining"), "0");
    let ttl: i64 = redis_cli(SHARED_PORT, &["-n", "11", "PTTL", &key])
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= 2000, "PTTL {ttl}");
    assert_eq!(client.post(&url).send().await.unwrap().status(), 429);
    delete_keys(SHARED_PORT, 11, &prefix);
}

const ROOMY: &str = r#"
[[limits]]
name = "roomy"
methods = ["POST"]
path = "/api/v1/roomy"
quantity = 1000
window_secs = 60
"#;

#[tokio::test]
async fn one_decision_is_one_redis_round_trip() {
    let redis = RedisServer::start();
    let stack = start(config("", ROOMY), vec![("REDIS_URL", redis.url())]).await;
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let mut monitor = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "MONITOR"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = client_from([127, 0, 65, 1]);
    for _ in 0..25 {
        assert_eq!(
            client
                .post(stack.url("/api/v1/roomy"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    // Neither an unlimited path nor the health path touches the store.
    client.get(stack.url("/other")).send().await.unwrap();
    client.get(stack.url("/healthz")).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    monitor.kill().unwrap();
    let output = monitor.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);

    // What clients sent, leaving out what the script ran inside Redis ("lua").
    let sent: Vec<String> = text
        .lines()
        .filter(|line| line.contains(" [") && !line.contains(" lua]"))
        .filter_map(|line| line.split('"').nth(1).map(str::to_ascii_lowercase))
        .collect();
    let evalsha = sent.iter().filter(|command| *command == "evalsha").count();
    let loads = sent.iter().filter(|command| *command == "script").count();
    assert!(loads <= 1, "{sent:?}");
    assert_eq!(
        evalsha,
        25 + loads,
        "one evalsha per decision (a retry after loading)"
    );
    assert_eq!(
        sent.len(),
        evalsha + loads,
        "other commands were sent: {sent:?}"
    );

    let stats = redis.cli(&["INFO", "commandstats"]);
    let line = stats
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
        .expect("evalsha was counted");
    println!("{line}");
    assert!(line.contains(&format!("calls={},", 25 + loads)), "{line}");
}

/// Redis's count of connections accepted since it started.
fn connections_received(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "stats"]);
    let line = stats
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .expect("INFO stats has total_connections_received");
    line.trim().parse().unwrap()
}

#[tokio::test]
async fn a_burst_on_a_fresh_gateway_opens_one_connection_per_worker_thread() {
    let redis = RedisServer::start();
    let stack = start(config("", ROOMY), vec![("REDIS_URL", redis.url())]).await;
    let before = connections_received(&redis);

    // 100 concurrent first decisions: each worker thread connects once, and the decisions that
    // arrive while it does wait for that connection rather than opening their own.
    let statuses = burst(&stack, "/api/v1/roomy", 66, 100).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");

    // This reading's own connection is the one more.
    let opened = connections_received(&redis) - before - 1;
    let threads = 2; // config/gateway.toml
    assert!(
        (1..=threads).contains(&opened),
        "{opened} connections for 100 decisions"
    );
}

/// Statuses of `count` concurrent POSTs to `path`, each from its own address 127.0.`net`.n.
async fn burst(stack: &Stack, path: &str, net: u8, count: u8) -> Vec<u16> {
    stream::iter(0..count)
        .map(|n| {
            let client = client_from([127, 0, net, n]);
            let url = stack.url(path);
            async move { client.post(url).send().await.unwrap().status().as_u16() }
        })
        .buffer_unordered(usize::from(count))
        .collect()
        .await
}

#[tokio::test]
async fn after_redis_restarts_no_decision_fails_on_a_connection_from_before() {
    let mut redis = RedisServer::start();
    let store = "timeout_ms = 50\nbreaker_failures = 3\nbreaker_cooldown_ms = 200";
    let stack = start(config(store, POLICIES), vec![("REDIS_URL", redis.url())]).await;
    // Both worker threads hold a connection.
    assert!(burst(&stack, "/api/v1/deny", 67, 20)
        .await
        .iter()
        .all(|s| *s == 200));

    // Redis dies: decisions fail, the breaker opens, `deny` answers 503. The failures come
    // over one keep-alive connection, so one worker thread sees them and the other keeps the
    // connection it made before. Then an empty Redis starts on the same port.
    redis.kill();
    let one = client_from([127, 0, 68, 1]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stack.metric("gateway_store_breaker_state").await == 0.0 {
        assert!(Instant::now() < deadline, "the breaker never opened");
        let response = one.post(stack.url("/api/v1/deny")).send().await.unwrap();
        assert_eq!(response.status(), 503);
    }
    redis.start_again();

    // Once the breaker closes, every decision is Redis's again: none fails on a connection
    // that a worker thread made before the restart.
    stack.wait_ready(Duration::from_secs(5)).await;
    let statuses = burst(&stack, "/api/v1/deny", 69, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}
