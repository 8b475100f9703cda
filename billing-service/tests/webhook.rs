//! Webhook deliveries end to end: real socket, real SQLite file, signatures computed here.

mod common;

use billing_service::webhook::signature;
use common::{fixture_with, paid_starter_event, unix_now, Db, Options, TestServer, WEBHOOK_SECRET};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

both_backends!(
    paid_session_grants_once_however_often_it_is_delivered,
    bad_signatures_are_400_and_leave_no_trace,
    body_limit_is_exactly_one_mebibyte,
    chunked_body_growing_past_the_limit_is_413,
    ignored_types_are_acknowledged_and_counted,
    validly_signed_non_json_is_400,
    price_mismatch_is_acknowledged_but_grants_nothing,
    delayed_payment_grants_on_async_success_only,
    missing_webhook_secret_is_503,
);

const SESSION: &str = "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY";

async fn paid_session_grants_once_however_often_it_is_delivered(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = paid_starter_event();

    let first = server.deliver_signed(&event).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 1_000);

    // Stripe's retry: the same bytes, re-signed with a later timestamp.
    let header = signature::sign(WEBHOOK_SECRET, unix_now() + 1, &event);
    let again = server.deliver(&event, Some(&header)).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 1_000);

    // A different event about the same session.
    let other = String::from_utf8(event.clone()).expect("UTF-8").replace(
        "evt_1QexampleCSCompletedPaid01",
        "evt_1QexampleCSCompletedPaid02",
    );
    let response = server.deliver_signed(other.as_bytes()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 1_000);

    let rows = server.transactions("42").await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["amount"], 1_000);
    assert_eq!(rows[0]["reason"], "purchase");
    assert_eq!(rows[0]["stripe_event_id"], "evt_1QexampleCSCompletedPaid01");
    assert_eq!(rows[0]["stripe_session_id"], SESSION);
    assert_eq!(server.balance("43").await, 0);

    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="granted"} 1"#));
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="duplicate_event"} 1"#));
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="already_granted"} 1"#));
}

async fn bad_signatures_are_400_and_leave_no_trace(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = paid_starter_event();
    let now = unix_now();

    let wrong_secret = signature::sign("whsec_someone_else", now, &event);
    let stale = signature::sign(WEBHOOK_SECRET, now - 301, &event);
    let mut tampered = event.clone();
    tampered.push(b'\n');
    let valid_for_original = signature::sign(WEBHOOK_SECRET, now, &event);
    let (timestamp, mac) = valid_for_original.split_once(",v1=").expect("t=...,v1=...");
    let uppercase_hex = format!("{timestamp},v1={}", mac.to_uppercase());
    let attempts: [(&str, &[u8], Option<&str>); 6] = [
        ("missing", &event, None),
        ("wrong secret", &event, Some(&wrong_secret)),
        ("stale", &event, Some(&stale)),
        ("tampered body", &tampered, Some(&valid_for_original)),
        ("garbage", &event, Some("garbage")),
        ("uppercase hex", &event, Some(&uppercase_hex)),
    ];
    for (what, body, header) in attempts {
        let response = server.deliver(body, header).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        let content_type = response.headers()["content-type"].to_str().expect("ASCII");
        assert_eq!(content_type, "application/problem+json", "{what}");
    }
    assert_eq!(server.balance("42").await, 0);

    let metrics = server.metrics.render();
    let stale_line = r#"billing_webhook_deliveries_total{outcome="timestamp_outside_tolerance"} 1"#;
    assert!(metrics.contains(stale_line), "{metrics}");
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="signature_missing"} 1"#));

    // Nothing was recorded, so the genuine delivery is processed as new.
    let response = server.deliver_signed(&event).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 1_000);
}

