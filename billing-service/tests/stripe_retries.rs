//! How billing's Stripe client retries, seen through `POST /api/v1/stripe/checkout` and a
//! stand-in that fails on command: which failures are retried, that every attempt carries
//! the same `Idempotency-Key` and body, how long a checkout may take, and what the buyer and
//! the purchase record are left with.
//!
//! The shipped config allows 2 retries (3 attempts) with a back-off of 250 ms doubling per
//! retry plus up to 50 % jitter.

mod common;

use std::time::{Duration, Instant};

use common::stripe::Fault;
use common::{unix_now, Db, Options, StripeStandIn, TestServer};
use reqwest::StatusCode;
use serde_json::Value;

both_backends!(
    server_error_then_success_reuses_the_key_and_opens_one_session,
    conflict_then_success_is_retried_with_the_same_key,
    rate_limit_is_backed_off_then_retried,
    server_errors_beyond_max_retries_are_502_and_the_purchase_fails,
    stripe_slower_than_the_timeout_is_503_within_a_bounded_time,
    one_answer_slower_than_the_timeout_is_retried_into_the_same_session,
    stripe_refusal_is_502_and_not_retried,
    should_retry_false_is_not_retried,
    unreachable_stripe_is_503,
    second_checkout_post_opens_a_second_purchase,
    stripe_clock_a_second_off_still_accepts_the_expiry,
);

/// Shortest pause before the first retry (the client's `FIRST_BACKOFF`).
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Request timeout given to billing in the slow-Stripe tests.
const SHORT_TIMEOUT: Duration = Duration::from_millis(500);

async fn server_with(db: Db, stripe: &StripeStandIn, timeout: Option<Duration>) -> TestServer {
    let options = Options {
        stripe_request_timeout: timeout,
        ..Options::with_stripe(stripe)
    };
    TestServer::start(db, options).await
}

/// Asserts that every request the stand-in saw is the same attempt: one non-empty
/// `Idempotency-Key` and one body (so `expires_at` was not recomputed between attempts).
#[track_caller]
fn assert_one_attempt_repeated(stripe: &StripeStandIn, attempts: usize) {
    let requests = stripe.requests();
    assert_eq!(requests.len(), attempts, "requests seen by Stripe");
    let key = requests[0].header("idempotency-key");
    assert!(key.starts_with("checkout_pur_"), "{key}");
    for request in &requests {
        assert_eq!(request.header("idempotency-key"), key);
        assert_eq!(request.body, requests[0].body);
    }
}

/// Reads a checkout answer, asserting it is a problem document with `status`.
async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers()["content-type"].to_str().expect("ASCII");
    assert_eq!(content_type, "application/problem+json");
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["status"], status.as_u16());
    problem
}

async fn server_error_then_success_reuses_the_key_and_opens_one_session(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    stripe.fail_next(1, Fault::retryable(500));

    let response = server.request_checkout("42", "starter").await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("JSON");

    assert_one_attempt_repeated(&stripe, 2);
    assert_eq!(stripe.sessions_created(), 1);
    assert!(answer["session_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("cs_test_")));
    assert_eq!(server.purchase_statuses("42").await, ["open"]);
}

async fn conflict_then_success_is_retried_with_the_same_key(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    stripe.fail_next(1, Fault::retryable(409));

    let response = server.request_checkout("42", "starter").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_one_attempt_repeated(&stripe, 2);
    assert_eq!(stripe.sessions_created(), 1);
    assert_eq!(server.purchase_statuses("42").await, ["open"]);
}

async fn rate_limit_is_backed_off_then_retried(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    stripe.fail_next(2, Fault::retryable(429));

    let response = server.request_checkout("42", "starter").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_one_attempt_repeated(&stripe, 3);

    // The pause doubles: at least 250 ms before the first retry, 500 ms before the second.
    let requests = stripe.requests();
    let pause = |index: usize| requests[index].received - requests[index - 1].received;
    assert!(pause(1) >= FIRST_BACKOFF, "{:?}", pause(1));
    assert!(pause(2) >= FIRST_BACKOFF * 2, "{:?}", pause(2));
}

async fn server_errors_beyond_max_retries_are_502_and_the_purchase_fails(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    stripe.fail_next(4, Fault::retryable(500));

    let response = server.request_checkout("42", "starter").await;
    let problem = problem(response, StatusCode::BAD_GATEWAY).await;
    assert_eq!(
        problem["type"],
        "urn:tollgate:problem:payment-provider-error"
    );
    assert!(!problem.to_string().contains("api_error"), "{problem}");

    assert_one_attempt_repeated(&stripe, 3);
    assert_eq!(stripe.sessions_created(), 0);
    assert_eq!(server.purchase_statuses("42").await, ["failed"]);
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_checkout_requests_total{outcome="stripe_rejected"} 1"#));
}

async fn stripe_slower_than_the_timeout_is_503_within_a_bounded_time(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, Some(SHORT_TIMEOUT)).await;
    stripe.fail_next(3, Fault::Hang(SHORT_TIMEOUT * 3));

    let started = Instant::now();
    let response = server.request_checkout("42", "starter").await;
    let elapsed = started.elapsed();
    let problem = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        problem["type"],
        "urn:tollgate:problem:payment-provider-error"
    );

    // Three attempts of 500 ms, and pauses of at most 375 ms and 750 ms between them.
    assert!(elapsed >= SHORT_TIMEOUT * 3, "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(3_000 + 1_000),
        "{elapsed:?}"
    );
    assert_one_attempt_repeated(&stripe, 3);
    assert_eq!(server.purchase_statuses("42").await, ["failed"]);

    // Stripe finishes the work nobody waited for, once, thanks to the shared key. The
    // buyer never saw its URL, so the session simply expires unpaid.
    stripe.settle().await;
    assert_eq!(stripe.sessions_created(), 1);
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
}

