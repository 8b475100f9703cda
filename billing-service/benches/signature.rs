//! Cost of checking `Stripe-Signature` on a typical webhook: the paid
//! `checkout.session.completed` fixture as Stripe sends it, compact, about 3 KB.
//!
//! Run: `cargo bench -p billing-service --bench signature`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use billing_service::webhook::signature;
use criterion::{Criterion, Throughput};

const SECRET: &str = "whsec_benchmark_secret";
const TOLERANCE: Duration = Duration::from_secs(300);
const SIGNED_AT: i64 = 1_767_225_600;

/// The paid-session event fixture, re-serialised without whitespace as Stripe sends it.
fn typical_event() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/stripe/fixtures/event_checkout_session_completed.json");
    let text = std::fs::read(&path).unwrap_or_else(|error| {
        let path = path.display();
        panic!("shared reference data missing at {path} ({error}); it sits beside the repository")
    });
    let event: serde_json::Value = serde_json::from_slice(&text).expect("the fixture is JSON");
    serde_json::to_vec(&event).expect("serialises")
}

fn verification(c: &mut Criterion) {
    let body = typical_event();
    let genuine = signature::sign(SECRET, SIGNED_AT, &body);
    // Two v1 values, the matching one last, as during a secret roll.
    let rolling = format!(
        "{},v1={}",
        signature::sign("whsec_previous_secret", SIGNED_AT, &body),
        genuine.split_once(",v1=").map_or("", |(_, mac)| mac)
    );
    let forged = signature::sign("whsec_someone_else", SIGNED_AT, &body);

    let mut group = c.benchmark_group(format!("verify_{}_byte_event", body.len()));
    group.throughput(Throughput::Bytes(body.len() as u64));
    for (name, header) in [
        ("genuine", &genuine),
        ("rolling_secret", &rolling),
        ("forged", &forged),
    ] {
        let expected_ok = name != "forged";
        group.bench_function(name, |b| {
            b.iter(|| {
                let verdict = signature::verify(
                    Some(black_box(header.as_bytes())),
                    black_box(&body),
                    SECRET,
                    TOLERANCE,
                    SIGNED_AT + 10,
                );
                assert_eq!(verdict.is_ok(), expected_ok);
            });
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    verification(&mut criterion);
    criterion.final_summary();
}
