//! The database: connecting, migrating, and the purchase, refund and Stripe-event records.
//!
//! Every query is one function taking a generic executor, so it runs on the pool or inside
//! a transaction. Queries go through sqlx's `Any` driver and are written in SQL that SQLite
//! and Postgres both accept; everything that differs between the two engines (file
//! creation, WAL, busy timeout, how a unique violation names its index) stays in the
//! [`Engine`] seam below. Token balances live in `ledger`, not here.
//!
//! Concurrency rule: every write transaction starts with a write. On SQLite that takes the
//! database's write lock before anything is read, so transactions never act on a stale
//! read; on Postgres the first write locks the row that concurrent handlers of the same
//! payment or user would also write, with the same effect. A handler holding a transaction
//! never queries the pool beside it: the SQLite pool has a single connection, so doing so
//! would wait for the acquire timeout and fail.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyPoolOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::Executor;
use tollgate_auth::UserId;

use crate::catalog::{Cents, PackageId, Tokens};
use crate::config::Secret;
use crate::stripe::{EventId, PaymentIntentId, SessionId};

/// The database every query is written for: sqlx's driver over SQLite or Postgres.
pub type Backend = sqlx::Any;

/// A pool of connections to [`Backend`].
pub type Pool = sqlx::Pool<Backend>;

/// How long a SQLite writer waits for another writer's lock before failing, in ms.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5_000;

/// How long a request waits for a free (or new) pooled connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per Postgres pool.
const POSTGRES_MAX_CONNECTIONS: u32 = 8;

/// Why the database could not be opened or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
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

pub(crate) fn query_failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { operation, source }
}

// ===== The engine seam =====

/// Which engine a `DATABASE_URL` names. The only place that knows the two apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// A local file (`sqlite:`), the default: WAL mode, one writer at a time.
    Sqlite,
    /// A server (`postgres:` or `postgresql:`), which several instances may share.
    Postgres,
}

impl Engine {
    pub fn of_url(url: &str) -> Result<Self, DbError> {
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err(DbError::UnsupportedUrl)
        }
    }

    /// Connections in the pool.
    ///
    /// SQLite has one writer at a time. With several connections, those that lose the race
    /// for the write lock sleep in SQLite's busy handler, in steps of 1 to 100 ms, instead
    /// of waiting their turn: a burst of paid webhooks measured about 1,100 grants/s with 8
    /// connections and 1,800/s with one (`benches/webhook_throughput.rs`). With one
    /// connection requests queue in the pool, first come first served, and give up after
    /// [`ACQUIRE_TIMEOUT`]. Reads lose WAL's parallelism, which costs little because every
    /// query here is short and indexed; but while another process holds the write lock,
    /// reads queue behind the waiting writer too.
    fn max_connections(self) -> u32 {
        match self {
            Self::Sqlite => 1,
            Self::Postgres => POSTGRES_MAX_CONNECTIONS,
        }
    }

    /// Statements run on every new connection. SQLite's WAL lets readers proceed beside
    /// the writer, and the busy timeout makes a writer wait for a lock held by another
    /// process instead of failing at once.
    ///
    /// `synchronous = FULL` syncs the WAL at every commit. A webhook is acknowledged only
    /// after its grant is committed, and Stripe never redelivers an acknowledged event, so a
    /// commit lost to an operating-system crash or power cut would be a payment without its
    /// tokens. `NORMAL` would be faster and lose exactly those last commits.
    fn session_setup(self) -> Option<String> {
        match self {
            Self::Sqlite => Some(format!(
                "PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS};
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;"
            )),
            Self::Postgres => None,
        }
    }
}

/// The unique index that a failed write violated, if that is why it failed. Postgres names
/// the index; SQLite names only `table.column`, which is mapped back to the index here.
pub(crate) fn violated_unique_index(error: &sqlx::Error) -> Option<&'static str> {
    /// SQLite's `table.column` for each unique index that callers turn into a domain error.
    const SQLITE_COLUMNS: &[(&str, &str)] = &[(
        "ledger_transactions.idempotency_key",
        "ledger_transactions_one_debit_per_key",
    )];

    let database = error.as_database_error()?;
    if database.kind() != sqlx::error::ErrorKind::UniqueViolation {
        return None;
    }
    let message = database.message();
    SQLITE_COLUMNS
        .iter()
        .find(|(columns, index)| {
            database.constraint() == Some(*index) || message.ends_with(columns)
        })
        .map(|(_, index)| *index)
}

