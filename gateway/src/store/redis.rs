//! The Redis store: counters shared by every gateway on one Redis or Redis Cluster.
//!
//! One decision is one round trip: `redis.lua` runs the memory store's rules over all of a
//! request's windows atomically, on Redis's clock, and sets every key's expiry in the same call.
//! This module owns the connection, the calls' timeout and the circuit breaker; what a failed
//! decision means for the request is the limiter's failure policy, not ours.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{RedisResult, Script, ScriptInvocation};
use tokio::sync::Notify;

use super::{sliding, Algorithm, CounterStore, StoreError, Verdict, Window, WindowState};
use crate::identity::ClientKey;
use crate::metrics::Metrics;

/// The decision script; see its header for the arguments and the reply.
const DECISION_SCRIPT: &str = include_str!("redis.lua");

/// How long opening a connection (or a Cluster's set of connections) may take. Longer than a
/// call's timeout: it happens off the request path, in the supervisor.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle supervisor checks that its store still exists.
const SUPERVISOR_TICK: Duration = Duration::from_secs(1);

/// Numbers each store, so that a thread's connections are never mixed up between stores.
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's decision connection to each live store it has used. The gateway decides
    /// on the thread that accepted the request (each Pingora worker runs its own single-thread
    /// runtime), so a connection made here is driven by that same thread's event loop: a
    /// decision is a socket write and read, with no hand-off to another thread and back.
    /// The first decision of a thread connects; decisions that arrive meanwhile wait for
    /// that connection instead of opening their own.
    static THREAD_CONNECTIONS: RefCell<Vec<ThreadConnection>> = const { RefCell::new(Vec::new()) };
}

/// One thread's connection to one store, filled by the first decision that needs it.
struct ThreadConnection {
    store_id: u64,
    store: Weak<Shared>,
    /// The store's `outages` when the connection was made.
    made_after: u64,
    connection: Arc<tokio::sync::OnceCell<Connection>>,
}

/// Breaker states, as stored and as exported by `gateway_store_breaker_state`.
const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Which Redis to use.
#[derive(Clone, PartialEq)]
pub enum RedisTarget {
    /// One server, as a `redis://` (or `rediss://`) URL, which may name a database number.
    Standalone(String),
    /// Seed nodes of a Cluster, as URLs; the rest of the topology is discovered.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    /// URLs may hold a password, so only the kind and the number of nodes print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone(_) => f.write_str("Standalone(<url>)"),
            Self::Cluster(nodes) => write!(f, "Cluster({} nodes)", nodes.len()),
        }
    }
}

/// How the Redis store connects and when it gives up on Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisSettings {
    pub target: RedisTarget,
    /// Put before every key, so that several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// The longest a decision waits for Redis before the failure policy applies.
    pub timeout: Duration,
    /// Consecutive failed decisions that open the breaker; at least 1.
    pub breaker_failures: u32,
    /// How long an open breaker waits between probes of Redis.
    pub breaker_cooldown: Duration,
}

/// Counters in Redis, shared by every gateway that uses the same Redis and key prefix.
///
/// Keys look like `<prefix>{<client key in hex>}:<limit>:<window ms>:<kind>:<variant>`. The
/// client key is already an HMAC of the address, so no address reaches Redis, and the braces
/// make it a Cluster hash tag: all of one client's windows live in one slot, which is what lets
/// one script touch them all. A sliding log is a list of admission times, an estimate and a fixed
/// window are small hashes, a bucket is its arrival time as a string. Each key expires when its
/// counter would go idle: within one window (two for the weighted estimate, whose previous
/// window still counts), and every decision that touches a key sets its expiry again.
///
/// Every call is bounded by `timeout`. A circuit breaker counts consecutive failures; at
/// `breaker_failures` it opens and decisions fail at once, without calling Redis, so no request
/// waits on a Redis that is down. A supervisor task then probes Redis with `PING` every
/// `breaker_cooldown` (the breaker shows half-open meanwhile) and closes the breaker as soon as
/// one succeeds; it also makes the first connection, until which the breaker is open. Each
/// change between closed and open is logged once.
///
/// Each worker thread has its own multiplexed connection, made on its first decision:
/// concurrent decisions of the thread share it, pipelined, and its I/O runs on the thread's own
/// event loop. The script is called by its SHA-1 (`EVALSHA`), loaded once per server when Redis
/// answers `NOSCRIPT`. So a gateway holds one connection per worker thread, plus the
/// supervisor's (per node, on a Cluster).
/// A call that fails drops the thread's connection, and the thread's next decision connects
/// afresh: a connection whose runtime has gone, or that is otherwise stuck, is not kept.
///
/// Redis memory: `MEMORY USAGE` reports 280 bytes for a client's key of a sliding window of
/// quantity 3 holding one request (key name, list and expiry), so a million such clients take
/// roughly 300 MB.
pub struct RedisStore {
    shared: Arc<Shared>,
}

