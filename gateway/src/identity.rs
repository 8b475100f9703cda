//! Who is calling: a verified user, or an anonymous client known only by its address.
//!
//! Addresses are never stored or logged as such. They are grouped (an IPv4-mapped IPv6 address
//! is its IPv4 address; an IPv6 address stands for its /64, the allocation one subscriber
//! usually holds) and hashed with HMAC-SHA256 under a secret key into a [`ClientKey`]. A bearer
//! token names a user only after its signature and claims check out; anything else about the
//! `Authorization` header leaves the caller anonymous, under its address's one budget.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tollgate_auth::{AuthError, BearerVerifier, UserId};

/// Prefix length by which IPv6 clients are grouped.
const IPV6_GROUP_PREFIX: u32 = 64;

/// A fixed-length, keyed hash naming one client to the counter store. It reveals nothing about
/// the address or user behind it without the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey([u8; 32]);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", hex::encode(&self.0[..6]))
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..8]))
    }
}

/// The secret under which client keys are derived. `Debug` never prints it.
#[derive(Clone)]
pub struct IdentityKey(Vec<u8>);

impl IdentityKey {
    pub fn new(secret: Vec<u8>) -> Self {
        Self(secret)
    }

    /// A random key for runs without a configured one. Counters keyed under it mean nothing
    /// to another process, which is fine for the in-memory store.
    pub fn random() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }

    fn derive(&self, domain: &[u8], material: &[u8]) -> ClientKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(domain);
        mac.update(material);
        ClientKey(mac.finalize().into_bytes().into())
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey(<redacted>)")
    }
}

/// The outcome of identification for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A verified bearer token; anonymous limits do not apply.
    User { id: UserId, key: ClientKey },
    /// No token, or one that failed verification (`rejected_token` is then set).
    Anonymous {
        key: ClientKey,
        rejected_token: bool,
    },
}

impl Caller {
    /// The key under which this caller's counters live.
    pub fn key(&self) -> ClientKey {
        match self {
            Caller::User { key, .. } | Caller::Anonymous { key, .. } => *key,
        }
    }
}

/// Turns a request's peer address and `Authorization` header into a [`Caller`].
#[derive(Debug)]
pub struct Identifier {
    key: IdentityKey,
    verifier: Option<BearerVerifier>,
}

impl Identifier {
    /// `verifier` is `None` when no token secret is configured; every caller is then anonymous.
    pub fn new(key: IdentityKey, verifier: Option<BearerVerifier>) -> Self {
        Self { key, verifier }
    }

    pub fn identify(&self, peer: IpAddr, authorization: Option<&[u8]>) -> Caller {
        let user = match (&self.verifier, authorization) {
            (_, None) => Err(AuthError::Missing),
            (None, Some(_)) => Err(AuthError::NoKey),
            (Some(verifier), header) => verifier.verify_header(header),
        };
        match user {
            Ok(id) => {
                let key = self.key.derive(b"user\0", id.as_str().as_bytes());
                Caller::User { id, key }
            }
            Err(error) => {
                let rejected_token = !matches!(error, AuthError::Missing);
                if rejected_token {
                    tracing::debug!(reason = %error, "bearer token not accepted");
                }
                Caller::Anonymous {
                    key: self.address_key(peer),
                    rejected_token,
                }
            }
        }
    }

    fn address_key(&self, peer: IpAddr) -> ClientKey {
        match group(peer) {
            IpAddr::V4(v4) => self.key.derive(b"ipv4\0", &v4.octets()),
            IpAddr::V6(v6) => self.key.derive(b"ipv6\0", &v6.octets()),
        }
    }
}

/// The address that stands for `peer`'s budget: IPv4 as is (also when IPv4-mapped), IPv6
/// reduced to its /64 network.
pub fn group(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - IPV6_GROUP_PREFIX);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn identifier() -> Identifier {
        Identifier::new(
            IdentityKey::new(b"k".to_vec()),
            Some(BearerVerifier::hs256(b"jwt-secret")),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn mapped_ipv4_and_plain_ipv4_share_a_key() {
        let id = identifier();
        assert_eq!(
            id.identify(ip("::ffff:203.0.113.10"), None),
            id.identify(ip("203.0.113.10"), None)
        );
    }

    #[test]
    fn ipv6_addresses_in_one_64_share_a_key() {
        let id = identifier();
        let a = id.identify(ip("2001:db8:1:2::1"), None).key();
        let b = id.identify(ip("2001:db8:1:2:ffff::9"), None).key();
        let c = id.identify(ip("2001:db8:1:3::1"), None).key();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn junk_tokens_fall_back_to_the_address_key() {
        let id = identifier();
        let plain = id.identify(ip("198.51.100.1"), None).key();
        for header in [
            &b"Bearer junk-1"[..],
            b"Bearer junk-2",
            b"n1 Bearer x",
            b"Basic Zm9v",
        ] {
            let caller = id.identify(ip("198.51.100.1"), Some(header));
            assert_eq!(
                caller,
                Caller::Anonymous {
                    key: plain,
                    rejected_token: true
                }
            );
        }
    }

    #[test]
    fn valid_token_names_the_user_and_not_the_address() {
        let id = identifier();
        let token = tollgate_auth::mint_hs256(b"jwt-secret", "42", Duration::from_secs(60));
        let header = format!("Bearer {token}");
        let caller = id.identify(ip("198.51.100.1"), Some(header.as_bytes()));
        let Caller::User { id: user, key } = caller else {
            panic!("token was not accepted: {caller:?}");
        };
        assert_eq!(user.as_str(), "42");
        assert_ne!(key, id.identify(ip("198.51.100.1"), None).key());
    }

    #[test]
    fn key_depends_on_the_secret() {
        let other = Identifier::new(IdentityKey::new(b"other".to_vec()), None);
        assert_ne!(
            identifier().identify(ip("192.0.2.1"), None).key(),
            other.identify(ip("192.0.2.1"), None).key()
        );
    }
}
