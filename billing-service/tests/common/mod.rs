//! Shared helpers for billing's integration tests: an in-process server on a real socket
//! over a fresh database, a local Stripe stand-in, tokens and signed events.
//!
//! Every database test runs twice, through [`both_backends!`]: on a fresh SQLite file, and
//! on a fresh Postgres database created under `TEST_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/test`) and dropped afterwards. Without that variable
//! the Postgres variant passes vacuously, except under `CI=true`, where it fails.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod stripe;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use billing_service::config::{Config, Environment, Secret};
use billing_service::db::Pool;
use billing_service::http::{self, AppState};
use billing_service::metrics::Metrics;
use billing_service::webhook::signature;
use reqwest::Url;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use self::stripe::StripeStandIn;

pub const JWT_SECRET: &str = "test-jwt-secret";
pub const WEBHOOK_SECRET: &str = "whsec_test_integration_secret";
pub const STRIPE_KEY: &str = "sk_test_integration_key";
pub const SERVICE_TOKEN: &str = "svc_test_integration_token";

/// Runs each named `async fn name(db: Db)` as two tests, `name::sqlite` and
/// `name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Db::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if $crate::common::postgres_admin_url().is_some() {
                        super::$name($crate::common::Db::Postgres).await;
                    }
                }
            }
        )*
    };
}

/// Which engine a test's database runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// `TEST_POSTGRES_URL`, the server under which each Postgres test creates its database.
/// `None` means skip the Postgres variant; under `CI=true` a missing URL fails the test
/// instead, so CI can never pass without having run against Postgres.
#[track_caller]
pub fn postgres_admin_url() -> Option<Url> {
    match std::env::var("TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(Url::parse(&url).expect("TEST_POSTGRES_URL is a URL")),
        _ => {
            let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
            assert!(
                !in_ci,
                "CI=true but TEST_POSTGRES_URL is unset: Postgres tests cannot run"
            );
            None
        }
    }
}

/// A fresh, empty database for one test, removed on drop.
pub struct TestDatabase {
    pub db: Db,
    pub url: String,
    /// For Postgres: the admin URL and the name of the database to drop.
    postgres: Option<(Url, String)>,
    dir: TempDir,
}

impl TestDatabase {
    pub async fn create(db: Db) -> Self {
        let dir = TempDir::new();
        match db {
            Db::Sqlite => Self {
                db,
                url: format!("sqlite://{}/data/billing.db?mode=rwc", dir.0.display()),
                postgres: None,
                dir,
            },
            Db::Postgres => {
                let admin = postgres_admin_url().expect("TEST_POSTGRES_URL is set");
                let name = format!("tollgate_test_{}", hex::encode(rand::random::<[u8; 8]>()));
                let mut connection = connect_postgres(&admin).await;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut connection)
                    .await
                    .expect("create the test database");
                let mut url = admin.clone();
                url.set_path(&format!("/{name}"));
                Self {
                    db,
                    url: url.to_string(),
                    postgres: Some((admin, name)),
                    dir,
                }
            }
        }
    }

    /// The SQLite file, for tests that lock or break it.
    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.0.join("data/billing.db")
    }
}

async fn connect_postgres(url: &Url) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(url.as_str())
        .await
        .expect("connect to TEST_POSTGRES_URL")
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop may run inside the test's runtime, so the cleanup gets a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async {
                let mut connection = connect_postgres(&admin).await;
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut connection)
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

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

/// Which secrets the server under test is given, and what it changes in the shipped config.
pub struct Options {
    pub stripe_secret_key: Option<&'static str>,
    pub stripe_api_base: Option<Url>,
    pub webhook_secret: Option<&'static str>,
    pub service_token: Option<&'static str>,
    /// Replaces `stripe.request_timeout_secs` (20 s shipped), for tests of a slow Stripe.
    pub stripe_request_timeout: Option<Duration>,
    /// Replaces `stripe.max_retries` (2 shipped).
    pub stripe_max_retries: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stripe_secret_key: Some(STRIPE_KEY),
            stripe_api_base: None,
            webhook_secret: Some(WEBHOOK_SECRET),
            service_token: Some(SERVICE_TOKEN),
            stripe_request_timeout: None,
            stripe_max_retries: None,
        }
    }
}

impl Options {
    /// The defaults, with Stripe's API at `stripe`.
    pub fn with_stripe(stripe: &StripeStandIn) -> Self {
        Self {
            stripe_api_base: Some(stripe.base.clone()),
            ..Self::default()
        }
    }
}

