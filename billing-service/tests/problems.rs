//! Every error answer is an RFC 9457 problem document, including the ones axum's own
//! extractors would otherwise answer in plain text.

mod common;

use common::{token, Db, Options, TestServer, SERVICE_TOKEN};
use reqwest::StatusCode;

both_backends!(
    malformed_paths_queries_and_bodies_get_problem_documents,
    bodies_not_declared_as_json_are_415,
);

/// Asserts that `response` is a problem document with `status`.
#[track_caller]
fn assert_problem(response: &reqwest::Response, status: StatusCode, what: &str) {
    assert_eq!(response.status(), status, "{what}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().expect("ASCII").to_owned());
    assert_eq!(
        content_type.as_deref(),
        Some("application/problem+json"),
        "{what}"
    );
}

async fn malformed_paths_queries_and_bodies_get_problem_documents(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let bearer = token("42");
    let gets = [
        "/api/v1/stripe/packages/%FF",
        "/api/v1/stripe/payments/%FF",
        "/api/v1/tokens/transactions?limit=1&limit=2",
        "/api/v1/tokens/transactions?limit=%FF",
    ];
    for path in gets {
        let response = server
            .client
            .get(server.url(path))
            .bearer_auth(&bearer)
            .send()
            .await
            .expect("request completes");
        assert_problem(&response, StatusCode::BAD_REQUEST, path);
        let problem: serde_json::Value = response.json().await.expect("problem JSON");
        assert_eq!(problem["status"], 400, "{path}");
    }

    let response = server
        .client
        .post(server.url("/api/v1/stripe/checkout"))
        .bearer_auth(&bearer)
        .header("content-type", "application/json; charset=utf-8")
        .body("{not json")
        .send()
        .await
        .expect("request completes");
    assert_problem(&response, StatusCode::BAD_REQUEST, "malformed JSON");
}

async fn bodies_not_declared_as_json_are_415(db: Db) {
    let server = TestServer::start(db, Options::default()).await;
    let checkout = r#"{"package_id":"starter","success_url":"https://a.example/ok",
        "cancel_url":"https://a.example/no"}"#;
    let debit = r#"{"user_id":"42","amount":1,"idempotency_key":"k"}"#;
    let requests = [
        (
            "/api/v1/stripe/checkout",
            token("42"),
            checkout,
            Some("text/plain"),
        ),
        ("/api/v1/stripe/checkout", token("42"), checkout, None),
        (
            "/internal/v1/tokens/debit",
            SERVICE_TOKEN.to_owned(),
            debit,
            Some("application/x-www-form-urlencoded"),
        ),
    ];
    for (path, bearer, body, content_type) in requests {
        let mut request = server
            .client
            .post(server.url(path))
            .bearer_auth(bearer)
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("request completes");
        assert_problem(
            &response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("{path} as {content_type:?}"),
        );
    }
}
