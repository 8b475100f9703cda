//! The HTTP surface: routes, shared state, the bearer-token extractor, and the one place
//! where errors become statuses.
//!
//! Every error answer is `application/problem+json` (RFC 9457) with `type`, `title`, `status`
//! and `detail`. Internal failures are logged once here and answered generically; database
//! and Stripe details never reach the client. Checkout, webhook and debit handling live in
//! their own modules; the small read-only handlers live here. The public API is described
//! by the OpenAPI document served at `/openapi.json` (`openapi.json` beside this file),
//! which must change together with the routes and bodies here.

use std::error::Error as _;
use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tollgate_auth::{BearerVerifier, UserId};

use crate::catalog::{Catalog, Package, Tokens};
use crate::checkout::{self, CheckoutError};
use crate::config::{Config, Environment, Secret, WebhookSettings};
use crate::db::{self, DbError, Engine, Pool, PurchaseView};
use crate::debit::{self, DebitError};
use crate::group_commit::GroupCommit;
use crate::ledger::{self, Cursor, LedgerError, Transaction};
use crate::metrics::Metrics;
use crate::stripe::{SessionId, StripeClient, StripeError};
use crate::webhook::{self, signature::SignatureError, WebhookError};

/// Largest accepted checkout request body, in bytes.
const CHECKOUT_BODY_LIMIT: usize = 16 * 1024;

/// Largest accepted debit request body, in bytes.
const DEBIT_BODY_LIMIT: usize = 4 * 1024;

/// Ledger rows per page of `GET /api/v1/tokens/transactions` when `limit` is not given.
const TRANSACTIONS_PAGE_DEFAULT: u32 = 50;

/// Most ledger rows one page may hold.
const TRANSACTIONS_PAGE_MAX: u32 = 100;

/// The OpenAPI 3 description of the public API, served as written.
const OPENAPI_DOCUMENT: &str = include_str!("openapi.json");

/// The media type of every error answer (RFC 9457).
const PROBLEM_JSON: &str = "application/problem+json";

// ===== State =====

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// The contents of [`AppState`]; its fields are for this crate's handlers only.
pub struct Inner {
    pub(crate) pool: Pool,
    /// Grants share transactions on SQLite, whose commits each wait for the disk; `None` on
    /// Postgres, where concurrent transactions commit in parallel.
    pub(crate) grants: Option<GroupCommit>,
    pub(crate) catalog: Catalog,
    pub(crate) metrics: Metrics,
    pub(crate) webhook: WebhookSettings,
    /// `None` when `STRIPE_WEBHOOK_SECRET` is unset: deliveries get 503.
    pub(crate) webhook_secret: Option<Secret>,
    /// `None` when `STRIPE_SECRET_KEY` is unset: checkout gets 503.
    pub(crate) stripe: Option<StripeClient>,
    /// `None` when `BILLING_SERVICE_TOKEN` is unset: debits get 503.
    pub(crate) service_token: Option<Secret>,
    /// `None` when `JWT_SECRET` is unset: every bearer request gets 401.
    verifier: Option<BearerVerifier>,
    publishable_key: Option<String>,
    checkout_expiry_secs: i64,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl AppState {
    /// Assembles the state from the validated config, the environment and an open pool.
    pub fn new(
        config: &Config,
        env: &Environment,
        pool: Pool,
        metrics: Metrics,
    ) -> Result<Self, StripeError> {
        let stripe = match &env.stripe_secret_key {
            Some(key) => Some(StripeClient::new(
                env.stripe_api_base.clone(),
                key.clone(),
                &config.stripe,
            )?),
            None => None,
        };
        let verifier = env
            .jwt_secret
            .as_ref()
            .map(|secret| BearerVerifier::hs256(secret.expose().as_bytes()));
        let checkout_expiry_secs =
            i64::try_from(config.checkout.session_expiry.as_secs()).unwrap_or(86_400);

        let url = &pool.connect_options().database_url;
        let grants = (Engine::of_url(url.as_str()).ok() == Some(Engine::Sqlite))
            .then(|| GroupCommit::start(pool.clone()));

        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                grants,
                catalog: config.catalog.clone(),
                metrics,
                webhook: config.webhook.clone(),
                webhook_secret: env.stripe_webhook_secret.clone(),
                stripe,
                service_token: env.billing_service_token.clone(),
                verifier,
                publishable_key: env.stripe_publishable_key.clone(),
                checkout_expiry_secs,
            }),
        })
    }

    /// Seconds from now until a new Checkout Session expires.
    pub(crate) fn checkout_expiry_secs(&self) -> i64 {
        self.inner.checkout_expiry_secs
    }
}

