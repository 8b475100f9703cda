//! Startup configuration: the strict TOML file and the secrets from the environment.
//!
//! Both are read once, before anything listens, and turned into validated types; handlers
//! never read the file or the environment. Unknown TOML keys are errors (with line and column)
//! because the file is ours and a typo must not silently fall back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::catalog::{Catalog, Cents, Package, PackageId, Tokens};

/// The Stripe API base used when `STRIPE_API_BASE` is unset.
pub const DEFAULT_STRIPE_API_BASE: &str = "https://api.stripe.com";

/// The database used when `DATABASE_URL` is unset: a SQLite file under `data/`, created on
/// first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/billing.db?mode=rwc";

/// Stripe accepts a Checkout Session `expires_at` between 30 minutes and 24 hours ahead.
const SESSION_EXPIRY_RANGE_SECS: std::ops::RangeInclusive<u64> = 1_800..=86_400;

/// Why the service cannot start with the given configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key; the message names line and column.
    /// The parser's error is part of the message rather than a source, so it prints once.
    #[error("config file {path} is not valid: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("config file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("environment variable {name} is not valid: {reason}")]
    Environment { name: &'static str, reason: String },
}

// ===== The file as written =====

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_admin_listen")]
    admin_listen: SocketAddr,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    checkout: CheckoutSection,
    #[serde(default)]
    webhook: WebhookSection,
    #[serde(default)]
    stripe: StripeSection,
    packages: Vec<PackageEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CheckoutSection {
    session_expiry_secs: u64,
}

