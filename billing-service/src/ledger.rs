//! The token ledger: append-only transactions, and balances computed from them.
//!
//! Invariant: a user's balance is exactly the sum of their transaction rows; no row is ever
//! updated or deleted. A Checkout Session yields at most one `purchase` row and a debit
//! idempotency key at most one `debit` row (unique indexes enforce both), so redelivered
//! events and replayed debits cannot count twice. Deciding *whether* tokens move is the
//! caller's job (`webhook`, `debit`), not the ledger's.

use serde::Serialize;
use sqlx::Executor;
use tollgate_auth::UserId;

use crate::catalog::Tokens;
use crate::db::{self, Backend};
use crate::stripe::{EventId, SessionId};

/// Why a ledger query failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Another debit already holds this idempotency key.
    #[error("the debit idempotency key is already used")]
    DebitKeyTaken,
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
    /// Tokens clawed back because the payment was refunded.
    Refund,
    /// Tokens spent through the internal debit API.
    Debit,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Refund => "refund",
            Self::Debit => "debit",
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
    /// `purchase`, `refund` or `debit`.
    pub reason: String,
    /// The Stripe event that caused the row, if any.
    pub stripe_event_id: Option<String>,
    /// The Checkout Session the row belongs to, if any.
    pub stripe_session_id: Option<String>,
    /// The debit's idempotency key, for `debit` rows.
    pub idempotency_key: Option<String>,
    /// When the row was written, in Unix milliseconds.
    pub created_at_ms: i64,
}

/// Where a page of transactions starts: strictly older than this row. Shown to clients as
/// `<created_at_ms>.<id>` of the last row of the previous page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    created_at_ms: i64,
    id: String,
}

impl Cursor {
    /// Reads a cursor as written by [`Cursor::after`]; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let (millis, id) = text.split_once('.')?;
        let valid_id = id.len() == 36
            && id.starts_with("txn_")
            && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
        let created_at_ms = millis.parse::<i64>().ok().filter(|ms| *ms >= 0)?;
        valid_id.then(|| Self {
            created_at_ms,
            id: id.to_owned(),
        })
    }

    /// The cursor of the page after `row`.
    pub fn after(row: &Transaction) -> String {
        format!("{}.{}", row.created_at_ms, row.id)
    }
}

fn new_transaction_id() -> String {
    format!("txn_{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// A row caused by a Stripe event: a purchase grant or a refund clawback.
#[derive(Debug)]
pub struct StripeEntry<'a> {
    pub user: &'a UserId,
    /// Positive for a grant, negative for a clawback.
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
    grant: &StripeEntry<'_>,
) -> Result<Option<String>, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    let id = new_transaction_id();
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

/// Appends a refund clawback (a negative `tokens`) and returns the row's id.
pub async fn append_clawback<'e, E>(
    executor: E,
    clawback: &StripeEntry<'_>,
) -> Result<String, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    let id = new_transaction_id();
    sqlx::query(
        r"INSERT INTO ledger_transactions
              (id, user_id, amount, reason, stripe_event_id, stripe_session_id, created_at_ms)
          VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(clawback.user.as_str())
    .bind(clawback.tokens)
    .bind(Reason::Refund.as_str())
    .bind(clawback.event_id)
    .bind(clawback.session_id)
    .bind(crate::unix_now_ms())
    .execute(executor)
    .await
    .map_err(query_failed("append a refund clawback"))?;
    Ok(id)
}

/// Tokens already clawed back from a session's purchase, as a positive number.
pub async fn clawed_back<'e, E>(executor: E, session: &SessionId) -> Result<Tokens, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_scalar(
        r"SELECT CAST(COALESCE(SUM(-amount), 0) AS BIGINT)
          FROM ledger_transactions
          WHERE stripe_session_id = $1 AND reason = 'refund'",
    )
    .bind(session)
    .fetch_one(executor)
    .await
    .map(Tokens)
    .map_err(query_failed("sum a session's clawbacks"))
}

