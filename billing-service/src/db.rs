//! The database: connecting, migrating, and the purchase and Stripe-event records.
//!
//! Every query is one function taking a generic executor, so it runs on the pool or inside
//! a transaction. The SQL is portable; what is specific to SQLite (file creation, WAL, busy
//! timeout) stays in [`connect`]. Token balances live in `ledger`, not here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Executor;
use tollgate_auth::UserId;

use crate::catalog::{Cents, PackageId, Tokens};
use crate::config::Secret;
use crate::stripe::{EventId, SessionId};

/// The database engine every query is written for.
pub type Backend = sqlx::Sqlite;

/// A pool of connections to [`Backend`].
pub type Pool = sqlx::Pool<Backend>;

/// How long a writer waits for another writer's lock before giving up with an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the database could not be opened or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL names a Postgres database, which this build does not support yet")]
    PostgresUnsupported,
    #[error("DATABASE_URL is not a sqlite: or postgres: URL")]
    UnsupportedUrl,
    #[error("DATABASE_URL is not a valid SQLite URL")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("cannot create the database directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A query failed; `operation` says what we were doing.
    #[error("database query failed while trying to {operation}")]
    Query {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

fn query_failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { operation, source }
}

/// Opens the database named by `url` and applies pending migrations.
///
/// SQLite files are opened in WAL mode, so readers never block the writer, with a busy
/// timeout so that concurrent writers wait instead of failing; the parent directory of the
/// file is created when missing.
pub async fn connect(url: &Secret) -> Result<Pool, DbError> {
    let url = url.expose();

    // Limitation: only SQLite is wired up. The migrations and queries are portable SQL, but
    // a Postgres URL is refused at startup rather than half-supported, so several billing
    // instances cannot yet share one database.
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        return Err(DbError::PostgresUnsupported);
    }
    if !url.starts_with("sqlite:") {
        return Err(DbError::UnsupportedUrl);
    }

    let options = SqliteConnectOptions::from_str(url)
        .map_err(DbError::InvalidUrl)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    create_parent_dir(options.get_filename())?;

    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(DbError::Connect)?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .map_err(DbError::Migrate)?;
    Ok(pool)
}

fn create_parent_dir(file: &Path) -> Result<(), DbError> {
    let Some(parent) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    std::fs::create_dir_all(parent).map_err(|source| DbError::CreateDir {
        path: parent.to_owned(),
        source,
    })
}

// ===== Purchases =====

/// Our id for a purchase attempt, also the basis of its Stripe idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct PurchaseId(String);

impl PurchaseId {
    /// A fresh random id, `pur_` followed by 32 hex digits.
    pub fn generate() -> Self {
        Self(format!("pur_{}", hex::encode(rand::random::<[u8; 16]>())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PurchaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a purchase stands. Stored as the lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurchaseStatus {
    /// Recorded; Stripe has not yet confirmed a session.
    Pending,
    /// Stripe created the session; waiting for the buyer.
    Open,
    /// Stripe could not create the session; nothing can be paid.
    Failed,
    /// Paid and its tokens granted.
    Fulfilled,
    /// Stripe reported a payment that does not match what was sold; nothing granted.
    Mismatch,
    /// The session expired or its delayed payment failed; nothing granted.
    Closed,
}

impl PurchaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Open => "open",
            Self::Failed => "failed",
            Self::Fulfilled => "fulfilled",
            Self::Mismatch => "mismatch",
            Self::Closed => "closed",
        }
    }
}

/// A purchase about to be recorded, before Stripe is called.
#[derive(Debug)]
pub struct NewPurchase<'a> {
    pub id: &'a PurchaseId,
    pub user: &'a UserId,
    pub package_id: &'a PackageId,
    pub tokens: Tokens,
    pub amount: Cents,
    pub currency: &'a str,
}

