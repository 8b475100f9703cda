//! Who is calling: a verified user, or an anonymous client known only by its address.
//!
//! The client address is the TCP peer unless that peer is a trusted proxy; only then is the
//! forwarding header read, from the right, skipping trusted hops, so a client can never pick its
//! own address. Addresses are then grouped (an IPv4-mapped IPv6 address is its IPv4 address; an
//! IPv6 address stands for its network of `ipv6_prefix` bits) and hashed with HMAC-SHA256 under
//! a secret key into a [`ClientKey`]; raw addresses go no further. A bearer token names a user
//! only after its signature and claims check out; anything else leaves the caller anonymous,
//! under its address's one budget.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use tollgate_auth::{AuthError, BearerVerifier, UserId};

use crate::config::{ForwardedHeader, IdentityConfig};

/// A fixed-length, keyed hash naming one client to the counter store. It reveals nothing about
/// the address or user behind it without the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey([u8; 32]);

impl ClientKey {
    /// The key as bytes, for stores that need a textual or binary form.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", hex::encode(&self.0[..6]))
    }
}

/// The secret under which client keys are derived. `Debug` never prints it.
///
/// It holds HMAC-SHA256 already keyed: the two key blocks are hashed once here, not on every
/// request, which halves the hashing per derived key.
#[derive(Clone)]
pub struct IdentityKey(Hmac<Sha256>);

impl IdentityKey {
    pub fn new(secret: Vec<u8>) -> Self {
        let keyed = Hmac::<Sha256>::new_from_slice(&secret)
            .expect("HMAC-SHA256 accepts keys of any length");
        Self(keyed)
    }

    /// A random key for runs without a configured one. Counters keyed under it mean nothing
    /// to another process, which is fine for the in-memory store.
    pub fn random() -> Self {
        Self::new(rand::random::<[u8; 32]>().to_vec())
    }