// ===== Routers and listeners =====

/// The public API, plus the internal debit endpoint that the gateway does not route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_document))
        .route("/api/v1/stripe/packages", get(list_packages))
        .route("/api/v1/stripe/packages/{id}", get(get_package))
        .route("/api/v1/stripe/config", get(stripe_config))
        .route(
            "/api/v1/stripe/checkout",
            post(checkout::create).layer(DefaultBodyLimit::max(CHECKOUT_BODY_LIMIT)),
        )
        // The webhook reads its body itself, under its own configured limit.
        .route("/api/v1/stripe/webhook", post(webhook::receive))
        .route("/api/v1/tokens/balance", get(balance))
        .route("/api/v1/tokens/transactions", get(transactions))
        .route("/api/v1/stripe/payments/{session_id}", get(payment))
        .route(
            "/internal/v1/tokens/debit",
            post(debit::debit).layer(DefaultBodyLimit::max(DEBIT_BODY_LIMIT)),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::map_response(problem_for_bare_errors))
        .with_state(state)
}

/// The safety net under the error mapping: an error answer that did not come from
/// [`ApiError`] (a rejection of an extractor no handler inspects, or one axum adds in a
/// future version) keeps its status but gets a problem document, so that no client ever
/// sees a `text/plain` error.
async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes() == PROBLEM_JSON.as_bytes());
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    ApiError::Rejected(status).into_response()
}

/// Checks that a request body is declared as JSON (`application/json` or any
/// `application/*+json`, with or without parameters), as the routes that take one require.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|essence| essence.trim().to_ascii_lowercase());
    let is_json = essence.as_deref().is_some_and(|essence| {
        essence == "application/json"
            || essence
                .strip_prefix("application/")
                .is_some_and(|subtype| subtype.ends_with("+json"))
    });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The internal listener's routes: `/healthz` and Prometheus `/metrics`.
pub fn admin_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|State(metrics): State<Metrics>| async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.render(),
                )
            }),
        )
        .with_state(metrics)
}

/// Serves `router` on an already bound listener until `shutdown` completes, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

// ===== Authentication =====

/// The user named by a valid `Authorization: Bearer` token. Extracting it from a request
/// without one answers 401 with `WWW-Authenticate: Bearer`.
#[derive(Debug)]
pub struct AuthenticatedUser(pub UserId);

impl FromRequestParts<AppState> for AuthenticatedUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(verifier) = &state.verifier else {
            return Err(ApiError::Unauthorized);
        };
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .map(|value| value.as_bytes());
        match verifier.verify_header(header) {
            Ok(user) => Ok(Self(user)),
            Err(error) => {
                tracing::debug!(error = %error, "bearer token rejected");
                Err(ApiError::Unauthorized)
            }
        }
    }
}

// ===== Read-only handlers =====

#[derive(Serialize)]
struct PackageView<'a> {
    id: &'a str,
    name: &'a str,
    tokens: Tokens,
    price_cents: i64,
    currency: &'a str,
    popular: bool,
    savings_percent: u32,
}

impl<'a> PackageView<'a> {
    fn new(catalog: &'a Catalog, package: &'a Package) -> Self {
        Self {
            id: package.id.as_str(),
            name: &package.name,
            tokens: package.tokens,
            price_cents: package.price.0,
            currency: catalog.currency(),
            popular: package.popular,
            savings_percent: catalog.savings_percent(package),
        }
    }
}

