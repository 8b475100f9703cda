//! One configuration generation: the validated file plus everything built from it.
//!
//! The proxy reads the current generation once per request, so a reload swaps the whole set
//! atomically and no request sees half of two files. Counters live in the shared store, outside
//! any generation, which is how they survive a reload.

use std::fmt;

use tollgate_auth::BearerVerifier;

use crate::config::{GatewayConfig, TokenAlgorithm};
use crate::identity::{Identifier, IdentityKey};
use crate::limiter::Limiter;
use crate::routing::Router;
use crate::store::Stores;

/// Secrets read once from the environment at start; a reload never re-reads them.
#[derive(Clone)]
pub struct Secrets {
    /// Key of the HMAC that turns addresses and user ids into client keys.
    pub identity_key: IdentityKey,
    /// Shared secret of HS256 bearer tokens (`JWT_SECRET`); `None` disables HS256.
    pub jwt_secret: Option<Vec<u8>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

/// Everything a request needs from the configuration in force.
pub struct Generation {
    /// 1 for the file loaded at start, then one more per successful reload.
    pub number: u64,
    pub config: GatewayConfig,
    pub router: Router,
    pub identifier: Identifier,
    pub limiter: Limiter,
}

impl Generation {
    /// Builds a generation; fails only when a key file named by the configuration is unusable.
    pub fn build(
        number: u64,
        config: GatewayConfig,
        secrets: &Secrets,
        stores: Stores,
    ) -> anyhow::Result<Self> {
        let verifier = verifier(&config, secrets)?;
        let fingerprints_on = config.identity.fingerprint_header.is_some();
        Ok(Self {
            number,
            router: Router::new(config.routes.clone()),
            identifier: Identifier::new(
                secrets.identity_key.clone(),
                verifier,
                config.identity.clone(),
            ),
            limiter: Limiter::new(&config.limits, stores, fingerprints_on),
            config,
        })
    }
}

fn verifier(config: &GatewayConfig, secrets: &Secrets) -> anyhow::Result<Option<BearerVerifier>> {
    let auth = &config.auth;
    let verifier = match (auth.algorithm, &auth.public_key_file, &secrets.jwt_secret) {
        (TokenAlgorithm::Hs256, _, Some(secret)) => BearerVerifier::hs256(secret),
        (TokenAlgorithm::Hs256, _, None) => return Ok(None),
        (algorithm, Some(file), _) => {
            let pem = std::fs::read(file)
                .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", file.display()))?;
            let parsed = match algorithm {
                TokenAlgorithm::Rs256 => BearerVerifier::rs256_pem(&pem),
                _ => BearerVerifier::ed25519_pem(&pem),
            };
            parsed.map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?
        }
        (_, None, _) => anyhow::bail!("auth.public_key_file is required for RS256 and EdDSA"),
    };
    let verifier = match &auth.issuer {
        Some(issuer) => verifier.with_issuer(issuer),
        None => verifier,
    };
    Ok(Some(match &auth.audience {
        Some(audience) => verifier.with_audience(audience),
        None => verifier,
    }))
}
