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

use crate::catalog::{Catalog, Cents, PackageId, Tokens};
use crate::config::WebhookSettings;
use crate::db::{
    self, Backend, ChargeRefund, DbError, EventRecord, ExternalPurchase, PaidPurchase,
    PurchaseRecord, PurchaseStatus,
};
use crate::group_commit::Ran;
use crate::http::{ApiError, AppState};
use crate::ledger::{self, LedgerError, StripeEntry};
use crate::metrics::WebhookOutcome;
use crate::stripe::{EventId, PaymentIntentId, SessionId};

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
        stripe.payment_intent = tracing::field::Empty,
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
    /// A charge was (partly) refunded: claw back the matching share of its tokens.
    Refund,
    Ignore,
}

fn handling(event_type: &str) -> Handling {
    match event_type {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            Handling::Fulfil
        }
        "checkout.session.expired" | "checkout.session.async_payment_failed" => Handling::Close,
        "charge.refunded" => Handling::Refund,
        _ => Handling::Ignore,
    }
}

/// Reads a string field, or the `id` of an expanded object in its place (Stripe expands
/// `payment_intent` into an object on request).
fn text_or_id(value: Option<&Value>) -> Option<String> {
    let value = value?;
    value
        .as_str()
        .or_else(|| value.get("id").and_then(Value::as_str))
        .filter(|text| !text.is_empty())
        .map(str::to_owned)
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
    payment_intent: Option<PaymentIntentId>,
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
            payment_intent: text_or_id(object.get("payment_intent")).map(PaymentIntentId::new),
        }
    }
}

/// The fields of a refunded Charge that decide a clawback, read as leniently.
#[derive(Debug, Default)]
struct ChargeView {
    id: Option<String>,
    amount: Option<i64>,
    amount_refunded: Option<i64>,
    currency: Option<String>,
    payment_intent: Option<PaymentIntentId>,
}

impl ChargeView {
    fn read(object: &Value) -> Self {
        Self {
            id: text_or_id(object.get("id")),
            amount: object.get("amount").and_then(Value::as_i64),
            amount_refunded: object.get("amount_refunded").and_then(Value::as_i64),
            currency: text_or_id(object.get("currency")),
            payment_intent: text_or_id(object.get("payment_intent")).map(PaymentIntentId::new),
        }
    }
}

// ===== Applying an event =====

