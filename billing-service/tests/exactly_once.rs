//! One grant per Checkout Session, whatever order, repetition, concurrency or failure the
//! deliveries come with (CASE-13, CASE-14, CASE-15).

mod common;

use std::time::Duration;

use billing_service::webhook::signature;
use common::{
    completed, event_from, session_event, unique, unix_now, Db, Options, TestServer, WEBHOOK_SECRET,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

both_backends!(
    recorded_purchase_is_granted_once_whatever_events_arrive,
    async_success_before_completion_grants_once,
    thirty_two_concurrent_deliveries_grant_once,
    concurrent_events_of_one_session_grant_once,
    failure_inside_a_grant_leaves_nothing_and_the_retry_grants,
    delivery_during_a_held_write_lock_is_granted_or_retried,
    unknown_fields_versions_and_enum_values_still_grant,
    rejected_deliveries_leave_no_trace,
    fulfilled_purchase_never_moves_back_whatever_arrives_later,
);

const ASYNC_SUCCEEDED: &str = "event_checkout_session_async_payment_succeeded.json";

async fn recorded_purchase_is_granted_once_whatever_events_arrive(db: Db) {
    let (server, _stripe) = TestServer::start_with_stripe(db).await;
    let session = server.checkout("42", "starter").await;
    let intent = unique("pi");
    assert_eq!(server.payment_status("42", &session).await, "open");

    let e1 = completed("evt_e1", &session, &intent);
    assert_eq!(server.deliver_signed(&e1).await.status(), StatusCode::OK);
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);

    // E1 again, re-signed later as Stripe's retry; E2, the same body under a new id; E3,
    // the async success for the same session; then payment_intent.succeeded.
    let retry = signature::sign(WEBHOOK_SECRET, unix_now() + 5, &e1);
    assert_eq!(
        server.deliver(&e1, Some(&retry)).await.status(),
        StatusCode::OK
    );
    let e2 = completed("evt_e2", &session, &intent);
    assert_eq!(server.deliver_signed(&e2).await.status(), StatusCode::OK);
    let e3 = session_event(ASYNC_SUCCEEDED, "evt_e3", &session, &intent);
    assert_eq!(server.deliver_signed(&e3).await.status(), StatusCode::OK);
    let intent_succeeded = serde_json::to_vec(&json!({
        "id": "evt_pi", "object": "event", "type": "payment_intent.succeeded",
        "data": {"object": {"id": intent, "object": "payment_intent", "amount": 500,
            "currency": "usd", "metadata": {"user_id": "42", "package_id": "starter"}}}
    }))
    .expect("JSON");
    let response = server.deliver_signed(&intent_succeeded).await;
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
    let rows = server.transactions("42").await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["reason"], "purchase");
    assert_eq!(rows[0]["stripe_event_id"], "evt_e1");
    assert_eq!(rows[0]["stripe_session_id"], session.as_str());
    assert_eq!(server.payment_status("42", &session).await, "fulfilled");
}

async fn async_success_before_completion_grants_once(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    let e3 = session_event(ASYNC_SUCCEEDED, &unique("evt"), &session, &intent);
    assert_eq!(server.deliver_signed(&e3).await.status(), StatusCode::OK);
    let e1 = completed(&unique("evt"), &session, &intent);
    assert_eq!(server.deliver_signed(&e1).await.status(), StatusCode::OK);
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
}

async fn thirty_two_concurrent_deliveries_grant_once(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
    let deliveries = (0..32).map(|_| server.deliver_signed(&event));
    for response in futures::future::join_all(deliveries).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
    assert_eq!(server.transactions("42").await.len(), 1);
}

async fn concurrent_events_of_one_session_grant_once(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    let events: Vec<Vec<u8>> = (0..16)
        .map(|index| match index % 2 {
            0 => completed(&format!("evt_c{index}"), &session, &intent),
            _ => session_event(ASYNC_SUCCEEDED, &format!("evt_a{index}"), &session, &intent),
        })
        .collect();
    let deliveries = events.iter().map(|event| server.deliver_signed(event));
    for response in futures::future::join_all(deliveries).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
}

async fn failure_inside_a_grant_leaves_nothing_and_the_retry_grants(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));

    server.break_ledger().await;
    let response = server.deliver_signed(&event).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let problem: Value = response.json().await.expect("problem JSON");
    assert!(!problem.to_string().contains("injected"), "{problem}");
    server.repair_ledger().await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    // The event id was rolled back with the failed grant, so Stripe's retry is new.
    assert_eq!(server.deliver_signed(&event).await.status(), StatusCode::OK);
    assert_eq!(server.deliver_signed(&event).await.status(), StatusCode::OK);
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
}

async fn delivery_during_a_held_write_lock_is_granted_or_retried(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
    // Signed 295 s before arrival: only just inside the tolerance, and the lock must not
    // push it out.
    let header = signature::sign(WEBHOOK_SECRET, unix_now() - 295, &event);

    let lock = server.hold_write_lock(Duration::from_secs(3)).await;
    let status = server.deliver(&event, Some(&header)).await.status();
    lock.await.expect("lock released");
    assert!(!status.is_client_error(), "never a 4xx: {status}");
    let expected = if status.is_success() { 1_000 } else { 0 };
    assert_eq!(server.assert_ledger_balanced("42").await, expected);
}

