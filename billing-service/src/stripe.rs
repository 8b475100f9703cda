//! The outbound Stripe API client and Stripe's identifiers.
//!
//! The client speaks Stripe's wire format (form-encoded requests, JSON answers) with bounded
//! timeouts and a small number of retries that reuse one `Idempotency-Key`, so a retried
//! attempt can never open a second session. It does not decide what to do with a failure:
//! `checkout` records it and `http` chooses the status.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tollgate_auth::UserId;

use crate::catalog::{Cents, PackageId, Tokens};
use crate::config::{Secret, StripeSettings};

/// Pause before the first retry; it doubles per retry up to [`MAX_BACKOFF`], plus jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A Checkout Session id (`cs_...`), the key of a purchase on Stripe's side.
#[derive(Clone, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct SessionId(String);

/// A webhook event id (`evt_...`); Stripe reuses it when it redelivers the event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct EventId(String);

macro_rules! string_id {
    ($name:ident) => {
        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A PaymentIntent id (`pi_...`): what a charge, and so a refund, names as its payment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct PaymentIntentId(String);

string_id!(SessionId);
string_id!(EventId);
string_id!(PaymentIntentId);

/// Why a Stripe call produced no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("cannot build the stripe http client")]
    ClientSetup(#[source] reqwest::Error),
    /// No HTTP answer at all (connection refused, DNS, TLS, timeout), after all retries.
    #[error("stripe could not be reached")]
    Unreachable(#[source] reqwest::Error),
    /// Stripe answered with an error status, after all retries that status allows.
    #[error("stripe answered {status} (type {error_type:?}, code {error_code:?})")]
    Rejected {
        status: StatusCode,
        /// Stripe's `Request-Id`, which its support needs to trace the call.
        request_id: Option<String>,
        /// `error.type` and `error.code` from Stripe's error body, when present.
        error_type: Option<String>,
        error_code: Option<String>,
        /// Stripe's `Stripe-Should-Retry` hint, when present.
        should_retry: Option<bool>,
    },
    /// A success status whose body lacks the fields we need.
    #[error("stripe answered with an unexpected body")]
    UnexpectedBody { request_id: Option<String> },
}

impl StripeError {
    /// Stripe's `Request-Id` for the failed call, if Stripe answered at all.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Rejected { request_id, .. } | Self::UnexpectedBody { request_id } => {
                request_id.as_deref()
            }
            Self::ClientSetup(_) | Self::Unreachable(_) => None,
        }
    }

    /// Whether repeating the same request with the same idempotency key may succeed.
    /// Follows Stripe's guidance: connection failures, 409 (a concurrent request with the
    /// same key), 429 and 5xx, unless Stripe explicitly says not to.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Rejected {
                status,
                should_retry,
                ..
            } => match should_retry {
                Some(hint) => *hint,
                None => {
                    *status == StatusCode::CONFLICT
                        || *status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error()
                }
            },
            Self::ClientSetup(_) | Self::UnexpectedBody { .. } => false,
        }
    }
}

/// The purchase-specific parameters of a one-time Checkout Session.
#[derive(Debug)]
pub struct CheckoutSessionParams<'a> {
    pub user: &'a UserId,
    pub package_id: &'a PackageId,
    pub tokens: Tokens,
    pub product_name: String,
    pub unit_amount: Cents,
    pub currency: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// Unix seconds after which Stripe stops accepting payment for the session.
    pub expires_at: i64,
}

impl CheckoutSessionParams<'_> {
    /// The form fields, in the shape Stripe's own libraries send for an ad-hoc price.
    /// User and package go both on the session (`metadata`) and on the PaymentIntent
    /// (`payment_intent_data[metadata]`), because Stripe does not copy one to the other.
    fn form(&self) -> Vec<(&'static str, String)> {
        let user = self.user.as_str();
        vec![
            ("mode", "payment".to_owned()),
            (
                "line_items[0][price_data][currency]",
                self.currency.to_owned(),
            ),
            (
                "line_items[0][price_data][unit_amount]",
                self.unit_amount.0.to_string(),
            ),
            (
                "line_items[0][price_data][product_data][name]",
                self.product_name.clone(),
            ),
            ("line_items[0][quantity]", "1".to_owned()),
            ("success_url", self.success_url.to_owned()),
            ("cancel_url", self.cancel_url.to_owned()),
            ("client_reference_id", format!("user_{user}")),
            ("metadata[user_id]", user.to_owned()),
            ("metadata[package_id]", self.package_id.to_string()),
            ("metadata[tokens]", self.tokens.0.to_string()),
            ("payment_intent_data[metadata][user_id]", user.to_owned()),
            (
                "payment_intent_data[metadata][package_id]",
                self.package_id.to_string(),
            ),
            ("expires_at", self.expires_at.to_string()),
        ]
    }
}

