//! Every metric the gateway exports, defined in one place.
//!
//! Labels are bounded by configuration: route names, limit names, outcomes and status codes.
//! Client keys, addresses and raw paths never become labels.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The gateway's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route name and status code.
    pub requests: IntCounterVec,
    /// Limit decisions, by limit name and outcome (`allowed` or `refused`).
    pub decisions: IntCounterVec,
    /// Bearer tokens that failed verification, by what the gateway then did.
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

        for result in ["ok", "failed"] {
            reloads.with_label_values(&[result]);
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