/// A debit about to be written.
#[derive(Debug)]
pub struct NewDebit<'a> {
    pub user: &'a UserId,
    /// Tokens spent, as a positive number.
    pub tokens: Tokens,
    pub idempotency_key: &'a str,
    /// The balance once this debit is applied.
    pub balance_after: Tokens,
    /// When the debit is made, in Unix milliseconds; replays report the same time.
    pub created_at_ms: i64,
}

/// A debit as recorded, and as its replay answers.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DebitRecord {
    pub id: String,
    pub user_id: String,
    /// Tokens spent, as a positive number.
    pub tokens: Tokens,
    pub balance_after: Tokens,
    pub created_at_ms: i64,
}

/// Appends a debit row and returns its id. [`LedgerError::DebitKeyTaken`] if another
/// debit holds the key.
pub async fn append_debit<'e, E>(executor: E, debit: &NewDebit<'_>) -> Result<String, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    let id = new_transaction_id();
    sqlx::query(
        r"INSERT INTO ledger_transactions
              (id, user_id, amount, reason, idempotency_key, balance_after, created_at_ms)
          VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(debit.user.as_str())
    .bind(Tokens(-debit.tokens.0))
    .bind(Reason::Debit.as_str())
    .bind(debit.idempotency_key)
    .bind(debit.balance_after)
    .bind(debit.created_at_ms)
    .execute(executor)
    .await
    .map_err(|error| match db::violated_unique_index(&error) {
        Some("ledger_transactions_one_debit_per_key") => LedgerError::DebitKeyTaken,
        _ => query_failed("append a debit")(error),
    })?;
    Ok(id)
}

/// The debit recorded under `idempotency_key`, if any.
pub async fn find_debit<'e, E>(
    executor: E,
    idempotency_key: &str,
) -> Result<Option<DebitRecord>, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    sqlx::query_as(
        r"SELECT id, user_id, -amount AS tokens, balance_after, created_at_ms
          FROM ledger_transactions
          WHERE idempotency_key = $1 AND reason = 'debit'",
    )
    .bind(idempotency_key)
    .fetch_optional(executor)
    .await
    .map_err(query_failed("look up a debit"))
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

/// The user's rows newest first, at most `limit` of them, starting after `before`.
pub async fn transactions<'e, E>(
    executor: E,
    user: &UserId,
    limit: u32,
    before: Option<&Cursor>,
) -> Result<Vec<Transaction>, LedgerError>
where
    E: Executor<'e, Database = Backend>,
{
    // With no cursor, start above every possible row.
    let (before_ms, before_id) = match before {
        Some(cursor) => (cursor.created_at_ms, cursor.id.as_str()),
        None => (i64::MAX, ""),
    };
    sqlx::query_as(
        r"SELECT id, amount, reason, stripe_event_id, stripe_session_id, idempotency_key,
                 created_at_ms
          FROM ledger_transactions
          WHERE user_id = $1
            AND (created_at_ms < $2 OR (created_at_ms = $2 AND ($3 = '' OR id < $3)))
          ORDER BY created_at_ms DESC, id DESC
          LIMIT $4",
    )
    .bind(user.as_str())
    .bind(before_ms)
    .bind(before_id)
    .bind(i64::from(limit))
    .fetch_all(executor)
    .await
    .map_err(query_failed("list transactions"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_anything_else() {
        let row = Transaction {
            id: format!("txn_{}", "ab".repeat(16)),
            amount: Tokens(5),
            reason: "debit".to_owned(),
            stripe_event_id: None,
            stripe_session_id: None,
            idempotency_key: Some("k".to_owned()),
            created_at_ms: 1_700_000_000_000,
        };
        let text = Cursor::after(&row);
        let cursor = Cursor::parse(&text).expect("own cursor parses");
        assert_eq!(cursor.created_at_ms, row.created_at_ms);
        assert_eq!(cursor.id, row.id);
        for bad in ["", "1", "x.txn_00", "-1.txn_", "1.txn_zz", "1700.txn_abc"] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }
}