    fn mac(&self, domain: &[u8], material: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(domain);
        mac.update(material);
        mac.finalize().into_bytes().into()
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
        /// The hashed fingerprint, when fingerprints are on and the request carried one.
        fingerprint: Option<u64>,
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

/// Everything identification learned about one request.
#[derive(Clone, Debug)]
pub struct Identified {
    pub caller: Caller,
    /// The resolved client address (before grouping), forwarded to the upstream.
    pub client_ip: IpAddr,
    /// The peer sent a forwarding header but is not a trusted proxy, so it was ignored.
    pub forwarding_ignored: bool,
}

/// Turns a request's peer address and headers into an [`Identified`] caller.
#[derive(Debug)]
pub struct Identifier {
    key: IdentityKey,
    verifier: Option<BearerVerifier>,
    config: IdentityConfig,
}

impl Identifier {
    /// `verifier` is `None` when no token key is configured; every caller is then anonymous.
    pub fn new(key: IdentityKey, verifier: Option<BearerVerifier>, config: IdentityConfig) -> Self {
        Self {
            key,
            verifier,
            config,
        }
    }

    pub fn identify(&self, peer: IpAddr, headers: &HeaderMap) -> Identified {
        let (client_ip, forwarding_ignored) = self.resolve_address(peer, headers);
        Identified {
            caller: self.caller(client_ip, headers),
            client_ip,
            forwarding_ignored,
        }
    }

    /// The caller behind a request from the already resolved `client_ip` (see
    /// [`Identifier::client_address`]): a verified user, or the address's anonymous budget.
    pub fn caller(&self, client_ip: IpAddr, headers: &HeaderMap) -> Caller {
        let mut authorizations = headers.get_all(http::header::AUTHORIZATION).iter();
        let authorization = authorizations.next().map(|value| value.as_bytes());
        let repeated = authorizations.next().is_some();
        let user = match (&self.verifier, authorization) {
            (_, None) => Err(AuthError::Missing),
            // Two credentials are ambiguous: the app might honour the other one.
            (_, Some(_)) if repeated => Err(AuthError::NotBearer),
            (None, Some(_)) => Err(AuthError::NoKey),
            (Some(verifier), header) => verifier.verify_header(header),
        };

        match user {
            Ok(id) => {
                let key = ClientKey(self.key.mac(b"user\0", id.as_str().as_bytes()));
                Caller::User { id, key }
            }
            Err(error) => {
                let rejected_token = !matches!(error, AuthError::Missing);
                if rejected_token {
                    tracing::debug!(reason = %error, "bearer token not accepted");
                }
                Caller::Anonymous {
                    key: self.address_key(client_ip),
                    fingerprint: self.fingerprint(headers),
                    rejected_token,
                }
            }
        }
    }

    /// The resolved client address and whether an untrusted peer's forwarding header was
    /// ignored; see [`Identifier::identify`].
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
        self.resolve_address(peer, headers)
    }

    /// The client address: the peer, or for a trusted peer the first untrusted hop of the
    /// forwarding header read from the right. A hop that does not parse ends the walk at the
    /// last address we could vouch for.
    fn resolve_address(&self, peer: IpAddr, headers: &HeaderMap) -> (IpAddr, bool) {
        let peer = canonical(peer);
        let header = match self.config.forwarded_header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        let values = headers.get_all(header);
        if !self.is_trusted(peer) {
            return (peer, values.iter().next().is_some());
        }

        let mut hops: Vec<&str> = Vec::new();
        for value in values {
            let Ok(value) = value.to_str() else {
                return (peer, false);
            };
            hops.extend(value.split(','));
        }
        let mut client = peer;
        for hop in hops.iter().rev() {
            let parsed = match self.config.forwarded_header {
                ForwardedHeader::XForwardedFor => parse_address(hop.trim()),
                ForwardedHeader::Forwarded => forwarded_for(hop),
            };
            let Some(address) = parsed.map(canonical) else {
                break;
            };
            client = address;
            if !self.is_trusted(address) {
                break;
            }
        }
        (client, false)
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.config
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&address))
    }

    fn address_key(&self, address: IpAddr) -> ClientKey {
        match group(address, self.config.ipv6_prefix) {
            IpAddr::V4(v4) => ClientKey(self.key.mac(b"ipv4\0", &v4.octets())),
            IpAddr::V6(v6) => ClientKey(self.key.mac(b"ipv6\0", &v6.octets())),
        }
    }

    /// A keyed 64-bit hash of the fingerprint header, whatever its length; a missing, empty
    /// or blank value is no fingerprint.
    fn fingerprint(&self, headers: &HeaderMap) -> Option<u64> {
        let name = self.config.fingerprint_header.as_ref()?;
        let value = headers.get(name)?.as_bytes().trim_ascii();
        if value.is_empty() {
            return None;
        }
        let digest = self.key.mac(b"fingerprint\0", value);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Some(u64::from_be_bytes(first))
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// The address that stands for a client's budget: IPv4 as is, IPv6 reduced to its network of
/// `prefix` bits.
pub fn group(address: IpAddr, prefix: u8) -> IpAddr {
    match canonical(address) {
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// Parses `192.0.2.1`, `192.0.2.1:443`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_address(text: &str) -> Option<IpAddr> {
    if let Ok(address) = text.parse::<IpAddr>() {
        return Some(address);
    }
    if let Ok(socket) = text.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    let inner = text.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

/// The address in the `for=` parameter of one RFC 7239 `Forwarded` element.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        parse_address(value.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    fn config(trusted: &[&str], header: ForwardedHeader) -> IdentityConfig {
        IdentityConfig {
            trusted_proxies: trusted.iter().map(|net| net.parse().unwrap()).collect(),
            forwarded_header: header,
            ipv6_prefix: 64,
            fingerprint_header: Some(http::HeaderName::from_static("x-fingerprint")),
        }
    }

    fn identifier(trusted: &[&str]) -> Identifier {
        Identifier::new(
            IdentityKey::new(b"k".to_vec()),
            Some(BearerVerifier::hs256(b"jwt-secret")),
            config(trusted, ForwardedHeader::XForwardedFor),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn resolve(id: &Identifier, peer: &str, pairs: &[(&'static str, &str)]) -> IpAddr {
        id.identify(ip(peer), &headers(pairs)).client_ip
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_address() {
        let id = identifier(&[]);
        let identified = id.identify(
            ip("198.51.100.7"),
            &headers(&[("x-forwarded-for", "1.2.3.4")]),
        );
        assert_eq!(identified.client_ip, ip("198.51.100.7"));
        assert!(identified.forwarding_ignored);
    }

    #[test]
    fn trusted_chains_are_walked_from_the_right() {
        let id = identifier(&["10.0.0.0/8"]);
        let xff = |value| resolve(&id, "10.0.0.5", &[("x-forwarded-for", value)]);
        assert_eq!(xff("203.0.113.10"), ip("203.0.113.10"));
        // The client's own claim on the left is not believed past the first untrusted hop.
        assert_eq!(xff("6.6.6.6, 203.0.113.10, 10.0.0.9"), ip("203.0.113.10"));
        assert_eq!(xff(""), ip("10.0.0.5"));
        assert_eq!(xff("garbage"), ip("10.0.0.5"));
        assert_eq!(xff("10.1.1.1, 10.2.2.2"), ip("10.1.1.1"));
        assert_eq!(resolve(&id, "10.0.0.6", &[]), ip("10.0.0.6"));
        let split = [
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "203.0.113.2"),
        ];
        assert_eq!(resolve(&id, "10.0.0.5", &split), ip("203.0.113.2"));
    }

    #[test]
    fn rfc_7239_forwarded_is_read_when_configured() {
        let id = Identifier::new(
            IdentityKey::new(b"k".to_vec()),
            None,
            config(&["10.0.0.0/8"], ForwardedHeader::Forwarded),
        );
        let value = "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\", for=10.0.0.2";
        assert_eq!(
            resolve(&id, "10.0.0.5", &[("forwarded", value)]),
            ip("2001:db8:cafe::17")
        );
        let value = "for=192.0.2.43:47011;by=10.0.0.1";
        assert_eq!(
            resolve(&id, "10.0.0.5", &[("forwarded", value)]),
            ip("192.0.2.43")
        );
    }

    #[test]
    fn mapped_ipv4_and_plain_ipv4_share_a_key() {
        let id = identifier(&[]);
        let none = HeaderMap::new();
        assert_eq!(
            id.identify(ip("::ffff:203.0.113.10"), &none).caller,
            id.identify(ip("203.0.113.10"), &none).caller
        );
    }

    #[test]
    fn ipv6_addresses_in_one_prefix_share_a_key() {
        let id = identifier(&[]);
        let key = |peer| id.identify(ip(peer), &HeaderMap::new()).caller.key();
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(group(ip("2001:db8:1:2:3::1"), 48), ip("2001:db8:1::"));
        assert_eq!(group(ip("2001:db8::1"), 128), ip("2001:db8::1"));
    }

    #[test]
    fn junk_tokens_fall_back_to_the_address_key() {
        let id = identifier(&[]);
        let plain = id
            .identify(ip("198.51.100.1"), &HeaderMap::new())
            .caller
            .key();
        for header in [
            "Bearer junk-1",
            "Bearer junk-2",
            "n1 Bearer x",
            "Basic Zm9v",
        ] {
            let caller = id.identify(ip("198.51.100.1"), &headers(&[("authorization", header)]));
            let expected = Caller::Anonymous {
                key: plain,
                fingerprint: None,
                rejected_token: true,
            };
            assert_eq!(caller.caller, expected);
        }
    }

    #[test]
    fn a_valid_token_beside_another_authorization_header_is_anonymous() {
        let id = identifier(&[]);
        let token = tollgate_auth::mint_hs256(b"jwt-secret", "42", Duration::from_secs(60));
        let valid = format!("Bearer {token}");
        let twice = headers(&[("authorization", &valid), ("authorization", "Basic Zm9v")]);
        let caller = id.identify(ip("198.51.100.2"), &twice).caller;
        assert!(
            matches!(
                caller,
                Caller::Anonymous {
                    rejected_token: true,
                    ..
                }
            ),
            "{caller:?}"
        );
    }

    #[test]
    fn valid_token_names_the_user_and_not_the_address() {
        let id = identifier(&[]);
        let token = tollgate_auth::mint_hs256(b"jwt-secret", "42", Duration::from_secs(60));
        let header = format!("Bearer {token}");
        let caller = id.identify(ip("198.51.100.1"), &headers(&[("authorization", &header)]));
        let Caller::User { id: user, key } = caller.caller else {
            panic!("token was not accepted: {caller:?}");
        };
        assert_eq!(user.as_str(), "42");
        assert_ne!(
            key,
            id.identify(ip("198.51.100.1"), &HeaderMap::new())
                .caller
                .key()
        );
    }

    #[test]
    fn blank_fingerprints_are_no_fingerprint_and_long_ones_hash_to_fixed_size() {
        let id = identifier(&[]);
        let fingerprint = |value: &str| match id
            .identify(ip("203.0.113.30"), &headers(&[("x-fingerprint", value)]))
            .caller
        {
            Caller::Anonymous { fingerprint, .. } => fingerprint,
            Caller::User { .. } => unreachable!("no token was sent"),
        };
        assert_eq!(fingerprint(""), None);
        assert_eq!(fingerprint("   "), None);
        assert!(fingerprint("fpA").is_some());
        assert_ne!(fingerprint("fpA"), fingerprint("fpB"));
        assert!(fingerprint(&"x".repeat(10_000)).is_some());
    }

    #[test]
    fn key_depends_on_the_secret() {
        let other = Identifier::new(
            IdentityKey::new(b"other".to_vec()),
            None,
            config(&[], ForwardedHeader::XForwardedFor),
        );
        let none = HeaderMap::new();
        assert_ne!(
            identifier(&[])
                .identify(ip("192.0.2.1"), &none)
                .caller
                .key(),
            other.identify(ip("192.0.2.1"), &none).caller.key()
        );
    }

    /// Gateways sharing Redis must agree on every key, whatever their uptime: the pre-keyed
    /// state is reused, never advanced, and the result is plain HMAC-SHA256 of domain and
    /// material.
    #[test]
    fn keys_are_plain_hmac_and_stable_across_calls() {
        let key = IdentityKey::new(b"shared-secret".to_vec());
        let mut reference = Hmac::<Sha256>::new_from_slice(b"shared-secret").unwrap();
        reference.update(b"ipv4\0");
        reference.update(b"192.0.2.1");
        let expected: [u8; 32] = reference.finalize().into_bytes().into();
        for _ in 0..3 {
            assert_eq!(key.mac(b"ipv4\0", b"192.0.2.1"), expected);
        }
    }
}
