//! A minimal local stand-in for Stripe's `POST /v1/checkout/sessions`, for running the
//! service (and schemathesis against it) without reaching Stripe.
//!
//! Usage: `cargo run -p billing-service --example stripe_stand_in -- 127.0.0.1:12111`, then
//! start billing with `STRIPE_API_BASE=http://127.0.0.1:12111` and any `STRIPE_SECRET_KEY`.
//! Each Idempotency-Key yields one session id, as Stripe's replay would. It checks
//! nothing else; the test suite's stand-in (`tests/common`) is the strict one.

use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Form, Json, Router};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:12111".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let router = Router::new().route("/v1/checkout/sessions", post(create_session));
    axum::serve(listener, router).await?;
    Ok(())
}

async fn create_session(
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Json<Value> {
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("none");
    let id = format!(
        "cs_test_stand_in_{}",
        key.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let expires_at = field("expires_at")
        .and_then(|value| value.parse::<i64>().ok())
        .unwrap_or_default();
    Json(json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        "expires_at": expires_at,
        "mode": "payment",
        "payment_status": "unpaid",
        "status": "open",
        "client_reference_id": field("client_reference_id"),
        "currency": field("line_items[0][price_data][currency]"),
    }))
}