async fn one_answer_slower_than_the_timeout_is_retried_into_the_same_session(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, Some(SHORT_TIMEOUT)).await;
    stripe.fail_next(1, Fault::Hang(SHORT_TIMEOUT * 4));

    let response = server.request_checkout("42", "starter").await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("JSON");
    assert_one_attempt_repeated(&stripe, 2);

    // The first attempt, finishing late, is answered with the retry's session.
    stripe.settle().await;
    assert_eq!(stripe.sessions_created(), 1);
    assert!(answer["session_id"].is_string());
    assert_eq!(server.purchase_statuses("42").await, ["open"]);
}

async fn stripe_refusal_is_502_and_not_retried(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    // A Stripe clock an hour behind ours puts our 24 h expires_at beyond its 24 h limit: a
    // genuine validation refusal, which no retry can fix.
    stripe.advance_clock(-3_600);

    let response = server.request_checkout("42", "starter").await;
    let problem = problem(response, StatusCode::BAD_GATEWAY).await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(!detail.contains("expires_at"), "{detail}");

    assert_eq!(stripe.requests().len(), 1, "a 400 is not retried");
    assert_eq!(server.purchase_statuses("42").await, ["failed"]);
}

async fn should_retry_false_is_not_retried(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = server_with(db, &stripe, None).await;
    let refusal = Fault::Status {
        status: 500,
        should_retry: false,
    };
    stripe.fail_next(1, refusal);

    let response = server.request_checkout("42", "starter").await;
    problem(response, StatusCode::BAD_GATEWAY).await;
    assert_eq!(stripe.requests().len(), 1);
    assert_eq!(server.purchase_statuses("42").await, ["failed"]);
}

async fn unreachable_stripe_is_503(db: Db) {
    // The default test API base has nothing listening; connection errors are retried.
    let server = TestServer::start(db, Options::default()).await;
    let response = server.request_checkout("42", "starter").await;
    problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(server.purchase_statuses("42").await, ["failed"]);
}

/// The API takes no idempotency key from its client, so a client that re-sends a checkout
/// (after a timeout, or a double click) gets a second, independent session. Only a paid
/// session grants, so this cannot grant twice for one payment.
async fn second_checkout_post_opens_a_second_purchase(db: Db) {
    let (server, stripe) = TestServer::start_with_stripe(db).await;

    let first = server.checkout("42", "pro").await;
    let second = server.checkout("42", "pro").await;
    assert_ne!(first, second);

    let requests = stripe.requests();
    assert_eq!(requests.len(), 2);
    assert_ne!(
        requests[0].header("idempotency-key"),
        requests[1].header("idempotency-key")
    );
    assert_eq!(stripe.sessions_created(), 2);
    assert_eq!(server.purchase_statuses("42").await, ["open", "open"]);
}

/// Stripe measures `expires_at` from when the request reaches it, on its own clock, and a
/// retry must resend the same body. Billing keeps inside the window so that neither a
/// slightly different clock nor the time spent retrying turns a checkout into a refusal.
async fn stripe_clock_a_second_off_still_accepts_the_expiry(db: Db) {
    for skew in [-1, 1] {
        let stripe = StripeStandIn::start().await;
        let server = server_with(db, &stripe, None).await;
        stripe.advance_clock(skew);
        let before = unix_now();
        let response = server.request_checkout("42", "starter").await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "Stripe clock off by {skew} s"
        );

        let answer: Value = response.json().await.expect("JSON");
        let expires_at = answer["expires_at"].as_i64().expect("an integer");
        assert!(expires_at - before <= 24 * 3_600 - 60, "{expires_at}");
        assert!(expires_at - unix_now() >= 23 * 3_600, "{expires_at}");
    }
}
