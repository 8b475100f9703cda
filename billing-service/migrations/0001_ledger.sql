-- Portable SQL: runs unchanged on SQLite and Postgres. Times are Unix seconds (or
-- milliseconds where the column says so); money and tokens are integers.

-- A purchase billing started. The row is written before Stripe is called, so every
-- Checkout Session we open is backed by a record of who pays what, even if the call
-- times out after Stripe created the session.
CREATE TABLE purchases (
    id           TEXT   NOT NULL PRIMARY KEY,
    user_id      TEXT   NOT NULL,
    package_id   TEXT   NOT NULL,
    tokens       BIGINT NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency     TEXT   NOT NULL,
    status       TEXT   NOT NULL,
    session_id   TEXT   UNIQUE,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

CREATE INDEX purchases_user_id ON purchases (user_id);

-- Stripe events that changed, or deliberately did not change, a purchase. The primary key
-- makes a redelivered event a no-op. Ignored event types are never written here.
CREATE TABLE stripe_events (
    event_id    TEXT   NOT NULL PRIMARY KEY,
    event_type  TEXT   NOT NULL,
    session_id  TEXT,
    outcome     TEXT   NOT NULL,
    detail      TEXT,
    received_at BIGINT NOT NULL
);

-- The append-only token ledger. A balance is the sum of a user's rows.
CREATE TABLE ledger_transactions (
    id                TEXT   NOT NULL PRIMARY KEY,
    user_id           TEXT   NOT NULL,
    amount            BIGINT NOT NULL,
    reason            TEXT   NOT NULL,
    stripe_event_id   TEXT,
    stripe_session_id TEXT,
    created_at_ms     BIGINT NOT NULL
);

CREATE INDEX ledger_transactions_user ON ledger_transactions (user_id, created_at_ms);

-- One purchase grant per Checkout Session, whichever event or delivery brings it.
CREATE UNIQUE INDEX ledger_transactions_one_purchase_per_session
    ON ledger_transactions (stripe_session_id)
    WHERE reason = 'purchase';
