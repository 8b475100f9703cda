//! A local stand-in for Stripe's `POST /v1/checkout/sessions`, for running the service (and
//! schemathesis against it, see `scripts/contract-test.sh`) without reaching Stripe.
//!
//! Usage: `cargo run -p billing-service --example stripe_stand_in -- 127.0.0.1:12111`, then
//! start billing with `STRIPE_API_BASE=http://127.0.0.1:12111` and any `sk_...` key in
//! `STRIPE_SECRET_KEY`. It is the test suite's stand-in (`tests/common/stripe.rs`), so it
//! refuses with a 400 any form Stripe would refuse and replays idempotent requests as Stripe
//! does; nothing here makes it fail on purpose.

// The stand-in's fault injection and request log serve the tests, not this binary.
#[allow(dead_code)]
#[path = "../tests/common/stripe.rs"]
mod stripe;

use anyhow::Context as _;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:12111".to_owned());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let _stand_in = stripe::StripeStandIn::serve(listener);
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for ctrl-c")?;
    Ok(())
}
