//! The real binary killed with SIGKILL in the middle of a burst of deliveries: after a
//! restart and Stripe's redelivery, every balance is exact (CASE-14, step 5).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use billing_service::webhook::signature;
use common::{completed, token, unique, unix_now, Db, TestDatabase, JWT_SECRET, WEBHOOK_SECRET};
use reqwest::StatusCode;

both_backends!(killed_mid_burst_then_redelivered_grants_exactly_once);

/// A free loopback port (free when asked; the binary binds it right after).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("bound address").port()
}

/// Starts `target/debug/billing-service` on `database` and waits until it answers.
async fn spawn_binary(database: &TestDatabase, client: &reqwest::Client) -> (Child, String) {
    let port = free_port();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/billing.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_billing-service"))
        .args(["--config", config])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .env("DATABASE_URL", &database.url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("billing-service starts");
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        let ready = client
            .get(format!("{base}/api/v1/stripe/config"))
            .send()
            .await;
        if ready.is_ok() {
            return (child, base);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("billing-service did not start listening");
}

async fn deliver(client: &reqwest::Client, base: &str, body: &[u8]) -> Option<StatusCode> {
    let header = signature::sign(WEBHOOK_SECRET, unix_now(), body);
    let response = client
        .post(format!("{base}/api/v1/stripe/webhook"))
        .header("stripe-signature", header)
        .body(body.to_vec())
        .send()
        .await;
    response.ok().map(|response| response.status())
}

async fn killed_mid_burst_then_redelivered_grants_exactly_once(db: Db) {
    let database = TestDatabase::create(db).await;
    let client = reqwest::Client::new();
    let users: Vec<String> = (0..4).map(|_| unique("user")).collect();
    // Five purchases per user, each paid event with its own session and event id.
    let events: Vec<(usize, Vec<u8>)> = (0..20)
        .map(|index| {
            let user = index % users.len();
            let event = completed(&unique("evt"), &unique("cs_test"), &unique("pi"));
            let text = String::from_utf8(event).expect("UTF-8");
            let text = text
                .replace(r#""user_42""#, &format!(r#""user_{}""#, users[user]))
                .replace(
                    r#""user_id":"42""#,
                    &format!(r#""user_id":"{}""#, users[user]),
                );
            (user, text.into_bytes())
        })
        .collect();

    let (mut child, base) = spawn_binary(&database, &client).await;
    let burst =
        futures::future::join_all(events.iter().map(|(_, body)| deliver(&client, &base, body)));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(15)).await;
        child.kill().expect("SIGKILL");
    };
    let (statuses, ()) = tokio::join!(burst, kill);
    let _ = child.wait();
    assert!(statuses
        .iter()
        .flatten()
        .all(|status| !status.is_client_error()));

    // Stripe redelivers everything it did not see acknowledged; here, simply everything.
    let (mut child, base) = spawn_binary(&database, &client).await;
    let mut statuses = Vec::new();
    for (_, body) in &events {
        statuses.push(deliver(&client, &base, body).await);
    }
    let mut balances = Vec::new();
    for user in &users {
        let balance: serde_json::Value = client
            .get(format!("{base}/api/v1/tokens/balance"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("balance answers")
            .json()
            .await
            .expect("JSON");
        balances.push(balance["balance"].clone());
    }
    child.kill().expect("stop the binary");
    let _ = child.wait();

    assert!(statuses
        .iter()
        .all(|status| *status == Some(StatusCode::OK)));
    assert!(
        balances.iter().all(|balance| *balance == 5_000),
        "{balances:?}"
    );
}
