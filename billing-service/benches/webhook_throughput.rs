//! Paid webhooks verified and granted per second, end to end: signed deliveries over real
//! HTTP to a billing server running in this process, each a distinct `checkout.session
//! .completed` for a session billing has not seen, so every one writes a grant.
//!
//! Runs on a SQLite file always, and on Postgres when `TEST_POSTGRES_URL` is set; it says
//! which ran. Criterion reports the throughput as elements (deliveries) per second. The
//! client shares the machine and the runtime with the server, so the figure is a floor.
//!
//! Run: `cargo bench -p billing-service --bench webhook_throughput`.

// The test helpers, which allow their own unused items.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use billing_service::webhook::signature;
use common::{completed, unique, unix_now, Db, Options, TestServer, WEBHOOK_SECRET};
use criterion::{Criterion, Throughput};
use futures::StreamExt as _;

/// Deliveries per measured batch.
const BATCH: usize = 256;

/// Deliveries in flight at once, as Stripe sends several at a time.
const IN_FLIGHT: usize = 16;

/// A batch of distinct paid events, each with its `Stripe-Signature`, signed now.
fn signed_batch() -> Vec<(Vec<u8>, String)> {
    (0..BATCH)
        .map(|_| {
            let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
            let header = signature::sign(WEBHOOK_SECRET, unix_now(), &event);
            (event, header)
        })
        .collect()
}

/// Delivers the batch with [`IN_FLIGHT`] concurrent requests; every one must be granted.
async fn deliver(server: &TestServer, batch: &[(Vec<u8>, String)]) -> Duration {
    let started = Instant::now();
    let deliveries = futures::stream::iter(batch)
        .map(|(event, header)| server.deliver(event, Some(header)))
        .buffer_unordered(IN_FLIGHT);
    let statuses: Vec<reqwest::StatusCode> =
        deliveries.map(|response| response.status()).collect().await;
    let elapsed = started.elapsed();
    assert!(
        statuses.iter().all(|status| status.is_success()),
        "a delivery failed: {statuses:?}"
    );
    elapsed
}

fn throughput(c: &mut Criterion, runtime: &tokio::runtime::Runtime, db: Db, name: &str) {
    let server = runtime.block_on(TestServer::start(db, Options::default()));
    let mut group = c.benchmark_group("webhook_deliveries");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let batch = signed_batch();
                total += runtime.block_on(deliver(&server, &batch));
            }
            total
        });
    });
    group.finish();
    let granted = runtime.block_on(server.balance("42")) / 1_000;
    eprintln!("webhook_throughput: {name}: {granted} paid deliveries granted in total");
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");

    eprintln!("webhook_throughput: running on sqlite");
    throughput(&mut criterion, &runtime, Db::Sqlite, "sqlite");
    if common::postgres_admin_url().is_some() {
        eprintln!("webhook_throughput: running on postgres");
        throughput(&mut criterion, &runtime, Db::Postgres, "postgres");
    } else {
        eprintln!("webhook_throughput: postgres skipped, TEST_POSTGRES_URL is unset");
    }
    criterion.final_summary();
}
