//! `POST /api/v1/stripe/checkout`: opens a Stripe Checkout Session for one package.
//!
//! The buyer is the verified bearer-token user and the price is the package's; nothing the
//! client sends can change either. Opening a session grants nothing: tokens are granted
//! only when Stripe's signed webhook reports the payment (see `webhook`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tollgate_auth::UserId;

use crate::db::{self, DbError, NewPurchase, PurchaseId, PurchaseStatus};
use crate::http::{self, ApiError, AppState, AuthenticatedUser};
use crate::metrics::CheckoutOutcome;
use crate::stripe::{CheckoutSessionParams, StripeError};

/// Longest accepted success or cancel URL, in bytes.
const MAX_URL_LEN: usize = 2_048;

/// Longest user id that can go into Stripe's `client_reference_id` (200 characters) after
/// the `user_` prefix.
const MAX_USER_ID_LEN: usize = 195;

/// Stripe accepts an `expires_at` from 30 min to 24 h after the request reaches it, in
/// seconds; see `expires_at` at https://docs.stripe.com/api/checkout/sessions/create.
const STRIPE_EXPIRY_MIN_SECS: i64 = 30 * 60;
const STRIPE_EXPIRY_MAX_SECS: i64 = 24 * 3600;

/// How far inside Stripe's window the `expires_at` we send stays, in seconds. Stripe judges
/// it on its own clock when a request arrives, while we compute it once, before the first
/// attempt, because every retry must resend the same body under the same idempotency key.
/// The margin absorbs clock differences at the upper end and time spent retrying (at most
/// about 65 s with the shipped timeouts) at the lower end.
const EXPIRY_MARGIN_SECS: i64 = 5 * 60;