/// A session Stripe created: where to send the buyer, and until when it is payable.
#[derive(Clone, Debug)]
pub struct CreatedSession {
    pub id: SessionId,
    pub url: String,
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct SessionBody {
    id: Option<String>,
    url: Option<String>,
    expires_at: Option<i64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    error_type: Option<String>,
    code: Option<String>,
}

/// Calls Stripe with the secret key. Cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    api_base: Url,
    secret_key: Secret,
    api_version: String,
    max_retries: u32,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient")
            .field("api_base", &self.api_base.as_str())
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

impl StripeClient {
    pub fn new(
        api_base: Url,
        secret_key: Secret,
        settings: &StripeSettings,
    ) -> Result<Self, StripeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .build()
            .map_err(StripeError::ClientSetup)?;
        Ok(Self {
            http,
            api_base,
            secret_key,
            api_version: settings.api_version.clone(),
            max_retries: settings.max_retries,
        })
    }

    /// Creates a Checkout Session (`POST /v1/checkout/sessions`).
    ///
    /// Every attempt carries `idempotency_key`, so Stripe answers a retry with the session
    /// the first attempt created (https://docs.stripe.com/api/idempotent_requests).
    pub async fn create_checkout_session(
        &self,
        params: &CheckoutSessionParams<'_>,
        idempotency_key: &str,
    ) -> Result<CreatedSession, StripeError> {
        let url = self.endpoint("v1/checkout/sessions");
        let form = params.form();

        let mut retries = 0;
        loop {
            let outcome = self.post_form(&url, &form, idempotency_key).await;
            let Err(error) = &outcome else {
                return outcome;
            };
            if retries >= self.max_retries || !error.is_retryable() {
                return outcome;
            }

            retries += 1;
            tracing::warn!(
                stripe.request_id = error.request_id(),
                stripe.retry = retries,
                error = %error,
                "retrying stripe request"
            );
            tokio::time::sleep(backoff(retries)).await;
        }
    }

    async fn post_form(
        &self,
        url: &str,
        form: &[(&'static str, String)],
        idempotency_key: &str,
    ) -> Result<CreatedSession, StripeError> {
        let response = self
            .http
            .post(url)
            .header(
                AUTHORIZATION,
                format!("Bearer {}", self.secret_key.expose()),
            )
            .header("Idempotency-Key", idempotency_key)
            .header("Stripe-Version", &self.api_version)
            .form(form)
            .send()
            .await
            .map_err(StripeError::Unreachable)?;

        let status = response.status();
        let request_id = request_id(response.headers());
        let should_retry = should_retry(response.headers());
        let body = response.bytes().await.map_err(StripeError::Unreachable)?;

        if !status.is_success() {
            let detail = serde_json::from_slice::<ErrorBody>(&body)
                .ok()
                .and_then(|body| body.error);
            let (error_type, error_code) = match detail {
                Some(detail) => (detail.error_type, detail.code),
                None => (None, None),
            };
            return Err(StripeError::Rejected {
                status,
                request_id,
                error_type,
                error_code,
                should_retry,
            });
        }

        let session: SessionBody =
            serde_json::from_slice(&body).map_err(|_| StripeError::UnexpectedBody {
                request_id: request_id.clone(),
            })?;
        let (Some(id), Some(url), Some(expires_at)) = (session.id, session.url, session.expires_at)
        else {
            return Err(StripeError::UnexpectedBody { request_id });
        };
        Ok(CreatedSession {
            id: SessionId::new(id),
            url,
            expires_at,
        })
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/{path}", self.api_base.as_str().trim_end_matches('/'))
    }
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("request-id")?.to_str().ok()?;
    Some(value.to_owned())
}

fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get("stripe-should-retry")?.to_str().ok()? {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Exponential back-off with up to 50 % random jitter, so that many instances retrying
/// after the same outage do not arrive together.
fn backoff(retry: u32) -> Duration {
    let exponential = FIRST_BACKOFF.saturating_mul(1 << retry.saturating_sub(1).min(8));
    let capped = exponential.min(MAX_BACKOFF);
    let jitter_ms = rand::random::<u64>() % (capped.as_millis() as u64 / 2 + 1);
    capped + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, should_retry: Option<bool>) -> StripeError {
        StripeError::Rejected {
            status: StatusCode::from_u16(status).expect("valid status"),
            request_id: None,
            error_type: None,
            error_code: None,
            should_retry,
        }
    }

    #[test]
    fn retries_follow_stripe_guidance() {
        assert!(rejected(409, None).is_retryable());
        assert!(rejected(429, None).is_retryable());
        assert!(rejected(500, None).is_retryable());
        assert!(rejected(503, None).is_retryable());
        assert!(!rejected(500, Some(false)).is_retryable());
        assert!(rejected(400, Some(true)).is_retryable());
        assert!(!rejected(400, None).is_retryable());
        assert!(!rejected(401, None).is_retryable());
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(1) >= FIRST_BACKOFF && backoff(1) <= FIRST_BACKOFF * 3 / 2);
        assert!(backoff(2) >= FIRST_BACKOFF * 2);
        assert!(backoff(30) <= MAX_BACKOFF * 3 / 2);
    }
}
