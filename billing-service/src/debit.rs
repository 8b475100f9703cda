//! `POST /internal/v1/tokens/debit`: the application spends a user's tokens.
//!
//! Only the application calls this, with the service token from `BILLING_SERVICE_TOKEN`;
//! the gateway never routes `/internal/`. A debit happens at most once per idempotency
//! key: a replay with the same user and amount answers what the first call answered, and
//! never spends twice. A debit never takes a balance below zero (refunds may; see
//! `webhook`). Concurrent debits of one user run one after the other (`db::lock_account`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_auth::UserId;

use crate::catalog::Tokens;
use crate::config::Secret;
use crate::db::{self, DbError};
use crate::http::{self, ApiError, AppState};
use crate::ledger::{self, LedgerError, NewDebit};

/// Longest accepted idempotency key, in bytes.
const MAX_KEY_LEN: usize = 255;

/// Longest accepted user id, in bytes.
const MAX_USER_ID_LEN: usize = 255;

/// Why a debit was not made.
#[derive(Debug, thiserror::Error)]
pub enum DebitError {
    #[error("no service token is configured")]
    NotConfigured,
    #[error("a valid service token is required")]
    Unauthorized,
    #[error("request body is not a valid debit request: {0}")]
    InvalidBody(#[source] serde_json::Error),
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The balance is below the amount; nothing was spent.
    #[error("balance of {} tokens is below the {} requested", balance.0, required.0)]
    InsufficientBalance { balance: Tokens, required: Tokens },
    /// The key was used before for another user or amount.
    #[error("idempotency key was already used for a different debit")]
    KeyReused,
    #[error(transparent)]
    Storage(#[from] DbError),
    #[error(transparent)]
    Ledger(LedgerError),
}

impl From<LedgerError> for DebitError {
    fn from(error: LedgerError) -> Self {
        match error {
            LedgerError::DebitKeyTaken => Self::KeyReused,
            other => Self::Ledger(other),
        }
    }
}

/// The body of a debit request.
#[derive(Debug, Deserialize)]
pub struct DebitRequest {
    pub user_id: String,
    /// Tokens to spend; at least 1.
    pub amount: i64,
    /// Chosen by the application, unique per intended debit (1 to 255 bytes).
    pub idempotency_key: String,
}

/// A debit made now or earlier under the same key.
#[derive(Debug, Serialize)]
pub struct DebitReceipt {
    pub transaction_id: String,
    pub user_id: String,
    /// Tokens spent.
    pub amount: Tokens,
    /// The user's balance right after this debit.
    pub balance: Tokens,
    /// When the debit was made, in Unix milliseconds.
    pub created_at_ms: i64,
}

/// Handles `POST /internal/v1/tokens/debit`.
pub async fn debit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(state.service_token.as_ref(), &headers)?;
    http::require_json(&headers)?;
    let body = body?;
    let request: DebitRequest = serde_json::from_slice(&body).map_err(DebitError::InvalidBody)?;
    let (user, amount) = validate(&request)?;

    let (receipt, replayed) = spend(&state, &user, amount, &request.idempotency_key).await?;
    let mut response = Json(receipt).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", "true".parse().expect("static ASCII"));
    }
    Ok(response)
}

/// Checks `Authorization: Bearer <service token>`. Both sides are hashed first so that
/// the constant-time comparison does not reveal the token's length either.
fn authorize(expected: Option<&Secret>, headers: &HeaderMap) -> Result<(), DebitError> {
    let Some(expected) = expected else {
        return Err(DebitError::NotConfigured);
    };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    let presented = Sha256::digest(presented);
    let expected = Sha256::digest(expected.expose().as_bytes());
    if bool::from(presented.ct_eq(&expected)) {
        Ok(())
    } else {
        Err(DebitError::Unauthorized)
    }
}