#[derive(Serialize)]
struct PackageList<'a> {
    packages: Vec<PackageView<'a>>,
}

async fn list_packages(State(state): State<AppState>) -> Response {
    let catalog = &state.catalog;
    let packages = catalog
        .packages()
        .iter()
        .map(|package| PackageView::new(catalog, package))
        .collect();
    Json(PackageList { packages }).into_response()
}

async fn get_package(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let catalog = &state.catalog;
    match catalog.get(&id) {
        Some(package) => Ok(Json(PackageView::new(catalog, package)).into_response()),
        None => Err(ApiError::UnknownPackage(id)),
    }
}

#[derive(Serialize)]
struct PublicStripeConfig<'a> {
    /// `null` when `STRIPE_PUBLISHABLE_KEY` is unset.
    publishable_key: Option<&'a str>,
    currency: &'a str,
}

async fn stripe_config(State(state): State<AppState>) -> Response {
    Json(PublicStripeConfig {
        publishable_key: state.publishable_key.as_deref(),
        currency: state.catalog.currency(),
    })
    .into_response()
}

#[derive(Serialize)]
struct Balance {
    user_id: String,
    balance: Tokens,
}

async fn balance(
    State(state): State<AppState>,
    AuthenticatedUser(user): AuthenticatedUser,
) -> Result<Json<Balance>, ApiError> {
    let balance = ledger::balance(&state.pool, &user).await?;
    Ok(Json(Balance {
        user_id: user.to_string(),
        balance,
    }))
}

#[derive(Serialize)]
struct TransactionList {
    user_id: String,
    /// Newest first.
    transactions: Vec<Transaction>,
    /// Pass as `before` to get the next (older) page; `null` on the last page.
    next_before: Option<String>,
}

/// Query of `GET /api/v1/tokens/transactions`. Read as text so that a bad value gets the
/// same problem answer as every other client mistake.
#[derive(Deserialize)]
struct TransactionsQuery {
    limit: Option<String>,
    before: Option<String>,
}

async fn transactions(
    State(state): State<AppState>,
    AuthenticatedUser(user): AuthenticatedUser,
    query: Result<Query<TransactionsQuery>, QueryRejection>,
) -> Result<Json<TransactionList>, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::InvalidQuery("query string is malformed"))?;
    let limit = match query.limit.as_deref() {
        None => TRANSACTIONS_PAGE_DEFAULT,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=TRANSACTIONS_PAGE_MAX).contains(limit))
            .ok_or(ApiError::InvalidQuery(
                "limit must be an integer from 1 to 100",
            ))?,
    };
    let before = match query.before.as_deref() {
        None => None,
        Some(text) => Some(Cursor::parse(text).ok_or(ApiError::InvalidQuery(
            "before is not a cursor from next_before",
        ))?),
    };

    // One row more than asked tells whether another page follows.
    let mut transactions =
        ledger::transactions(&state.pool, &user, limit + 1, before.as_ref()).await?;
    let more = transactions.len() > limit as usize;
    transactions.truncate(limit as usize);
    let next_before = more
        .then(|| transactions.last().map(Cursor::after))
        .flatten();
    Ok(Json(TransactionList {
        user_id: user.to_string(),
        transactions,
        next_before,
    }))
}

/// `GET /api/v1/stripe/payments/{session_id}`: one purchase, for its owner only. Another
/// user's session answers exactly like an unknown one, so ids cannot be probed.
async fn payment(
    State(state): State<AppState>,
    AuthenticatedUser(user): AuthenticatedUser,
    session_id: Result<Path<String>, PathRejection>,
) -> Result<Json<PurchaseView>, ApiError> {
    let Path(session_id) = session_id?;
    let session = SessionId::new(session_id);
    match db::find_owned_purchase(&state.pool, &session, &user).await? {
        Some(purchase) => Ok(Json(purchase)),
        None => Err(ApiError::NotFound),
    }
}