impl Default for CheckoutSection {
    fn default() -> Self {
        Self {
            session_expiry_secs: 86_400,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct WebhookSection {
    tolerance_secs: u64,
    body_limit_bytes: usize,
    body_read_timeout_secs: u64,
}

impl Default for WebhookSection {
    fn default() -> Self {
        Self {
            tolerance_secs: 300,
            body_limit_bytes: 1_048_576,
            body_read_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StripeSection {
    api_version: String,
    connect_timeout_secs: u64,
    request_timeout_secs: u64,
    max_retries: u32,
}

impl Default for StripeSection {
    fn default() -> Self {
        Self {
            api_version: "2026-10-28.endive".to_owned(),
            connect_timeout_secs: 5,
            request_timeout_secs: 20,
            max_retries: 2,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageEntry {
    id: String,
    name: String,
    tokens: i64,
    price_cents: i64,
    #[serde(default)]
    popular: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}

fn default_currency() -> String {
    "usd".to_owned()
}

// ===== The validated config =====

/// Everything the TOML file decides, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// Public API address. Default `127.0.0.1:8081`; `--listen` overrides it.
    pub listen: SocketAddr,
    /// Address of `/healthz` and `/metrics`. Default `127.0.0.1:9091`; `--admin-listen`
    /// overrides it.
    pub admin_listen: SocketAddr,
    pub catalog: Catalog,
    pub checkout: CheckoutSettings,
    pub webhook: WebhookSettings,
    pub stripe: StripeSettings,
}

/// How Checkout Sessions are opened.
#[derive(Clone, Debug)]
pub struct CheckoutSettings {
    /// How long a session stays payable; Stripe allows 30 min to 24 h. Default 24 h. The
    /// value sent to Stripe is kept 5 min inside that range (24 h becomes 23 h 55 min), so
    /// that clock differences and retries cannot push it out; see `checkout`.
    pub session_expiry: Duration,
}

/// How webhook deliveries are received and verified.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Oldest accepted signature timestamp, relative to receipt. Default 300 s.
    pub tolerance: Duration,
    /// Largest accepted body in bytes; larger ones get 413 unread. Default 1 MiB.
    pub body_limit_bytes: usize,
    /// Deadline for reading the whole body, so a slow sender cannot hold a task. Default 10 s.
    pub body_read_timeout: Duration,
}

/// How the Stripe API is called.
#[derive(Clone, Debug)]
pub struct StripeSettings {
    /// Sent as `Stripe-Version`, pinning the shape of Stripe's responses and events.
    pub api_version: String,
    /// Limit for establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit for one whole attempt, connection included. Default 20 s.
    pub request_timeout: Duration,
    /// Retries after the first attempt, on connection errors, 409, 429 and 5xx. Default 2.
    pub max_retries: u32,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates TOML text; `origin` only names the source in errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_owned(),
            error,
        })?;
        file.validate().map_err(|reason| ConfigError::Invalid {
            path: origin.to_owned(),
            reason,
        })
    }
}

impl FileConfig {
    fn validate(self) -> Result<Config, String> {
        let currency = self.currency;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(format!(
                "currency {currency:?} is not a lowercase ISO 4217 code"
            ));
        }
        if !SESSION_EXPIRY_RANGE_SECS.contains(&self.checkout.session_expiry_secs) {
            return Err("checkout.session_expiry_secs must be between 1800 and 86400".to_owned());
        }
        if self.webhook.tolerance_secs == 0 {
            return Err("webhook.tolerance_secs must be positive".to_owned());
        }
        if self.webhook.body_limit_bytes == 0 || self.webhook.body_read_timeout_secs == 0 {
            return Err("webhook body limit and read timeout must be positive".to_owned());
        }
        if self.stripe.api_version.trim().is_empty() {
            return Err("stripe.api_version must not be empty".to_owned());
        }
        if self.stripe.connect_timeout_secs == 0 || self.stripe.request_timeout_secs == 0 {
            return Err("stripe timeouts must be positive".to_owned());
        }
        if self.stripe.max_retries > 5 {
            return Err("stripe.max_retries must be at most 5".to_owned());
        }
        let packages = validate_packages(self.packages)?;

        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            catalog: Catalog::new(currency, packages),
            checkout: CheckoutSettings {
                session_expiry: Duration::from_secs(self.checkout.session_expiry_secs),
            },
            webhook: WebhookSettings {
                tolerance: Duration::from_secs(self.webhook.tolerance_secs),
                body_limit_bytes: self.webhook.body_limit_bytes,
                body_read_timeout: Duration::from_secs(self.webhook.body_read_timeout_secs),
            },
            stripe: StripeSettings {
                api_version: self.stripe.api_version,
                connect_timeout: Duration::from_secs(self.stripe.connect_timeout_secs),
                request_timeout: Duration::from_secs(self.stripe.request_timeout_secs),
                max_retries: self.stripe.max_retries,
            },
        })
    }
}

fn validate_packages(entries: Vec<PackageEntry>) -> Result<Vec<Package>, String> {
    if entries.is_empty() {
        return Err("at least one [[packages]] entry is required".to_owned());
    }
    let mut packages: Vec<Package> = Vec::with_capacity(entries.len());
    for entry in entries {
        let id_is_plain = !entry.id.is_empty()
            && entry.id.len() <= 64
            && entry
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !id_is_plain {
            return Err(format!(
                "package id {:?} must be 1-64 of [a-z0-9_-]",
                entry.id
            ));
        }
        if packages.iter().any(|known| known.id.as_str() == entry.id) {
            return Err(format!("package id {:?} appears twice", entry.id));
        }
        if entry.name.trim().is_empty() {
            return Err(format!("package {:?} has an empty name", entry.id));
        }
        if entry.tokens <= 0 || entry.price_cents <= 0 {
            return Err(format!(
                "package {:?} needs positive tokens and price_cents",
                entry.id
            ));
        }
        packages.push(Package {
            id: PackageId::new(entry.id),
            name: entry.name,
            tokens: Tokens(entry.tokens),
            price: Cents(entry.price_cents),
            popular: entry.popular,
        });
    }
    if packages.iter().filter(|package| package.popular).count() > 1 {
        return Err("at most one package may be marked popular".to_owned());
    }
    Ok(packages)
}

// ===== Secrets from the environment =====

/// A value that must never reach a log: its `Debug` and `Display` print a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that signs or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What the environment decides, read once at startup. An unset or empty variable is `None`;
/// the feature that needs it then answers 401 or 503 instead of the service failing to start.
#[derive(Clone, Debug)]
pub struct Environment {
    /// `STRIPE_SECRET_KEY`; without it checkout answers 503.
    pub stripe_secret_key: Option<Secret>,
    /// `STRIPE_PUBLISHABLE_KEY`, handed to browsers by `GET /api/v1/stripe/config`.
    pub stripe_publishable_key: Option<String>,
    /// `STRIPE_WEBHOOK_SECRET` (`whsec_...`); without it the webhook answers 503.
    pub stripe_webhook_secret: Option<Secret>,
    /// `STRIPE_API_BASE`, default [`DEFAULT_STRIPE_API_BASE`]; tests point it at a stand-in.
    pub stripe_api_base: Url,
    /// `DATABASE_URL`, default [`DEFAULT_DATABASE_URL`]. Secret because it may hold a password.
    pub database_url: Secret,
    /// `JWT_SECRET` for HS256 bearer tokens; without it every bearer request gets 401.
    pub jwt_secret: Option<Secret>,
    /// `BILLING_SERVICE_TOKEN`: the bearer token the application presents to
    /// `POST /internal/v1/tokens/debit`; without it that endpoint answers 503.
    pub billing_service_token: Option<Secret>,
}

impl Environment {
    /// Reads the variables listed on the fields from the process environment.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        let read = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());

