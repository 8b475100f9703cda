//! Checkout end to end against a local Stripe stand-in, plus the public read endpoints.

mod common;

use std::collections::BTreeMap;

use common::{read_shared, token, unix_now, Db, Options, StripeStandIn, TestServer, STRIPE_KEY};
use reqwest::StatusCode;
use serde_json::{json, Value};

both_backends!(
    checkout_sends_stripes_form_and_returns_the_session_url,
    bad_checkout_requests_get_problem_answers,
    missing_stripe_key_is_503,
    packages_and_public_config_are_served,
);

/// Form fields whose values legitimately differ from the captured reference request: the
/// buyer's URLs, our package id (the capture used `tokens_1000`) and the expiry time.
const VARYING: &[&str] = &[
    "success_url",
    "cancel_url",
    "expires_at",
    "metadata[package_id]",
    "payment_intent_data[metadata][package_id]",
];

/// Present in the reference capture but not sent by us: billing knows no e-mail address
/// (the bearer token carries only the user id), and Stripe asks the buyer for it instead.
const NOT_SENT: &[&str] = &["customer_email"];

fn checkout_body(package_id: &str) -> Value {
    json!({
        "package_id": package_id,
        "success_url": "https://app.example.com/billing/success?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://app.example.com/billing/cancel",
    })
}