/// Opens the database named by `url` and applies pending migrations.
///
/// A SQLite file's parent directory is created when missing. The same migrations run on
/// both engines.
pub async fn connect(url: &Secret) -> Result<Pool, DbError> {
    let url = url.expose();
    let engine = Engine::of_url(url)?;
    if engine == Engine::Sqlite {
        let options = SqliteConnectOptions::from_str(url).map_err(DbError::InvalidUrl)?;
        create_parent_dir(options.get_filename())?;
    }

    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(engine.max_connections())
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                if let Some(setup) = engine.session_setup() {
                    connection.execute(setup.as_str()).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(DbError::Connect)?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .map_err(DbError::Migrate)?;
    Ok(pool)
}

/// Starts a transaction; `operation` names it for the error.
pub(crate) async fn begin(
    pool: &Pool,
    operation: &'static str,
) -> Result<sqlx::Transaction<'static, Backend>, DbError> {
    pool.begin().await.map_err(query_failed(operation))
}

/// Commits a transaction; `operation` names it for the error.
pub(crate) async fn commit(
    transaction: sqlx::Transaction<'static, Backend>,
    operation: &'static str,
) -> Result<(), DbError> {
    transaction.commit().await.map_err(query_failed(operation))
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

/// Where a purchase stands. Stored, and shown to its owner, as the snake_case name.
///
/// A status only moves forward; [`PurchaseStatus::may_become`] lists every allowed step, and
/// every query that changes a status is guarded by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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
    /// Paid and granted, then part of the payment was refunded and the matching share of
    /// the tokens clawed back.
    PartiallyRefunded,
    /// Paid and granted, then the whole payment was refunded and every token clawed back.
    Refunded,
}

impl PurchaseStatus {
    const ALL: [Self; 8] = [
        Self::Pending,
        Self::Open,
        Self::Failed,
        Self::Fulfilled,
        Self::Mismatch,
        Self::Closed,
        Self::PartiallyRefunded,
        Self::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Open => "open",
            Self::Failed => "failed",
            Self::Fulfilled => "fulfilled",
            Self::Mismatch => "mismatch",
            Self::Closed => "closed",
            Self::PartiallyRefunded => "partially_refunded",
            Self::Refunded => "refunded",
        }
    }

    /// The status stored as `text`; `None` for a value this version does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// Whether a purchase in this status may move to `next`: the one table of allowed
    /// transitions.
    ///
    /// Webhooks arrive in any order and any number of times, so a later event must never
    /// undo what an earlier one established. Once paid, a purchase only moves along
    /// fulfilled, partially refunded, refunded; no mismatch, expiry or failure reported
    /// afterwards changes it (such events are still recorded in `stripe_events`). Before
    /// payment a confirmed payment always wins, so a session flagged or closed earlier
    /// still becomes fulfilled when Stripe reports it paid as sold.
    pub fn may_become(self, next: Self) -> bool {
        match next {
            Self::Pending => false,
            Self::Open | Self::Failed => self == Self::Pending,
            Self::Closed => matches!(self, Self::Pending | Self::Open),
            Self::Mismatch => matches!(self, Self::Pending | Self::Open | Self::Closed),
            Self::Fulfilled => !self.is_paid(),
            Self::PartiallyRefunded => self == Self::Fulfilled,
            Self::Refunded => matches!(self, Self::Fulfilled | Self::PartiallyRefunded),
        }
    }

    /// Whether the purchase was paid and its tokens granted, whatever was refunded since.
    pub fn is_paid(self) -> bool {
        matches!(
            self,
            Self::Fulfilled | Self::PartiallyRefunded | Self::Refunded
        )
    }
}