async fn openapi_document() -> Response {
    ([(CONTENT_TYPE, "application/json")], OPENAPI_DOCUMENT).into_response()
}

// ===== Errors =====

/// Every way a request can fail, from every module. [`ApiError::status`] and the
/// `IntoResponse` impl below are the only place that turns a failure into a status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("no package with id {0:?}")]
    UnknownPackage(String),
    #[error("{0}")]
    InvalidQuery(&'static str),
    /// A path parameter could not be read, for example because it is not UTF-8.
    #[error("path parameter is not valid: {}", .0.body_text())]
    InvalidPath(#[from] PathRejection),
    #[error("request body must be sent as application/json")]
    UnsupportedMediaType,
    #[error(transparent)]
    Body(#[from] BytesRejection),
    /// An error answer produced outside this type, passed through with its status; see
    /// `problem_for_bare_errors`.
    #[error("the request was rejected")]
    Rejected(StatusCode),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error(transparent)]
    Debit(#[from] DebitError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::UnknownPackage(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            Self::InvalidPath(rejection) => rejection.status(),
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Body(rejection) => rejection.status(),
            Self::Rejected(status) => *status,
            Self::Checkout(error) => match error {
                CheckoutError::InvalidBody(_) => StatusCode::BAD_REQUEST,
                CheckoutError::UnknownPackage(_) => StatusCode::NOT_FOUND,
                CheckoutError::InvalidUrl { .. } | CheckoutError::UnusableUserId => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                CheckoutError::NotConfigured
                | CheckoutError::Stripe(StripeError::Unreachable(_))
                | CheckoutError::Stripe(StripeError::ClientSetup(_)) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                CheckoutError::Stripe(_) => StatusCode::BAD_GATEWAY,
                CheckoutError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Webhook(error) => match error {
                WebhookError::NotConfigured => StatusCode::SERVICE_UNAVAILABLE,
                WebhookError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                WebhookError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
                WebhookError::BodyRead
                | WebhookError::Signature(_)
                | WebhookError::InvalidEvent(_) => StatusCode::BAD_REQUEST,
                WebhookError::Storage(_) | WebhookError::Ledger(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            Self::Debit(error) => match error {
                DebitError::NotConfigured => StatusCode::SERVICE_UNAVAILABLE,
                DebitError::Unauthorized => StatusCode::UNAUTHORIZED,
                DebitError::InvalidBody(_) => StatusCode::BAD_REQUEST,
                DebitError::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
                DebitError::InsufficientBalance { .. } => StatusCode::PAYMENT_REQUIRED,
                DebitError::KeyReused => StatusCode::CONFLICT,
                DebitError::Storage(_) | DebitError::Ledger(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Ledger(_) | Self::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` slug and `title` of the problem document.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Unauthorized => ("unauthorized", "Authentication required"),
            Self::NotFound => ("not-found", "Not found"),
            Self::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            Self::UnknownPackage(_) | Self::Checkout(CheckoutError::UnknownPackage(_)) => {
                ("unknown-package", "Unknown package")
            }
            Self::InvalidQuery(_) => ("invalid-query", "Invalid query parameter"),
            Self::InvalidPath(_) => ("invalid-path", "Invalid path parameter"),
            Self::UnsupportedMediaType => ("unsupported-media-type", "Unsupported media type"),
            Self::Rejected(_) => ("request-rejected", "Request rejected"),
            Self::Body(_)
            | Self::Checkout(CheckoutError::InvalidBody(_))
            | Self::Debit(DebitError::InvalidBody(_) | DebitError::InvalidRequest(_)) => {
                ("invalid-body", "Invalid request body")
            }
            Self::Debit(DebitError::NotConfigured) => {
                ("debit-not-configured", "Debits are not configured")
            }
            Self::Debit(DebitError::Unauthorized) => ("unauthorized", "Authentication required"),
            Self::Debit(DebitError::InsufficientBalance { .. }) => {
                ("insufficient-balance", "Not enough tokens")
            }
            Self::Debit(DebitError::KeyReused) => {
                ("idempotency-key-reused", "Idempotency key already used")
            }
            Self::Checkout(CheckoutError::InvalidUrl { .. }) => ("invalid-url", "Invalid URL"),
            Self::Checkout(CheckoutError::UnusableUserId) => {
                ("unusable-user-id", "User id not accepted for payments")
            }
            Self::Checkout(CheckoutError::NotConfigured) => {
                ("payments-not-configured", "Payments are not configured")
            }
            Self::Checkout(CheckoutError::Stripe(_)) => {
                ("payment-provider-error", "Payment provider error")
            }
            Self::Webhook(WebhookError::NotConfigured) => (
                "webhook-not-configured",
                "Webhook verification is not configured",
            ),
            Self::Webhook(WebhookError::BodyTooLarge { .. }) => {
                ("body-too-large", "Request body too large")
            }
            Self::Webhook(WebhookError::BodyTimeout | WebhookError::BodyRead) => {
                ("body-not-received", "Request body not received")
            }
            Self::Webhook(WebhookError::Signature(SignatureError::TimestampOutsideTolerance {
                ..
            })) => ("stale-signature", "Signature timestamp outside tolerance"),
            Self::Webhook(WebhookError::Signature(_)) => {
                ("invalid-signature", "Invalid webhook signature")
            }
            Self::Webhook(WebhookError::InvalidEvent(_)) => ("invalid-event", "Invalid event"),
            Self::Checkout(CheckoutError::Storage(_))
            | Self::Webhook(WebhookError::Storage(_) | WebhookError::Ledger(_))
            | Self::Debit(DebitError::Storage(_) | DebitError::Ledger(_))
            | Self::Ledger(_)
            | Self::Storage(_) => ("internal", "Internal error"),
        }
    }

    /// The human-readable `detail`. Server-side failures get a fixed sentence so that no
    /// database or Stripe detail leaks.
    fn detail(&self) -> String {
        let status = self.status();
        match self {
            Self::Checkout(CheckoutError::Stripe(_)) if status == StatusCode::BAD_GATEWAY => {
                "the payment provider refused to open a checkout session".to_owned()
            }
            Self::Checkout(CheckoutError::Stripe(_)) => {
                "the payment provider cannot be reached; try again later".to_owned()
            }
            Self::Checkout(CheckoutError::NotConfigured) => {
                "this server has no Stripe secret key configured".to_owned()
            }
            Self::Webhook(WebhookError::NotConfigured) => {
                "this server has no Stripe webhook secret configured".to_owned()
            }
            Self::Debit(DebitError::NotConfigured) => {
                "this server has no service token configured".to_owned()
            }
            _ if status.is_server_error() => {
                "the request could not be completed; try again later".to_owned()
            }
            _ => self.to_string(),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Serialize)]
struct Problem {
    #[serde(rename = "type")]
    problem_type: String,
    title: &'static str,
    status: u16,
    detail: String,
    /// The current balance, on an insufficient-balance answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    balance: Option<Tokens>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            let stripe_request_id = match &self {
                Self::Checkout(CheckoutError::Stripe(error)) => error.request_id(),
                _ => None,
            };
            tracing::error!(
                error = %error_chain(&self),
                http.status = status.as_u16(),
                stripe.request_id = stripe_request_id,
                "request failed"
            );
        }

        let (slug, title) = self.kind();
        let problem = Problem {
            problem_type: format!("urn:tollgate:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: self.detail(),
            balance: match &self {
                Self::Debit(DebitError::InsufficientBalance { balance, .. }) => Some(*balance),
                _ => None,
            },
        };
        let mut response = (status, Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The error and all its sources, joined with `: `, for one log line.
fn error_chain(error: &ApiError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