async fn apply_event(state: &AppState, event: &Event) -> Result<WebhookOutcome, WebhookError> {
    match handling(&event.event_type) {
        Handling::Fulfil => fulfil(state, event).await,
        Handling::Close => close(state, event).await,
        Handling::Refund => refund(state, event).await,
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

/// A paid session that checks out: who gets how many tokens, and what was paid.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grant {
    session: SessionId,
    user: UserId,
    tokens: Tokens,
    package: PackageId,
    amount: Cents,
    currency: String,
    payment_intent: Option<PaymentIntentId>,
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

    let (package, tokens, amount, currency) = match purchase {
        Some(purchase) => {
            if purchase.user_id != user.as_str() {
                return Err("user differs from the recorded purchase".to_owned());
            }
            if package_id.is_some_and(|id| id != purchase.package_id.as_str()) {
                return Err("package differs from the recorded purchase".to_owned());
            }
            (
                purchase.package_id.clone(),
                purchase.tokens,
                purchase.amount_cents,
                purchase.currency.as_str(),
            )
        }
        None => {
            let Some(package) = package_id.and_then(|id| catalog.get(id)) else {
                return Err("package is missing or unknown".to_owned());
            };
            (
                package.id.clone(),
                package.tokens,
                package.price,
                catalog.currency(),
            )
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
        package,
        amount,
        currency: currency.to_owned(),
        payment_intent: session.payment_intent.clone(),
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

/// Records the event, appends the grant and marks the purchase fulfilled, in one
/// transaction. If either the event or the session was seen before, nothing changes. A
/// refund that arrived before the grant is settled in the same transaction. On SQLite the
/// transaction is shared with other deliveries of the moment (see [`crate::group_commit`]);
/// either way the answer comes only after the grant is committed.
async fn write_grant(
    state: &AppState,
    event_id: &EventId,
    event: &Event,
    grant: &Grant,
) -> Result<WebhookOutcome, WebhookError> {
    let written = match &state.grants {
        Some(grants) => {
            let (event_id, event_type) = (event_id.clone(), event.event_type.clone());
            let grant = grant.clone();
            grants
                .run(move |transaction| {
                    Box::pin(async move {
                        let written = grant_in(transaction, &event_id, &event_type, &grant).await?;
                        let keep = written.outcome == WebhookOutcome::Granted;
                        Ok::<_, WebhookError>(Ran {
                            value: written,
                            keep,
                        })
                    })
                })
                .await?
        }
        None => {
            let mut transaction = db::begin(&state.pool, "begin a grant transaction").await?;
            let written = grant_in(&mut transaction, event_id, &event.event_type, grant).await?;
            if written.outcome == WebhookOutcome::Granted {
                db::commit(transaction, "commit a grant").await?;
            }
            written
        }
    };

    match written.outcome {
        WebhookOutcome::DuplicateEvent => tracing::info!("duplicate event delivery"),
        WebhookOutcome::AlreadyGranted => tracing::info!("session already granted"),
        _ => {
            state.metrics.grant(grant.tokens);
            tracing::info!(
                ledger.grant_id = written.grant_id,
                user.id = grant.user.as_str(),
                ledger.tokens = grant.tokens.0,
                ledger.clawed_back = written.clawback.0,
                "tokens granted"
            );
        }
    }
    Ok(written.outcome)
}

/// What a grant transaction did: granted (with the new ledger row and any clawback of an
/// earlier refund), or nothing because the event or the session was seen before.
struct Written {
    outcome: WebhookOutcome,
    grant_id: String,
    clawback: Tokens,
}

/// The writes of a grant, inside `transaction`. Unless the outcome is `Granted`, the caller
/// must roll back: the event row may already be written.
async fn grant_in(
    transaction: &mut sqlx::Transaction<'static, Backend>,
    event_id: &EventId,
    event_type: &str,
    grant: &Grant,
) -> Result<Written, WebhookError> {
    let nothing = |outcome| Written {
        outcome,
        grant_id: String::new(),
        clawback: Tokens(0),
    };
    let record = EventRecord {
        event_id,
        event_type,
        session_id: Some(&grant.session),
        outcome: "granted",
        detail: None,
    };
    if !db::record_event(&mut **transaction, &record).await? {
        return Ok(nothing(WebhookOutcome::DuplicateEvent));
    }
    let ledger_row = StripeEntry {
        user: &grant.user,
        tokens: grant.tokens,
        event_id,
        session_id: &grant.session,
    };
    let Some(grant_id) = ledger::grant_purchase(&mut **transaction, &ledger_row).await? else {
        return Ok(nothing(WebhookOutcome::AlreadyGranted));
    };

    let payment_intent = grant.payment_intent.as_ref();
    if !db::mark_fulfilled(&mut **transaction, &grant.session, payment_intent).await? {
        let external = ExternalPurchase {
            user: &grant.user,
            package_id: &grant.package,
            tokens: grant.tokens,
            amount: grant.amount,
            currency: &grant.currency,
            session_id: &grant.session,
            payment_intent,
        };
        db::insert_external_purchase(&mut **transaction, &external).await?;
    }
    let mut clawback = Tokens(0);
    if let Some(payment_intent) = payment_intent {
        db::claim_refund_record(&mut **transaction, payment_intent).await?;
        let paid = PaidPurchase {
            session_id: grant.session.clone(),
            user_id: grant.user.to_string(),
            tokens: grant.tokens,
            amount_cents: grant.amount,
            currency: grant.currency.clone(),
        };
        clawback = settle_clawback(transaction, &paid, payment_intent, event_id).await?;
    }
    Ok(Written {
        outcome: WebhookOutcome::Granted,
        grant_id,
        clawback,
    })
}

async fn record_mismatch(
    state: &AppState,
    event_id: &EventId,
    event: &Event,
    session: &SessionView,
    reason: &str,
) -> Result<WebhookOutcome, WebhookError> {
    let mut transaction = db::begin(&state.pool, "begin a mismatch transaction").await?;

    let mut record = event_record(event_id, event, session.id.as_ref(), "mismatch");
    record.detail = Some(reason);
    if !db::record_event(&mut *transaction, &record).await? {
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    if let Some(id) = &session.id {
        db::set_session_status(&mut *transaction, id, PurchaseStatus::Mismatch).await?;
    }
    db::commit(transaction, "commit a mismatch").await?;

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
    let mut transaction = db::begin(&state.pool, "begin a close transaction").await?;

    let record = event_record(&event_id, event, session.id.as_ref(), "closed");
    if !db::record_event(&mut *transaction, &record).await? {
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    if let Some(id) = &session.id {
        db::set_session_status(&mut *transaction, id, PurchaseStatus::Closed).await?;
    }
    db::commit(transaction, "commit a closed purchase").await?;

    tracing::info!("checkout session closed without payment");
    Ok(WebhookOutcome::Closed)
}

// ===== Refunds =====

/// Applies `charge.refunded`: stores the charge's cumulative refunded amount, then claws
/// back whatever share of the purchase's tokens is owed and not yet taken.
///
/// The charge must be for exactly what the purchase was paid, in the same currency; one
/// that is not is recorded as a mismatch, acknowledged, and neither stored nor clawed back
/// (trusting its figures could take tokens the refund does not cover). A refund of a
/// payment billing has not granted is stored and acknowledged; the grant, when it comes,
/// checks and settles it. The event id is recorded last, in the same transaction, so a
/// duplicate is rolled back whole.
async fn refund(state: &AppState, event: &Event) -> Result<WebhookOutcome, WebhookError> {
    let charge = ChargeView::read(&event.data.object);
    let event_id = EventId::new(event.id.as_str());
    let (Some(payment_intent), Some(charge_id), Some(amount), Some(refunded), Some(currency)) = (
        charge.payment_intent.as_ref(),
        charge.id.as_deref(),
        charge.amount.filter(|amount| *amount > 0),
        charge.amount_refunded.filter(|refunded| *refunded >= 0),
        charge.currency.as_deref(),
    ) else {
        let mut record = event_record(&event_id, event, None, "refund_unusable");
        record.detail = Some("charge lacks payment_intent, id, amount or currency");
        if !db::record_event(&state.pool, &record).await? {
            return Ok(WebhookOutcome::DuplicateEvent);
        }
        tracing::warn!("refunded charge cannot be matched; nothing clawed back");
        return Ok(WebhookOutcome::RefundUnusable);
    };
    tracing::Span::current().record("stripe.payment_intent", payment_intent.as_str());
    let figures = ChargeRefund {
        payment_intent,
        charge_id,
        amount: Cents(amount),
        amount_refunded: Cents(refunded),
        currency,
    };

    // Claiming the refund record first is the transaction's opening write (see `db`).
    let mut transaction = db::begin(&state.pool, "begin a refund transaction").await?;
    db::claim_refund_record(&mut *transaction, payment_intent).await?;
    let purchase = db::find_paid_purchase(&mut *transaction, payment_intent).await?;
    let mismatch = purchase
        .as_ref()
        .and_then(|purchase| charge_mismatch(purchase, figures.amount, currency));

    let (outcome, clawback) = match (&purchase, &mismatch) {
        (Some(_), Some(_)) => (WebhookOutcome::RefundMismatch, Tokens(0)),
        (Some(purchase), None) => {
            db::upsert_charge_refund(&mut *transaction, &figures).await?;
            let clawback =
                settle_clawback(&mut transaction, purchase, payment_intent, &event_id).await?;
            (WebhookOutcome::Refunded, clawback)
        }
        (None, _) => {
            db::upsert_charge_refund(&mut *transaction, &figures).await?;
            (WebhookOutcome::RefundUnmatched, Tokens(0))
        }
    };
    let session = purchase.as_ref().map(|purchase| &purchase.session_id);
    let label = match outcome {
        WebhookOutcome::Refunded => "refunded",
        WebhookOutcome::RefundMismatch => "refund_mismatch",
        _ => "refund_unmatched",
    };
    let mut record = event_record(&event_id, event, session, label);
    record.detail = mismatch.as_deref();
    if !db::record_event(&mut *transaction, &record).await? {
        return Ok(WebhookOutcome::DuplicateEvent);
    }
    db::commit(transaction, "commit a refund").await?;

    match outcome {
        WebhookOutcome::RefundUnmatched => {
            tracing::warn!("refund for a payment billing has not granted; stored for later");
        }
        WebhookOutcome::RefundMismatch => {
            tracing::warn!(
                reason = mismatch.as_deref(),
                "refunded charge does not match the purchase; nothing clawed back"
            );
        }
        _ => tracing::info!(ledger.tokens = -clawback.0, "refund applied"),
    }
    Ok(outcome)
}

/// Why a charge of `amount` in `currency` cannot be the payment of `purchase`, or `None`
/// when it is.
fn charge_mismatch(purchase: &PaidPurchase, amount: Cents, currency: &str) -> Option<String> {
    if amount != purchase.amount_cents {
        return Some(format!(
            "charge amount {} differs from the {} paid",
            amount.0, purchase.amount_cents.0
        ));
    }
    if !currency.eq_ignore_ascii_case(&purchase.currency) {
        return Some(format!(
            "charge currency {currency:?} differs from {:?}",
            purchase.currency
        ));
    }
    None
}

/// Claws back what a refunded purchase still owes, inside the caller's transaction, moves
/// the purchase to `partially_refunded` or `refunded`, and returns the tokens taken now (0
/// when nothing is owed).
///
/// What is owed in total follows the charge's cumulative refund, rounded down so that a
/// partial refund never takes more than its share:
///
/// ```text
/// owed_total = floor(tokens * min(amount_refunded, amount) / amount)
/// take_now   = owed_total - already_clawed_back      (nothing if <= 0)
/// ```
///
/// For 1,000 tokens bought for 500 cents, refunds of 200 then 500 cumulative cents take
/// 400 then 600 more. A balance may go negative when the tokens were already spent; the
/// clawback is booked anyway, so the ledger shows what is owed. A stored refund whose charge
/// differs from the purchase's payment (possible when the refund arrived first) takes
/// nothing.
async fn settle_clawback(
    transaction: &mut sqlx::Transaction<'static, Backend>,
    purchase: &PaidPurchase,
    payment_intent: &PaymentIntentId,
    event_id: &EventId,
) -> Result<Tokens, WebhookError> {
    let Some(refund) = db::find_refund_state(&mut **transaction, payment_intent).await? else {
        return Ok(Tokens(0));
    };
    let Some(user) = UserId::new(purchase.user_id.as_str()) else {
        return Ok(Tokens(0));
    };
    if refund.amount_cents.0 <= 0 {
        return Ok(Tokens(0));
    }
    if let Some(reason) = charge_mismatch(purchase, refund.amount_cents, &refund.currency) {
        tracing::warn!(
            reason,
            "stored refund does not match the purchase; nothing clawed back"
        );
        return Ok(Tokens(0));
    }

    let refunded = refund.amount_refunded_cents;
    if refunded.0 > 0 {
        let status = if refunded.0 >= refund.amount_cents.0 {
            PurchaseStatus::Refunded
        } else {
            PurchaseStatus::PartiallyRefunded
        };
        db::set_session_status(&mut **transaction, &purchase.session_id, status).await?;
    }

    let owed_total = owed_clawback(purchase.tokens, refund.amount_cents, refunded);
    let already = ledger::clawed_back(&mut **transaction, &purchase.session_id).await?;
    let take_now = Tokens(owed_total.0 - already.0);
    if take_now.0 <= 0 {
        return Ok(Tokens(0));
    }
    let entry = StripeEntry {
        user: &user,
        tokens: Tokens(-take_now.0),
        event_id,
        session_id: &purchase.session_id,
    };
    ledger::append_clawback(&mut **transaction, &entry).await?;
    Ok(take_now)
}

/// The total clawback owed for a charge of `amount` of which `refunded` was given back; see
/// [`settle_clawback`].
fn owed_clawback(tokens: Tokens, amount: Cents, refunded: Cents) -> Tokens {
    if amount.0 <= 0 || refunded.0 <= 0 {
        return Tokens(0);
    }
    let refunded = i128::from(refunded.0.min(amount.0));
    let owed = i128::from(tokens.0) * refunded / i128::from(amount.0);
    Tokens(i64::try_from(owed).unwrap_or(tokens.0))
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
    use crate::catalog::Package;
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
    fn clawback_follows_the_cumulative_refund_rounded_down() {
        let owed = |refunded| owed_clawback(Tokens(1_000), Cents(500), Cents(refunded)).0;
        assert_eq!(owed(0), 0);
        assert_eq!(owed(200), 400);
        assert_eq!(owed(500), 1_000);
        assert_eq!(owed(1), 2);
        assert_eq!(owed(900), 1_000, "never more than the purchase");
        assert_eq!(owed_clawback(Tokens(1_000), Cents(3), Cents(1)).0, 333);
        assert_eq!(owed_clawback(Tokens(5), Cents(0), Cents(1)).0, 0);
    }

    #[test]
    fn only_checkout_session_and_refund_types_are_handled() {
        assert_eq!(handling("checkout.session.completed"), Handling::Fulfil);
        assert_eq!(
            handling("checkout.session.async_payment_succeeded"),
            Handling::Fulfil
        );
        assert_eq!(handling("checkout.session.expired"), Handling::Close);
        assert_eq!(handling("charge.refunded"), Handling::Refund);
        assert_eq!(handling("payment_intent.succeeded"), Handling::Ignore);
        assert_eq!(handling("customer.tax_id.created"), Handling::Ignore);
    }
}