/// What billing recorded about a purchase it started.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PurchaseRecord {
    pub id: PurchaseId,
    pub user_id: String,
    pub package_id: PackageId,
    pub tokens: Tokens,
    pub amount_cents: Cents,
    pub currency: String,
}

pub async fn insert_purchase<'e, E>(executor: E, purchase: &NewPurchase<'_>) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let now = crate::unix_now();
    sqlx::query(
        r"INSERT INTO purchases
              (id, user_id, package_id, tokens, amount_cents, currency, status,
               created_at, updated_at)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(purchase.id)
    .bind(purchase.user.as_str())
    .bind(purchase.package_id)
    .bind(purchase.tokens)
    .bind(purchase.amount)
    .bind(purchase.currency)
    .bind(PurchaseStatus::Pending.as_str())
    .bind(now)
    .execute(executor)
    .await
    .map_err(query_failed("record a pending purchase"))?;
    Ok(())
}

/// Stores the session Stripe created for a purchase and marks it open.
pub async fn attach_session<'e, E>(
    executor: E,
    purchase: &PurchaseId,
    session: &SessionId,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"UPDATE purchases
          SET session_id = $2, status = $3, updated_at = $4
          WHERE id = $1",
    )
    .bind(purchase)
    .bind(session)
    .bind(PurchaseStatus::Open.as_str())
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("attach a checkout session to its purchase"))?;
    Ok(())
}

pub async fn set_purchase_status<'e, E>(
    executor: E,
    purchase: &PurchaseId,
    status: PurchaseStatus,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"UPDATE purchases
          SET status = $2, updated_at = $3
          WHERE id = $1",
    )
    .bind(purchase)
    .bind(status.as_str())
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("update a purchase status"))?;
    Ok(())
}

/// Sets the status of the purchase behind `session`, if billing started it. A fulfilled
/// purchase keeps its status whatever arrives later.
pub async fn set_session_status<'e, E>(
    executor: E,
    session: &SessionId,
    status: PurchaseStatus,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"UPDATE purchases
          SET status = $2, updated_at = $3
          WHERE session_id = $1 AND status <> 'fulfilled'",
    )
    .bind(session)
    .bind(status.as_str())
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("update a purchase status by session"))?;
    Ok(())
}

/// The purchase billing recorded for `session`, or `None` if the session was not opened by
/// this service (for example one created in Stripe's dashboard).
pub async fn find_purchase_by_session<'e, E>(
    executor: E,
    session: &SessionId,
) -> Result<Option<PurchaseRecord>, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_as(
        r"SELECT id, user_id, package_id, tokens, amount_cents, currency
          FROM purchases
          WHERE session_id = $1 AND status <> 'fulfilled'",
    )
    .bind(session)
    .fetch_optional(executor)
    .await
    .map_err(query_failed("look up a purchase by session"))
}

// ===== Stripe events =====

/// A Stripe event that billing acted on (or deliberately declined to act on).
#[derive(Debug)]
pub struct EventRecord<'a> {
    pub event_id: &'a EventId,
    pub event_type: &'a str,
    pub session_id: Option<&'a SessionId>,
    /// Short constant describing the decision, e.g. `granted` or `mismatch`.
    pub outcome: &'static str,
    /// Why, for outcomes that need explaining (a mismatch names what differed).
    pub detail: Option<&'a str>,
}

/// Records an event id. Returns `false`, changing nothing, when the id is already recorded:
/// the event is a redelivery.
pub async fn record_event<'e, E>(executor: E, event: &EventRecord<'_>) -> Result<bool, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let result = sqlx::query(
        r"INSERT INTO stripe_events
              (event_id, event_type, session_id, outcome, detail, received_at)
          VALUES ($1, $2, $3, $4, $5, $6)
          ON CONFLICT DO NOTHING",
    )
    .bind(event.event_id)
    .bind(event.event_type)
    .bind(event.session_id)
    .bind(event.outcome)
    .bind(event.detail)
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("record a stripe event"))?;
    Ok(result.rows_affected() == 1)
}
