//! RS256 and EdDSA tokens verified against public keys in PEM files. The key pairs under
//! `tests/data/` were generated for these tests only.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tollgate_auth::BearerVerifier;

fn token(algorithm: Algorithm, key: &EncodingKey, sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let claims = serde_json::json!({"sub": sub, "exp": exp});
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).unwrap()
}

#[test]
fn rs256_tokens_verify_with_the_public_key_only() {
    let private = EncodingKey::from_rsa_pem(include_bytes!("data/rsa-private.pem")).unwrap();
    let verifier = BearerVerifier::rs256_pem(include_bytes!("data/rsa-public.pem")).unwrap();
    let user = verifier
        .verify_token(&token(Algorithm::RS256, &private, "7"))
        .unwrap();
    assert_eq!(user.as_str(), "7");

    // An HS256 token "signed" with the public key text must not pass (algorithm confusion).
    let confused = EncodingKey::from_secret(include_bytes!("data/rsa-public.pem"));
    assert!(verifier
        .verify_token(&token(Algorithm::HS256, &confused, "7"))
        .is_err());
}

#[test]
fn eddsa_tokens_verify_with_the_public_key_only() {
    let private = EncodingKey::from_ed_pem(include_bytes!("data/ed25519-private.pem")).unwrap();
    let verifier = BearerVerifier::ed25519_pem(include_bytes!("data/ed25519-public.pem")).unwrap();
    let user = verifier
        .verify_token(&token(Algorithm::EdDSA, &private, "9"))
        .unwrap();
    assert_eq!(user.as_str(), "9");

    let rsa = EncodingKey::from_rsa_pem(include_bytes!("data/rsa-private.pem")).unwrap();
    assert!(verifier
        .verify_token(&token(Algorithm::RS256, &rsa, "9"))
        .is_err());
}

#[test]
fn malformed_public_keys_are_an_error() {
    assert!(BearerVerifier::rs256_pem(b"not a key").is_err());
    assert!(BearerVerifier::ed25519_pem(b"not a key").is_err());
}