/// What the request path and the supervisor share.
struct Shared {
    /// This store's number among the process's stores (see `THREAD_CONNECTIONS`).
    id: u64,
    /// Outages the breaker has recovered from. A thread's connection made before the latest
    /// one is not trusted after it (Redis may have restarted under it) and is made afresh.
    outages: AtomicU64,
    settings: RedisSettings,
    /// The supervisor's connection, for probes. `None` until the supervisor first connects.
    /// Both kinds of connection reconnect by themselves after that, so the slot is filled once.
    /// Decisions use a connection of their own thread instead.
    connection: ArcSwapOption<Connection>,
    script: Script,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    /// Wakes the supervisor when the breaker opens.
    wake: Arc<Notify>,
    /// Whether "unreachable since start" has been logged; the breaker starts open, so no
    /// opening is logged for it.
    announced_unreachable: std::sync::atomic::AtomicBool,
    /// Tests set this to decide on the caller's `now_ms`, as the memory store does, so both
    /// stores can be driven by one fake clock. The gateway always uses Redis's clock.
    #[cfg(test)]
    caller_clock: std::sync::atomic::AtomicBool,
}

/// A multiplexed connection; clones share it.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Consecutive-failure circuit breaker.
struct Breaker {
    /// `CLOSED`, `OPEN` or `HALF_OPEN`.
    state: AtomicU8,
    /// Failed decisions since the last success; reset on success.
    failures: AtomicU32,
}

impl RedisStore {
    /// Starts the store and its supervisor thread, which connects in the background: until it
    /// has, decisions fail with [`StoreError::CircuitOpen`] and the store is not ready.
    pub fn start(settings: RedisSettings, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        metrics.store_breaker_state.set(i64::from(OPEN));
        let shared = Arc::new(Shared {
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            outages: AtomicU64::new(0),
            settings,
            connection: ArcSwapOption::empty(),
            script: Script::new(DECISION_SCRIPT),
            breaker: Breaker {
                state: AtomicU8::new(OPEN),
                failures: AtomicU32::new(0),
            },
            metrics,
            wake: Arc::new(Notify::new()),
            announced_unreachable: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            caller_clock: std::sync::atomic::AtomicBool::new(false),
        });

        // The supervisor and the connection's own I/O tasks run on a runtime of their own, so
        // the store works the same under Pingora's runtimes, a test's, or none at start.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("redis-store".into())
            .spawn(move || runtime.block_on(supervise(weak)))?;
        Ok(Self { shared })
    }
}

