//! Every metric the gateway exports, defined in one place.
//!
//! Labels are bounded by configuration: route names, limit names, outcomes and status codes.
//! Client keys, addresses and raw paths never become labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The gateway's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route name and status code.
    pub requests: IntCounterVec,
    /// Limit decisions, by limit name and outcome (`allowed` or `refused`).
    pub decisions: IntCounterVec,
    /// Bearer tokens that failed verification, by what the gateway then did. Tokens are
    /// checked only where they can matter (see `proxy`), so this is not every bad token sent.
    pub rejected_tokens: IntCounterVec,
    /// Clients with live counters in the memory store, as of the last sweep.
    pub tracked_clients: IntGauge,
    /// Requests decided but not recorded because the memory store was full.
    pub untracked_decisions: IntCounter,
    /// Requests whose forwarding header was ignored because the peer is not a trusted proxy.
    pub forwarding_ignored: IntCounter,
    /// Configuration reloads, by result (`ok` or `failed`).
    pub reloads: IntCounterVec,
    /// Generation of the configuration in force; 1 for the file loaded at start.
    pub config_generation: IntGauge,
    /// Duration of each Redis decision call, seconds, timeouts included.
    pub store_latency: Histogram,
    /// Failed Redis decision calls, by kind (`timeout`, `connection`, `server`, `reply`).
    pub store_errors: IntCounterVec,
    /// The Redis circuit breaker: 0 closed, 1 open, 2 half-open (a probe is under way). Stays 0
    /// with the memory store.
    pub store_breaker_state: IntGauge,
    /// Requests decided by a failure policy instead of the store, by policy (`allow`, `deny`,
    /// `local`).
    pub store_fallbacks: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "Requests answered, by route and status.",
            ),
            &["route", "status"],
        )
        .expect("metric definition is valid");
        let decisions = IntCounterVec::new(
            Opts::new(
                "gateway_limit_decisions_total",
                "Limit decisions, by limit and outcome.",
            ),
            &["limit", "outcome"],
        )
        .expect("metric definition is valid");
        let rejected_tokens = IntCounterVec::new(
            Opts::new(
                "gateway_rejected_tokens_total",
                "Bearer tokens that failed verification, by the action taken.",
            ),
            &["action"],
        )
        .expect("metric definition is valid");
        let tracked_clients = IntGauge::new(
            "gateway_tracked_clients",
            "Clients with live counters in the memory store at the last sweep.",
        )
        .expect("metric definition is valid");
        let untracked_decisions = IntCounter::new(
            "gateway_untracked_decisions_total",
            "Requests decided but not recorded because the memory store was full.",
        )
        .expect("metric definition is valid");
        let forwarding_ignored = IntCounter::new(
            "gateway_forwarding_ignored_total",
            "Forwarding headers ignored because the peer is not a trusted proxy.",
        )
        .expect("metric definition is valid");
        let reloads = IntCounterVec::new(
            Opts::new(
                "gateway_config_reloads_total",
                "Configuration reloads, by result.",
            ),
            &["result"],
        )
        .expect("metric definition is valid");
        let config_generation = IntGauge::new(
            "gateway_config_generation",
            "Generation of the configuration in force.",
        )
        .expect("metric definition is valid");
        let store_latency = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_store_latency_seconds",
                "Duration of Redis decision calls, timeouts included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        )
        .expect("metric definition is valid");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "gateway_store_errors_total",
                "Failed Redis decision calls, by kind.",
            ),
            &["kind"],
        )
        .expect("metric definition is valid");
        let store_breaker_state = IntGauge::new(
            "gateway_store_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open.",
        )
        .expect("metric definition is valid");
        let store_fallbacks = IntCounterVec::new(
            Opts::new(
                "gateway_store_fallbacks_total",
                "Requests decided by a failure policy instead of the store, by policy.",
            ),
            &["policy"],
        )
        .expect("metric definition is valid");

        for result in ["ok", "failed"] {
            reloads.with_label_values(&[result]);
        }
        for kind in ["timeout", "connection", "server", "reply"] {
            store_errors.with_label_values(&[kind]);
        }
        for policy in ["allow", "deny", "local"] {
            store_fallbacks.with_label_values(&[policy]);
        }
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decisions.clone()),
            Box::new(rejected_tokens.clone()),
            Box::new(tracked_clients.clone()),
            Box::new(untracked_decisions.clone()),
            Box::new(forwarding_ignored.clone()),
            Box::new(reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(store_latency.clone()),
            Box::new(store_errors.clone()),
            Box::new(store_breaker_state.clone()),
            Box::new(store_fallbacks.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            decisions,
            rejected_tokens,
            tracked_clients,
            untracked_decisions,
            forwarding_ignored,
            reloads,
            config_generation,
            store_latency,
            store_errors,
            store_breaker_state,
            store_fallbacks,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        buffer
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
