//! The gateway's TOML configuration: parsed strictly, validated once, then immutable.
//!
//! [`GatewayConfig::load`] is the only way in. Unknown keys, wrong types and values that make no
//! sense (a zero window, a route to an undeclared upstream) are errors that name the key with its
//! line and column, so a typo can never quietly turn a limit off.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

pub use crate::store::Algorithm;
use crate::store::{RedisSettings, RedisTarget};

/// A configuration error, already rendered with the file name, line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

// ------------------------------------------------------------------------------------------------
// The file as written
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    store: RawStore,
    upstreams: BTreeMap<String, RawUpstream>,
    routes: Vec<RawRoute>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    webhook: RawWebhook,
    #[serde(default)]
    problem: RawProblem,
    #[serde(default)]
    limits: Vec<RawLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Spanned<String>,
    admin_listen: Spanned<String>,
    threads: Spanned<usize>,
    health_paths: Vec<String>,
    blocked_path_prefixes: Vec<String>,
    body_read_timeout_secs: Spanned<u64>,
    body_timeout_secs: Spanned<u64>,
    max_header_bytes: Spanned<usize>,
    max_body_bytes: Spanned<u64>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: Spanned::new(0..0, "127.0.0.1:8080".into()),
            admin_listen: Spanned::new(0..0, "127.0.0.1:9090".into()),
            threads: Spanned::new(0..0, 2),
            health_paths: vec!["/healthz".into()],
            blocked_path_prefixes: vec!["/internal/".into()],
            body_read_timeout_secs: Spanned::new(0..0, 10),
            body_timeout_secs: Spanned::new(0..0, 30),
            max_header_bytes: Spanned::new(0..0, 16 * 1024),
            max_body_bytes: Spanned::new(0..0, 10 * 1024 * 1024),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    max_tracked_clients: usize,
    backend: Option<BackendName>,
    redis_url: Option<String>,
    cluster_nodes: Vec<String>,
    key_prefix: String,
    timeout_ms: Spanned<u64>,
    breaker_failures: Spanned<u32>,
    breaker_cooldown_ms: Spanned<u64>,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            max_tracked_clients: 1_000_000,
            backend: None,
            redis_url: None,
            cluster_nodes: Vec::new(),
            key_prefix: "tollgate:".into(),
            timeout_ms: Spanned::new(0..0, 50),
            breaker_failures: Spanned::new(0..0, 3),
            breaker_cooldown_ms: Spanned::new(0..0, 1000),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum BackendName {
    Memory,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIdentity {
    trusted_proxies: Vec<Spanned<String>>,
    forwarded_header: ForwardedHeader,
    ipv6_prefix: Spanned<u8>,
    fingerprint_header: Option<String>,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            ipv6_prefix: Spanned::new(0..0, 64),
            fingerprint_header: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    path_prefix: Spanned<String>,
    upstream: Spanned<String>,
    #[serde(default = "one")]
    cost: Spanned<u64>,
    max_body_bytes: Option<u64>,
    cors: Option<RawCors>,
}

fn one() -> Spanned<u64> {
    Spanned::new(0..0, 1)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allow_origins: Vec<Spanned<String>>,
    #[serde(default = "default_cors_methods")]
    allow_methods: Vec<Spanned<String>>,
    #[serde(default)]
    allow_headers: Vec<Spanned<String>>,
    #[serde(default)]
    expose_headers: Vec<Spanned<String>>,
    #[serde(default = "default_cors_max_age")]
    max_age_secs: u64,
}

fn default_cors_methods() -> Vec<Spanned<String>> {
    ["GET", "POST", "OPTIONS"]
        .map(|method| Spanned::new(0..0, method.to_owned()))
        .to_vec()
}

fn default_cors_max_age() -> u64 {
    600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    invalid_token: InvalidTokenPolicy,
    algorithm: TokenAlgorithm,
    public_key_file: Option<Spanned<String>>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            invalid_token: InvalidTokenPolicy::Anonymous,
            algorithm: TokenAlgorithm::Hs256,
            public_key_file: None,
            issuer: None,
            audience: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhook {
    path: Spanned<String>,
    max_body_bytes: u64,
}

impl Default for RawWebhook {
    fn default() -> Self {
        Self {
            path: Spanned::new(0..0, "/api/v1/stripe/webhook".into()),
            max_body_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProblem {
    sign_in_url: String,
    buy_tokens_url: String,
}

impl Default for RawProblem {
    fn default() -> Self {
        Self {
            sign_in_url: "/login".into(),
            buy_tokens_url: "/api/v1/stripe/packages".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: Spanned<String>,
    #[serde(default)]
    methods: Vec<String>,
    path: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    applies_to: Audience,
    quantity: Spanned<u64>,
    quantity_env: Option<String>,
    window_secs: Spanned<u64>,
    #[serde(default)]
    algorithm: AlgorithmName,
    burst: Option<Spanned<u64>>,
    fingerprint_quantity: Option<Spanned<u64>>,
    #[serde(default)]
    mode: LimitMode,
    #[serde(default)]
    on_store_failure: FailurePolicy,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum AlgorithmName {
    #[default]
    SlidingWindow,
    FixedWindow,
    TokenBucket,
}

// ------------------------------------------------------------------------------------------------
// The validated configuration
// ------------------------------------------------------------------------------------------------

/// What to do with a request whose bearer token fails verification.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InvalidTokenPolicy {
    /// Count it as an anonymous request from its address (default).
    #[default]
    Anonymous,
    /// Answer 401 with a `WWW-Authenticate: Bearer` challenge; the upstream is not called.
    Reject,
}

/// Which callers a limit counts.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Requests without a valid bearer token, keyed by client address (default).
    #[default]
    Anonymous,
    /// Requests with a valid bearer token, keyed by user id.
    Authenticated,
    /// Everyone: users by id, anonymous callers by address.
    Everyone,
}

/// Which forwarding header trusted proxies use to name the client.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (default).
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The signature algorithm of bearer tokens.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with the shared secret in `JWT_SECRET` (default).
    #[serde(rename = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256; the public key is `auth.public_key_file` (PEM).
    #[serde(rename = "RS256")]
    Rs256,
    /// Ed25519; the public key is `auth.public_key_file` (PEM).
    #[serde(rename = "EdDSA")]
    EdDsa,
}

/// Whether a limit refuses requests or only measures what it would refuse.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// Over-limit requests get 429 (default).
    #[default]
    Enforce,
    /// Decisions are counted in metrics only; no request is refused and no header is sent.
    Shadow,
}

/// What a limit does with a request when the Redis store cannot decide it (timeout, error, or
/// open circuit breaker). The memory store never fails, so this only matters with Redis.
///
/// When a request falls under limits with different policies, the strictest wins: `deny` over
/// `local` over `allow`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Admit without counting (fail open), and send no rate-limit headers for this limit: the
    /// gateway has no numbers it computed (default).
    #[default]
    Allow,
    /// Decide on this gateway's own memory counts while Redis is away: limits still hold per
    /// instance, not across instances. Headers carry those local numbers.
    Local,
    /// Answer 503 with a problem body; the upstream is not called.
    Deny,
}

/// Where counters live.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreBackend {
    /// Process memory of this gateway (default without `REDIS_URL` or Redis keys).
    Memory,
    /// Redis or Redis Cluster, shared by every gateway that points at it.
    Redis(RedisSettings),
}

/// CORS policy of a route, applied by the gateway to every response of the route, its own
/// 429s included, and used to answer preflights.
#[derive(Clone, Debug)]
///
/// The answer headers are rendered once, when the configuration loads, so a value that cannot
/// be sent is a configuration error rather than a failed response.
pub struct CorsConfig {
    /// Exact origins allowed, or `*`.
    pub allow_origins: Vec<String>,
    /// `Access-Control-Allow-Methods` of a preflight answer.
    pub allow_methods: HeaderValue,
    /// `Access-Control-Allow-Headers` of a preflight answer; `None` when none are listed.
    pub allow_headers: Option<HeaderValue>,
    /// `Access-Control-Expose-Headers`: response headers a browser may read (the rate-limit
    /// headers belong here); `None` when none are listed.
    pub expose_headers: Option<HeaderValue>,
    /// `Access-Control-Max-Age`: how long a browser may cache a preflight answer, in seconds.
    /// Default 600.
    pub max_age: HeaderValue,
}

/// Where a limit applies: a set of methods (empty means all) and an exact path or a prefix,
/// both compared against the normalised path.
#[derive(Clone, Debug)]
pub struct RouteMatcher {
    pub methods: Vec<String>,
    pub path: PathMatch,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// One configured limit, validated.
#[derive(Clone, Debug)]
pub struct LimitConfig {
    /// Unique, made of `[a-z0-9_-]`; it appears in headers, bodies and metric labels.
    pub name: String,
    pub matcher: RouteMatcher,
    pub applies_to: Audience,
    /// Requests admitted per window; at least 1. For a token bucket, the steady rate.
    pub quantity: u64,
    /// Window length in seconds; at least 1.
    pub window_secs: u64,
    pub algorithm: Algorithm,
    /// With fingerprints on, what each fingerprint of an address may use; `quantity` is then
    /// the ceiling of the whole address. `None`: fingerprints do not split this limit.
    pub fingerprint_quantity: Option<u64>,
    pub mode: LimitMode,
    /// What happens when the Redis store cannot decide. Default `allow`.
    pub on_store_failure: FailurePolicy,
}

/// A named upstream and the route prefix that sends traffic to it.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// The `[upstreams]` entry this route names.
    pub upstream_name: String,
    pub upstream: SocketAddr,
    /// Units each request of this route uses in every limit that counts it. Default 1.
    pub cost: u64,
    /// Body ceiling in bytes; larger bodies get 413. Default `server.max_body_bytes`.
    pub max_body_bytes: u64,
    pub cors: Option<CorsConfig>,
}

/// How the client address is found and grouped.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Peers whose forwarding header is believed. Default: none.
    pub trusted_proxies: Vec<IpNet>,
    pub forwarded_header: ForwardedHeader,
    /// IPv6 clients are grouped by this prefix length. Default 64.
    pub ipv6_prefix: u8,
    /// Header whose value splits an address's budget; `None` (default) turns that off.
    pub fingerprint_header: Option<http::HeaderName>,
}

/// How bearer tokens are verified.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub invalid_token: InvalidTokenPolicy,
    pub algorithm: TokenAlgorithm,
    /// PEM public key for RS256 and EdDSA.
    pub public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// The whole validated configuration.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Proxy listener. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Admin listener for `/healthz`, `/readyz` and `/metrics`. Default `127.0.0.1:9090`.
    pub admin_listen: String,
    /// Worker threads of the proxy. Default 2.
    pub threads: usize,
    /// Paths the gateway answers itself with 200 and never counts. Default `["/healthz"]`.
    pub health_paths: Vec<String>,
    /// Path prefixes the gateway never forwards (answered 404), so that service-to-service
    /// APIs such as billing's `/internal/` stay unreachable from outside. A prefix ending in
    /// `/` also covers the path without it. Default `["/internal/"]`.
    pub blocked_path_prefixes: Vec<String>,
    /// Longest pause allowed between two reads of a request body, in seconds. Default 10.
    pub body_read_timeout_secs: u64,
    /// Longest time to receive a whole request body, in seconds. Default 30.
    pub body_timeout_secs: u64,
    /// Largest request head (request line and headers), in bytes; larger gets 431. Default
    /// 16 KiB.
    pub max_header_bytes: usize,
    /// Clients the memory store tracks at most; see [`crate::store::MemoryStore`]. Default
    /// 1,000,000. Applies at start.
    pub max_tracked_clients: usize,
    /// Where counters live: memory unless `store.backend = "redis"`, `store.redis_url`,
    /// `store.cluster_nodes` or `REDIS_URL` says Redis. Applies at start.
    pub store: StoreBackend,
    /// Routes in the order written; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    pub identity: IdentityConfig,
    pub auth: AuthConfig,
    /// The exact path of the Stripe webhook, exempt from every limit for `POST`.
    pub webhook_path: String,
    /// Body ceiling of the webhook route, in bytes. Default 1 MiB.
    pub webhook_max_body_bytes: u64,
    /// Where 429 bodies send anonymous clients to sign in. Default `/login`.
    pub sign_in_url: String,
    /// Where 429 bodies send anonymous clients to buy tokens.
    pub buy_tokens_url: String,
    pub limits: Vec<LimitConfig>,
}