#[cfg(test)]
impl RedisStore {
    /// Decides on the caller's `now_ms` from now on, like the memory store.
    pub(super) fn use_caller_clock(&self) {
        self.shared.caller_clock.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn decide(
        &self,
        client: ClientKey,
        windows: &[Window],
        cost: u64,
        now_ms: u64,
    ) -> Result<Verdict, StoreError> {
        let shared = &self.shared;
        if !shared.breaker.is_closed() {
            return Err(StoreError::CircuitOpen);
        }
        if shared.connection.load().is_none() {
            return Err(StoreError::CircuitOpen);
        }

        let mut invocation = shared.script.prepare_invoke();
        let tag = hex::encode(client.as_bytes());
        for window in windows {
            invocation.key(key(&shared.settings.key_prefix, &tag, window));
        }
        invocation.arg(cost.max(1)).arg(clock(shared, now_ms));
        for window in windows {
            let (kind, burst) = kind_of(window);
            invocation
                .arg(kind)
                .arg(window.quantity)
                .arg(window.window_ms)
                .arg(burst);
        }

        let started = Instant::now();
        let timeout = shared.settings.timeout;
        let call = async {
            let mut connection = Shared::thread_connection(&self.shared).await?;
            let reply = connection.run(&invocation).await;
            if reply.is_err() {
                shared.forget_thread_connection();
            }
            reply
        };
        let reply = tokio::time::timeout(timeout, call).await;
        shared
            .metrics
            .store_latency
            .observe(started.elapsed().as_secs_f64());
        let verdict = match reply {
            Err(_) => Err(StoreError::Timeout(timeout)),
            Ok(Err(error)) => Err(StoreError::Redis(error)),
            Ok(Ok(values)) => verdict(&values, windows.len()),
        };
        match &verdict {
            Ok(_) => shared.breaker.succeeded(),
            Err(error) => {
                shared
                    .metrics
                    .store_errors
                    .with_label_values(&[error.kind()])
                    .inc();
                shared.failed();
            }
        }
        verdict
    }

    fn is_ready(&self) -> bool {
        self.shared.breaker.is_closed()
    }
}

impl Shared {
    /// Counts a failed decision; opens the breaker at the threshold.
    fn failed(&self) {
        let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.settings.breaker_failures.max(1) {
            return;
        }
        let opened = self
            .breaker
            .state
            .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if opened {
            self.metrics.store_breaker_state.set(i64::from(OPEN));
            tracing::warn!(
                store.failures = failures,
                store.cooldown_ms = self.settings.breaker_cooldown.as_millis() as u64,
                "redis store unavailable; limits follow their failure policy"
            );
            self.wake.notify_one();
        }
    }

    /// The calling thread's connection to this store, made on first use (within the decision's
    /// timeout). It reconnects by itself afterwards, like the supervisor's.
    async fn thread_connection(this: &Arc<Shared>) -> RedisResult<Connection> {
        let outages = this.outages.load(Ordering::Acquire);
        let cell = THREAD_CONNECTIONS.with_borrow_mut(|connections| {
            let current = connections
                .iter()
                .find(|entry| entry.store_id == this.id && entry.made_after == outages);
            if let Some(entry) = current {
                return entry.connection.clone();
            }
            // Connections of stores that are gone (a test's, say), or made before this store's
            // latest outage, are closed here.
            connections.retain(|entry| entry.store_id != this.id && entry.store.strong_count() > 0);
            let connection = Arc::new(tokio::sync::OnceCell::new());
            connections.push(ThreadConnection {
                store_id: this.id,
                store: Arc::downgrade(this),
                made_after: outages,
                connection: connection.clone(),
            });
            connection
        });
        cell.get_or_try_init(|| this.connect()).await.cloned()
    }

    fn forget_thread_connection(&self) {
        THREAD_CONNECTIONS.with_borrow_mut(|connections| {
            connections.retain(|entry| entry.store_id != self.id);
        });
    }

    /// Probes Redis once: connects if there is no connection yet, then `PING`s it.
    async fn probe(&self) -> Result<(), StoreError> {
        let connection = match self.connection.load_full() {
            Some(connection) => connection,
            None => {
                let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                    .await
                    .map_err(|_| StoreError::Timeout(CONNECT_TIMEOUT))??;
                let connection = Arc::new(connection);
                self.connection.store(Some(connection.clone()));
                connection
            }
        };
        let mut connection = Connection::clone(&connection);
        let timeout = self.settings.timeout.max(Duration::from_millis(100));
        tokio::time::timeout(timeout, connection.ping())
            .await
            .map_err(|_| StoreError::Timeout(timeout))??;
        Ok(())
    }

