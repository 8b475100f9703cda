//! Shared helpers for billing's integration tests: an in-process server on a real socket
//! with a real SQLite file, a local Stripe stand-in, tokens and signed events.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use billing_service::config::{Config, Environment, Secret};
use billing_service::http::{self, AppState};
use billing_service::metrics::Metrics;
use billing_service::webhook::signature;
use reqwest::Url;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const JWT_SECRET: &str = "test-jwt-secret";
pub const WEBHOOK_SECRET: &str = "whsec_test_integration_secret";
pub const STRIPE_KEY: &str = "sk_test_integration_key";

/// `shared/` beside the repository, which holds Stripe's reference data.
#[track_caller]
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        dir.is_dir(),
        "shared reference data missing at {}",
        dir.display()
    );
    dir
}

#[track_caller]
pub fn read_shared(relative: &str) -> Vec<u8> {
    let path = shared_dir().join(relative);
    std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

pub fn unix_now() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(elapsed.as_secs()).expect("seconds fit i64")
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let name = format!("billing-test-{}", hex::encode(rand::random::<[u8; 8]>()));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which secrets the server under test is given.
pub struct Options {
    pub stripe_secret_key: Option<&'static str>,
    pub stripe_api_base: Option<Url>,
    pub webhook_secret: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stripe_secret_key: Some(STRIPE_KEY),
            stripe_api_base: None,
            webhook_secret: Some(WEBHOOK_SECRET),
        }
    }
}

/// A billing server running in this process on 127.0.0.1 with a fresh SQLite file.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    _dir: TempDir,
}

