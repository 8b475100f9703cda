//! Stripe webhooks through the gateway: exempt from limits, byte for byte, granted once.

mod common;

use common::{
    client_from, ignored_event, paid_checkout_event, post_signed, stripe_signature, token_for,
    unix_now, Stack, StackOptions, WEBHOOK_SECRET,
};
use reqwest::{Client, StatusCode};

async fn deliver(client: &Client, stack: &Stack, body: &[u8], signature: Option<&str>) -> u16 {
    let mut request = client
        .post(stack.url("/api/v1/stripe/webhook"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    request.send().await.unwrap().status().as_u16()
}

async fn balance(stack: &Stack, user: &str) -> i64 {
    let response = client_from([127, 0, 20, 1])
        .get(stack.url("/api/v1/tokens/balance"))
        .bearer_auth(token_for(user))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.unwrap();
    body["balance"].as_i64().unwrap()
}

#[tokio::test]
async fn signed_paid_checkout_grants_once() {
    let stack = Stack::start(StackOptions::default()).await;
    let stripe = client_from([127, 0, 21, 1]);
    let event = paid_checkout_event("evt_e2e_paid_1", "cs_test_e2e_once");
    assert_eq!(balance(&stack, "42").await, 0);

    let signature = stripe_signature(&event, unix_now(), WEBHOOK_SECRET);
    assert_eq!(
        deliver(&stripe, &stack, &event, Some(&signature)).await,
        200
    );
    assert_eq!(balance(&stack, "42").await, 1000);

    // Stripe's retry of the same delivery, signed later, and a second event for the session.
    let retry = stripe_signature(&event, unix_now() + 1, WEBHOOK_SECRET);
    assert_eq!(deliver(&stripe, &stack, &event, Some(&retry)).await, 200);
    let other = paid_checkout_event("evt_e2e_paid_2", "cs_test_e2e_once");
    let other_signature = stripe_signature(&other, unix_now(), WEBHOOK_SECRET);
    assert_eq!(
        deliver(&stripe, &stack, &other, Some(&other_signature)).await,
        200
    );
    assert_eq!(balance(&stack, "42").await, 1000);
}

#[tokio::test]
async fn bad_or_missing_signatures_are_refused_and_grant_nothing() {
    let stack = Stack::start(StackOptions::default()).await;
    let stripe = client_from([127, 0, 22, 1]);
    let event = paid_checkout_event("evt_e2e_forged", "cs_test_e2e_forged");

    let forged = stripe_signature(&event, unix_now(), "whsec_not_ours");
    let stale = stripe_signature(&event, unix_now() - 3600, WEBHOOK_SECRET);
    for signature in [
        Some(forged.as_str()),
        Some(stale.as_str()),
        Some("garbage"),
        None,
    ] {
        assert_eq!(
            deliver(&stripe, &stack, &event, signature).await,
            400,
            "{signature:?}"
        );
    }
    assert_eq!(balance(&stack, "42").await, 0);

    // A rejection leaves no trace: the same event, properly signed, is then processed.
    let good = stripe_signature(&event, unix_now(), WEBHOOK_SECRET);
    assert_eq!(deliver(&stripe, &stack, &event, Some(&good)).await, 200);
    assert_eq!(balance(&stack, "42").await, 1000);
}

#[tokio::test]
async fn fifty_deliveries_from_one_address_all_reach_billing() {
    let stack = Stack::start(StackOptions::default()).await;
    let stripe = client_from([127, 0, 23, 1]);
    for n in 0..50 {
        let event = ignored_event(&format!("evt_e2e_burst_{n}"));
        let response = post_signed(&stripe, &stack, "/api/v1/stripe/webhook", event).await;
        assert!(
            response.status().is_success(),
            "delivery {n}: {}",
            response.status()
        );
        assert!(response.headers().get("x-ratelimit-limit").is_none());
        assert!(response.headers().get("retry-after").is_none());
    }

    // The deliveries used none of the sender's anonymous budget.
    let generate = stripe
        .post(stack.url("/api/v1/generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(generate.headers()["x-ratelimit-remaining"], "2");
}

#[tokio::test]
async fn webhook_bodies_over_one_mebibyte_are_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    let stripe = client_from([127, 0, 24, 1]);
    let padding = "x".repeat(1024 * 1024);
    let event = serde_json::to_vec(&serde_json::json!({
        "id": "evt_e2e_huge", "type": "customer.created", "padding": padding,
    }))
    .unwrap();
    let signature = stripe_signature(&event, unix_now(), WEBHOOK_SECRET);
    assert_eq!(
        deliver(&stripe, &stack, &event, Some(&signature)).await,
        413
    );

    // A large but legal body (600 KiB) still goes through byte for byte.
    let padding = "y".repeat(600 * 1024);
    let event = serde_json::to_vec(&serde_json::json!({
        "id": "evt_e2e_large", "object": "event", "type": "customer.created",
        "data": {"object": {"padding": padding}},
    }))
    .unwrap();
    let signature = stripe_signature(&event, unix_now(), WEBHOOK_SECRET);
    assert_eq!(
        deliver(&stripe, &stack, &event, Some(&signature)).await,
        200
    );
}

#[tokio::test]
async fn only_the_exact_webhook_route_is_exempt() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 25, 1]);
    // Escapes that decode to the webhook path are the same route; everything else is not.
    let event = ignored_event("evt_e2e_escaped");
    let escaped = post_signed(&client, &stack, "/api/v1/stripe/%77ebhook", event).await;
    assert_eq!(escaped.status(), StatusCode::OK);

    for _ in 0..3 {
        let response = client
            .post(stack.url("/api/v1/generate"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let sneaky = client
        .post(stack.url("/api/v1/stripe/webhook/../../generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(sneaky.status(), StatusCode::TOO_MANY_REQUESTS);
}
