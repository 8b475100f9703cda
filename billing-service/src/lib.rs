//! Tollgate billing: sells token packages through Stripe Checkout and keeps the token ledger.
//!
//! Tokens are granted only by verified Stripe webhooks, never by a browser returning from
//! Checkout. Layout:
//!
//! - [`config`]: the strict TOML file and the secrets read once from the environment.
//! - [`catalog`]: the token packages on sale and the savings derived from their prices.
//! - [`http`]: the router, the request extractors and the one error-to-status mapping.
//! - [`checkout`]: records a pending purchase and opens a Stripe Checkout Session for it.
//! - [`webhook`]: receives Stripe events, verifies them and applies them to the ledger.
//! - [`debit`]: the internal endpoint through which the application spends tokens.
//! - [`ledger`]: append-only token transactions; a balance is the sum of its rows.
//! - [`db`]: the pool (SQLite or Postgres), migrations, purchase, refund and event records.
//! - [`stripe`]: the outbound Stripe API client (timeouts, retries, idempotency keys).
//! - [`metrics`]: every Prometheus metric the service exports, and the admin listener.

pub mod catalog;
pub mod checkout;
pub mod config;
pub mod db;
pub mod debit;
pub mod group_commit;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod stripe;
pub mod webhook;

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch by the system clock; 0 if the clock is before 1970.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// Milliseconds since the Unix epoch by the system clock; used to order ledger rows.
pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