impl GatewayConfig {
    /// Reads and validates the file at `path`. `env` resolves `quantity_env` overrides; the
    /// server passes the process environment, tests pass a map.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Self::parse(&source, env).map_err(|message| ConfigError::Invalid {
            path: display,
            message,
        })
    }

    /// Parses and validates TOML text; the error is a message with line and column.
    pub fn parse(source: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(source).map_err(|error| {
            let at = error
                .span()
                .map(|span| position(source, &span))
                .unwrap_or_default();
            // Some parse errors carry their explanation only in the rendered text.
            let message = match error.message() {
                "" => error
                    .to_string()
                    .lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .unwrap_or("invalid TOML")
                    .to_owned(),
                message => message.to_owned(),
            };
            format!("{at}{message}")
        })?;
        Validator { source, env }.validate(raw)
    }
}

/// Command-line overrides, applied on top of the file at start and again at every reload.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// `(upstream name, address)` pairs replacing `[upstreams.NAME] address`.
    pub upstreams: Vec<(String, SocketAddr)>,
}

impl GatewayConfig {
    /// Loads `path` and applies `overrides`.
    pub fn load_with(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::load(path, env)?;
        if let Some(listen) = &overrides.listen {
            config.listen = listen.clone();
        }
        if let Some(admin) = &overrides.admin_listen {
            config.admin_listen = admin.clone();
        }
        for (name, address) in &overrides.upstreams {
            let mut routes = config
                .routes
                .iter_mut()
                .filter(|route| route.upstream_name == *name);
            let mut found = false;
            for route in &mut routes {
                route.upstream = *address;
                found = true;
            }
            if !found {
                return Err(ConfigError::Invalid {
                    path: path.display().to_string(),
                    message: format!("override for upstream {name}: no route uses it"),
                });
            }
        }
        Ok(config)
    }
}