    async fn connect(&self) -> RedisResult<Connection> {
        match &self.settings.target {
            RedisTarget::Standalone(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_number_of_retries(1);
                let manager = ConnectionManager::new_with_config(client, config).await?;
                Ok(Connection::Standalone(manager))
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .retries(1)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Closes the breaker after a successful probe.
    fn recovered(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
        // Before the breaker closes, so that no decision after it uses an older connection.
        self.outages.fetch_add(1, Ordering::AcqRel);
        let previous = self.breaker.state.swap(CLOSED, Ordering::AcqRel);
        self.metrics.store_breaker_state.set(i64::from(CLOSED));
        if previous != CLOSED {
            tracing::info!("redis store available; shared limits enforced");
        }
    }
}

/// Keeps the connection up and the breaker honest, until the store is dropped.
async fn supervise(store: Weak<Shared>) {
    loop {
        let Some(shared) = store.upgrade() else {
            return;
        };
        if shared.breaker.is_closed() {
            let wake = shared.wake.clone();
            drop(shared);
            let _ = tokio::time::timeout(SUPERVISOR_TICK, wake.notified()).await;
            continue;
        }

        shared.breaker.state.store(HALF_OPEN, Ordering::Release);
        shared.metrics.store_breaker_state.set(i64::from(HALF_OPEN));
        let cooldown = shared.settings.breaker_cooldown;
        match shared.probe().await {
            Ok(()) => shared.recovered(),
            Err(error) => {
                shared.breaker.state.store(OPEN, Ordering::Release);
                shared.metrics.store_breaker_state.set(i64::from(OPEN));
                shared
                    .metrics
                    .store_errors
                    .with_label_values(&[error.kind()])
                    .inc();
                let never_connected = shared.connection.load().is_none();
                if never_connected && !shared.announced_unreachable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        store.error = %error,
                        "redis store unreachable since start; limits follow their failure policy"
                    );
                }
                tracing::debug!(store.error = %error, "redis probe failed");
                drop(shared);
                tokio::time::sleep(cooldown).await;
            }
        }
    }
}

impl Breaker {
    fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    fn succeeded(&self) {
        // Most decisions succeed after a success; skip the write to keep the line shared.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }
}

impl Connection {
    async fn run(&mut self, invocation: &ScriptInvocation<'_>) -> RedisResult<Vec<i64>> {
        match self {
            Self::Standalone(manager) => invocation.invoke_async(manager).await,
            Self::Cluster(cluster) => invocation.invoke_async(cluster).await,
        }
    }

    async fn ping(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Self::Standalone(manager) => ping.query_async(manager).await,
            Self::Cluster(cluster) => ping.query_async(cluster).await,
        }
    }
}

/// The time argument of the script: 0 for Redis's own clock.
#[cfg(not(test))]
fn clock(_shared: &Shared, _now_ms: u64) -> u64 {
    0
}

#[cfg(test)]
fn clock(shared: &Shared, now_ms: u64) -> u64 {
    if shared.caller_clock.load(Ordering::Relaxed) {
        now_ms.max(1)
    } else {
        0
    }
}

/// The Redis key of `window`'s counter for the client whose key is `tag` in hex.
///
/// The kind is part of the key, so a reload that moves a sliding window's quantity across
/// [`super::SLIDING_LOG_MAX_QUANTITY`] starts that limit's count afresh.
// Limitation: the memory store converts a log to an estimate (and back) on such a reload and
// keeps the count; here the old key simply expires, so each client gets a fresh window once.
fn key(prefix: &str, tag: &str, window: &Window) -> String {
    let (kind, _) = kind_of(window);
    format!(
        "{prefix}{{{tag}}}:{}:{}:{kind}:{}",
        window.name, window.window_ms, window.variant
    )
}

/// The script's name for a window's rule, and its burst (1 for rules without one).
fn kind_of(window: &Window) -> (&'static str, u64) {
    match window.algorithm {
        Algorithm::SlidingWindow if sliding::is_exact(window.quantity) => ("log", 1),
        Algorithm::SlidingWindow => ("estimate", 1),
        Algorithm::FixedWindow => ("fixed", 1),
        Algorithm::TokenBucket { burst } => ("bucket", burst),
    }
}

/// Reads the script's reply: `admitted`, then `admits, remaining, reset_ms` per window.
fn verdict(values: &[i64], windows: usize) -> Result<Verdict, StoreError> {
    let Some((&admitted, states)) = values.split_first() else {
        return Err(StoreError::Reply);
    };
    if states.len() != windows * 3 {
        return Err(StoreError::Reply);
    }
    let number = |value: i64| u64::try_from(value).map_err(|_| StoreError::Reply);
    let states = states
        .chunks_exact(3)
        .map(|state| {
            Ok(WindowState {
                admits: state[0] == 1,
                remaining: number(state[1])?,
                reset_ms: number(state[2])?.max(1),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Verdict {
        admitted: admitted == 1,
        untracked: false,
        states,
    })
}
