-- Refund clawbacks and debits by the application. Portable SQL, like 0001.

-- The PaymentIntent that paid a purchase, learned from the completed Checkout Session. A
-- `charge.refunded` event names only the PaymentIntent, so this is how a refund finds the
-- purchase it belongs to.
ALTER TABLE purchases ADD COLUMN payment_intent_id TEXT;

CREATE UNIQUE INDEX purchases_payment_intent_id ON purchases (payment_intent_id);

-- How much of each refunded charge Stripe reports as refunded, in the charge's currency.
-- Stripe's figure is cumulative, so the row only ever grows; the clawback owed is derived
-- from it whenever either the refund or the purchase's grant arrives, in whichever order.
-- Writing to the row also serialises concurrent refunds and grants of one payment.
CREATE TABLE charge_refunds (
    payment_intent_id     TEXT   NOT NULL PRIMARY KEY,
    charge_id             TEXT   NOT NULL,
    amount_cents          BIGINT NOT NULL,
    amount_refunded_cents BIGINT NOT NULL,
    currency              TEXT   NOT NULL,
    updated_at            BIGINT NOT NULL
);

-- One row per user who has ever spent tokens. A debit writes its user's row first, which
-- makes concurrent debits of one user wait for each other, so two of them can never both
-- spend the same balance.
CREATE TABLE accounts (
    user_id    TEXT   NOT NULL PRIMARY KEY,
    touched_at BIGINT NOT NULL
);

-- A debit's idempotency key and the balance it left, so that a replay answers the same.
ALTER TABLE ledger_transactions ADD COLUMN idempotency_key TEXT;

ALTER TABLE ledger_transactions ADD COLUMN balance_after BIGINT;

CREATE UNIQUE INDEX ledger_transactions_one_debit_per_key
    ON ledger_transactions (idempotency_key)
    WHERE reason = 'debit';

-- Refund rows are looked up by the session they claw back from.
CREATE INDEX ledger_transactions_session ON ledger_transactions (stripe_session_id);
