//! Tollgate's gateway: a Pingora reverse proxy that enforces usage limits.
//!
//! Layout, in the order a request meets it:
//! - [`config`]: the strict TOML file, validated once into [`config::GatewayConfig`];
//! - [`routing`]: path normalisation and the choice of upstream;
//! - [`identity`]: who the caller is (verified user, or a hashed client address);
//! - [`limiter`]: which limits apply and what the client is told;
//! - [`store`]: where counts live and the all-or-nothing decision;
//! - [`generation`] and [`reload`]: the configuration in force and how it is replaced;
//! - [`proxy`]: the life of a request, tying these together;
//! - [`forward`] and [`upstream`]: the exchange with the upstream and its pooled connections;
//! - [`admin`] and [`metrics`]: the private listener and what it exports.

pub mod admin;
pub mod config;
pub mod forward;
pub mod generation;
pub mod identity;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod store;
pub mod upstream;