/// The SQL condition `status IN (…)` over every status that may become `next`. The names
/// written into the statement are our own constants, never request data.
fn may_become_condition(next: PurchaseStatus) -> String {
    let sources: Vec<String> = PurchaseStatus::ALL
        .into_iter()
        .filter(|status| status.may_become(next))
        .map(|status| format!("'{}'", status.as_str()))
        .collect();
    format!("status IN ({})", sources.join(", "))
}

/// The SQL condition `status IN (…)` over the paid statuses.
fn paid_condition() -> String {
    let paid: Vec<String> = PurchaseStatus::ALL
        .into_iter()
        .filter(|status| status.is_paid())
        .map(|status| format!("'{}'", status.as_str()))
        .collect();
    format!("status IN ({})", paid.join(", "))
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

/// Stores the session Stripe created for a purchase and marks it open, if it is still
/// pending.
pub async fn attach_session<'e, E>(
    executor: E,
    purchase: &PurchaseId,
    session: &SessionId,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let statement = format!(
        r"UPDATE purchases
          SET session_id = $2, status = $3, updated_at = $4
          WHERE id = $1 AND {}",
        may_become_condition(PurchaseStatus::Open)
    );
    sqlx::query(&statement)
        .bind(purchase)
        .bind(session)
        .bind(PurchaseStatus::Open.as_str())
        .bind(crate::unix_now())
        .execute(executor)
        .await
        .map_err(query_failed("attach a checkout session to its purchase"))?;
    Ok(())
}

/// Moves `purchase` to `status` if [`PurchaseStatus::may_become`] allows it; otherwise
/// leaves it as it is.
pub async fn set_purchase_status<'e, E>(
    executor: E,
    purchase: &PurchaseId,
    status: PurchaseStatus,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let statement = format!(
        r"UPDATE purchases
          SET status = $2, updated_at = $3
          WHERE id = $1 AND {}",
        may_become_condition(status)
    );
    sqlx::query(&statement)
        .bind(purchase)
        .bind(status.as_str())
        .bind(crate::unix_now())
        .execute(executor)
        .await
        .map_err(query_failed("update a purchase status"))?;
    Ok(())
}

/// Moves the purchase behind `session` to `status` if there is one and
/// [`PurchaseStatus::may_become`] allows it; otherwise changes nothing.
pub async fn set_session_status<'e, E>(
    executor: E,
    session: &SessionId,
    status: PurchaseStatus,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let statement = format!(
        r"UPDATE purchases
          SET status = $2, updated_at = $3
          WHERE session_id = $1 AND {}",
        may_become_condition(status)
    );
    sqlx::query(&statement)
        .bind(session)
        .bind(status.as_str())
        .bind(crate::unix_now())
        .execute(executor)
        .await
        .map_err(query_failed("update a purchase status by session"))?;
    Ok(())
}

/// The purchase billing recorded for `session`, whatever its status, or `None` if the
/// session was not opened by this service (for example one created in Stripe's dashboard).
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
          WHERE session_id = $1",
    )
    .bind(session)
    .fetch_optional(executor)
    .await
    .map_err(query_failed("look up a purchase by session"))
}

/// A paid session that billing did not open (for example one created in Stripe's
/// dashboard), recorded when it is granted so that later refunds can find it.
#[derive(Debug)]
pub struct ExternalPurchase<'a> {
    pub user: &'a UserId,
    pub package_id: &'a PackageId,
    pub tokens: Tokens,
    pub amount: Cents,
    pub currency: &'a str,
    pub session_id: &'a SessionId,
    pub payment_intent: Option<&'a PaymentIntentId>,
}

/// Marks the purchase behind `session` fulfilled and remembers the PaymentIntent that paid
/// it. Returns `false` if billing has no unpaid purchase for the session; callers only get
/// here after writing the session's one grant, so a paid purchase cannot exist yet.
pub async fn mark_fulfilled<'e, E>(
    executor: E,
    session: &SessionId,
    payment_intent: Option<&PaymentIntentId>,
) -> Result<bool, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let statement = format!(
        r"UPDATE purchases
          SET status = $2, payment_intent_id = $3, updated_at = $4
          WHERE session_id = $1 AND {}",
        may_become_condition(PurchaseStatus::Fulfilled)
    );
    let result = sqlx::query(&statement)
        .bind(session)
        .bind(PurchaseStatus::Fulfilled.as_str())
        .bind(payment_intent)
        .bind(crate::unix_now())
        .execute(executor)
        .await
        .map_err(query_failed("mark a purchase fulfilled"))?;
    Ok(result.rows_affected() > 0)
}

