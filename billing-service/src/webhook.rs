//! `POST /api/v1/stripe/webhook`: Stripe event deliveries, read top to bottom as the protocol.
//!
//! Receive the raw body under a size limit and a deadline, verify the signature against the
//! time of receipt, parse only the fields we use, then apply the event to the purchase and
//! the ledger in one transaction that also records the event id. Deliveries are at least
//! once and in any order, so every step is safe to repeat: a redelivery answers 2xx and
//! changes nothing. Unknown event types are acknowledged and counted, never stored.

pub mod signature;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_auth::UserId;
use tracing::Instrument;

use crate::catalog::{Catalog, Cents, Tokens};
use crate::config::WebhookSettings;
use crate::db::{self, DbError, EventRecord, PurchaseRecord, PurchaseStatus};
use crate::http::{ApiError, AppState};
use crate::ledger::{self, LedgerError, PurchaseGrant};
use crate::metrics::WebhookOutcome;
use crate::stripe::{EventId, SessionId};

use self::signature::SignatureError;

/// Why a delivery was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no webhook secret is configured")]
    NotConfigured,
    #[error("webhook body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("webhook body was not received before the deadline")]
    BodyTimeout,
    #[error("webhook body could not be read")]
    BodyRead,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("webhook body is not a stripe event")]
    InvalidEvent(#[source] serde_json::Error),
    #[error(transparent)]
    Storage(#[from] DbError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl WebhookError {
    fn outcome(&self) -> WebhookOutcome {
        match self {
            Self::NotConfigured => WebhookOutcome::NotConfigured,
            Self::BodyTooLarge { .. } => WebhookOutcome::BodyTooLarge,
            Self::BodyTimeout | Self::BodyRead => WebhookOutcome::BodyReadFailed,
            Self::Signature(SignatureError::Missing) => WebhookOutcome::SignatureMissing,
            Self::Signature(SignatureError::Mismatch | SignatureError::NoV1Signature) => {
                WebhookOutcome::SignatureMismatch
            }
            Self::Signature(SignatureError::TimestampOutsideTolerance { .. }) => {
                WebhookOutcome::TimestampOutsideTolerance
            }
            Self::Signature(SignatureError::Malformed | SignatureError::EmptySecret) => {
                WebhookOutcome::SignatureMalformed
            }
            Self::InvalidEvent(_) => WebhookOutcome::InvalidJson,
            Self::Storage(_) | Self::Ledger(_) => WebhookOutcome::StorageFailed,
        }
    }
}

/// The acknowledgement body; Stripe only looks at the status.
#[derive(Debug, Serialize)]
pub struct Receipt {
    received: bool,
}

/// Handles one delivery. Client mistakes are logged here at info (they are security
/// decisions); server failures are logged once where `ApiError` becomes a response.
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Receipt>, ApiError> {
    let span = tracing::info_span!(
        "webhook",
        stripe.event_id = tracing::field::Empty,
        stripe.event_type = tracing::field::Empty,
        stripe.session_id = tracing::field::Empty,
    );
    let result = process(&state, &headers, body)
        .instrument(span.clone())
        .await;
    let _entered = span.enter();

    match result {
        Ok(outcome) => {
            state.metrics.webhook_delivery(outcome);
            Ok(Json(Receipt { received: true }))
        }
        Err(error) => {
            state.metrics.webhook_delivery(error.outcome());
            if !matches!(error, WebhookError::Storage(_) | WebhookError::Ledger(_)) {
                tracing::info!(error = %error, "webhook rejected");
            }
            Err(error.into())
        }
    }
}

async fn process(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<WebhookOutcome, WebhookError> {
    let Some(secret) = &state.webhook_secret else {
        return Err(WebhookError::NotConfigured);
    };
    // The tolerance is judged against the moment the delivery arrived, once, so a slow
    // database or a retry inside billing can never turn a fresh event into a stale one.
    let received_at = crate::unix_now();

    let body = read_body(headers, body, &state.webhook).await?;
    let header = headers
        .get("stripe-signature")
        .map(|value| value.as_bytes());
    signature::verify(
        header,
        &body,
        secret.expose(),
        state.webhook.tolerance,
        received_at,
    )?;
    let event = parse_event(&body)?;

    let span = tracing::Span::current();
    span.record("stripe.event_id", event.id.as_str());
    span.record("stripe.event_type", event.event_type.as_str());
    apply_event(state, &event).await
}

/// Reads the whole body, refusing more than the limit without buffering it, and refusing a
/// sender that trickles bytes past the deadline.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    settings: &WebhookSettings,
) -> Result<Bytes, WebhookError> {
    let limit = settings.body_limit_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(WebhookError::BodyTooLarge { limit });
    }

    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(settings.body_read_timeout, collect).await {
        Err(_) => Err(WebhookError::BodyTimeout),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(WebhookError::BodyTooLarge { limit })
        }
        Ok(Err(_)) => Err(WebhookError::BodyRead),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

// ===== Parsing: only what we use =====

/// The parts of a Stripe event billing reads. Every other field, and any type of value in
/// `data.object`, is accepted and ignored, so new API versions do not break delivery.
#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: EventData,
}