/// Why no session was opened.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("request body is not a valid checkout request: {0}")]
    InvalidBody(#[source] serde_json::Error),
    #[error("no package with id {0:?}")]
    UnknownPackage(String),
    #[error("{field} must be an absolute http or https URL of at most 2048 bytes")]
    InvalidUrl { field: &'static str },
    #[error("the user id cannot be sent to stripe as a reference")]
    UnusableUserId,
    #[error("payments are not configured")]
    NotConfigured,
    #[error("stripe did not open a checkout session")]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl CheckoutError {
    fn outcome(&self) -> CheckoutOutcome {
        match self {
            Self::InvalidBody(_)
            | Self::UnknownPackage(_)
            | Self::InvalidUrl { .. }
            | Self::UnusableUserId => CheckoutOutcome::InvalidRequest,
            Self::NotConfigured => CheckoutOutcome::NotConfigured,
            Self::Stripe(StripeError::Unreachable(_) | StripeError::ClientSetup(_)) => {
                CheckoutOutcome::StripeUnreachable
            }
            Self::Stripe(_) => CheckoutOutcome::StripeRejected,
            Self::Storage(_) => CheckoutOutcome::StorageFailed,
        }
    }
}

/// The body of a checkout request.
#[derive(Debug, Deserialize)]
pub struct CheckoutRequest {
    pub package_id: String,
    /// Where Stripe sends the buyer after paying. May contain Stripe's
    /// `{CHECKOUT_SESSION_ID}` placeholder, which is passed through untouched.
    pub success_url: String,
    /// Where Stripe sends the buyer who gives up.
    pub cancel_url: String,
}

/// Where to send the buyer.
#[derive(Debug, Serialize)]
pub struct CheckoutResponse {
    pub checkout_url: String,
    pub session_id: String,
    /// Unix seconds after which the session can no longer be paid.
    pub expires_at: i64,
}

/// Handles `POST /api/v1/stripe/checkout`.
pub async fn create(
    State(state): State<AppState>,
    AuthenticatedUser(user): AuthenticatedUser,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CheckoutResponse>, ApiError> {
    http::require_json(&headers)?;
    let body = body?;
    match open_session(&state, &user, &body).await {
        Ok(response) => {
            state.metrics.checkout_request(CheckoutOutcome::Created);
            Ok(Json(response))
        }
        Err(error) => {
            state.metrics.checkout_request(error.outcome());
            Err(error.into())
        }
    }
}

#[tracing::instrument(skip_all, fields(user.id = user.as_str(), purchase.id))]
async fn open_session(
    state: &AppState,
    user: &UserId,
    body: &[u8],
) -> Result<CheckoutResponse, CheckoutError> {
    let request: CheckoutRequest =
        serde_json::from_slice(body).map_err(CheckoutError::InvalidBody)?;
    let Some(package) = state.catalog.get(&request.package_id) else {
        return Err(CheckoutError::UnknownPackage(request.package_id));
    };
    check_redirect_url("success_url", &request.success_url)?;
    check_redirect_url("cancel_url", &request.cancel_url)?;
    check_user_reference(user)?;
    let Some(stripe) = &state.stripe else {
        return Err(CheckoutError::NotConfigured);
    };

    // The purchase is recorded before Stripe is called. If the call times out after Stripe
    // created the session, the buyer may still pay, and the record is what lets the webhook
    // check the payment against what we meant to sell.
    let purchase_id = PurchaseId::generate();
    tracing::Span::current().record("purchase.id", purchase_id.as_str());
    let currency = state.catalog.currency();
    let purchase = NewPurchase {
        id: &purchase_id,
        user,
        package_id: &package.id,
        tokens: package.tokens,
        amount: package.price,
        currency,
    };
    db::insert_purchase(&state.pool, &purchase).await?;

    let expires_at = crate::unix_now() + sendable_expiry_secs(state.checkout_expiry_secs());
    let params = CheckoutSessionParams {
        user,
        package_id: &package.id,
        tokens: package.tokens,
        product_name: package.product_name(),
        unit_amount: package.price,
        currency,
        success_url: &request.success_url,
        cancel_url: &request.cancel_url,
        expires_at,
    };
    let idempotency_key = format!("checkout_{purchase_id}");
    let session = match stripe
        .create_checkout_session(&params, &idempotency_key)
        .await
    {
        Ok(session) => session,
        Err(error) => {
            if let Err(db_error) =
                db::set_purchase_status(&state.pool, &purchase_id, PurchaseStatus::Failed).await
            {
                tracing::warn!(error = %db_error, "cannot mark the purchase failed");
            }
            return Err(error.into());
        }
    };

    db::attach_session(&state.pool, &purchase_id, &session.id).await?;
    tracing::info!(
        stripe.session_id = session.id.as_str(),
        package.id = package.id.as_str(),
        "checkout session opened"
    );
    Ok(CheckoutResponse {
        checkout_url: session.url,
        session_id: session.id.to_string(),
        expires_at: session.expires_at,
    })
}

/// Accepts absolute http(s) URLs with a host. The original text is what gets sent to
/// Stripe, so placeholders such as `{CHECKOUT_SESSION_ID}` survive unencoded.
fn check_redirect_url(field: &'static str, value: &str) -> Result<(), CheckoutError> {
    let valid = value.len() <= MAX_URL_LEN
        && Url::parse(value)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
    if valid {
        Ok(())
    } else {
        Err(CheckoutError::InvalidUrl { field })
    }
}

/// The session lifetime to ask Stripe for: the configured one, kept [`EXPIRY_MARGIN_SECS`]
/// inside Stripe's accepted range.
// Limitation: if `request_timeout` times the attempts exceeds the margin, a late retry of a
// 30-minute session can still arrive too close to its expiry and be refused.
fn sendable_expiry_secs(configured_secs: i64) -> i64 {
    configured_secs.clamp(
        STRIPE_EXPIRY_MIN_SECS + EXPIRY_MARGIN_SECS,
        STRIPE_EXPIRY_MAX_SECS - EXPIRY_MARGIN_SECS,
    )
}

/// Stripe's `client_reference_id` allows letters, digits, `-` and `_`, up to 200 characters.
fn check_user_reference(user: &UserId) -> Result<(), CheckoutError> {
    let id = user.as_str();
    let usable = id.len() <= MAX_USER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if usable {
        Ok(())
    } else {
        Err(CheckoutError::UnusableUserId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_urls_must_be_absolute_web_urls() {
        let ok = "https://example.com/billing/success?session_id={CHECKOUT_SESSION_ID}";
        assert!(check_redirect_url("success_url", ok).is_ok());
        assert!(check_redirect_url("success_url", "http://localhost:3000/done").is_ok());
        for bad in [
            "",
            "/relative",
            "javascript:alert(1)",
            "ftp://example.com/x",
            "https://",
        ] {
            assert!(
                check_redirect_url("success_url", bad).is_err(),
                "{bad} accepted"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(check_redirect_url("success_url", &long).is_err());
    }

    #[test]
    fn expiry_sent_to_stripe_stays_inside_its_window() {
        assert_eq!(sendable_expiry_secs(86_400), 86_100);
        assert_eq!(sendable_expiry_secs(1_800), 2_100);
        assert_eq!(sendable_expiry_secs(7_200), 7_200);
    }

    #[test]
    fn user_ids_must_fit_a_stripe_reference() {
        let user = |id: &str| UserId::new(id).expect("non-empty");
        assert!(check_user_reference(&user("42")).is_ok());
        assert!(check_user_reference(&user("user-a_B9")).is_ok());
        assert!(check_user_reference(&user("a b")).is_err());
        assert!(check_user_reference(&user(&"x".repeat(196))).is_err());
    }
}
