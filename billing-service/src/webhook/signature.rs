//! Verification of Stripe's `Stripe-Signature` header over the raw request body.
//!
//! This module decides only whether bytes are genuinely from Stripe and fresh enough; it
//! never parses the body. The caller passes the time of receipt, so verification does not
//! depend on when it happens to run and tests can pin the clock.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Why a delivery's signature was refused. Every variant is the sender's problem (or clock
/// skew), so each maps to 400; they are kept apart for logs and metrics.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the webhook secret is empty")]
    EmptySecret,
    #[error("no stripe-signature header")]
    Missing,
    /// No usable `t=`, a non-numeric one, more than one, or a header that is not text.
    #[error("stripe-signature header is malformed")]
    Malformed,
    #[error("stripe-signature header has no v1 signature")]
    NoV1Signature,
    #[error("no v1 signature matches the body")]
    Mismatch,
    /// The signature is genuine but older than the tolerance: a replay, or our clock is
    /// ahead of Stripe's.
    #[error("signature timestamp is {age_secs} s old, beyond the tolerance")]
    TimestampOutsideTolerance { age_secs: i64 },
}

/// Checks a `Stripe-Signature` header against the raw body, following Stripe's scheme
/// (https://docs.stripe.com/webhooks#verify-manually):
///
/// 1. The header is comma-separated `key=value` pairs. `t` is the signing time in Unix
///    seconds and must appear exactly once; every `v1` is a candidate signature; `v0` and
///    unknown keys are ignored. Keys are matched exactly, so ` v1` (after a space) is not
///    `v1`.
/// 2. The expected signature is the lowercase hex HMAC-SHA256, keyed with the whole
///    `whsec_...` secret, of `"<t>.<body>"` with `t` in canonical decimal.
/// 3. The delivery is genuine if any `v1` equals it, compared in constant time. Hex is
///    compared as text, so an uppercased signature does not match, as in Stripe's libraries.
/// 4. A genuine delivery is fresh unless `t < received_at - tolerance`. A timestamp in the
///    future is accepted, as Stripe's own libraries do.
///
/// Returns the signing time. `shared/stripe/vectors.json` is the compatibility suite.
pub fn verify(
    header: Option<&[u8]>,
    body: &[u8],
    secret: &str,
    tolerance: Duration,
    received_at: i64,
) -> Result<i64, SignatureError> {
    if secret.is_empty() {
        return Err(SignatureError::EmptySecret);
    }
    let header = header
        .filter(|value| !value.is_empty())
        .ok_or(SignatureError::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| SignatureError::Malformed)?;

    let parsed = parse_header(header)?;
    if parsed.v1.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }

    let expected = hex::encode(mac(secret, parsed.timestamp, body));
    let matches = parsed.v1.iter().fold(false, |found, candidate| {
        found | bool::from(candidate.as_bytes().ct_eq(expected.as_bytes()))
    });
    if !matches {
        return Err(SignatureError::Mismatch);
    }

    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age_secs = received_at.saturating_sub(parsed.timestamp);
    if age_secs > tolerance {
        return Err(SignatureError::TimestampOutsideTolerance { age_secs });
    }
    Ok(parsed.timestamp)
}

/// A `Stripe-Signature` value (`t=<timestamp>,v1=<hex>`) for `body`, as Stripe would send it.
/// Used by the `sign-event` helper and by tests that play Stripe.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body))
    )
}

struct ParsedHeader<'a> {
    timestamp: i64,
    v1: Vec<&'a str>,
}

fn parse_header(header: &str) -> Result<ParsedHeader<'_>, SignatureError> {
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for (key, value) in header.split(',').filter_map(|pair| pair.split_once('=')) {
        match key {
            "t" if timestamp.is_some() => return Err(SignatureError::Malformed),
            "t" => timestamp = Some(parse_timestamp(value)?),
            "v1" => v1.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    Ok(ParsedHeader { timestamp, v1 })
}

/// Decimal digits only; leading zeros are allowed and do not change the value.
fn parse_timestamp(value: &str) -> Result<i64, SignatureError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed);
    }
    value.parse().map_err(|_| SignatureError::Malformed)
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::Deserialize;
    use sha2::Digest;

    use super::*;

    #[derive(Deserialize)]
    struct Suite {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        id: String,
        payload: String,
        payload_sha256: String,
        secret: String,
        header: String,
        now: i64,
        tolerance: u64,
        expected: String,
    }

    fn suite() -> Suite {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/stripe/vectors.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "the signature suite must be present at {}: {error}",
                path.display()
            )
        });
        serde_json::from_str(&text).expect("vectors.json parses")
    }

    #[test]
    fn every_vector_gets_its_expected_verdict() {
        let suite = suite();
        assert!(
            suite.cases.len() >= 24,
            "the suite lost cases: {}",
            suite.cases.len()
        );

        let mut verdicts = Vec::new();
        for case in &suite.cases {
            let digest = hex::encode(Sha256::digest(case.payload.as_bytes()));
            assert_eq!(
                digest, case.payload_sha256,
                "{}: payload bytes differ",
                case.id
            );

            let outcome = verify(
                Some(case.header.as_bytes()),
                case.payload.as_bytes(),
                &case.secret,
                Duration::from_secs(case.tolerance),
                case.now,
            );
            let verdict = if outcome.is_ok() { "accept" } else { "reject" };
            if verdict != case.expected {
                verdicts.push(format!("{}: got {verdict} ({outcome:?})", case.id));
            }
        }
        assert!(
            verdicts.is_empty(),
            "verdicts differ from the suite: {verdicts:#?}"
        );
    }

    #[test]
    fn stale_and_forged_deliveries_are_told_apart() {
        let secret = "whsec_test";
        let body = br#"{"id":"evt_1"}"#;
        let header = sign(secret, 1_000, body);
        let tolerance = Duration::from_secs(300);

        assert_eq!(
            verify(Some(header.as_bytes()), body, secret, tolerance, 1_300),
            Ok(1_000)
        );
        assert_eq!(
            verify(Some(header.as_bytes()), body, secret, tolerance, 1_301),
            Err(SignatureError::TimestampOutsideTolerance { age_secs: 301 })
        );
        assert_eq!(
            verify(
                Some(header.as_bytes()),
                body,
                "whsec_other",
                tolerance,
                1_000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(None, body, secret, tolerance, 1_000),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(Some(b"t=1000,t=1000"), body, secret, tolerance, 1_000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some(b"t=1000"), body, secret, tolerance, 1_000),
            Err(SignatureError::NoV1Signature)
        );
    }
}