        let base = read("STRIPE_API_BASE").unwrap_or_else(|| DEFAULT_STRIPE_API_BASE.to_owned());
        let stripe_api_base = parse_api_base(&base).map_err(|reason| ConfigError::Environment {
            name: "STRIPE_API_BASE",
            reason,
        })?;

        Ok(Self {
            stripe_secret_key: read("STRIPE_SECRET_KEY").map(Secret::new),
            stripe_publishable_key: read("STRIPE_PUBLISHABLE_KEY"),
            stripe_webhook_secret: read("STRIPE_WEBHOOK_SECRET").map(Secret::new),
            stripe_api_base,
            database_url: Secret::new(
                read("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            ),
            jwt_secret: read("JWT_SECRET").map(Secret::new),
            billing_service_token: read("BILLING_SERVICE_TOKEN").map(Secret::new),
        })
    }
}

/// Accepts an absolute http(s) URL; a trailing slash is tolerated.
pub fn parse_api_base(base: &str) -> Result<Url, String> {
    let url = Url::parse(base).map_err(|error| format!("{base:?} is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{base:?} is not an http(s) URL"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../config/billing.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn shipped_file_has_the_four_packages() {
        let config = parse(SHIPPED).expect("the shipped config is valid");
        let summary: Vec<(&str, i64, i64, bool)> = config
            .catalog
            .packages()
            .iter()
            .map(|p| (p.id.as_str(), p.tokens.0, p.price.0, p.popular))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("starter", 1_000, 500, false),
                ("pro", 5_000, 2_000, true),
                ("enterprise", 15_000, 5_000, false),
                ("ultimate", 50_000, 15_000, false),
            ]
        );
        assert_eq!(config.catalog.currency(), "usd");
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.admin_listen, default_admin_listen());
        assert_eq!(config.webhook.tolerance, Duration::from_secs(300));
        assert_eq!(config.webhook.body_limit_bytes, 1_048_576);
        assert_eq!(config.checkout.session_expiry, Duration::from_secs(86_400));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_position() {
        let text = SHIPPED.replacen("tolerance_secs", "tolerence_secs", 1);
        let error = parse(&text)
            .expect_err("a misspelt key must be rejected")
            .to_string();
        assert!(error.contains("tolerence_secs"), "{error}");
        assert!(error.contains("line"), "{error}");
        assert!(error.contains("column"), "{error}");
    }

    #[test]
    fn invalid_packages_are_rejected() {
        let package = |id: &str, tokens: i64, price: i64, popular: bool| {
            format!(
                "[[packages]]\nid = \"{id}\"\nname = \"x\"\ntokens = {tokens}\n\
                 price_cents = {price}\npopular = {popular}\n"
            )
        };
        let cases = [
            (
                "duplicate id",
                package("a", 1, 1, false) + &package("a", 2, 2, false),
            ),
            ("zero tokens", package("a", 0, 1, false)),
            ("negative price", package("a", 1, -5, false)),
            (
                "two popular",
                package("a", 1, 1, true) + &package("b", 2, 2, true),
            ),
            ("bad id", package("A b", 1, 1, false)),
            ("no packages", "packages = []\n".to_owned()),
        ];
        for (what, text) in cases {
            assert!(
                matches!(parse(&text), Err(ConfigError::Invalid { .. })),
                "{what} was accepted"
            );
        }
        assert!(parse(&package("a", 1, 1, true)).is_ok());
    }

    #[test]
    fn expiry_outside_stripe_range_is_rejected() {
        let text = SHIPPED.replacen(
            "session_expiry_secs = 86400",
            "session_expiry_secs = 90000",
            1,
        );
        assert_ne!(text, SHIPPED);
        assert!(matches!(parse(&text), Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("whsec_very_secret");
        assert!(!format!("{secret:?} {secret}").contains("very_secret"));
    }

    #[test]
    fn api_base_must_be_http() {
        assert!(parse_api_base("http://127.0.0.1:1234").is_ok());
        assert!(parse_api_base("ftp://example.com").is_err());
        assert!(parse_api_base("not a url").is_err());
    }
}