async fn body_limit_is_exactly_one_mebibyte(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let padded = |total: usize| {
        let head = r#"{"id":"evt_padded","type":"customer.created","padding":""#;
        let tail = r#""}"#;
        let fill = "x".repeat(total - head.len() - tail.len());
        format!("{head}{fill}{tail}").into_bytes()
    };

    let at_limit = padded(1_048_576);
    assert_eq!(at_limit.len(), 1_048_576);
    let response = server.deliver_signed(&at_limit).await;
    assert_eq!(response.status(), StatusCode::OK);

    let over_limit = padded(1_048_577);
    let response = server.deliver_signed(&over_limit).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

async fn chunked_body_growing_past_the_limit_is_413(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();

    // Read while writing: the server answers as soon as the limit is passed and may reset
    // the connection before the rest of the body is sent.
    let response = tokio::spawn(async move {
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received).await;
        received
    });
    let head = "POST /api/v1/stripe/webhook HTTP/1.1\r\nHost: billing\r\n\
                Transfer-Encoding: chunked\r\nStripe-Signature: t=1,v1=00\r\n\
                Connection: close\r\n\r\n";
    let chunk = [
        format!("{:x}\r\n", 64 * 1024).into_bytes(),
        vec![b' '; 64 * 1024],
    ]
    .concat();
    let mut sent = writer.write_all(head.as_bytes()).await;
    for _ in 0..20 {
        if sent.is_err() {
            break;
        }
        sent = writer.write_all(&chunk).await;
        if sent.is_ok() {
            sent = writer.write_all(b"\r\n").await;
        }
    }
    let _ = writer.write_all(b"0\r\n\r\n").await;

    let received = response.await.expect("reader finishes");
    let status_line = String::from_utf8_lossy(&received[..received.len().min(12)]).into_owned();
    assert_eq!(status_line, "HTTP/1.1 413");
    assert_eq!(server.balance("42").await, 0);
}

async fn ignored_types_are_acknowledged_and_counted(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let event = br#"{"id":"evt_tax","type":"customer.tax_id.created","api_version":"2099-01-01",
        "data":{"object":{"object":"tax_id","new_thing":{"a":1}}}}"#;
    let response = server.deliver_signed(event).await;
    assert_eq!(response.status(), StatusCode::OK);

    let unknown = br#"{"id":"evt_new","type":"brand_new.thing","data":{"object":[]}}"#;
    assert_eq!(
        server.deliver_signed(unknown).await.status(),
        StatusCode::OK
    );

    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_events_ignored_total{class="customer"} 1"#));
    assert!(metrics.contains(r#"billing_webhook_events_ignored_total{class="other"} 1"#));
}

async fn validly_signed_non_json_is_400(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let response = server.deliver_signed(b"not json").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

async fn price_mismatch_is_acknowledged_but_grants_nothing(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let cheap = fixture_with(
        "event_checkout_session_completed.json",
        &[
            (
                r#""package_id": "tokens_1000""#,
                r#""package_id": "starter""#,
            ),
            (r#""amount_total": 500"#, r#""amount_total": 5"#),
        ],
    );
    assert_eq!(server.deliver_signed(&cheap).await.status(), StatusCode::OK);
    assert_eq!(server.balance("42").await, 0);

    let no_amount = fixture_with(
        "event_checkout_session_completed.json",
        &[
            (
                r#""package_id": "tokens_1000""#,
                r#""package_id": "starter""#,
            ),
            (r#""amount_total": 500,"#, ""),
            ("evt_1QexampleCSCompletedPaid01", "evt_no_amount"),
        ],
    );
    assert_eq!(
        server.deliver_signed(&no_amount).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.balance("42").await, 0);
    let metrics = server.metrics.render();
    assert!(metrics.contains(r#"billing_webhook_deliveries_total{outcome="mismatch"} 2"#));
}

async fn delayed_payment_grants_on_async_success_only(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let unpaid = fixture_with(
        "event_checkout_session_completed_unpaid.json",
        &[(
            r#""package_id": "tokens_1000""#,
            r#""package_id": "starter""#,
        )],
    );
    assert_eq!(
        server.deliver_signed(&unpaid).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.balance("42").await, 0);

    let succeeded = fixture_with(
        "event_checkout_session_async_payment_succeeded.json",
        &[(
            r#""package_id": "tokens_1000""#,
            r#""package_id": "starter""#,
        )],
    );
    assert_eq!(
        server.deliver_signed(&succeeded).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.balance("42").await, 1_000);
}

async fn missing_webhook_secret_is_503(db: Db) {
    let options = Options {
        webhook_secret: None,
        ..Options::default()
    };
    let server = TestServer::start(db, options).await;
    let response = server.deliver_signed(&paid_starter_event()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.balance("42").await, 0);
}
