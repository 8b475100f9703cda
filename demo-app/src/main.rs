//! A stand-in for the application behind the gateway, so that `make run` and the README's
//! walk-through work without a real app. `POST /api/v1/generate` plays the expensive endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "demo-app",
    about = "A tiny upstream for trying Tollgate locally"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "DEMO_APP_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
}

#[derive(Default)]
struct Counters {
    generations: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route(
            "/",
            get(|| async { "Tollgate demo app: try POST /api/v1/generate\n" }),
        )
        .route("/api/v1/generate", post(generate))
        .with_state(counters);

    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    eprintln!("demo-app listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// Pretends to generate a map, and says whether an `Authorization` header reached it (the
/// gateway forwards it; verifying it is the app's business, not this stand-in's).
async fn generate(State(counters): State<Arc<Counters>>, headers: HeaderMap) -> Json<Value> {
    let number = counters.generations.fetch_add(1, Ordering::Relaxed) + 1;
    let authorization_forwarded = headers.contains_key("authorization");
    Json(json!({
        "map": format!("map-{number}"),
        "size": [64, 64],
        "authorization_forwarded": authorization_forwarded,
    }))
}
