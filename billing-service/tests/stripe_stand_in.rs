//! The Stripe stand-in itself answers as Stripe does, so that the checkout and retry tests
//! built on it prove something about the real API. No database is involved.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::stripe::{Fault, EXPIRES_AT_MAX_SECS, EXPIRES_AT_MIN_SECS, REQUIRED};
use common::{read_shared, StripeStandIn};
use reqwest::StatusCode;
use serde_json::Value;

/// stripe-python's captured form with `expires_at` set to `expires_at` (the captured value
/// is a fixed date, long past) and each `(field, value)` edit applied; `None` removes it.
fn captured_form(expires_at: i64, edits: &[(&str, Option<&str>)]) -> String {
    let capture: Value =
        serde_json::from_slice(&read_shared("stripe/checkout_request.json")).expect("JSON");
    let body = capture["request"]["body"].as_str().expect("body is text");
    let mut form: Vec<(String, String)> = serde_urlencoded::from_str(body).expect("a form");
    let expires_at = expires_at.to_string();
    let edits = std::iter::once(("expires_at", Some(expires_at.as_str()))).chain(edits.to_vec());
    for (name, value) in edits {
        let position = form.iter().position(|(key, _)| key == name);
        match (position, value) {
            (Some(index), Some(value)) => form[index].1 = value.to_owned(),
            (Some(index), None) => {
                form.remove(index);
            }
            (None, Some(value)) => form.push((name.to_owned(), value.to_owned())),
            (None, None) => {}
        }
    }
    serde_urlencoded::to_string(&form).expect("encodes")
}

/// Posts `body` to the stand-in with the captured request's headers and `key`.
async fn post(stripe: &StripeStandIn, key: Option<&str>, body: String) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}v1/checkout/sessions", stripe.base))
        .header("authorization", "Bearer sk_test_dummy_key_for_capture")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("stripe-version", "2026-10-28.endive")
        .body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("the stand-in answers")
}

/// A stand-in whose clock is frozen, and the `expires_at` one hour after its time.
async fn frozen_stand_in() -> (StripeStandIn, i64) {
    let stripe = StripeStandIn::start().await;
    let now = stripe.now();
    stripe.freeze_clock(now);
    (stripe, now + 3_600)
}

#[track_caller]
fn assert_refused(status: StatusCode, answer: &Value, param: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    assert_eq!(answer["error"]["param"], param, "{answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
}

#[tokio::test]
async fn captured_stripe_python_request_opens_a_session_shaped_like_stripes_fixture() {
    let (stripe, expires_at) = frozen_stand_in().await;

    let response = post(
        &stripe,
        Some("order_7f3c2a"),
        captured_form(expires_at, &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = response.headers()["request-id"].to_str().expect("ASCII");
    assert!(request_id.starts_with("req_"), "{request_id}");
    let session: Value = response.json().await.expect("JSON");

    let official: Value = serde_json::from_slice(&read_shared(
        "stripe/fixtures/official/checkout_session.fixtures3.json",
    ))
    .expect("JSON");
    let keys = |value: &Value| -> BTreeSet<String> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(&session), keys(&official));

    let id = session["id"].as_str().expect("an id");
    assert!(id.starts_with("cs_test_") && id.len() == official["id"].as_str().map_or(0, str::len));
    assert_eq!(
        session["url"],
        format!("https://checkout.stripe.com/c/pay/{id}")
    );
    assert_eq!(session["object"], "checkout.session");
    assert_eq!(session["expires_at"], expires_at);
    assert_eq!(session["client_reference_id"], "user_42");
    assert_eq!(
        session["metadata"],
        serde_json::json!({"user_id": "42", "package_id": "tokens_1000", "tokens": "1000"})
    );
    assert_eq!(session["amount_total"], 500);
    assert_eq!(session["currency"], "usd");
    assert_eq!(session["payment_status"], "unpaid");
    assert_eq!(session["status"], "open");
    assert_eq!(stripe.sessions_created(), 1);

    let recorded = stripe.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].header("idempotency-key"), "order_7f3c2a");
    assert_eq!(recorded[0].path, "/v1/checkout/sessions");
}

#[tokio::test]
async fn each_missing_required_field_is_refused_naming_it() {
    let (stripe, expires_at) = frozen_stand_in().await;
    for &field in REQUIRED {
        for edit in [None, Some("")] {
            let response = post(&stripe, None, captured_form(expires_at, &[(field, edit)])).await;
            let status = response.status();
            assert_refused(status, &response.json().await.expect("JSON"), field);
        }
    }
    assert_eq!(stripe.sessions_created(), 0);
}

#[tokio::test]
async fn malformed_values_and_unknown_fields_are_refused() {
    let (stripe, expires_at) = frozen_stand_in().await;
    let amount = "line_items[0][price_data][unit_amount]";
    let cases = [
        (amount, "0", amount),
        (amount, "-500", amount),
        (amount, "5.00", amount),
        (amount, "abc", amount),
        ("line_items[0][quantity]", "0", "line_items[0][quantity]"),
        ("mode", "subscription", "mode"),
        ("success_url", "/relative", "success_url"),
        (
            "line_items[0][price_data][currency]",
            "USD",
            "line_items[0][price_data][currency]",
        ),
        ("expires_at", "soon", "expires_at"),
        (
            "metadata[user id is far too long for stripe metadata]",
            "1",
            "",
        ),
        ("line_items[0][price]", "price_123", "line_items[0][price]"),
    ];
    for (field, value, param) in cases {
        let body = captured_form(expires_at, &[(field, Some(value))]);
        let response = post(&stripe, None, body).await;
        let status = response.status();
        let answer: Value = response.json().await.expect("JSON");
        let param = if param.is_empty() { field } else { param };
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{field}={value} was accepted"
        );
        assert_refused(status, &answer, param);
    }
    assert_eq!(stripe.sessions_created(), 0);
}

