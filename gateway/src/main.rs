//! The `gateway` binary: load the configuration, build the proxy, serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::admin::AdminApp;
use gateway::config::GatewayConfig;
use gateway::identity::{Identifier, IdentityKey};
use gateway::limiter::Limiter;
use gateway::metrics::Metrics;
use gateway::proxy::Gateway;
use gateway::routing::Router;
use gateway::store::MemoryStore;
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use tollgate_auth::BearerVerifier;

/// How often idle counters are swept from memory.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "gateway", about = "Tollgate's rate-limiting reverse proxy")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy (the default).
    Run(RunArgs),
    /// Validate a configuration file and exit 0 (valid) or 1 (invalid, with line and column).
    CheckConfig { file: PathBuf },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The TOML configuration file.
    #[arg(long, env = "GATEWAY_CONFIG", default_value = "config/gateway.toml")]
    config: PathBuf,
    /// Overrides `server.listen`.
    #[arg(long, env = "GATEWAY_LISTEN")]
    listen: Option<String>,
    /// Overrides `server.admin_listen`.
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Overrides an upstream's address, as NAME=HOST:PORT; may be repeated.
    #[arg(long = "upstream", value_name = "NAME=HOST:PORT")]
    upstreams: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &PathBuf) -> anyhow::Result<()> {
    let config = GatewayConfig::load(file, &env)?;
    println!(
        "{}: ok ({} routes, {} limits)",
        file.display(),
        config.routes.len(),
        config.limits.len()
    );
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = GatewayConfig::load(&args.config, &env)?;
    apply_overrides(&mut config, &args)?;

    let identity_key = match std::env::var("IDENTITY_HASH_KEY") {
        Ok(secret) if !secret.is_empty() => IdentityKey::new(secret.into_bytes()),
        _ => {
            tracing::warn!("IDENTITY_HASH_KEY is unset; client keys use a random per-process key");
            IdentityKey::random()
        }
    };
    let verifier = match std::env::var("JWT_SECRET") {
        Ok(secret) if !secret.is_empty() => {
            let mut verifier = BearerVerifier::hs256(secret.as_bytes());
            if let Some(issuer) = &config.issuer {
                verifier = verifier.with_issuer(issuer);
            }
            if let Some(audience) = &config.audience {
                verifier = verifier.with_audience(audience);
            }
            Some(verifier)
        }
        _ => {
            tracing::warn!("JWT_SECRET is unset; every caller is treated as anonymous");
            None
        }
    };

    let metrics = Arc::new(Metrics::new());
    metrics.config_generation.set(1);
    let store = Arc::new(MemoryStore::default());
    let gateway = Gateway {
        router: Router::new(config.routes.clone()),
        identifier: Identifier::new(identity_key, verifier),
        limiter: Limiter::new(&config.limits, store.clone()),
        metrics: metrics.clone(),
        config: config.clone(),
    };
    spawn_sweeper(store, metrics.clone());

    let server_conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&config.listen);
    let mut admin = Service::new("admin".into(), HttpServer::new_app(AdminApp { metrics }));
    admin.add_tcp(&config.admin_listen);
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);

    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        limits = config.limits.len(),
        config = %args.config.display(),
        "gateway starting"
    );
    server.run_forever()
}

fn apply_overrides(config: &mut GatewayConfig, args: &RunArgs) -> anyhow::Result<()> {
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(admin) = &args.admin_listen {
        config.admin_listen = admin.clone();
    }
    for upstream in &args.upstreams {
        let (name, address) = upstream
            .split_once('=')
            .context("--upstream takes NAME=HOST:PORT")?;
        let address = address
            .parse()
            .context("--upstream address must be an IP and port")?;
        let mut found = false;
        for route in config
            .routes
            .iter_mut()
            .filter(|route| route.upstream_name == name)
        {
            route.upstream = address;
            found = true;
        }
        anyhow::ensure!(found, "--upstream {name}: no route uses that upstream");
    }
    Ok(())
}

fn spawn_sweeper(store: Arc<MemoryStore>, metrics: Arc<Metrics>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(SWEEP_INTERVAL);
        metrics.tracked_clients.set(store.sweep(now_ms()) as i64);
    });
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
