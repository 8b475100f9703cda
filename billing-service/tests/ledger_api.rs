//! The ledger as users and the application see it: purchase state, paginated
//! transactions, and the internal debit API.

mod common;

use common::{completed, token, unique, Db, Options, TestServer, SERVICE_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

both_backends!(
    payment_state_is_shown_to_its_owner_only,
    transactions_page_through_every_row_once,
    debit_spends_once_per_key_and_never_overdraws,
    debit_requires_the_service_token,
    debit_rejects_bad_input,
    concurrent_debits_never_spend_the_same_tokens_twice,
);

/// Grants user 42 a starter purchase (1,000 tokens).
async fn grant_starter(server: &TestServer) {
    let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
    assert_eq!(server.deliver_signed(&event).await.status(), StatusCode::OK);
}

async fn payment_state_is_shown_to_its_owner_only(db: Db) {
    let (server, _stripe) = TestServer::start_with_stripe(db).await;
    let session = server.checkout("42", "pro").await;

    let response = server.payment("42", &session).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["session_id"], session.as_str());
    assert_eq!(body["package_id"], "pro");
    assert_eq!(body["tokens"], 5_000);
    assert_eq!(body["amount_cents"], 2_000);
    assert_eq!(body["status"], "open");

    let others = server.payment("43", &session).await;
    let unknown = server.payment("42", "cs_test_unknown").await;
    assert_eq!(others.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let others: Value = others.json().await.expect("JSON");
    let unknown: Value = unknown.json().await.expect("JSON");
    assert_eq!(others, unknown, "another user's session looks unknown");

    let anonymous = server
        .client
        .get(server.url(&format!("/api/v1/stripe/payments/{session}")))
        .send()
        .await
        .expect("request completes");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

async fn transactions_page_through_every_row_once(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    grant_starter(&server).await;
    for index in 0..6 {
        let response = server.debit("42", 10, &format!("page-{index}")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let all = server.transactions_paged("42", 100).await;
    let paged = server.transactions_paged("42", 2).await;
    assert_eq!(all.len(), 7);
    assert_eq!(all, paged);
    assert_eq!(server.assert_ledger_balanced("42").await, 940);

    for query in [
        "limit=0",
        "limit=101",
        "limit=x",
        "before=nonsense",
        "before=1.txn_1",
    ] {
        let response = server
            .client
            .get(server.url(&format!("/api/v1/tokens/transactions?{query}")))
            .bearer_auth(token("42"))
            .send()
            .await
            .expect("request completes");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
}

async fn debit_spends_once_per_key_and_never_overdraws(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let response = server.debit("42", 1, "too-early").await;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    let problem: Value = response.json().await.expect("JSON");
    assert_eq!(problem["balance"], 0);

    grant_starter(&server).await;
    let first = server.debit("42", 300, "gen-1").await;
    assert_eq!(first.status(), StatusCode::OK);
    let first: Value = first.json().await.expect("JSON");
    assert_eq!(first["balance"], 700);
    assert_eq!(first["amount"], 300);

    let replay = server.debit("42", 300, "gen-1").await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.expect("JSON");
    assert_eq!(
        replay, first,
        "a replay answers what the first call answered"
    );

    let reused = server.debit("42", 301, "gen-1").await;
    assert_eq!(reused.status(), StatusCode::CONFLICT);
    let too_much = server.debit("42", 701, "gen-2").await;
    assert_eq!(too_much.status(), StatusCode::PAYMENT_REQUIRED);
    let problem: Value = too_much.json().await.expect("JSON");
    assert_eq!(problem["balance"], 700);
    assert_eq!(
        server.debit("42", 700, "gen-3").await.status(),
        StatusCode::OK
    );
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    let rows = server.transactions("42").await;
    assert_eq!(rows[0]["reason"], "debit");
    assert_eq!(rows[0]["idempotency_key"], "gen-3");
}

async fn debit_requires_the_service_token(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let body = json!({"user_id": "42", "amount": 1, "idempotency_key": "k"});
    let url = server.url("/internal/v1/tokens/debit");
    let wrong = [None, Some(token("42")), Some(format!("{SERVICE_TOKEN}x"))];
    for bearer in wrong {
        let mut request = server.client.post(&url).json(&body);
        if let Some(bearer) = &bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.expect("request completes");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{bearer:?}");
    }

    let unconfigured = TestServer::start(
        db,
        Options {
            service_token: None,
            ..Options::default()
        },
    )
    .await;
    let response = unconfigured.debit("42", 1, "k").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}

async fn debit_rejects_bad_input(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let url = server.url("/internal/v1/tokens/debit");
    let cases: [(&str, StatusCode); 7] = [
        ("not json", StatusCode::BAD_REQUEST),
        (
            r#"{"user_id":"42","amount":"5","idempotency_key":"k"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"user_id":"42","idempotency_key":"k"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"user_id":"42","amount":1.5,"idempotency_key":"k"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            r#"{"user_id":"42","amount":0,"idempotency_key":"k"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"user_id":"","amount":1,"idempotency_key":"k"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            r#"{"user_id":"42","amount":1,"idempotency_key":""}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (body, expected) in cases {
        let response = server
            .client
            .post(&url)
            .bearer_auth(SERVICE_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request completes");
        assert_eq!(response.status(), expected, "{body}");
    }
}

async fn concurrent_debits_never_spend_the_same_tokens_twice(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    grant_starter(&server).await;

    // 24 debits of 100 against 1,000 tokens: exactly 10 succeed; the same key sent twice
    // at once debits once.
    let keys: Vec<String> = (0..24)
        .map(|index| format!("burst-{}", index % 20))
        .collect();
    let debits = keys.iter().map(|key| server.debit("42", 100, key));
    let statuses: Vec<StatusCode> = futures::future::join_all(debits)
        .await
        .iter()
        .map(reqwest::Response::status)
        .collect();
    assert!(statuses
        .iter()
        .all(|status| *status == StatusCode::OK || *status == StatusCode::PAYMENT_REQUIRED));
    assert_eq!(server.assert_ledger_balanced("42").await, 0);
    let debit_rows = server
        .transactions("42")
        .await
        .iter()
        .filter(|row| row["reason"] == "debit")
        .count();
    assert_eq!(debit_rows, 10);
}
