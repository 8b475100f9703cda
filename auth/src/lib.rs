//! Bearer-token verification shared by the gateway and the billing service.
//!
//! Both services must agree, byte for byte, on which `Authorization` headers name a signed-in
//! user: the gateway lifts the anonymous quota for them and billing charges their account. This
//! crate owns that one decision. It does not own what a service does with an unauthenticated
//! request; that differs (the gateway counts it as anonymous, billing answers 401).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock leeway applied to `exp` and `nbf`, in seconds: a token is still accepted this long
/// after its expiry, to absorb small clock differences between the issuer and us.
pub const LEEWAY_SECS: u64 = 5;

/// The id of a signed-in user, taken verbatim from the token's `sub` claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Wraps an id that has already been checked to be non-empty.
    pub fn new(id: impl Into<String>) -> Option<Self> {
        let id = id.into();
        (!id.is_empty()).then_some(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request is not authenticated. Every variant means "treat as no user"; the
/// distinction exists for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no authorization header")]
    Missing,
    #[error("authorization header is not a single bearer token")]
    NotBearer,
    #[error("bearer token rejected: {0}")]
    Rejected(#[from] jsonwebtoken::errors::Error),
    #[error("bearer token has an empty subject")]
    EmptySubject,
    #[error("no verification key is configured")]
    NoKey,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Checks bearer tokens against one key and algorithm.
///
/// Only the configured algorithm is accepted, so a token whose header claims `none` or another
/// algorithm fails even if its payload is genuine. `exp` and `sub` are required; `nbf`, `iss`
/// and `aud` are checked when present or configured.
#[derive(Clone)]
pub struct BearerVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for BearerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl BearerVerifier {
    /// A verifier for HS256 tokens signed with a shared secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// A verifier for RS256 tokens, given the issuer's RSA public key in PEM.
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, AuthError> {
        Ok(Self::new(DecodingKey::from_rsa_pem(pem)?, Algorithm::RS256))
    }

    /// A verifier for EdDSA (Ed25519) tokens, given the issuer's public key in PEM.
    pub fn ed25519_pem(pem: &[u8]) -> Result<Self, AuthError> {
        Ok(Self::new(DecodingKey::from_ed_pem(pem)?, Algorithm::EdDSA))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { key, validation }
    }

    /// Requires the `iss` claim to equal `issuer`.
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self
    }

    /// Requires the `aud` claim to contain `audience`.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self
    }

    /// Verifies the value of an `Authorization` header (see [`bearer_token`] for the accepted
    /// shape) and returns the user it names.
    pub fn verify_header(&self, authorization: Option<&[u8]>) -> Result<UserId, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = bearer_token(header).ok_or(AuthError::NotBearer)?;
        self.verify_token(token)
    }

    /// Verifies a bare token and returns the user in its `sub` claim.
    pub fn verify_token(&self, token: &str) -> Result<UserId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        UserId::new(data.claims.sub).ok_or(AuthError::EmptySubject)
    }
}

/// Extracts the token from `Bearer <token>`.
///
/// The scheme is case-insensitive (RFC 9110, section 11.1) and must be followed by exactly one
/// space-free token. Anything else (another scheme, a prefix before `Bearer`, trailing words)
/// yields `None`, so a client cannot smuggle a valid token past us inside a longer header.
pub fn bearer_token(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_matches(' ');
    let well_formed = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
    well_formed.then_some(token)
}

/// Signs an HS256 token for `user`, valid for `ttl` from now. Used by the offline helper that
/// stands in for an identity provider during local runs, and by tests.
pub fn mint_hs256(secret: &[u8], user: &str, ttl: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let claims = Claims {
        sub: user.to_owned(),
        exp: now + ttl.as_secs(),
        nbf: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing with an in-memory secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn token_with(claims: serde_json::Value, secret: &[u8]) -> String {
        let key = EncodingKey::from_secret(secret);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_token_names_its_user() {
        let token = mint_hs256(SECRET, "42", Duration::from_secs(60));
        let header = format!("Bearer {token}");
        let user = BearerVerifier::hs256(SECRET)
            .verify_header(Some(header.as_bytes()))
            .unwrap();
        assert_eq!(user.as_str(), "42");
    }

    #[test]
    fn scheme_is_case_insensitive_but_shape_is_strict() {
        assert_eq!(bearer_token(b"bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"BEARER abc"), Some("abc"));
        assert_eq!(bearer_token(b"X Bearer abc"), None);
        assert_eq!(bearer_token(b"Bearer abc extra"), None);
        assert_eq!(bearer_token(b"abc"), None);
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
    }

    #[test]
    fn expired_future_and_foreign_tokens_are_rejected() {
        let verifier = BearerVerifier::hs256(SECRET);
        let expired = token_with(
            serde_json::json!({"sub": "42", "exp": now() - 3600}),
            SECRET,
        );
        let early = token_with(
            serde_json::json!({"sub": "42", "exp": now() + 7200, "nbf": now() + 3600}),
            SECRET,
        );
        let foreign = token_with(
            serde_json::json!({"sub": "42", "exp": now() + 60}),
            b"other",
        );
        let no_subject = token_with(serde_json::json!({"exp": now() + 60}), SECRET);
        let empty_subject = token_with(serde_json::json!({"sub": "", "exp": now() + 60}), SECRET);
        for token in [expired, early, foreign, no_subject, empty_subject] {
            assert!(
                verifier.verify_token(&token).is_err(),
                "{token} was accepted"
            );
        }
    }

    #[test]
    fn unsigned_and_other_algorithm_tokens_are_rejected() {
        let genuine = mint_hs256(SECRET, "42", Duration::from_secs(60));
        let payload = genuine.split('.').nth(1).unwrap();
        // base64url of {"alg":"none","typ":"JWT"} and {"alg":"RS256","typ":"JWT"}.
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        let rs256 = format!("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{payload}.c2ln");
        let verifier = BearerVerifier::hs256(SECRET);
        assert!(verifier.verify_token(&none).is_err());
        assert!(verifier.verify_token(&rs256).is_err());
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let verifier = BearerVerifier::hs256(SECRET)
            .with_issuer("tollgate")
            .with_audience("app");
        let exp = now() + 60;
        let good = token_with(
            serde_json::json!({"sub": "1", "exp": exp, "iss": "tollgate", "aud": "app"}),
            SECRET,
        );
        let bad_iss = token_with(
            serde_json::json!({"sub": "1", "exp": exp, "iss": "x", "aud": "app"}),
            SECRET,
        );
        let bad_aud = token_with(
            serde_json::json!({"sub": "1", "exp": exp, "iss": "tollgate", "aud": "x"}),
            SECRET,
        );
        assert!(verifier.verify_token(&good).is_ok());
        assert!(verifier.verify_token(&bad_iss).is_err());
        assert!(verifier.verify_token(&bad_aud).is_err());
    }
}