#[derive(Debug, Default, Deserialize)]
struct EventData {
    #[serde(default)]
    object: Value,
}

fn parse_event(body: &[u8]) -> Result<Event, WebhookError> {
    serde_json::from_slice(body).map_err(WebhookError::InvalidEvent)
}

/// What billing does with an event type.
#[derive(Debug, PartialEq, Eq)]
enum Handling {
    /// The session may be paid: grant if it is and everything matches.
    Fulfil,
    /// The session can no longer be paid.
    Close,
    Ignore,
}

fn handling(event_type: &str) -> Handling {
    match event_type {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            Handling::Fulfil
        }
        "checkout.session.expired" | "checkout.session.async_payment_failed" => Handling::Close,
        _ => Handling::Ignore,
    }
}

/// The fields of a Checkout Session that decide a grant, read leniently: a missing field or
/// one of an unexpected type is `None`, which makes the session not grantable rather than
/// failing the delivery.
#[derive(Debug, Default)]
struct SessionView {
    id: Option<SessionId>,
    payment_status: Option<String>,
    amount_total: Option<i64>,
    currency: Option<String>,
    client_reference_id: Option<String>,
    metadata_user_id: Option<String>,
    metadata_package_id: Option<String>,
}

impl SessionView {
    fn read(object: &Value) -> Self {
        let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
        let metadata = object.get("metadata");
        Self {
            id: text(object.get("id")).map(SessionId::new),
            payment_status: text(object.get("payment_status")),
            amount_total: object.get("amount_total").and_then(Value::as_i64),
            currency: text(object.get("currency")),
            client_reference_id: text(object.get("client_reference_id")),
            metadata_user_id: text(metadata.and_then(|m| m.get("user_id"))),
            metadata_package_id: text(metadata.and_then(|m| m.get("package_id"))),
        }
    }
}

// ===== Applying an event =====

async fn apply_event(state: &AppState, event: &Event) -> Result<WebhookOutcome, WebhookError> {
    match handling(&event.event_type) {
        Handling::Fulfil => fulfil(state, event).await,
        Handling::Close => close(state, event).await,
        Handling::Ignore => {
            state.metrics.event_ignored(&event.event_type);
            tracing::debug!("event type ignored");
            Ok(WebhookOutcome::Ignored)
        }
    }
}

/// Grants the tokens of a paid session exactly once, or records why it cannot.
async fn fulfil(state: &AppState, event: &Event) -> Result<WebhookOutcome, WebhookError> {
    let session = SessionView::read(&event.data.object);
    let event_id = EventId::new(event.id.as_str());
    if let Some(id) = &session.id {
        tracing::Span::current().record("stripe.session_id", id.as_str());
    }

    if session.payment_status.as_deref() != Some("paid") {
        let record = event_record(&event_id, event, session.id.as_ref(), "awaiting_payment");
        if !db::record_event(&state.pool, &record).await? {
            return Ok(WebhookOutcome::DuplicateEvent);
        }
        tracing::info!("checkout completed, payment still pending");
        return Ok(WebhookOutcome::AwaitingPayment);
    }

    let purchase = match &session.id {
        Some(id) => db::find_purchase_by_session(&state.pool, id).await?,
        None => None,
    };
    match assess(&session, &state.catalog, purchase.as_ref()) {
        Ok(grant) => write_grant(state, &event_id, event, &grant).await,
        Err(mismatch) => record_mismatch(state, &event_id, event, &session, &mismatch).await,
    }
}

/// A paid session that checks out: who gets how many tokens.
#[derive(Debug, PartialEq, Eq)]
struct Grant {
    session: SessionId,
    user: UserId,
    tokens: Tokens,
}