#[tokio::test]
async fn expires_at_must_fall_between_thirty_minutes_and_a_day_from_arrival() {
    let (stripe, _) = frozen_stand_in().await;
    let now = stripe.now();
    let cases = [
        (now + EXPIRES_AT_MIN_SECS - 1, false),
        (now + EXPIRES_AT_MIN_SECS, true),
        (now + EXPIRES_AT_MAX_SECS, true),
        (now + EXPIRES_AT_MAX_SECS + 1, false),
        (now - 10, false),
    ];
    for (expires_at, accepted) in cases {
        let response = post(&stripe, None, captured_form(expires_at, &[])).await;
        let status = response.status();
        let answer: Value = response.json().await.expect("JSON");
        if accepted {
            assert_eq!(status, StatusCode::OK, "{expires_at}: {answer}");
        } else {
            assert_refused(status, &answer, "expires_at");
        }
    }
}

#[tokio::test]
async fn same_key_and_body_replays_the_first_answer_byte_for_byte() {
    let (stripe, expires_at) = frozen_stand_in().await;
    let body = captured_form(expires_at, &[]);

    let first = post(&stripe, Some("order_1"), body.clone()).await;
    let second = post(&stripe, Some("order_1"), body.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), first.status());
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_ne!(
        first.headers()["request-id"],
        second.headers()["request-id"]
    );
    let first = first.bytes().await.expect("body");
    assert_eq!(second.bytes().await.expect("body"), first);
    assert_eq!(stripe.sessions_created(), 1);

    // Without a key, or with another key, the same body is a new session.
    assert_eq!(
        post(&stripe, None, body.clone()).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        post(&stripe, Some("order_2"), body).await.status(),
        StatusCode::OK
    );
    assert_eq!(stripe.sessions_created(), 3);
}

#[tokio::test]
async fn same_key_with_another_body_is_an_idempotency_error_for_a_day() {
    let (stripe, expires_at) = frozen_stand_in().await;
    let first = captured_form(expires_at, &[]);
    assert_eq!(
        post(&stripe, Some("k"), first).await.status(),
        StatusCode::OK
    );

    stripe.advance_clock(EXPIRES_AT_MAX_SECS - 1);
    let other = captured_form(stripe.now() + 3_600, &[]);
    let response = post(&stripe, Some("k"), other).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(answer["error"]["type"], "idempotency_error");

    // A day after the first use the key is forgotten and the request runs afresh.
    stripe.advance_clock(1);
    let other = captured_form(stripe.now() + 3_600, &[]);
    assert_eq!(
        post(&stripe, Some("k"), other).await.status(),
        StatusCode::OK
    );
    assert_eq!(stripe.sessions_created(), 2);
}

#[tokio::test]
async fn injected_failures_answer_in_order_and_store_nothing() {
    let (stripe, expires_at) = frozen_stand_in().await;
    for status in [500, 409, 429, 503] {
        stripe.fail_next(1, Fault::retryable(status));
    }
    stripe.fail_next(
        1,
        Fault::Status {
            status: 500,
            should_retry: false,
        },
    );
    let expected = [
        (500, "true", "api_error"),
        (409, "true", "idempotency_error"),
        (429, "true", "invalid_request_error"),
        (503, "true", "api_error"),
        (500, "false", "api_error"),
    ];
    let body = captured_form(expires_at, &[]);
    for (status, should_retry, error_type) in expected {
        let response = post(&stripe, Some("order_f"), body.clone()).await;
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(response.headers()["stripe-should-retry"], should_retry);
        assert!(response.headers().contains_key("request-id"));
        let answer: Value = response.json().await.expect("JSON");
        assert_eq!(answer["error"]["type"], error_type, "{status}");
    }

    let response = post(&stripe, Some("order_f"), body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("idempotent-replayed").is_none());
    assert_eq!(stripe.sessions_created(), 1);
    assert_eq!(stripe.requests().len(), 6);
}

#[tokio::test]
async fn hung_request_finishes_its_work_after_the_caller_gives_up() {
    let (stripe, expires_at) = frozen_stand_in().await;
    stripe.fail_next(1, Fault::Hang(Duration::from_millis(300)));
    let body = captured_form(expires_at, &[]);

    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .expect("client");
    let attempt = impatient
        .post(format!("{}v1/checkout/sessions", stripe.base))
        .header("authorization", "Bearer sk_test_x")
        .header("idempotency-key", "order_h")
        .body(body.clone())
        .send()
        .await;
    assert!(attempt.is_err_and(|error| error.is_timeout()));
    stripe.settle().await;
    assert_eq!(stripe.sessions_created(), 1);

    let retry = post(&stripe, Some("order_h"), body).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn missing_api_key_and_unknown_routes_get_stripe_errors() {
    let (stripe, expires_at) = frozen_stand_in().await;
    let client = reqwest::Client::new();
    let anonymous = client
        .post(format!("{}v1/checkout/sessions", stripe.base))
        .body(captured_form(expires_at, &[]))
        .send()
        .await
        .expect("answers");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let unknown = client
        .post(format!("{}v1/customers", stripe.base))
        .send()
        .await
        .expect("answers");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let answer: Value = unknown.json().await.expect("JSON");
    assert_eq!(answer["error"]["type"], "invalid_request_error");
    assert_eq!(stripe.sessions_created(), 0);
    let paths: Vec<String> = stripe.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/checkout/sessions", "/v1/customers"]);
}