struct Validator<'a> {
    source: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn fail<T>(&self, span: Range<usize>, message: impl std::fmt::Display) -> Result<T, String> {
        Err(format!("{}{message}", position(self.source, &span)))
    }

    fn validate(&self, raw: RawConfig) -> Result<GatewayConfig, String> {
        let mut upstreams = BTreeMap::new();
        for (name, upstream) in &raw.upstreams {
            let Ok(address) = upstream.address.get_ref().parse::<SocketAddr>() else {
                return self.fail(
                    upstream.address.span(),
                    format!("upstreams.{name}.address must be host:port with an IP address"),
                );
            };
            upstreams.insert(name.clone(), address);
        }

        let mut routes = Vec::new();
        for route in raw.routes {
            let default_max_body = *raw.server.max_body_bytes.get_ref();
            routes.push(self.validate_route(route, &upstreams, default_max_body)?);
        }
        self.check_path(&raw.webhook.path, "webhook.path")?;
        if crate::routing::normalise(raw.webhook.path.get_ref()) != *raw.webhook.path.get_ref() {
            let message = "webhook.path must be a normalised path (no //, . or .. segments)";
            return self.fail(raw.webhook.path.span(), message);
        }

        let mut names = HashSet::new();
        let mut limits = Vec::new();
        for limit in raw.limits {
            let limit = self.validate_limit(limit)?;
            if !names.insert(limit.name.clone()) {
                return Err(format!("limit name {:?} is used twice", limit.name));
            }
            limits.push(limit);
        }

        let server = raw.server;
        for (address, key) in [
            (&server.listen, "listen"),
            (&server.admin_listen, "admin_listen"),
        ] {
            if address.get_ref().parse::<SocketAddr>().is_err() {
                let message = format!("server.{key} must be IP:port, got {:?}", address.get_ref());
                return self.fail(address.span(), message);
            }
        }
        let positive = [
            (
                server.threads.span(),
                *server.threads.get_ref() as u64,
                "threads",
            ),
            (
                server.body_read_timeout_secs.span(),
                *server.body_read_timeout_secs.get_ref(),
                "body_read_timeout_secs",
            ),
            (
                server.body_timeout_secs.span(),
                *server.body_timeout_secs.get_ref(),
                "body_timeout_secs",
            ),
            (
                server.max_header_bytes.span(),
                *server.max_header_bytes.get_ref() as u64,
                "max_header_bytes",
            ),
            (
                server.max_body_bytes.span(),
                *server.max_body_bytes.get_ref(),
                "max_body_bytes",
            ),
        ];
        for (span, value, key) in positive {
            if value == 0 {
                return self.fail(span, format!("server.{key} must be at least 1"));
            }
        }
        Ok(GatewayConfig {
            listen: server.listen.into_inner(),
            admin_listen: server.admin_listen.into_inner(),
            threads: server.threads.into_inner(),
            health_paths: server.health_paths,
            blocked_path_prefixes: server.blocked_path_prefixes,
            body_read_timeout_secs: server.body_read_timeout_secs.into_inner(),
            body_timeout_secs: server.body_timeout_secs.into_inner(),
            max_header_bytes: server.max_header_bytes.into_inner(),
            max_tracked_clients: raw.store.max_tracked_clients.max(1),
            store: self.validate_store(raw.store)?,
            routes,
            identity: self.validate_identity(raw.identity)?,
            auth: self.validate_auth(raw.auth)?,
            webhook_path: raw.webhook.path.into_inner(),
            webhook_max_body_bytes: raw.webhook.max_body_bytes,
            sign_in_url: raw.problem.sign_in_url,
            buy_tokens_url: raw.problem.buy_tokens_url,
            limits,
        })
    }

    fn validate_route(
        &self,
        route: RawRoute,
        upstreams: &BTreeMap<String, SocketAddr>,
        default_max_body: u64,
    ) -> Result<RouteConfig, String> {
        let Some(&upstream) = upstreams.get(route.upstream.get_ref()) else {
            let name = route.upstream.get_ref();
            return self.fail(
                route.upstream.span(),
                format!("no [upstreams.{name}] is declared"),
            );
        };
        self.check_path(&route.path_prefix, "routes.path_prefix")?;
        if *route.cost.get_ref() == 0 {
            return self.fail(route.cost.span(), "routes.cost must be at least 1");
        }
        let cors = match route.cors {
            Some(cors) => Some(self.validate_cors(cors)?),
            None => None,
        };
        Ok(RouteConfig {
            name: route.name.into_inner(),
            path_prefix: route.path_prefix.into_inner(),
            upstream_name: route.upstream.into_inner(),
            upstream,
            cost: route.cost.into_inner(),
            max_body_bytes: route.max_body_bytes.unwrap_or(default_max_body),
            cors,
        })
    }

    fn validate_cors(&self, raw: RawCors) -> Result<CorsConfig, String> {
        let lists = [
            &raw.allow_origins,
            &raw.allow_methods,
            &raw.allow_headers,
            &raw.expose_headers,
        ];
        let sendable = |entry: &str| {
            !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        };
        if let Some(entry) = lists
            .into_iter()
            .flatten()
            .find(|entry| !sendable(entry.get_ref()))
        {
            let message = format!(
                "routes.cors entry {:?} must be one non-empty value of visible ASCII \
                 without spaces or commas",
                entry.get_ref()
            );
            return self.fail(entry.span(), message);
        }
        let list = |entries: &[Spanned<String>]| {
            (!entries.is_empty()).then(|| {
                let values: Vec<&str> = entries
                    .iter()
                    .map(|entry| entry.get_ref().as_str())
                    .collect();
                HeaderValue::try_from(values.join(", ")).expect("entries were checked above")
            })
        };
        Ok(CorsConfig {
            allow_methods: list(&raw.allow_methods).unwrap_or(HeaderValue::from_static("")),
            allow_headers: list(&raw.allow_headers),
            expose_headers: list(&raw.expose_headers),
            max_age: HeaderValue::from(raw.max_age_secs),
            allow_origins: raw
                .allow_origins
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
        })
    }

    fn validate_identity(&self, raw: RawIdentity) -> Result<IdentityConfig, String> {
        let mut trusted_proxies = Vec::new();
        for cidr in &raw.trusted_proxies {
            let text = cidr.get_ref();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => {
                    let message = format!("identity.trusted_proxies: {text:?} is not a CIDR");
                    return self.fail(cidr.span(), message);
                }
            }
        }
        let prefix = *raw.ipv6_prefix.get_ref();
        if !(1..=128).contains(&prefix) {
            return self.fail(
                raw.ipv6_prefix.span(),
                "identity.ipv6_prefix must be 1 to 128",
            );
        }
        let fingerprint_header = match raw.fingerprint_header {
            None => None,
            Some(name) => Some(http::HeaderName::try_from(name.as_str()).map_err(|_| {
                format!("identity.fingerprint_header {name:?} is not a header name")
            })?),
        };
        Ok(IdentityConfig {
            trusted_proxies,
            forwarded_header: raw.forwarded_header,
            ipv6_prefix: prefix,
            fingerprint_header,
        })
    }

    fn validate_auth(&self, raw: RawAuth) -> Result<AuthConfig, String> {
        let needs_key = raw.algorithm != TokenAlgorithm::Hs256;
        if needs_key && raw.public_key_file.is_none() {
            return Err("auth.public_key_file is required for RS256 and EdDSA".into());
        }
        Ok(AuthConfig {
            invalid_token: raw.invalid_token,
            algorithm: raw.algorithm,
            public_key_file: raw
                .public_key_file
                .map(|file| PathBuf::from(file.into_inner())),
            issuer: raw.issuer,
            audience: raw.audience,
        })
    }

    fn validate_limit(&self, raw: RawLimit) -> Result<LimitConfig, String> {
        let name = raw.name.get_ref();
        let well_named = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !well_named {
            return self.fail(raw.name.span(), "limits.name must be non-empty [a-z0-9_-]");
        }

        let path = match (raw.path, raw.path_prefix) {
            (Some(path), None) => {
                self.check_path(&path, "limits.path")?;
                PathMatch::Exact(path.into_inner())
            }
            (None, Some(prefix)) => {
                self.check_path(&prefix, "limits.path_prefix")?;
                PathMatch::Prefix(prefix.into_inner())
            }
            _ => {
                return self.fail(
                    raw.name.span(),
                    "a limit needs exactly one of path, path_prefix",
                )
            }
        };

        let mut quantity = *raw.quantity.get_ref();
        if let Some(variable) = &raw.quantity_env {
            if let Some(value) = (self.env)(variable) {
                quantity = value.trim().parse().map_err(|_| {
                    format!("environment variable {variable} must be a whole number, got {value:?}")
                })?;
            }
        }
        if quantity == 0 {
            return self.fail(raw.quantity.span(), "limits.quantity must be at least 1");
        }
        if *raw.window_secs.get_ref() == 0 {
            return self.fail(
                raw.window_secs.span(),
                "limits.window_secs must be at least 1",
            );
        }
        let algorithm = match (raw.algorithm, &raw.burst) {
            (AlgorithmName::TokenBucket, Some(burst)) if *burst.get_ref() == 0 => {
                return self.fail(burst.span(), "limits.burst must be at least 1");
            }
            (AlgorithmName::TokenBucket, burst) => Algorithm::TokenBucket {
                burst: burst.as_ref().map_or(quantity, |burst| *burst.get_ref()),
            },
            (_, Some(burst)) => {
                return self.fail(burst.span(), "limits.burst applies to token_bucket only");
            }
            (AlgorithmName::SlidingWindow, None) => Algorithm::SlidingWindow,
            (AlgorithmName::FixedWindow, None) => Algorithm::FixedWindow,
        };
        let fingerprint_quantity = match raw.fingerprint_quantity {
            Some(per) if *per.get_ref() == 0 || *per.get_ref() > quantity => {
                let message = "limits.fingerprint_quantity must be 1 to quantity";
                return self.fail(per.span(), message);
            }
            other => other.map(Spanned::into_inner),
        };

        Ok(LimitConfig {
            name: name.clone(),
            matcher: RouteMatcher {
                methods: raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                path,
            },
            applies_to: raw.applies_to,
            quantity,
            window_secs: *raw.window_secs.get_ref(),
            algorithm,
            fingerprint_quantity,
            mode: raw.mode,
            on_store_failure: raw.on_store_failure,
        })
    }

    /// Chooses the backend. `REDIS_URL` in the environment wins over `store.redis_url`, so a
    /// password need not be written in the file; `store.cluster_nodes` means a Cluster.
    fn validate_store(&self, raw: RawStore) -> Result<StoreBackend, String> {
        let url = (self.env)("REDIS_URL")
            .filter(|url| !url.trim().is_empty())
            .or(raw.redis_url);
        let target = match (url, raw.cluster_nodes.is_empty()) {
            (_, false) => Some(RedisTarget::Cluster(raw.cluster_nodes)),
            (Some(url), true) => Some(RedisTarget::Standalone(url)),
            (None, true) => None,
        };
        let target = match (raw.backend, target) {
            (Some(BackendName::Memory), _) | (None, None) => return Ok(StoreBackend::Memory),
            (Some(BackendName::Redis) | None, Some(target)) => target,
            (Some(BackendName::Redis), None) => {
                return Err("store.backend = \"redis\" needs store.redis_url, \
                            store.cluster_nodes or REDIS_URL"
                    .into())
            }
        };
        if *raw.timeout_ms.get_ref() == 0 {
            return self.fail(raw.timeout_ms.span(), "store.timeout_ms must be at least 1");
        }
        if *raw.breaker_failures.get_ref() == 0 {
            let message = "store.breaker_failures must be at least 1";
            return self.fail(raw.breaker_failures.span(), message);
        }
        if raw.key_prefix.contains(['{', '}']) {
            return Err("store.key_prefix must not contain { or }: they set the hash tag".into());
        }
        Ok(StoreBackend::Redis(RedisSettings {
            target,
            key_prefix: raw.key_prefix,
            timeout: Duration::from_millis(*raw.timeout_ms.get_ref()),
            breaker_failures: *raw.breaker_failures.get_ref(),
            breaker_cooldown: Duration::from_millis(*raw.breaker_cooldown_ms.get_ref()),
        }))
    }

    fn check_path(&self, path: &Spanned<String>, key: &str) -> Result<(), String> {
        if path.get_ref().starts_with('/') {
            Ok(())
        } else {
            self.fail(path.span(), format!("{key} must start with '/'"))
        }
    }
}

