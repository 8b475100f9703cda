//! The `gateway` binary: load the configuration, build the proxy, serve.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use gateway::admin::AdminApp;
use gateway::config::{GatewayConfig, Overrides, StoreBackend};
use gateway::generation::{Generation, Secrets};
use gateway::identity::IdentityKey;
use gateway::metrics::Metrics;
use gateway::proxy::Gateway;
use gateway::reload::Reloader;
use gateway::store::{MemoryStore, RedisStore, Stores};
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

/// The proxy allocates and frees many small buffers per request; mimalloc's thread-local free
/// lists make that markedly cheaper than glibc's malloc (see the Performance section of the
/// README for the measurement).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often idle counters are swept from memory.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

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

fn check_config(file: &Path) -> anyhow::Result<()> {
    let config = GatewayConfig::load(file, &env)?;
    let (routes, limits) = (config.routes.len(), config.limits.len());
    println!("{}: ok ({routes} routes, {limits} limits)", file.display());
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let overrides = overrides(&args)?;
    let config = GatewayConfig::load_with(&args.config, &env, &overrides)?;
    let shared_store = matches!(config.store, StoreBackend::Redis(_));
    let secrets = secrets(shared_store)?;
    let metrics = Arc::new(Metrics::new());
    let local = Arc::new(MemoryStore::new(config.max_tracked_clients));
    let stores = match &config.store {
        StoreBackend::Memory => Stores::memory(local.clone()),
        StoreBackend::Redis(settings) => {
            let redis = RedisStore::start(settings.clone(), metrics.clone())
                .context("starting the redis store")?;
            Stores {
                shared: Arc::new(redis),
                local: local.clone(),
            }
        }
    };
    let backend = match &config.store {
        StoreBackend::Memory => "memory",
        StoreBackend::Redis(_) => "redis",
    };

    let (listen, admin_listen, threads) = (
        config.listen.clone(),
        config.admin_listen.clone(),
        config.threads,
    );
    let fingerprint = config
        .identity
        .fingerprint_header
        .as_ref()
        .map(|name| name.to_string());
    let generation = Generation::build(1, config, &secrets, stores.clone())?;
    metrics.config_generation.set(1);
    let current = Arc::new(ArcSwap::from_pointee(generation));

    let reloader = Arc::new(Reloader::new(
        args.config.clone(),
        overrides,
        secrets,
        stores.clone(),
        current.clone(),
        metrics.clone(),
    ));
    reloader.clone().spawn_watcher();
    reloader
        .spawn_sighup_handler()
        .context("installing the SIGHUP handler")?;
    spawn_sweeper(local, metrics.clone());

    let server_conf = ServerConf {
        threads,
        // One single-threaded runtime per worker: a connection's tasks stay on the thread
        // that accepted it, which saves the cross-thread wake-ups of work stealing.
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    // Pingora retries a busy address forever in the background while the admin listener
    // answers healthy; fail at start instead, with the reason.
    for address in [&listen, &admin_listen] {
        std::net::TcpListener::bind(address.as_str())
            .with_context(|| format!("cannot listen on {address}"))?;
    }
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let gateway = Gateway {
        current,
        metrics: metrics.clone(),
    };
    let mut proxy = Service::new("gateway".into(), gateway);
    proxy.add_tcp(&listen);
    let mut admin = Service::new(
        "admin".into(),
        HttpServer::new_app(AdminApp {
            metrics,
            store: stores.shared,
        }),
    );
    admin.add_tcp(&admin_listen);
    admin.threads = Some(1);
    server.add_service(proxy);
    server.add_service(admin);

    tracing::info!(
        listen = %listen,
        admin = %admin_listen,
        config = %args.config.display(),
        fingerprint.header = fingerprint.as_deref().unwrap_or("off"),
        store.backend = backend,
        "gateway starting"
    );
    server.run_forever()
}

fn overrides(args: &RunArgs) -> anyhow::Result<Overrides> {
    let mut upstreams = Vec::new();
    for upstream in &args.upstreams {
        let (name, address) = upstream
            .split_once('=')
            .context("--upstream takes NAME=HOST:PORT")?;
        let address = address
            .parse()
            .context("--upstream address must be an IP and port")?;
        upstreams.push((name.to_owned(), address));
    }
    Ok(Overrides {
        listen: args.listen.clone(),
        admin_listen: args.admin_listen.clone(),
        upstreams,
    })
}

/// Reads the secrets once; handlers and reloads never touch the environment for them.
///
/// Gateways that share a store must derive the same key for the same client, so a shared store
/// without `IDENTITY_HASH_KEY` is a startup error rather than a silent split of every budget.
fn secrets(shared_store: bool) -> anyhow::Result<Secrets> {
    let identity_key = match std::env::var("IDENTITY_HASH_KEY") {
        Ok(secret) if !secret.is_empty() => IdentityKey::new(secret.into_bytes()),
        _ if shared_store => {
            anyhow::bail!("IDENTITY_HASH_KEY must be set when counters are shared through Redis")
        }
        _ => {
            tracing::warn!("IDENTITY_HASH_KEY is unset; client keys use a random per-process key");
            IdentityKey::random()
        }
    };
    let jwt_secret = std::env::var("JWT_SECRET")
        .ok()
        .filter(|secret| !secret.is_empty());
    if jwt_secret.is_none() {
        tracing::warn!("JWT_SECRET is unset; HS256 bearer tokens cannot be verified");
    }
    Ok(Secrets {
        identity_key,
        jwt_secret: jwt_secret.map(String::into_bytes),
    })
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
