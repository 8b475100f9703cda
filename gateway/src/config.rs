//! The gateway's TOML configuration: parsed strictly, validated once, then immutable.
//!
//! [`GatewayConfig::load`] is the only way in. Unknown keys, wrong types and values that make no
//! sense (a zero window, a route to an undeclared upstream) are errors that name the key with its
//! line and column, so a typo can never quietly turn a limit off.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

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
    listen: String,
    admin_listen: String,
    threads: usize,
    health_paths: Vec<String>,
    body_read_timeout_secs: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 2,
            health_paths: vec!["/healthz".into()],
            body_read_timeout_secs: 10,
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
    name: String,
    path_prefix: Spanned<String>,
    upstream: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    invalid_token: InvalidTokenPolicy,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            invalid_token: InvalidTokenPolicy::Anonymous,
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
    algorithm: Algorithm,
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

/// How a limit counts. Only the rolling window exists so far; see [`crate::store`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// At most `quantity` requests in any `window_secs`-long span (default).
    #[default]
    SlidingWindow,
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
    /// Requests admitted per window; at least 1.
    pub quantity: u64,
    /// Window length in seconds; at least 1.
    pub window_secs: u64,
    pub algorithm: Algorithm,
}

/// A named upstream and the route prefix that sends traffic to it.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// The `[upstreams]` entry this route names.
    pub upstream_name: String,
    pub upstream: SocketAddr,
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
    /// Longest pause allowed between two reads of a request body, in seconds. Default 10.
    pub body_read_timeout_secs: u64,
    /// Routes in the order written; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    pub invalid_token: InvalidTokenPolicy,
    pub issuer: Option<String>,
    pub audience: Option<String>,
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
            format!("{at}{}", error.message())
        })?;
        Validator { source, env }.validate(raw)
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
            let Some(&upstream) = upstreams.get(route.upstream.get_ref()) else {
                return self.fail(
                    route.upstream.span(),
                    format!(
                        "routes.upstream names no [upstreams] entry: {}",
                        route.upstream.get_ref()
                    ),
                );
            };
            self.check_path(&route.path_prefix, "routes.path_prefix")?;
            routes.push(RouteConfig {
                name: route.name,
                path_prefix: route.path_prefix.into_inner(),
                upstream_name: route.upstream.into_inner(),
                upstream,
            });
        }
        self.check_path(&raw.webhook.path, "webhook.path")?;

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
        if server.threads == 0 {
            return Err("server.threads must be at least 1".into());
        }
        Ok(GatewayConfig {
            listen: server.listen,
            admin_listen: server.admin_listen,
            threads: server.threads,
            health_paths: server.health_paths,
            body_read_timeout_secs: server.body_read_timeout_secs.max(1),
            routes,
            invalid_token: raw.auth.invalid_token,
            issuer: raw.auth.issuer,
            audience: raw.auth.audience,
            webhook_path: raw.webhook.path.into_inner(),
            webhook_max_body_bytes: raw.webhook.max_body_bytes,
            sign_in_url: raw.problem.sign_in_url,
            buy_tokens_url: raw.problem.buy_tokens_url,
            limits,
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

        Ok(LimitConfig {
            name: name.clone(),
            matcher: RouteMatcher {
                methods: raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                path,
            },
            applies_to: raw.applies_to,
            quantity,
            window_secs: *raw.window_secs.get_ref(),
            algorithm: raw.algorithm,
        })
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
        ] {
            assert!(SHIPPED.contains(from));
            let error = parse(&SHIPPED.replacen(from, to, 1)).unwrap_err();
            assert!(error.starts_with("line "), "{to}: {error}");
        }
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