impl TestServer {
    pub async fn start(options: Options) -> Self {
        let dir = TempDir::new();
        let config_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/billing.toml");
        let config = Config::load(&config_path).expect("shipped config loads");
        let database_url = format!("sqlite://{}/data/billing.db?mode=rwc", dir.0.display());
        let env = Environment {
            stripe_secret_key: options.stripe_secret_key.map(Secret::new),
            stripe_publishable_key: Some("pk_test_integration".to_owned()),
            stripe_webhook_secret: options.webhook_secret.map(Secret::new),
            stripe_api_base: options
                .stripe_api_base
                // Nothing listens on port 9 here; tests that reach Stripe pass a stand-in.
                .unwrap_or_else(|| Url::parse("http://127.0.0.1:9").expect("valid URL")),
            database_url: Secret::new(database_url),
            jwt_secret: Some(Secret::new(JWT_SECRET)),
        };

        let pool = billing_service::db::connect(&env.database_url)
            .await
            .expect("database opens");
        let metrics = Metrics::new();
        let state = AppState::new(&config, &env, pool, metrics.clone()).expect("state builds");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(http::serve(listener, http::router(state), async {
            let _ = stopped.await;
        }));

        Self {
            addr,
            client: reqwest::Client::new(),
            metrics,
            stop: Some(stop),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts `body` to the webhook with the given `Stripe-Signature` (or none).
    pub async fn deliver(&self, body: &[u8], signature: Option<&str>) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/api/v1/stripe/webhook"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("webhook request completes")
    }

    /// Posts `body` signed now with the server's webhook secret.
    pub async fn deliver_signed(&self, body: &[u8]) -> reqwest::Response {
        let header = signature::sign(WEBHOOK_SECRET, unix_now(), body);
        self.deliver(body, Some(&header)).await
    }

    pub async fn balance(&self, user: &str) -> i64 {
        let response = self
            .client
            .get(self.url("/api/v1/tokens/balance"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("balance request completes");
        assert_eq!(response.status(), StatusCode::OK);
        let body: serde_json::Value = response.json().await.expect("balance is JSON");
        assert_eq!(body["user_id"], user);
        body["balance"].as_i64().expect("balance is an integer")
    }

    pub async fn transactions(&self, user: &str) -> Vec<serde_json::Value> {
        let response = self
            .client
            .get(self.url("/api/v1/tokens/transactions"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("transactions request completes");
        assert_eq!(response.status(), StatusCode::OK);
        let body: serde_json::Value = response.json().await.expect("transactions are JSON");
        body["transactions"].as_array().expect("a list").clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn token(user: &str) -> String {
    tollgate_auth::mint_hs256(JWT_SECRET.as_bytes(), user, Duration::from_secs(3600))
}

/// A fixture from `shared/stripe/fixtures/` with its `"key": "old"` text replaced, leaving
/// every other byte as Stripe sent it.
#[track_caller]
pub fn fixture_with(name: &str, replacements: &[(&str, &str)]) -> Vec<u8> {
    let mut text = String::from_utf8(read_shared(&format!("stripe/fixtures/{name}")))
        .expect("fixture is UTF-8");
    for (old, new) in replacements {
        assert!(text.contains(old), "{name} does not contain {old}");
        text = text.replace(old, new);
    }
    text.into_bytes()
}

/// The paid `checkout.session.completed` fixture, sold as `starter`.
pub fn paid_starter_event() -> Vec<u8> {
    fixture_with(
        "event_checkout_session_completed.json",
        &[(
            r#""package_id": "tokens_1000""#,
            r#""package_id": "starter""#,
        )],
    )
}

// ===== Stripe stand-in =====

/// One request the stand-in received.
#[derive(Clone, Debug)]
pub struct Captured {
    pub path: String,
    pub headers: HeaderMap,
    pub form: Vec<(String, String)>,
}

/// What the stand-in answers.
#[derive(Clone, Copy, Debug)]
pub enum StandInMode {
    /// Creates sessions.
    Succeed,
    /// Answers 500 this many times, then creates sessions.
    FailFirst(usize),
    /// Always refuses with a Stripe-shaped 400.
    Reject,
}

#[derive(Clone)]
struct StandInState {
    captured: Arc<Mutex<Vec<Captured>>>,
    mode: StandInMode,
    calls: Arc<AtomicUsize>,
}

/// A local server that speaks Stripe's Checkout Session API.
pub struct StripeStandIn {
    pub base: Url,
    captured: Arc<Mutex<Vec<Captured>>>,
}

impl StripeStandIn {
    pub async fn start(mode: StandInMode) -> Self {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let state = StandInState {
            captured: captured.clone(),
            mode,
            calls: Arc::new(AtomicUsize::new(0)),
        };
        let router = Router::new()
            .route("/v1/checkout/sessions", post(create_session))
            .with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            base: Url::parse(&format!("http://{addr}")).expect("valid URL"),
            captured,
        }
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.captured.lock().expect("not poisoned").clone()
    }
}

async fn create_session(
    State(state): State<StandInState>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let form: Vec<(String, String)> = serde_urlencoded::from_str(&body).expect("form-encoded");
    let call = state.calls.fetch_add(1, Ordering::SeqCst);
    state.captured.lock().expect("not poisoned").push(Captured {
        path: "/v1/checkout/sessions".to_owned(),
        headers: headers.clone(),
        form: form.clone(),
    });
    let request_id = [("request-id", format!("req_standin_{call}"))];

    let failing = match state.mode {
        StandInMode::Succeed => false,
        StandInMode::FailFirst(failures) => call < failures,
        StandInMode::Reject => {
            let error = serde_json::json!({"error": {
                "type": "invalid_request_error", "code": "parameter_invalid", "message": "bad"
            }});
            return (StatusCode::BAD_REQUEST, request_id, Json(error)).into_response();
        }
    };
    if failing {
        let error = serde_json::json!({"error": {"type": "api_error", "message": "try again"}});
        return (StatusCode::INTERNAL_SERVER_ERROR, request_id, Json(error)).into_response();
    }

    // Stripe answers a repeated idempotency key with the first session, so the id is
    // derived from the key.
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("none");
    let id = format!(
        "cs_test_standin_{}",
        key.replace(|c: char| !c.is_alphanumeric(), "")
    );
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, v)| v.clone())
    };
    let expires_at: i64 = field("expires_at")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let session = serde_json::json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        "expires_at": expires_at,
        "payment_status": "unpaid",
        "status": "open",
        "client_reference_id": field("client_reference_id"),
        "amount_total": field("line_items[0][price_data][unit_amount]")
            .and_then(|v| v.parse::<i64>().ok()),
        "currency": field("line_items[0][price_data][currency]"),
    });
    (StatusCode::OK, request_id, Json(session)).into_response()
}