async fn unknown_fields_versions_and_enum_values_still_grant(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let mut event: Value = serde_json::from_slice(&completed(
        &unique("evt"),
        &unique("cs_test"),
        &unique("pi"),
    ))
    .expect("JSON");
    event["api_version"] = json!("2099-01-01.future");
    let object = &mut event["data"]["object"];
    object["new_thing"] = json!({"a": 1});
    object["customer_details"]["tax_exempt"] = json!("some_future_value");
    object["ui_mode"] = json!("self");
    let body = serde_json::to_vec(&event).expect("JSON");
    assert_eq!(server.deliver_signed(&body).await.status(), StatusCode::OK);
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);

    // Without amount_total nothing can be checked: acknowledged, recorded, not granted.
    let no_amount = event_from(
        "event_checkout_session_completed.json",
        &unique("evt"),
        |object| {
            object["id"] = json!(unique("cs_test"));
            object["metadata"]["package_id"] = json!("starter");
            object
                .as_object_mut()
                .map(|fields| fields.remove("amount_total"));
        },
    );
    assert_eq!(
        server.deliver_signed(&no_amount).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="mismatch"} 1"#));

    // A 600 KiB event of an ignored type, padded with an unknown field.
    let padded = serde_json::to_vec(&json!({
        "id": unique("evt"), "type": "customer.tax_id.created",
        "data": {"object": {"object": "tax_id"}}, "padding": "x".repeat(600 * 1024),
    }))
    .expect("JSON");
    assert_eq!(
        server.deliver_signed(&padded).await.status(),
        StatusCode::OK
    );
}

async fn rejected_deliveries_leave_no_trace(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
    let now = unix_now();
    let signed = |t: i64| signature::sign(WEBHOOK_SECRET, t, &event);
    let first = signed(now);
    let mac = first.split_once(",v1=").expect("t=...,v1=...").1;
    let rejected = [
        signed(now - 305),
        signed(now - 3_600),
        format!("v1={mac}"),
        format!("t=abc,v1={mac}"),
        String::new(),
        "garbage".to_owned(),
        format!("t={now},t={},v1={mac}", now + 1),
    ];
    for header in &rejected {
        let status = server.deliver(&event, Some(header)).await.status();
        assert!(status.is_client_error(), "{header:?} got {status}");
        assert_eq!(server.assert_ledger_balanced("42").await, 0);
    }
    // A future timestamp is accepted, as Stripe's libraries accept it.
    let future = signature::sign(WEBHOOK_SECRET, now + 3_600, &event);
    assert_eq!(
        server.deliver(&event, Some(&future)).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
}

async fn fulfilled_purchase_never_moves_back_whatever_arrives_later(db: Db) {
    let (server, _stripe) = TestServer::start_with_stripe(db).await;
    let session = server.checkout("42", "starter").await;
    let intent = unique("pi");
    let status = || async { Some(server.payment_status("42", &session).await) };
    let e1 = completed(&unique("evt"), &session, &intent);
    assert_eq!(server.deliver_signed(&e1).await.status(), StatusCode::OK);
    assert_eq!(status().await.as_deref(), Some("fulfilled"));

    // A second paid event for the session, for another amount, then in another currency;
    // then the session's expiry and a failed delayed payment.
    let session_event_with = |fixture: &str, edit: &dyn Fn(&mut Value)| {
        event_from(fixture, &unique("evt"), |object| {
            object["id"] = json!(session);
            object["payment_intent"] = json!(intent);
            object["metadata"]["package_id"] = json!("starter");
            edit(object);
        })
    };
    let completed_fixture = "event_checkout_session_completed.json";
    let expired_fixture = "event_checkout_session_expired.json";
    let later = [
        session_event_with(completed_fixture, &|object| {
            object["amount_total"] = json!(400)
        }),
        session_event_with(completed_fixture, &|object| {
            object["currency"] = json!("eur")
        }),
        session_event_with(expired_fixture, &|_| {}),
        serde_json::to_vec(&{
            let mut event: Value =
                serde_json::from_slice(&session_event_with(expired_fixture, &|_| {}))
                    .expect("JSON");
            event["type"] = json!("checkout.session.async_payment_failed");
            event
        })
        .expect("JSON"),
    ];
    for event in &later {
        assert_eq!(server.deliver_signed(event).await.status(), StatusCode::OK);
        assert_eq!(status().await.as_deref(), Some("fulfilled"));
    }
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="mismatch"} 2"#));
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="closed"} 2"#));

    // Refunded in full, the purchase stays refunded through the same events.
    let refund = common::refunded(&unique("evt"), &intent, 500);
    assert_eq!(
        server.deliver_signed(&refund).await.status(),
        StatusCode::OK
    );
    assert_eq!(status().await.as_deref(), Some("refunded"));
    for event in &later {
        let mut again: Value = serde_json::from_slice(event).expect("JSON");
        again["id"] = json!(unique("evt"));
        let again = serde_json::to_vec(&again).expect("JSON");
        let response = server.deliver_signed(&again).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(status().await.as_deref(), Some("refunded"));
    }
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
}