fn validate(request: &DebitRequest) -> Result<(UserId, Tokens), DebitError> {
    let user = UserId::new(request.user_id.as_str())
        .filter(|_| request.user_id.len() <= MAX_USER_ID_LEN)
        .ok_or(DebitError::InvalidRequest("user_id must be 1 to 255 bytes"))?;
    if request.amount < 1 {
        return Err(DebitError::InvalidRequest("amount must be at least 1"));
    }
    let key = &request.idempotency_key;
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(DebitError::InvalidRequest(
            "idempotency_key must be 1 to 255 bytes",
        ));
    }
    Ok((user, Tokens(request.amount)))
}

/// Spends `amount` of `user`'s tokens once per key, in one transaction. Returns the receipt
/// and whether it is a replay of an earlier debit.
#[tracing::instrument(skip_all, fields(user.id = user.as_str(), ledger.tokens = amount.0))]
async fn spend(
    state: &AppState,
    user: &UserId,
    amount: Tokens,
    key: &str,
) -> Result<(DebitReceipt, bool), DebitError> {
    let mut transaction = db::begin(&state.pool, "begin a debit transaction").await?;
    db::lock_account(&mut *transaction, user).await?;

    if let Some(earlier) = ledger::find_debit(&mut *transaction, key).await? {
        if earlier.user_id != user.as_str() || earlier.tokens != amount {
            return Err(DebitError::KeyReused);
        }
        tracing::debug!(ledger.transaction_id = earlier.id, "debit replayed");
        let receipt = DebitReceipt {
            transaction_id: earlier.id,
            user_id: earlier.user_id,
            amount: earlier.tokens,
            balance: earlier.balance_after,
            created_at_ms: earlier.created_at_ms,
        };
        return Ok((receipt, true));
    }

    let balance = ledger::balance(&mut *transaction, user).await?;
    if balance < amount {
        tracing::debug!(ledger.balance = balance.0, "debit refused, balance too low");
        return Err(DebitError::InsufficientBalance {
            balance,
            required: amount,
        });
    }
    let balance_after = Tokens(balance.0 - amount.0);
    let debit = NewDebit {
        user,
        tokens: amount,
        idempotency_key: key,
        balance_after,
        created_at_ms: crate::unix_now_ms(),
    };
    let id = ledger::append_debit(&mut *transaction, &debit).await?;
    db::commit(transaction, "commit a debit").await?;

    tracing::info!(ledger.transaction_id = id, "tokens debited");
    let receipt = DebitReceipt {
        transaction_id: id,
        user_id: user.to_string(),
        amount,
        balance: balance_after,
        created_at_ms: debit.created_at_ms,
    };
    Ok((receipt, false))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("ASCII"));
        headers
    }

    #[test]
    fn only_the_exact_service_token_is_accepted() {
        let secret = Secret::new("svc-token");
        assert!(authorize(Some(&secret), &headers("Bearer svc-token")).is_ok());
        for wrong in [
            "Bearer svc-toke",
            "Bearer svc-token ",
            "svc-token",
            "Bearer ",
        ] {
            assert!(
                matches!(
                    authorize(Some(&secret), &headers(wrong)),
                    Err(DebitError::Unauthorized)
                ),
                "{wrong}"
            );
        }
        assert!(matches!(
            authorize(None, &headers("Bearer svc-token")),
            Err(DebitError::NotConfigured)
        ));
    }

    #[test]
    fn requests_need_a_user_a_positive_amount_and_a_key() {
        let request = |user: &str, amount, key: &str| DebitRequest {
            user_id: user.to_owned(),
            amount,
            idempotency_key: key.to_owned(),
        };
        assert!(validate(&request("42", 1, "k")).is_ok());
        assert!(validate(&request("", 1, "k")).is_err());
        assert!(validate(&request("42", 0, "k")).is_err());
        assert!(validate(&request("42", -5, "k")).is_err());
        assert!(validate(&request("42", 1, "")).is_err());
        assert!(validate(&request("42", 1, &"k".repeat(256))).is_err());
    }
}
