//! The anonymous daily quota, end to end: real gateway, real sockets, a capturing upstream.

mod common;

use common::{client_from, header_values, token_for, Stack, StackOptions};
use reqwest::{Client, Response, StatusCode};

const POLICY: &str = "\"anonymous-generate\";q=3;w=86400";

async fn generate(client: &Client, stack: &Stack) -> Response {
    client
        .post(stack.url("/api/v1/generate"))
        .body("{}")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn fourth_anonymous_generation_is_refused_with_exact_headers() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 1, 1]);

    for remaining in [2, 1, 0] {
        let response = generate(&client, &stack).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header_values(&response, "x-ratelimit-limit"), ["3"]);
        assert_eq!(
            header_values(&response, "x-ratelimit-remaining"),
            [remaining.to_string()]
        );
        assert_eq!(header_values(&response, "x-ratelimit-reset"), ["86400"]);
        assert_eq!(header_values(&response, "ratelimit-policy"), [POLICY]);
        let current = format!("\"anonymous-generate\";r={remaining};t=86400");
        assert_eq!(header_values(&response, "ratelimit"), [current]);
        assert!(header_values(&response, "retry-after").is_empty());
    }

    for _ in 0..2 {
        let refused = generate(&client, &stack).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header_values(&refused, "retry-after"), ["86400"]);
        assert_eq!(header_values(&refused, "x-ratelimit-remaining"), ["0"]);
        assert_eq!(header_values(&refused, "x-ratelimit-reset"), ["86400"]);
        assert_eq!(
            header_values(&refused, "ratelimit"),
            ["\"anonymous-generate\";r=0;t=86400"]
        );
        assert_eq!(
            header_values(&refused, "content-type"),
            ["application/problem+json"]
        );
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["status"], 429);
        assert_eq!(body["limit"], "anonymous-generate");
        assert_eq!(body["retry_after"], 86400);
        assert_eq!(body["buy_tokens"], "/api/v1/stripe/packages");
        assert!(body["sign_in"].is_string());
    }

    assert_eq!(stack.upstream.count("/api/v1/generate"), 3);
}

#[tokio::test]
async fn clients_have_separate_budgets_and_probes_count_nothing() {
    let stack = Stack::start(StackOptions::default()).await;
    let first = client_from([127, 0, 2, 1]);
    let second = client_from([127, 0, 2, 2]);

    for _ in 0..3 {
        assert_eq!(generate(&first, &stack).await.status(), StatusCode::OK);
    }
    for _ in 0..5 {
        let probe = first.get(stack.url("/healthz")).send().await.unwrap();
        assert_eq!(probe.status(), StatusCode::OK);
        assert!(header_values(&probe, "x-ratelimit-remaining").is_empty());
        let admin = first.get(stack.admin_url("/healthz")).send().await.unwrap();
        assert_eq!(admin.status(), StatusCode::OK);
    }
    assert_eq!(
        generate(&first, &stack).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let other = generate(&second, &stack).await;
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(header_values(&other, "x-ratelimit-remaining"), ["2"]);
}

#[tokio::test]
async fn upstream_rate_limit_headers_are_replaced_not_repeated() {
    let stack = Stack::start(StackOptions::default()).await;
    let response = generate(&client_from([127, 0, 3, 1]), &stack).await;
    assert_eq!(header_values(&response, "x-ratelimit-limit"), ["3"]);
    assert_eq!(header_values(&response, "ratelimit-policy"), [POLICY]);

    // Unlimited routes keep whatever the app says.
    let other = client_from([127, 0, 3, 1])
        .get(stack.url("/about"))
        .send()
        .await
        .unwrap();
    assert_eq!(header_values(&other, "x-ratelimit-limit"), ["999"]);
}

#[tokio::test]
async fn valid_bearer_tokens_are_not_limited() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 4, 1]);
    let token = token_for("42");

    for _ in 0..10 {
        let response = client
            .post(stack.url("/api/v1/generate"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // No limit covers the user, so the gateway adds nothing; the app's own header passes.
        assert_eq!(header_values(&response, "x-ratelimit-limit"), ["999"]);
        assert!(header_values(&response, "ratelimit").is_empty());
    }
    let seen = stack.upstream.requests();
    let forwarded = seen[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(forwarded, format!("Bearer {token}"));

    // Authenticated traffic left the address's anonymous budget whole.
    let anonymous = generate(&client, &stack).await;
    assert_eq!(header_values(&anonymous, "x-ratelimit-remaining"), ["2"]);
}

#[tokio::test]
async fn expired_malformed_and_forged_tokens_count_as_anonymous() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 5, 1]);
    let now = common::unix_now();
    let sign = |claims: serde_json::Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let expired = sign(
        serde_json::json!({"sub": "42", "exp": now - 3600}),
        common::JWT_SECRET,
    );
    let forged = sign(
        serde_json::json!({"sub": "42", "exp": now + 3600}),
        "not-the-secret",
    );
    let headers = [
        format!("Bearer {expired}"),
        format!("Bearer {forged}"),
        "Bearer not.a.jwt".to_string(),
        format!("X Bearer {}", token_for("42")),
    ];

    let mut statuses = Vec::new();
    for value in &headers {
        let response = client
            .post(stack.url("/api/v1/generate"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);

    // The junk shared the address's one bucket: a bare request is refused too.
    assert_eq!(
        generate(&client, &stack).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn path_spellings_share_one_limit() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 6, 1]);
    for path in [
        "/api/v1/generate",
        "/api//v1/./generate",
        "/api/v1/%67enerate",
    ] {
        let response = client.post(stack.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let fourth = client
        .post(stack.url("/healthz/../api/v1/generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(fourth.status(), StatusCode::TOO_MANY_REQUESTS);

    // The app receives the normalised path.
    assert_eq!(stack.upstream.count("/api/v1/generate"), 3);
}

#[tokio::test]
async fn anonymous_daily_limit_comes_from_the_environment() {
    let options = StackOptions {
        env: vec![("ANONYMOUS_DAILY_LIMIT".into(), "5".into())],
        ..StackOptions::default()
    };
    let stack = Stack::start(options).await;
    let response = generate(&client_from([127, 0, 7, 1]), &stack).await;
    assert_eq!(header_values(&response, "x-ratelimit-limit"), ["5"]);
    assert_eq!(header_values(&response, "x-ratelimit-remaining"), ["4"]);
}

#[tokio::test]
async fn metrics_count_decisions_by_limit_without_client_data() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 8, 1]);
    for _ in 0..4 {
        generate(&client, &stack).await;
    }
    let text = reqwest::get(stack.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = "gateway_limit_decisions_total{limit=\"anonymous-generate\",outcome=\"refused\"} 1";
    assert!(text.contains(line), "{text}");
    assert!(!text.contains("127.0.8.1"));
}