/// Records a granted session that billing did not open, as a fulfilled purchase.
pub async fn insert_external_purchase<'e, E>(
    executor: E,
    purchase: &ExternalPurchase<'_>,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"INSERT INTO purchases
              (id, user_id, package_id, tokens, amount_cents, currency, status,
               session_id, payment_intent_id, created_at, updated_at)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
    )
    .bind(PurchaseId::generate())
    .bind(purchase.user.as_str())
    .bind(purchase.package_id)
    .bind(purchase.tokens)
    .bind(purchase.amount)
    .bind(purchase.currency)
    .bind(PurchaseStatus::Fulfilled.as_str())
    .bind(purchase.session_id)
    .bind(purchase.payment_intent)
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("record a purchase opened outside billing"))?;
    Ok(())
}

/// A granted purchase, as a refund needs it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PaidPurchase {
    pub session_id: SessionId,
    pub user_id: String,
    pub tokens: Tokens,
    /// What was paid for it, in the smallest unit of `currency`.
    pub amount_cents: Cents,
    pub currency: String,
}

/// The paid purchase (fulfilled, or refunded in part or whole) that `payment_intent` paid,
/// if any.
pub async fn find_paid_purchase<'e, E>(
    executor: E,
    payment_intent: &PaymentIntentId,
) -> Result<Option<PaidPurchase>, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let statement = format!(
        r"SELECT session_id, user_id, tokens, amount_cents, currency
          FROM purchases
          WHERE payment_intent_id = $1 AND {}",
        paid_condition()
    );
    sqlx::query_as(&statement)
        .bind(payment_intent)
        .fetch_optional(executor)
        .await
        .map_err(query_failed("look up a purchase by payment intent"))
}

/// One purchase as its owner sees it.
#[derive(Clone, Debug, Serialize)]
pub struct PurchaseView {
    pub session_id: String,
    pub package_id: String,
    pub tokens: Tokens,
    pub amount_cents: Cents,
    pub currency: String,
    pub status: PurchaseStatus,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last status change.
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct PurchaseViewRow {
    session_id: String,
    package_id: String,
    tokens: Tokens,
    amount_cents: Cents,
    currency: String,
    status: String,
    created_at: i64,
    updated_at: i64,
}

/// The purchase behind `session` if `user` made it. Someone else's session and an unknown
/// one look the same: `None`.
pub async fn find_owned_purchase<'e, E>(
    executor: E,
    session: &SessionId,
    user: &UserId,
) -> Result<Option<PurchaseView>, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    let row: Option<PurchaseViewRow> = sqlx::query_as(
        r"SELECT session_id, package_id, tokens, amount_cents, currency, status,
                 created_at, updated_at
          FROM purchases
          WHERE session_id = $1 AND user_id = $2",
    )
    .bind(session)
    .bind(user.as_str())
    .fetch_optional(executor)
    .await
    .map_err(query_failed("look up a purchase for its owner"))?;

    Ok(row.and_then(|row| {
        Some(PurchaseView {
            status: PurchaseStatus::parse(&row.status)?,
            session_id: row.session_id,
            package_id: row.package_id,
            tokens: row.tokens,
            amount_cents: row.amount_cents,
            currency: row.currency,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }))
}

// ===== Refunds =====

/// What Stripe last reported about the refunds of one charge.
#[derive(Debug)]
pub struct ChargeRefund<'a> {
    pub payment_intent: &'a PaymentIntentId,
    pub charge_id: &'a str,
    /// The charge's amount, in the smallest currency unit.
    pub amount: Cents,
    /// Cumulative refunded amount, in the smallest currency unit.
    pub amount_refunded: Cents,
    pub currency: &'a str,
}

/// The refund record of one payment, for computing what is owed back.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RefundState {
    pub amount_cents: Cents,
    pub amount_refunded_cents: Cents,
    pub currency: String,
}

