//! A paid delivery while the database really cannot take it (CASE-15, step 4): the delivery
//! is answered 5xx with nothing recorded, or succeeds whole, and Stripe's redelivery after
//! the database is back grants exactly once.
//!
//! The failures are real, not injected by a trigger. On SQLite, another connection holds the
//! write lock past billing's busy timeout. Making the file read-only would prove nothing
//! here: these tests run as root, which writes through mode 0444, and a pool's open
//! descriptors keep their access whatever the mode. On Postgres, billing's connections are
//! terminated by the server, once while a grant waits inside its transaction and once during
//! a burst of deliveries.

mod common;

use std::time::Duration;

use common::{completed, unique, Db, Options, TestServer};
use reqwest::StatusCode;
use sqlx::Connection as _;

both_backends!(paid_delivery_during_an_outage_is_5xx_then_redelivery_grants_once);

/// How long SQLite makes a writer wait for the lock (the pool's `busy_timeout`).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Grants recorded for `session`: ledger rows and `granted` events. Both must be 0 or 1
/// together; one without the other would be a half-applied grant.
async fn grants_of(server: &TestServer, session: &str) -> (i64, i64) {
    let count = |query: &'static str| async move {
        sqlx::query_scalar::<_, i64>(query)
            .bind(session)
            .fetch_one(&server.pool)
            .await
            .expect("count grants")
    };
    let rows = count(
        r"SELECT COUNT(*)
          FROM ledger_transactions
          WHERE stripe_session_id = $1 AND reason = 'purchase'",
    )
    .await;
    let events = count(
        r"SELECT COUNT(*)
          FROM stripe_events
          WHERE session_id = $1 AND outcome = 'granted'",
    )
    .await;
    (rows, events)
}

/// The purchase behind a paid delivery that arrives while the database is unavailable:
/// held by a writer past the busy timeout (SQLite), or refusing every connection after
/// billing's were terminated (Postgres; killing a grant mid-transaction is the burst test's).
async fn paid_delivery_during_an_outage_is_5xx_then_redelivery_grants_once(db: Db) {
    let (server, _stripe) = TestServer::start_with_stripe(db).await;
    let session = server.checkout("42", "starter").await;
    let event = completed(&unique("evt"), &session, &unique("pi"));

    let status = match db {
        Db::Sqlite => deliver_while_sqlite_is_locked(&server, &event).await,
        Db::Postgres => deliver_while_postgres_is_down(&server, &event).await,
    };
    assert!(status.is_server_error(), "{status}");
    assert_eq!(grants_of(&server, &session).await, (0, 0));
    assert_eq!(server.assert_ledger_balanced("42").await, 0);

    // Stripe redelivers the same event, then once more.
    for _ in 0..2 {
        assert_eq!(server.deliver_signed(&event).await.status(), StatusCode::OK);
    }
    assert_eq!(grants_of(&server, &session).await, (1, 1));
    assert_eq!(server.assert_ledger_balanced("42").await, 1_000);
    let payment: serde_json::Value = server
        .payment("42", &session)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(payment["status"], "fulfilled");
}

/// Holds SQLite's write lock from a second connection for longer than billing waits for
/// it, delivers `event` meanwhile, and returns the delivery's status.
async fn deliver_while_sqlite_is_locked(server: &TestServer, event: &[u8]) -> StatusCode {
    let mut holder = sqlx::AnyConnection::connect(&server.database.url)
        .await
        .expect("second connection");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .expect("take the write lock");

    let started = std::time::Instant::now();
    let status = server.deliver_signed(event).await.status();
    assert!(
        started.elapsed() >= SQLITE_BUSY_TIMEOUT,
        "billing waited for the lock"
    );

    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release the write lock");
    status
}

/// Makes the database refuse new connections, terminates billing's, delivers, then lets
/// connections in again. `ALLOW_CONNECTIONS false` holds for superusers too, so the pool
/// cannot reconnect behind the test's back.
async fn deliver_while_postgres_is_down(server: &TestServer, event: &[u8]) -> StatusCode {
    // A database cannot refuse its own session, so the switch is thrown from the admin one.
    let admin_url = common::postgres_admin_url().expect("the Postgres variant has an admin URL");
    let mut admin = sqlx::PgConnection::connect(admin_url.as_str())
        .await
        .expect("admin connection");
    let mut billing_db = sqlx::PgConnection::connect(&server.database.url)
        .await
        .expect("connection to billing's database");
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut billing_db)
        .await
        .expect("database name");
    drop(billing_db);
    let allow =
        |allowed: bool| format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allowed}");
    sqlx::query(&allow(false))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .expect("terminate billing's connections");

    let status = server.deliver_signed(event).await.status();
    sqlx::query(&allow(true))
        .execute(&mut admin)
        .await
        .expect("accept connections again");
    status
}

/// Postgres only: billing's connections are terminated repeatedly during a burst of paid
/// deliveries. Each delivery succeeds or fails whole, and after Stripe's redelivery every
/// session is granted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_during_a_burst_leave_no_half_applied_grant() {
    if common::postgres_admin_url().is_none() {
        return;
    }
    let server = TestServer::start(Db::Postgres, Options::default()).await;
    let sessions: Vec<String> = (0..24).map(|_| unique("cs_test")).collect();
    let events: Vec<Vec<u8>> = sessions
        .iter()
        .map(|session| completed(&unique("evt"), session, &unique("pi")))
        .collect();
    let mut admin = sqlx::PgConnection::connect(&server.database.url)
        .await
        .expect("second connection");

    let burst = futures::future::join_all(events.iter().map(|event| server.deliver_signed(event)));
    let killer = async {
        for _ in 0..5 {
            sqlx::query(
                r"SELECT pg_terminate_backend(pid)
                  FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .execute(&mut admin)
            .await
            .expect("terminate billing's connections");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (responses, ()) = tokio::join!(burst, killer);

    for (session, response) in sessions.iter().zip(&responses) {
        let status = response.status();
        assert!(
            status == StatusCode::OK || status.is_server_error(),
            "{status}"
        );
        let grants = grants_of(&server, session).await;
        assert!(
            grants == (0, 0) || grants == (1, 1),
            "{session}: {grants:?}"
        );
        if status == StatusCode::OK {
            assert_eq!(grants, (1, 1), "{session} was acknowledged but not granted");
        }
    }

    for event in &events {
        assert_eq!(server.deliver_signed(event).await.status(), StatusCode::OK);
    }
    for session in &sessions {
        assert_eq!(grants_of(&server, session).await, (1, 1), "{session}");
    }
    let expected = 1_000 * sessions.len() as i64;
    assert_eq!(server.assert_ledger_balanced("42").await, expected);
}
