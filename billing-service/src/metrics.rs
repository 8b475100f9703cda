//! Every Prometheus metric billing exports, defined in one place.
//!
//! Labels come from the closed enums below or from a fixed list of event-type classes, never
//! from request data, so the number of series stays bounded whatever callers send. The
//! metrics are served by the admin listener (see `http::admin_router`), not the public one.

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::catalog::Tokens;

/// How one webhook delivery ended; the `outcome` label of `billing_webhook_deliveries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookOutcome {
    Granted,
    /// The event id was seen before.
    DuplicateEvent,
    /// A new event for a session whose tokens were already granted.
    AlreadyGranted,
    /// Paid amount, currency, user or package did not match what was sold.
    Mismatch,
    /// Completed but not yet paid (a delayed payment method).
    AwaitingPayment,
    /// The session expired or its delayed payment failed.
    Closed,
    /// A refund of a granted purchase; tokens were clawed back if any were still owed.
    Refunded,
    /// A refund of a payment billing has not granted (yet); recorded for a later grant.
    RefundUnmatched,
    /// A refund that cannot be applied (missing figures, other currency); recorded.
    RefundUnusable,
    /// A refund whose charge amount or currency differs from what the purchase was paid;
    /// recorded, nothing clawed back.
    RefundMismatch,
    /// A type billing does not act on.
    Ignored,
    NotConfigured,
    BodyTooLarge,
    BodyReadFailed,
    SignatureMissing,
    SignatureMalformed,
    SignatureMismatch,
    /// Correctly signed, but the timestamp is older than the tolerance (or clocks disagree).
    TimestampOutsideTolerance,
    InvalidJson,
    StorageFailed,
}

impl WebhookOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::DuplicateEvent => "duplicate_event",
            Self::AlreadyGranted => "already_granted",
            Self::Mismatch => "mismatch",
            Self::AwaitingPayment => "awaiting_payment",
            Self::Closed => "closed",
            Self::Refunded => "refunded",
            Self::RefundUnmatched => "refund_unmatched",
            Self::RefundUnusable => "refund_unusable",
            Self::RefundMismatch => "refund_mismatch",
            Self::Ignored => "ignored",
            Self::NotConfigured => "not_configured",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyReadFailed => "body_read_failed",
            Self::SignatureMissing => "signature_missing",
            Self::SignatureMalformed => "signature_malformed",
            Self::SignatureMismatch => "signature_mismatch",
            Self::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            Self::InvalidJson => "invalid_json",
            Self::StorageFailed => "storage_failed",
        }
    }
}

/// How one checkout request ended; the `outcome` label of `billing_checkout_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckoutOutcome {
    Created,
    InvalidRequest,
    NotConfigured,
    StripeRejected,
    StripeUnreachable,
    StorageFailed,
}

impl CheckoutOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::InvalidRequest => "invalid_request",
            Self::NotConfigured => "not_configured",
            Self::StripeRejected => "stripe_rejected",
            Self::StripeUnreachable => "stripe_unreachable",
            Self::StorageFailed => "storage_failed",
        }
    }
}

/// Object families that get their own `class` label on ignored events; anything else is
/// counted as `other`, since Stripe adds event types over time.
const EVENT_CLASSES: &[&str] = &[
    "account",
    "balance",
    "charge",
    "checkout",
    "customer",
    "invoice",
    "payment_intent",
    "payment_method",
    "payout",
    "price",
    "product",
    "refund",
    "setup_intent",
    "subscription_schedule",
];

/// The service's metrics and the registry that renders them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    webhook_deliveries: IntCounterVec,
    events_ignored: IntCounterVec,
    grants: IntCounter,
    tokens_granted: IntCounter,
    checkout_requests: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "billing_webhook_deliveries_total",
                "Stripe webhook deliveries by outcome",
            ),
            &["outcome"],
        )
        .expect("metric options are static and valid");
        let events_ignored = IntCounterVec::new(
            Opts::new(
                "billing_webhook_events_ignored_total",
                "Verified Stripe events of types billing does not act on, by object class",
            ),
            &["class"],
        )
        .expect("metric options are static and valid");
        let grants = IntCounter::new("billing_token_grants_total", "Purchase grants written")
            .expect("metric options are static and valid");
        let tokens_granted = IntCounter::new(
            "billing_tokens_granted_total",
            "Tokens granted by purchases",
        )
        .expect("metric options are static and valid");
        let checkout_requests = IntCounterVec::new(
            Opts::new(
                "billing_checkout_requests_total",
                "Checkout requests by outcome",
            ),
            &["outcome"],
        )
        .expect("metric options are static and valid");

        for collector in [&webhook_deliveries, &events_ignored, &checkout_requests] {
            registry
                .register(Box::new(collector.clone()))
                .expect("each metric name is registered once");
        }
        for collector in [&grants, &tokens_granted] {
            registry
                .register(Box::new(collector.clone()))
                .expect("each metric name is registered once");
        }

        Self {
            registry,
            webhook_deliveries,
            events_ignored,
            grants,
            tokens_granted,
            checkout_requests,
        }
    }

    pub fn webhook_delivery(&self, outcome: WebhookOutcome) {
        self.webhook_deliveries
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Counts a verified event that billing does not act on, by the family of its type.
    pub fn event_ignored(&self, event_type: &str) {
        self.events_ignored
            .with_label_values(&[event_class(event_type)])
            .inc();
    }

    pub fn grant(&self, tokens: Tokens) {
        self.grants.inc();
        self.tokens_granted.inc_by(tokens.0.max(0).unsigned_abs());
    }

    pub fn checkout_request(&self, outcome: CheckoutOutcome) {
        self.checkout_requests
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// All metrics in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The bounded label for an event type: its first dotted segment when that is a known
/// family, otherwise `other`.
fn event_class(event_type: &str) -> &'static str {
    let family = event_type.split('.').next().unwrap_or_default();
    EVENT_CLASSES
        .iter()
        .find(|known| **known == family)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_classes_are_bounded() {
        assert_eq!(event_class("customer.tax_id.created"), "customer");
        assert_eq!(event_class("payment_intent.succeeded"), "payment_intent");
        assert_eq!(event_class("brand_new_family.happened"), "other");
        assert_eq!(event_class(""), "other");
    }

    #[test]
    fn rendered_output_names_the_counters() {
        let metrics = Metrics::new();
        metrics.webhook_delivery(WebhookOutcome::SignatureMismatch);
        metrics.event_ignored("customer.created");
        let text = metrics.render();
        assert!(
            text.contains(r#"billing_webhook_deliveries_total{outcome="signature_mismatch"} 1"#)
        );
        assert!(text.contains(r#"billing_webhook_events_ignored_total{class="customer"} 1"#));
    }
}