/// Renders a byte span as `line L, column C: ` (both 1-based).
fn position(source: &str, span: &Range<usize>) -> String {
    let before = &source[..span.start.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../config/gateway.toml");

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(source: &str) -> Result<GatewayConfig, String> {
        GatewayConfig::parse(source, &no_env)
    }

    #[test]
    fn shipped_file_is_valid_and_limits_anonymous_generation() {
        let config = parse(SHIPPED).unwrap();
        let limit = &config.limits[0];
        assert_eq!(limit.quantity, 3);
        assert_eq!(limit.window_secs, 86_400);
        assert_eq!(limit.applies_to, Audience::Anonymous);
    }

    #[test]
    fn environment_overrides_the_anonymous_quantity() {
        let env = |name: &str| (name == "ANONYMOUS_DAILY_LIMIT").then(|| "7".to_string());
        let config = GatewayConfig::parse(SHIPPED, &env).unwrap();
        assert_eq!(config.limits[0].quantity, 7);

        let bad = |name: &str| (name == "ANONYMOUS_DAILY_LIMIT").then(|| "lots".to_string());
        let error = GatewayConfig::parse(SHIPPED, &bad).unwrap_err();
        assert!(error.contains("ANONYMOUS_DAILY_LIMIT"), "{error}");
    }

    #[test]
    fn misspelled_key_is_rejected_with_its_position() {
        let source = SHIPPED.replace("window_secs", "windw_secs");
        let error = parse(&source).unwrap_err();
        assert!(error.contains("windw_secs"), "{error}");
        assert!(error.starts_with("line "), "{error}");
    }

    #[test]
    fn nonsense_values_are_rejected_with_their_position() {
        for (from, to) in [
            ("quantity = 3", "quantity = \"three\""),
            ("quantity = 3", "quantity = -1"),
            ("quantity = 3", "quantity = 0"),
            ("window_secs = 86400", "window_secs = 0"),
            ("quantity = 3", "quantity ="),
            ("threads = 2", "threads = 0"),
            ("body_read_timeout_secs = 10", "body_read_timeout_secs = 0"),
            ("listen = \"127.0.0.1:8080\"", "listen = \"garbage\""),
            (
                "path = \"/api/v1/stripe/webhook\"",
                "path = \"/api/v1/stripe/../generate\"",
            ),
        ] {
            assert!(SHIPPED.contains(from));
            let error = parse(&SHIPPED.replacen(from, to, 1)).unwrap_err();
            assert!(error.starts_with("line "), "{to}: {error}");
            let (_, message) = error.split_once(": ").unwrap();
            assert!(
                !message.trim().is_empty(),
                "{to}: the error explains nothing"
            );
        }
    }

    /// A CORS value the gateway could not send is refused at load, at the route's CORS table,
    /// instead of failing responses later.
    #[test]
    fn unsendable_cors_values_are_rejected_with_their_position() {
        let route = "[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n";
        let base = format!("[upstreams.app]\naddress = \"127.0.0.1:8000\"\n{route}");
        let good = format!("{base}[routes.cors]\nallow_origins = [\"https://a.example\"]\n");
        let cors = parse(&good).unwrap().routes[0].cors.clone().unwrap();
        assert_eq!(cors.allow_methods, "GET, POST, OPTIONS");
        assert_eq!(cors.max_age, "600");
        assert!(cors.expose_headers.is_none());
        for bad in ["bad\\nvalue", "a, b", "", "two words"] {
            let source = format!("{good}expose_headers = [\"ok\", \"{bad}\"]\n");
            let error = parse(&source).unwrap_err();
            assert!(error.starts_with("line 9, column 25: "), "{bad}: {error}");
            assert!(error.contains("routes.cors"), "{bad}: {error}");
        }
        // Dotted keys are the same table written another way.
        let dotted = format!("{base}cors.allow_origins = [\"https://a.example\"]\n");
        let cors = parse(&dotted).unwrap().routes[0].cors.clone().unwrap();
        assert_eq!(cors.allow_origins, ["https://a.example"]);
    }

    #[test]
    fn empty_file_is_rejected() {
        assert!(parse("").is_err());
    }

    #[test]
    fn position_counts_lines_and_columns_from_one() {
        assert_eq!(position("ab\ncd", &(4..5)), "line 2, column 2: ");
    }
}