/// A billing server running in this process on 127.0.0.1 over a fresh database.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub metrics: Metrics,
    /// The server's own pool, for tests that inspect or break the database.
    pub pool: Pool,
    stop: Option<oneshot::Sender<()>>,
    // Declared last: dropped after the server is told to stop.
    pub database: TestDatabase,
}

impl TestServer {
    pub async fn start(db: Db, options: Options) -> Self {
        let database = TestDatabase::create(db).await;
        let config_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/billing.toml");
        let mut config = Config::load(&config_path).expect("shipped config loads");
        if let Some(timeout) = options.stripe_request_timeout {
            config.stripe.request_timeout = timeout;
        }
        if let Some(retries) = options.stripe_max_retries {
            config.stripe.max_retries = retries;
        }
        let database_url = database.url.clone();
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
            billing_service_token: options.service_token.map(Secret::new),
        };

        let pool = billing_service::db::connect(&env.database_url)
            .await
            .expect("database opens");
        let metrics = Metrics::new();
        let state =
            AppState::new(&config, &env, pool.clone(), metrics.clone()).expect("state builds");
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
            pool,
            stop: Some(stop),
            database,
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

    /// Every transaction of `user`, newest first, read page by page (`page` rows a page).
    pub async fn transactions_paged(&self, user: &str, page: u32) -> Vec<serde_json::Value> {
        let mut rows = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut url = format!("/api/v1/tokens/transactions?limit={page}");
            if let Some(cursor) = &before {
                url.push_str(&format!("&before={cursor}"));
            }
            let response = self
                .client
                .get(self.url(&url))
                .bearer_auth(token(user))
                .send()
                .await
                .expect("transactions request completes");
            assert_eq!(response.status(), StatusCode::OK);
            let body: serde_json::Value = response.json().await.expect("transactions are JSON");
            let page_rows = body["transactions"].as_array().expect("a list");
            assert!(page_rows.len() <= page as usize);
            rows.extend(page_rows.iter().cloned());
            match body["next_before"].as_str() {
                Some(cursor) => before = Some(cursor.to_owned()),
                None => return rows,
            }
        }
    }

    pub async fn transactions(&self, user: &str) -> Vec<serde_json::Value> {
        self.transactions_paged(user, 100).await
    }

    /// Asserts that `user`'s balance is the sum of their transactions, and returns it.
    pub async fn assert_ledger_balanced(&self, user: &str) -> i64 {
        let balance = self.balance(user).await;
        let sum: i64 = self
            .transactions_paged(user, 7)
            .await
            .iter()
            .map(|row| row["amount"].as_i64().expect("integer amount"))
            .sum();
        assert_eq!(
            balance, sum,
            "balance of {user} differs from its transactions"
        );
        balance
    }

    /// Posts a debit to the internal API with the test service token.
    pub async fn debit(&self, user: &str, amount: i64, key: &str) -> reqwest::Response {
        self.client
            .post(self.url("/internal/v1/tokens/debit"))
            .bearer_auth(SERVICE_TOKEN)
            .json(&serde_json::json!({"user_id": user, "amount": amount, "idempotency_key": key}))
            .send()
            .await
            .expect("debit request completes")
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

// ===== Events for one purchase =====

/// A fixture event re-identified as `event_id`, with `edit` applied to its `data.object`.
#[track_caller]
pub fn event_from(fixture: &str, event_id: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut event: Value =
        serde_json::from_slice(&read_shared(&format!("stripe/fixtures/{fixture}")))
            .expect("fixture is JSON");
    event["id"] = Value::from(event_id);
    edit(&mut event["data"]["object"]);
    serde_json::to_vec(&event).expect("serialises")
}

/// A paid-session event of `fixture`'s type for user 42's `starter` purchase `session`,
/// paid through `payment_intent`.
pub fn session_event(
    fixture: &str,
    event_id: &str,
    session: &str,
    payment_intent: &str,
) -> Vec<u8> {
    event_from(fixture, event_id, |object| {
        object["id"] = Value::from(session);
        object["payment_intent"] = Value::from(payment_intent);
        object["metadata"]["package_id"] = Value::from("starter");
    })
}

/// `checkout.session.completed`, paid, for `session`.
pub fn completed(event_id: &str, session: &str, payment_intent: &str) -> Vec<u8> {
    session_event(
        "event_checkout_session_completed.json",
        event_id,
        session,
        payment_intent,
    )
}

/// `charge.refunded` for a 500-cent charge of `payment_intent`, of which `refunded` cents
/// have been refunded so far.
pub fn refunded(event_id: &str, payment_intent: &str, refunded: i64) -> Vec<u8> {
    event_from("event_charge_refunded.json", event_id, |object| {
        object["payment_intent"] = Value::from(payment_intent);
        object["amount"] = Value::from(500);
        object["amount_refunded"] = Value::from(refunded);
        object["refunded"] = Value::from(refunded == 500);
    })
}

/// A random suffix, so that ids never collide between tests sharing a database server.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 6]>()))
}