/// Decides whether a paid session earns tokens.
///
/// When billing opened the session, the recorded purchase is the reference: the user,
/// package, amount and currency Stripe reports must all equal it. For a session billing has
/// no record of, the user comes from the metadata (or `client_reference_id`) and the package
/// price from the catalog. Any difference means nothing is granted; the reason is returned.
fn assess(
    session: &SessionView,
    catalog: &Catalog,
    purchase: Option<&PurchaseRecord>,
) -> Result<Grant, String> {
    let Some(session_id) = session.id.clone() else {
        return Err("session id is missing".to_owned());
    };
    let user = session_user(session)?;
    let package_id = session.metadata_package_id.as_deref();

    let (tokens, amount, currency) = match purchase {
        Some(purchase) => {
            if purchase.user_id != user.as_str() {
                return Err("user differs from the recorded purchase".to_owned());
            }
            if package_id.is_some_and(|id| id != purchase.package_id.as_str()) {
                return Err("package differs from the recorded purchase".to_owned());
            }
            (
                purchase.tokens,
                purchase.amount_cents,
                purchase.currency.as_str(),
            )
        }
        None => {
            let Some(package) = package_id.and_then(|id| catalog.get(id)) else {
                return Err("package is missing or unknown".to_owned());
            };
            (package.tokens, package.price, catalog.currency())
        }
    };

    if session.amount_total.map(Cents) != Some(amount) {
        return Err(format!(
            "amount_total {:?} differs from the price {}",
            session.amount_total, amount.0
        ));
    }
    let paid_currency = session.currency.as_deref().unwrap_or_default();
    if !paid_currency.eq_ignore_ascii_case(currency) {
        return Err(format!(
            "currency {paid_currency:?} differs from {currency:?}"
        ));
    }
    Ok(Grant {
        session: session_id,
        user,
        tokens,
    })
}

/// The buyer named by the session: `metadata.user_id`, or `client_reference_id` without its
/// `user_` prefix. If both are present they must agree.
fn session_user(session: &SessionView) -> Result<UserId, String> {
    let from_reference = session
        .client_reference_id
        .as_deref()
        .and_then(|reference| reference.strip_prefix("user_"));
    let from_metadata = session.metadata_user_id.as_deref();

    let user = match (from_metadata, from_reference) {
        (Some(metadata), Some(reference)) if metadata != reference => {
            return Err("metadata user differs from client_reference_id".to_owned());
        }
        (Some(user), _) | (None, Some(user)) => user,
        (None, None) => return Err("session names no user".to_owned()),
    };
    UserId::new(user).ok_or_else(|| "session user is empty".to_owned())
}