async fn post_checkout(
    server: &TestServer,
    bearer: Option<&str>,
    body: String,
) -> reqwest::Response {
    let mut request = server
        .client
        .post(server.url("/api/v1/stripe/checkout"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.expect("checkout request completes")
}

fn reference_form() -> BTreeMap<String, String> {
    let capture: Value =
        serde_json::from_slice(&read_shared("stripe/checkout_request.json")).expect("JSON");
    let body = capture["request"]["body"].as_str().expect("body is text");
    serde_urlencoded::from_str::<Vec<(String, String)>>(body)
        .expect("form-encoded")
        .into_iter()
        .collect()
}

async fn checkout_sends_stripes_form_and_returns_the_session_url(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = TestServer::start(db, Options::with_stripe(&stripe)).await;

    let before = unix_now();
    let body = checkout_body("starter").to_string();
    let response = post_checkout(&server, Some(&token("42")), body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.expect("JSON");

    let requests = stripe.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/v1/checkout/sessions");
    let header = |name: &str| request.headers[name].to_str().expect("ASCII").to_owned();
    assert_eq!(header("authorization"), format!("Bearer {STRIPE_KEY}"));
    assert_eq!(header("content-type"), "application/x-www-form-urlencoded");
    assert!(!header("idempotency-key").is_empty());
    assert_eq!(header("stripe-version"), "2026-10-28.endive");

    // Same keys as the reference, and the same values except where they must differ.
    let sent: BTreeMap<String, String> = request.form.iter().cloned().collect();
    assert_eq!(sent.len(), request.form.len(), "a field was sent twice");
    let mut expected = reference_form();
    for key in NOT_SENT {
        expected.remove(*key);
    }
    assert_eq!(
        sent.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, value) in &expected {
        if !VARYING.contains(&key.as_str()) {
            assert_eq!(&sent[key], value, "field {key}");
        }
    }
    assert_eq!(sent["metadata[package_id]"], "starter");
    assert_eq!(sent["payment_intent_data[metadata][package_id]"], "starter");
    assert_eq!(sent["success_url"], checkout_body("starter")["success_url"]);
    assert_eq!(sent["cancel_url"], checkout_body("starter")["cancel_url"]);
    let expires_at: i64 = sent["expires_at"].parse().expect("integer");
    // 24 h configured, sent 5 min short so that it stays inside Stripe's window.
    assert!((before + 86_100..=unix_now() + 86_100).contains(&expires_at));

    let session_id = answer["session_id"].as_str().expect("session id");
    assert_eq!(
        answer["checkout_url"],
        format!("https://checkout.stripe.com/c/pay/{session_id}")
    );
    assert_eq!(answer["expires_at"], expires_at);
    assert!(server
        .metrics
        .render()
        .contains(r#"billing_checkout_requests_total{outcome="created"} 1"#));

    // The webhook for this session is checked against the recorded purchase and grants.
    let event = common::fixture_with(
        "event_checkout_session_completed.json",
        &[
            (
                r#""package_id": "tokens_1000""#,
                r#""package_id": "starter""#,
            ),
            (
                "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY",
                session_id,
            ),
        ],
    );
    assert_eq!(server.deliver_signed(&event).await.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 1_000);
}

async fn bad_checkout_requests_get_problem_answers(db: Db) {
    let stripe = StripeStandIn::start().await;
    let server = TestServer::start(db, Options::with_stripe(&stripe)).await;
    let user = token("42");
    let mut bad_url = checkout_body("starter");
    bad_url["success_url"] = json!("javascript:alert(1)");

    let cases = [
        (
            "malformed JSON",
            Some(user.as_str()),
            "{not json".to_owned(),
            400,
        ),
        (
            "missing field",
            Some(user.as_str()),
            json!({"package_id": "starter"}).to_string(),
            400,
        ),
        (
            "unknown package",
            Some(user.as_str()),
            checkout_body("platinum").to_string(),
            404,
        ),
        ("bad URL", Some(user.as_str()), bad_url.to_string(), 422),
        ("no bearer", None, checkout_body("starter").to_string(), 401),
        (
            "junk bearer",
            Some("junk"),
            checkout_body("starter").to_string(),
            401,
        ),
    ];
    for (what, bearer, body, status) in cases {
        let response = post_checkout(&server, bearer, body).await;
        assert_eq!(response.status().as_u16(), status, "{what}");
        let content_type = response.headers()["content-type"].to_str().expect("ASCII");
        assert_eq!(content_type, "application/problem+json", "{what}");
        if status == 401 {
            assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
        }
        let problem: Value = response.json().await.expect("JSON");
        assert_eq!(problem["status"], status, "{what}");
        assert!(
            problem["type"].is_string() && problem["title"].is_string(),
            "{what}"
        );
    }
    assert!(
        stripe.requests().is_empty(),
        "no invalid request reached Stripe"
    );
}

async fn missing_stripe_key_is_503(db: Db) {
    let options = Options {
        stripe_secret_key: None,
        ..Options::default()
    };
    let server = TestServer::start(db, options).await;
    let body = checkout_body("starter").to_string();
    let response = post_checkout(&server, Some(&token("42")), body).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["status"], 503);
}

async fn packages_and_public_config_are_served(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let get = |path: &str| server.client.get(server.url(path)).send();

    let list: Value = get("/api/v1/stripe/packages")
        .await
        .expect("ok")
        .json()
        .await
        .expect("JSON");
    let summary: Vec<(String, i64, i64, bool, i64)> = list["packages"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            assert_eq!(p["currency"], "usd");
            (
                p["id"].as_str().expect("id").to_owned(),
                p["tokens"].as_i64().expect("tokens"),
                p["price_cents"].as_i64().expect("price"),
                p["popular"].as_bool().expect("popular"),
                p["savings_percent"].as_i64().expect("savings"),
            )
        })
        .collect();
    let expected = [
        ("starter", 1_000, 500, false, 0),
        ("pro", 5_000, 2_000, true, 20),
        ("enterprise", 15_000, 5_000, false, 33),
        ("ultimate", 50_000, 15_000, false, 40),
    ]
    .map(|(id, tokens, price, popular, savings)| (id.to_owned(), tokens, price, popular, savings));
    assert_eq!(summary, expected);

    let pro: Value = get("/api/v1/stripe/packages/pro")
        .await
        .expect("ok")
        .json()
        .await
        .expect("JSON");
    assert_eq!(pro["name"], "Pro");
    let missing = get("/api/v1/stripe/packages/platinum")
        .await
        .expect("completes");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    let config: Value = get("/api/v1/stripe/config")
        .await
        .expect("ok")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        config,
        json!({"publishable_key": "pk_test_integration", "currency": "usd"})
    );

    let unauthenticated = get("/api/v1/tokens/balance").await.expect("completes");
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.balance("7").await, 0);
}
