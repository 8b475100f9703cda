//! `charge.refunded` end to end: clawbacks follow the charge's cumulative refund, once.

mod common;

use common::{completed, refunded, unique, Db, Options, TestServer};
use reqwest::StatusCode;

both_backends!(
    full_refund_takes_back_every_token,
    partial_refunds_claw_back_the_cumulative_share,
    refund_before_the_grant_is_settled_by_the_grant,
    refund_of_an_unknown_payment_is_acknowledged_and_stored,
    refund_after_spending_leaves_a_negative_balance,
    concurrent_refund_events_claw_back_exactly_once,
    refund_of_another_amount_or_currency_claws_back_nothing,
    purchase_status_follows_the_cumulative_refund,
);

/// Delivers `body` and expects 200.
async fn deliver_ok(server: &TestServer, body: &[u8]) {
    let response = server.deliver_signed(body).await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn full_refund_takes_back_every_token(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);

    let refund = refunded(&unique("evt"), &intent, 500);
    deliver_ok(&server, &refund).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    deliver_ok(&server, &refund).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    let rows = server.transactions("42").await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_eq!(rows[0]["reason"], "refund");
    assert_eq!(rows[0]["amount"], -1_000);
    assert_eq!(rows[0]["stripe_session_id"], session.as_str());
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="refunded"} 1"#));
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="duplicate_event"} 1"#));
}

async fn partial_refunds_claw_back_the_cumulative_share(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;

    // 200 of 500 cents refunded: 400 of 1,000 tokens.
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 200)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 600);
    // 500 of 500 cumulative: the other 600.
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 500)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    // The first refund's event arriving late, under a new id, changes nothing.
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 200)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    let amounts: Vec<i64> = server
        .transactions("42")
        .await
        .iter()
        .map(|row| row["amount"].as_i64().expect("integer"))
        .collect();
    assert_eq!(amounts, [-600, -400, 1_000]);
}

async fn refund_before_the_grant_is_settled_by_the_grant(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 500)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    let rows = server.transactions("42").await;
    assert_eq!(rows.len(), 2, "a grant and its clawback: {rows:#?}");
}

async fn refund_of_an_unknown_payment_is_acknowledged_and_stored(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    deliver_ok(&server, &refunded(&unique("evt"), &unique("pi"), 300)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="refund_unmatched"} 1"#));

    // A charge without a payment intent cannot be matched at all: still acknowledged.
    let orphan = common::event_from("event_charge_refunded.json", &unique("evt"), |object| {
        object["payment_intent"] = serde_json::Value::Null;
    });
    deliver_ok(&server, &orphan).await;
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="refund_unusable"} 1"#));
}

async fn refund_after_spending_leaves_a_negative_balance(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;
    assert_eq!(
        server.debit("42", 800, "spend-1").await.status(),
        StatusCode::OK
    );

    deliver_ok(&server, &refunded(&unique("evt"), &intent, 500)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, -800);
    // Nothing more can be spent until the debt is covered.
    let response = server.debit("42", 1, "spend-2").await;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
}

async fn concurrent_refund_events_claw_back_exactly_once(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;

    let partial = refunded(&unique("evt"), &intent, 200);
    let full = refunded(&unique("evt"), &intent, 500);
    let deliveries = (0..16).map(|index| {
        let body = if index % 2 == 0 { &partial } else { &full };
        server.deliver_signed(body)
    });
    for response in futures::future::join_all(deliveries).await {
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
}

async fn refund_of_another_amount_or_currency_claws_back_nothing(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;

    // The purchase was paid 500 usd cents; these charges are not that payment.
    let doubled = common::event_from("event_charge_refunded.json", &unique("evt"), |object| {
        object["payment_intent"] = serde_json::Value::from(intent.as_str());
        object["amount"] = serde_json::Value::from(1_000);
        object["amount_refunded"] = serde_json::Value::from(1_000);
    });
    let in_euros = common::event_from("event_charge_refunded.json", &unique("evt"), |object| {
        object["payment_intent"] = serde_json::Value::from(intent.as_str());
        object["amount"] = serde_json::Value::from(500);
        object["amount_refunded"] = serde_json::Value::from(500);
        object["currency"] = serde_json::Value::from("eur");
    });
    deliver_ok(&server, &doubled).await;
    deliver_ok(&server, &in_euros).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
    assert_eq!(server.payment_status("42", &session).await, "fulfilled");
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="refund_mismatch"} 2"#));

    // The mismatching figures were not kept: a genuine partial refund takes its share only.
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 200)).await;
    assert_eq!(server.assert_ledger_balanced("42").await, 600);
}

async fn purchase_status_follows_the_cumulative_refund(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let (session, intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &completed(&unique("evt"), &session, &intent)).await;
    assert_eq!(server.payment_status("42", &session).await, "fulfilled");

    deliver_ok(&server, &refunded(&unique("evt"), &intent, 200)).await;
    assert_eq!(
        server.payment_status("42", &session).await,
        "partially_refunded"
    );
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 500)).await;
    assert_eq!(server.payment_status("42", &session).await, "refunded");
    // The partial refund's event arriving late does not move it back.
    deliver_ok(&server, &refunded(&unique("evt"), &intent, 200)).await;
    assert_eq!(server.payment_status("42", &session).await, "refunded");

    // A refund that arrives before the grant is reflected once the grant lands.
    let (early, early_intent) = (unique("cs_test"), unique("pi"));
    deliver_ok(&server, &refunded(&unique("evt"), &early_intent, 500)).await;
    deliver_ok(&server, &completed(&unique("evt"), &early, &early_intent)).await;
    assert_eq!(server.payment_status("42", &early).await, "refunded");
}