/// Stores a charge's refund figures. The refunded amount only grows: an older event
/// arriving late cannot lower it. Writing the row waits for any other transaction that is
/// settling the same payment.
pub async fn upsert_charge_refund<'e, E>(
    executor: E,
    refund: &ChargeRefund<'_>,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"INSERT INTO charge_refunds
              (payment_intent_id, charge_id, amount_cents, amount_refunded_cents, currency,
               updated_at)
          VALUES ($1, $2, $3, $4, $5, $6)
          ON CONFLICT (payment_intent_id) DO UPDATE
          SET charge_id = excluded.charge_id,
              amount_cents = excluded.amount_cents,
              currency = excluded.currency,
              amount_refunded_cents = CASE
                  WHEN excluded.amount_refunded_cents > charge_refunds.amount_refunded_cents
                  THEN excluded.amount_refunded_cents
                  ELSE charge_refunds.amount_refunded_cents
              END,
              updated_at = excluded.updated_at",
    )
    .bind(refund.payment_intent)
    .bind(refund.charge_id)
    .bind(refund.amount)
    .bind(refund.amount_refunded)
    .bind(refund.currency)
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("record a charge refund"))?;
    Ok(())
}

/// Claims the refund record of `payment_intent` for the rest of the transaction, creating
/// an empty one (amount 0, nothing refunded) if no refund has been reported yet. A grant
/// calls this so that it and a concurrent first refund of the same payment run one after
/// the other: whichever commits second sees the other's work and settles the clawback.
pub async fn claim_refund_record<'e, E>(
    executor: E,
    payment_intent: &PaymentIntentId,
) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"INSERT INTO charge_refunds
              (payment_intent_id, charge_id, amount_cents, amount_refunded_cents, currency,
               updated_at)
          VALUES ($1, '', 0, 0, '', $2)
          ON CONFLICT (payment_intent_id) DO UPDATE
          SET updated_at = charge_refunds.updated_at",
    )
    .bind(payment_intent)
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("claim a refund record"))?;
    Ok(())
}

pub async fn find_refund_state<'e, E>(
    executor: E,
    payment_intent: &PaymentIntentId,
) -> Result<Option<RefundState>, DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_as(
        r"SELECT amount_cents, amount_refunded_cents, currency
          FROM charge_refunds
          WHERE payment_intent_id = $1",
    )
    .bind(payment_intent)
    .fetch_optional(executor)
    .await
    .map_err(query_failed("read a refund record"))
}

// ===== Accounts =====

/// Writes `user`'s account row, creating it if needed, and so holds it until the
/// transaction ends: concurrent debits of one user queue here instead of both spending
/// the same balance.
pub async fn lock_account<'e, E>(executor: E, user: &UserId) -> Result<(), DbError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query(
        r"INSERT INTO accounts (user_id, touched_at)
          VALUES ($1, $2)
          ON CONFLICT (user_id) DO UPDATE
          SET touched_at = excluded.touched_at",
    )
    .bind(user.as_str())
    .bind(crate::unix_now())
    .execute(executor)
    .await
    .map_err(query_failed("lock an account"))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::PurchaseStatus;

    #[test]
    fn paid_purchases_only_move_towards_refunded() {
        for from in PurchaseStatus::ALL.into_iter().filter(|s| s.is_paid()) {
            for to in PurchaseStatus::ALL {
                let forward = matches!(
                    (from, to),
                    (PurchaseStatus::Fulfilled, PurchaseStatus::PartiallyRefunded)
                        | (
                            PurchaseStatus::Fulfilled | PurchaseStatus::PartiallyRefunded,
                            PurchaseStatus::Refunded
                        )
                );
                assert_eq!(from.may_become(to), forward, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn no_status_returns_to_pending_and_every_unpaid_one_can_be_fulfilled() {
        for status in PurchaseStatus::ALL {
            assert!(!status.may_become(PurchaseStatus::Pending), "{status:?}");
            assert_eq!(
                status.may_become(PurchaseStatus::Fulfilled),
                !status.is_paid(),
                "{status:?}"
            );
            assert_eq!(PurchaseStatus::parse(status.as_str()), Some(status));
        }
    }
}
