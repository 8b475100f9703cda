//! Checkout through the gateway against a local stand-in for Stripe's API.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use common::{client_from, shared_dir, token_for, Stack, StackOptions};
use reqwest::StatusCode;

/// What the stand-in received: the decoded form and the request headers.
type Captured = Arc<Mutex<Vec<(BTreeMap<String, String>, HeaderMap)>>>;

/// Answers `POST /v1/checkout/sessions` with a session shaped like Stripe's fixture.
async fn start_stripe_stand_in() -> (String, Captured) {
    let captured: Captured = Arc::default();
    let record = captured.clone();
    let app = axum::Router::new().route(
        "/v1/checkout/sessions",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let record = record.clone();
            async move {
                let form: BTreeMap<String, String> = url_pairs(&body);
                record.lock().unwrap().push((form.clone(), headers));
                let path = shared_dir().join("stripe/fixtures/checkout_session_complete_paid.json");
                let mut session: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
                session["id"] = "cs_test_standin_1".into();
                session["url"] = "https://checkout.stripe.com/c/pay/cs_test_standin_1".into();
                session["status"] = "open".into();
                session["payment_status"] = "unpaid".into();
                session["expires_at"] = form["expires_at"].parse::<u64>().unwrap().into();
                axum::Json(session)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, captured)
}

fn url_pairs(body: &str) -> BTreeMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{body}"))
        .unwrap()
        .query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

#[tokio::test]
async fn checkout_sends_stripes_form_and_returns_the_session_url() {
    let (base, captured) = start_stripe_stand_in().await;
    let options = StackOptions {
        stripe_api_base: Some(base),
        ..StackOptions::default()
    };
    let stack = Stack::start(options).await;

    let response = client_from([127, 0, 30, 1])
        .post(stack.url("/api/v1/stripe/checkout"))
        .bearer_auth(token_for("42"))
        .json(&serde_json::json!({
            "package_id": "starter",
            "success_url": "https://example.com/billing/success?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://example.com/billing/cancel",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["session_id"], "cs_test_standin_1");
    assert_eq!(
        body["checkout_url"],
        "https://checkout.stripe.com/c/pay/cs_test_standin_1"
    );
    assert!(body["expires_at"].as_u64().is_some());

    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared_dir().join("stripe/checkout_request.json")).unwrap(),
    )
    .unwrap();
    let expected = url_pairs(reference["request"]["body"].as_str().unwrap());
    let requests = captured.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let (form, headers) = &requests[0];

    // Every field Stripe's own library sends is present; the buyer's email is optional.
    for key in expected.keys().filter(|key| *key != "customer_email") {
        assert!(form.contains_key(key), "missing form field {key}: {form:?}");
    }
    for key in [
        "mode",
        "line_items[0][price_data][currency]",
        "line_items[0][price_data][unit_amount]",
        "line_items[0][price_data][product_data][name]",
        "line_items[0][quantity]",
        "success_url",
        "cancel_url",
        "client_reference_id",
        "metadata[user_id]",
        "metadata[tokens]",
        "payment_intent_data[metadata][user_id]",
    ] {
        assert_eq!(form[key], expected[key], "{key}");
    }
    assert_eq!(form["metadata[package_id]"], "starter");
    assert_eq!(form["payment_intent_data[metadata][package_id]"], "starter");
    let expires_at: u64 = form["expires_at"].parse().unwrap();
    let ahead = expires_at.saturating_sub(common::unix_now());
    assert!(
        (23 * 3600..=24 * 3600).contains(&ahead),
        "expires_at {ahead} s ahead"
    );
    assert!(!headers["idempotency-key"].is_empty());
    assert_eq!(headers["authorization"], "Bearer sk_test_e2e");
}

#[tokio::test]
async fn checkout_rejects_bad_input_clearly() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 31, 1]);
    let checkout = |body: &'static str, token: Option<String>| {
        let mut request = client
            .post(stack.url("/api/v1/stripe/checkout"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let valid = r#"{"package_id":"starter",
        "success_url":"https://e.com/s","cancel_url":"https://e.com/c"}"#;
    let unknown =
        r#"{"package_id":"nope","success_url":"https://e.com/s","cancel_url":"https://e.com/c"}"#;

    let missing_token = checkout(valid, None).await.unwrap();
    assert_eq!(missing_token.status(), StatusCode::UNAUTHORIZED);
    let malformed = checkout("{not json", Some(token_for("42"))).await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let unknown = checkout(unknown, Some(token_for("42"))).await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );

    let packages = client
        .get(stack.url("/api/v1/stripe/packages/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(packages.status(), StatusCode::NOT_FOUND);
}