/// Records the event and appends the grant in one transaction. If either the event or the
/// session was seen before, the transaction is rolled back and nothing changes.
async fn write_grant(
    state: &AppState,
    event_id: &EventId,
    event: &Event,
    grant: &Grant,
) -> Result<WebhookOutcome, WebhookError> {
    let mut transaction = state.pool.begin().await.map_err(|source| DbError::Query {
        operation: "begin a grant transaction",
        source,
    })?;

    let record = event_record(event_id, event, Some(&grant.session), "granted");
    if !db::record_event(&mut *transaction, &record).await? {
        tracing::info!("duplicate event delivery");
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    let ledger_row = PurchaseGrant {
        user: &grant.user,
        tokens: grant.tokens,
        event_id,
        session_id: &grant.session,
    };
    let Some(grant_id) = ledger::grant_purchase(&mut *transaction, &ledger_row).await? else {
        tracing::info!("session already granted");
        return Ok(WebhookOutcome::AlreadyGranted);
    };
    db::set_session_status(&mut *transaction, &grant.session, PurchaseStatus::Fulfilled).await?;
    transaction
        .commit()
        .await
        .map_err(|source| DbError::Query {
            operation: "commit a grant",
            source,
        })?;

    state.metrics.grant(grant.tokens);
    tracing::info!(
        ledger.grant_id = grant_id,
        user.id = grant.user.as_str(),
        ledger.tokens = grant.tokens.0,
        "tokens granted"
    );
    Ok(WebhookOutcome::Granted)
}

async fn record_mismatch(
    state: &AppState,
    event_id: &EventId,
    event: &Event,
    session: &SessionView,
    reason: &str,
) -> Result<WebhookOutcome, WebhookError> {
    let mut transaction = state.pool.begin().await.map_err(|source| DbError::Query {
        operation: "begin a mismatch transaction",
        source,
    })?;

    let mut record = event_record(event_id, event, session.id.as_ref(), "mismatch");
    record.detail = Some(reason);
    if !db::record_event(&mut *transaction, &record).await? {
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    if let Some(id) = &session.id {
        db::set_session_status(&mut *transaction, id, PurchaseStatus::Mismatch).await?;
    }
    transaction
        .commit()
        .await
        .map_err(|source| DbError::Query {
            operation: "commit a mismatch",
            source,
        })?;

    tracing::warn!(
        reason,
        "paid session does not match the purchase; nothing granted"
    );
    Ok(WebhookOutcome::Mismatch)
}

/// Marks an expired or failed session's purchase closed.
async fn close(state: &AppState, event: &Event) -> Result<WebhookOutcome, WebhookError> {
    let session = SessionView::read(&event.data.object);
    let event_id = EventId::new(event.id.as_str());
    let mut transaction = state.pool.begin().await.map_err(|source| DbError::Query {
        operation: "begin a close transaction",
        source,
    })?;

    let record = event_record(&event_id, event, session.id.as_ref(), "closed");
    if !db::record_event(&mut *transaction, &record).await? {
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    if let Some(id) = &session.id {
        db::set_session_status(&mut *transaction, id, PurchaseStatus::Closed).await?;
    }
    transaction
        .commit()
        .await
        .map_err(|source| DbError::Query {
            operation: "commit a closed purchase",
            source,
        })?;

    tracing::info!("checkout session closed without payment");
    Ok(WebhookOutcome::Closed)
}

fn event_record<'a>(
    event_id: &'a EventId,
    event: &'a Event,
    session: Option<&'a SessionId>,
    outcome: &'static str,
) -> EventRecord<'a> {
    EventRecord {
        event_id,
        event_type: &event.event_type,
        session_id: session,
        outcome,
        detail: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::catalog::{Package, PackageId};
    use crate::db::PurchaseId;

    fn catalog() -> Catalog {
        Catalog::new(
            "usd".to_owned(),
            vec![Package {
                id: PackageId::new("starter"),
                name: "Starter".to_owned(),
                tokens: Tokens(1_000),
                price: Cents(500),
                popular: false,
            }],
        )
    }

    fn paid_session() -> Value {
        json!({
            "id": "cs_test_1",
            "payment_status": "paid",
            "amount_total": 500,
            "currency": "usd",
            "client_reference_id": "user_42",
            "metadata": {"user_id": "42", "package_id": "starter", "tokens": "1000"},
            "some_future_field": {"nested": [1, 2, 3]},
        })
    }

    fn assess_object(object: &Value, purchase: Option<&PurchaseRecord>) -> Result<Grant, String> {
        assess(&SessionView::read(object), &catalog(), purchase)
    }

    #[test]
    fn paid_session_matching_the_catalog_grants_its_tokens() {
        let grant = assess_object(&paid_session(), None).expect("grantable");
        assert_eq!(grant.user.as_str(), "42");
        assert_eq!(grant.tokens, Tokens(1_000));
        assert_eq!(grant.session.as_str(), "cs_test_1");
    }

    #[test]
    fn any_difference_from_what_was_sold_grants_nothing() {
        let edits: [(&str, Value); 6] = [
            ("/amount_total", json!(50)),
            ("/amount_total", json!("500")),
            ("/currency", json!("eur")),
            ("/metadata/package_id", json!("nonexistent")),
            ("/metadata/user_id", json!("43")),
            ("/id", Value::Null),
        ];
        for (pointer, value) in edits {
            let mut object = paid_session();
            *object.pointer_mut(pointer).expect("field exists") = value;
            assert!(
                assess_object(&object, None).is_err(),
                "{pointer} edit was granted"
            );
        }
        let mut missing_amount = paid_session();
        missing_amount
            .as_object_mut()
            .map(|object| object.remove("amount_total"));
        assert!(assess_object(&missing_amount, None).is_err());
    }

    #[test]
    fn recorded_purchase_is_the_reference_when_present() {
        let purchase = PurchaseRecord {
            id: PurchaseId::generate(),
            user_id: "42".to_owned(),
            package_id: PackageId::new("starter"),
            tokens: Tokens(1_200),
            amount_cents: Cents(450),
            currency: "usd".to_owned(),
        };
        let mut object = paid_session();
        object["amount_total"] = json!(450);
        let grant = assess_object(&object, Some(&purchase)).expect("matches the record");
        assert_eq!(grant.tokens, Tokens(1_200));

        object["amount_total"] = json!(500);
        assert!(assess_object(&object, Some(&purchase)).is_err());
    }

    #[test]
    fn user_falls_back_to_the_client_reference() {
        let mut object = paid_session();
        object["metadata"]
            .as_object_mut()
            .map(|metadata| metadata.remove("user_id"));
        assert_eq!(
            assess_object(&object, None)
                .expect("grantable")
                .user
                .as_str(),
            "42"
        );
        object["client_reference_id"] = Value::Null;
        assert!(assess_object(&object, None).is_err());
    }

    #[test]
    fn only_checkout_session_types_are_handled() {
        assert_eq!(handling("checkout.session.completed"), Handling::Fulfil);
        assert_eq!(
            handling("checkout.session.async_payment_succeeded"),
            Handling::Fulfil
        );
        assert_eq!(handling("checkout.session.expired"), Handling::Close);
        assert_eq!(handling("payment_intent.succeeded"), Handling::Ignore);
        assert_eq!(handling("customer.tax_id.created"), Handling::Ignore);
    }
}
