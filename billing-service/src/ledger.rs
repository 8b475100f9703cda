//! The token ledger: append-only transactions, and balances computed from them.
//!
//! Invariant: a user's balance is exactly the sum of their transaction rows; no row is ever
//! updated or deleted. A Checkout Session yields at most one `purchase` row (a unique index
//! enforces it), so redelivered or duplicate payment events cannot grant twice. Deciding
//! *whether* a payment earns tokens is the webhook's job, not the ledger's.

use serde::Serialize;
use sqlx::Executor;
use tollgate_auth::UserId;

use crate::catalog::Tokens;
use crate::db::Backend;
use crate::stripe::{EventId, SessionId};

/// Why a ledger query failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger query failed while trying to {operation}")]
    Query {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

fn query_failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> LedgerError {
    move |source| LedgerError::Query { operation, source }
}

/// Why tokens moved. Stored as the lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A paid Checkout Session.
    Purchase,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
        }
    }
}

/// One ledger row as shown to its owner.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Transaction {
    /// `txn_` followed by 32 hex digits.
    pub id: String,
    /// Tokens added (positive) or removed (negative).
    pub amount: Tokens,
    pub reason: String,
    /// The Stripe event that caused the row, if any.
    pub stripe_event_id: Option<String>,
    /// The Checkout Session the row belongs to, if any.
    pub stripe_session_id: Option<String>,
    /// When the row was written, in Unix milliseconds.
    pub created_at_ms: i64,
}

/// A purchase grant about to be written.
#[derive(Debug)]
pub struct PurchaseGrant<'a> {
    pub user: &'a UserId,
    pub tokens: Tokens,
    pub event_id: &'a EventId,
    pub session_id: &'a SessionId,
}

/// Appends the purchase row for a session. Returns the new row's id, or `None`, writing
/// nothing, if the session was already granted.
///
/// Run it in the same transaction that records the event, so an event is never marked as
/// handled without its grant, or granted without being marked.
pub async fn grant_purchase<'e, E>(
    executor: E,
    grant: &PurchaseGrant<'_>,
) -> Result<Option<String>, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    let id = format!("txn_{}", hex::encode(rand::random::<[u8; 16]>()));
    let result = sqlx::query(
        r"INSERT INTO ledger_transactions
              (id, user_id, amount, reason, stripe_event_id, stripe_session_id, created_at_ms)
          VALUES ($1, $2, $3, $4, $5, $6, $7)
          ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(grant.user.as_str())
    .bind(grant.tokens)
    .bind(Reason::Purchase.as_str())
    .bind(grant.event_id)
    .bind(grant.session_id)
    .bind(crate::unix_now_ms())
    .execute(executor)
    .await
    .map_err(query_failed("append a purchase grant"))?;
    Ok((result.rows_affected() == 1).then_some(id))
}

/// The user's balance: the sum of their rows, 0 for a user with none.
pub async fn balance<'e, E>(executor: E, user: &UserId) -> Result<Tokens, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_scalar(
        r"SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT)
          FROM ledger_transactions
          WHERE user_id = $1",
    )
    .bind(user.as_str())
    .fetch_one(executor)
    .await
    .map(Tokens)
    .map_err(query_failed("sum a balance"))
}

/// The user's most recent rows, newest first, at most `limit` of them.
pub async fn transactions<'e, E>(
    executor: E,
    user: &UserId,
    limit: u32,
) -> Result<Vec<Transaction>, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_as(
        r"SELECT id, amount, reason, stripe_event_id, stripe_session_id, created_at_ms
          FROM ledger_transactions
          WHERE user_id = $1
          ORDER BY created_at_ms DESC, id DESC
          LIMIT $2",
    )
    .bind(user.as_str())
    .bind(i64::from(limit))
    .fetch_all(executor)
    .await
    .map_err(query_failed("list transactions"))
}