impl TestServer {
    /// A server whose Stripe API base is a fresh stand-in that creates sessions.
    pub async fn start_with_stripe(db: Db) -> (Self, StripeStandIn) {
        let stripe = StripeStandIn::start().await;
        (Self::start(db, Options::with_stripe(&stripe)).await, stripe)
    }

    /// `POST /api/v1/stripe/checkout` for `package_id` as `user`, whatever the answer.
    pub async fn request_checkout(&self, user: &str, package_id: &str) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/stripe/checkout"))
            .bearer_auth(token(user))
            .json(&serde_json::json!({
                "package_id": package_id,
                "success_url": "https://app.example.com/done",
                "cancel_url": "https://app.example.com/cancel",
            }))
            .send()
            .await
            .expect("checkout request completes")
    }

    /// Opens a checkout for `user` and returns the session id: a recorded purchase.
    pub async fn checkout(&self, user: &str, package_id: &str) -> String {
        let response = self.request_checkout(user, package_id).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("checkout answer is JSON");
        body["session_id"].as_str().expect("session id").to_owned()
    }

    /// The status of each purchase `user` started, oldest first, read from the database
    /// because a purchase whose session was never opened has no id the API could show.
    pub async fn purchase_statuses(&self, user: &str) -> Vec<String> {
        sqlx::query_scalar(
            r"SELECT status
              FROM purchases
              WHERE user_id = $1
              ORDER BY created_at, id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .expect("read purchase statuses")
    }

    /// `GET /api/v1/stripe/payments/{session}` as `user`.
    pub async fn payment(&self, user: &str, session: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/v1/stripe/payments/{session}")))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("payment request completes")
    }

    /// The `status` of `user`'s purchase `session`, as `GET /api/v1/stripe/payments` shows it.
    pub async fn payment_status(&self, user: &str, session: &str) -> String {
        let response = self.payment(user, session).await;
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let body: serde_json::Value = response.json().await.expect("JSON");
        body["status"].as_str().expect("a status").to_owned()
    }
}

// ===== Breaking the database on purpose =====

impl TestServer {
    /// Makes every ledger insert fail until [`TestServer::repair_ledger`], as a database
    /// failure in the middle of a grant would.
    pub async fn break_ledger(&self) {
        let statements: &[&str] = match self.database.db {
            Db::Sqlite => &[
                r"CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger_transactions
                BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            ],
            Db::Postgres => &[
                r"CREATE FUNCTION fail_ledger() RETURNS trigger LANGUAGE plpgsql
                  AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
                r"CREATE TRIGGER fail_ledger BEFORE INSERT ON ledger_transactions
                  FOR EACH ROW EXECUTE FUNCTION fail_ledger()",
            ],
        };
        for statement in statements {
            sqlx::query(statement)
                .execute(&self.pool)
                .await
                .expect("install the failing trigger");
        }
    }

    pub async fn repair_ledger(&self) {
        let statement = match self.database.db {
            Db::Sqlite => "DROP TRIGGER fail_ledger",
            Db::Postgres => "DROP TRIGGER fail_ledger ON ledger_transactions",
        };
        sqlx::query(statement)
            .execute(&self.pool)
            .await
            .expect("drop the failing trigger");
    }

    /// Holds the database's write lock (SQLite) or an exclusive lock on the event table
    /// (Postgres) from a separate connection for `hold`.
    pub async fn hold_write_lock(&self, hold: Duration) -> tokio::task::JoinHandle<()> {
        use sqlx::Connection as _;
        let mut connection = sqlx::AnyConnection::connect(&self.database.url)
            .await
            .expect("second connection");
        let statements: &[&str] = match self.database.db {
            Db::Sqlite => &["BEGIN IMMEDIATE"],
            Db::Postgres => &["BEGIN", "LOCK TABLE stripe_events IN ACCESS EXCLUSIVE MODE"],
        };
        for statement in statements {
            sqlx::query(statement)
                .execute(&mut connection)
                .await
                .expect("take the lock");
        }
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            sqlx::query("COMMIT")
                .execute(&mut connection)
                .await
                .expect("release the lock");
        })
    }
}
