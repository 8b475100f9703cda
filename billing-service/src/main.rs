//! The `billing-service` binary: command-line parsing and wiring only.
//!
//! `serve` (the default) loads the config and environment, opens the database, and runs the
//! public and admin listeners until SIGINT or SIGTERM. `mint-token` and `sign-event` are
//! offline helpers for local runs and manual tests; they start no server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use billing_service::config::{Config, Environment};
use billing_service::http::{self, AppState};
use billing_service::metrics::Metrics;
use billing_service::{db, webhook};

/// How long in-flight requests may run on after a stop signal before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "billing-service",
    version,
    about = "Tollgate billing: tokens sold via Stripe"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default when no command is given).
    Serve(ServeArgs),
    /// Print an HS256 bearer token for a user, signed with JWT_SECRET.
    MintToken {
        /// The user id to put in the token's subject.
        #[arg(long)]
        user: String,
        /// Lifetime of the token in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Print a Stripe-Signature header value for a file's exact bytes, signed with
    /// STRIPE_WEBHOOK_SECRET.
    SignEvent {
        /// The event body to sign, byte for byte.
        file: PathBuf,
        /// Signing time in Unix seconds; defaults to now.
        #[arg(long)]
        timestamp: Option<i64>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Path of the TOML config file.
    #[arg(long, default_value = "config/billing.toml")]
    config: PathBuf,
    /// Public API address; overrides `listen` in the config file.
    #[arg(long, env = "BILLING_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of /healthz and /metrics; overrides `admin_listen` in the config file.
    #[arg(long, env = "BILLING_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::MintToken { user, ttl_secs }) => mint_token(&user, ttl_secs),
        Some(Command::SignEvent { file, timestamp }) => sign_event(&file, timestamp),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let config = Config::load(&args.config)?;
    let env = Environment::from_process_env()?;
    tracing::info!(config.path = %args.config.display(), "config loaded");
    warn_about_missing_secrets(&env);

    let pool = db::connect(&env.database_url).await?;
    let metrics = Metrics::new();
    let state = AppState::new(&config, &env, pool, metrics.clone())?;

    let listen = args.listen.unwrap_or(config.listen);
    let admin_listen = args.admin_listen.unwrap_or(config.admin_listen);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin_listener = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot listen on {admin_listen}"))?;
    tracing::info!(
        listen.addr = %listener.local_addr()?,
        admin.addr = %admin_listener.local_addr()?,
        "billing service listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let public = tokio::spawn(http::serve(
        listener,
        http::router(state),
        stopped(stop_rx.clone()),
    ));
    let admin = tokio::spawn(http::serve(
        admin_listener,
        http::admin_router(metrics),
        stopped(stop_rx),
    ));

    stop_signal().await?;
    tracing::info!("stop signal received, draining requests");
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let (public, admin) = tokio::join!(public, admin);
        public??;
        admin??;
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => tracing::warn!("requests still running after the grace period; exiting"),
    }
    tracing::info!("billing service stopped");
    Ok(())
}

fn warn_about_missing_secrets(env: &Environment) {
    if env.stripe_secret_key.is_none() {
        tracing::warn!("STRIPE_SECRET_KEY is unset; checkout will answer 503");
    }
    if env.stripe_webhook_secret.is_none() {
        tracing::warn!("STRIPE_WEBHOOK_SECRET is unset; webhooks will answer 503");
    }
    if env.jwt_secret.is_none() {
        tracing::warn!("JWT_SECRET is unset; every bearer-token request will answer 401");
    }
    let padded =
        |secret: &billing_service::config::Secret| secret.expose() != secret.expose().trim();
    if env.stripe_webhook_secret.as_ref().is_some_and(padded) {
        tracing::warn!("STRIPE_WEBHOOK_SECRET has surrounding whitespace; signatures will fail");
    }
}

/// Resolves once the stop flag is raised (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn mint_token(user: &str, ttl_secs: u64) -> anyhow::Result<()> {
    let secret = required_env("JWT_SECRET")?;
    anyhow::ensure!(!user.is_empty(), "--user must not be empty");
    let token = tollgate_auth::mint_hs256(secret.as_bytes(), user, Duration::from_secs(ttl_secs));
    println!("{token}");
    Ok(())
}

fn sign_event(file: &PathBuf, timestamp: Option<i64>) -> anyhow::Result<()> {
    let secret = required_env("STRIPE_WEBHOOK_SECRET")?;
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let timestamp = match timestamp {
        Some(timestamp) => timestamp,
        None => i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("system clock is before 1970")?
                .as_secs(),
        )?,
    };
    println!("{}", webhook::signature::sign(&secret, timestamp, &body));
    Ok(())
}

fn required_env(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .with_context(|| format!("{name} must be set"))
}
