#!/usr/bin/env bash
# Contract test: schemathesis fuzzes a running billing service against its own OpenAPI
# document (/openapi.json) and fails on any 5xx or response that breaks the schema. Stripe's
# API is a local stand-in. Used by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import schemathesis' 2>/dev/null || python3 -m pip install --quiet schemathesis

work=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
stripe_port=$(free_port)
billing_port=$(free_port)
admin_port=$(free_port)

bin="${CARGO_TARGET_DIR:-target}/debug"
cargo build --quiet -p billing-service --bins --example stripe_stand_in
"$bin/examples/stripe_stand_in" "127.0.0.1:$stripe_port" >"$work/stripe.log" 2>&1 &
pids+=($!)

export JWT_SECRET=contract-secret STRIPE_WEBHOOK_SECRET=whsec_contract
export BILLING_SERVICE_TOKEN=contract-service-token STRIPE_SECRET_KEY=sk_test_contract
export STRIPE_API_BASE="http://127.0.0.1:$stripe_port" RUST_LOG=warn
export DATABASE_URL="sqlite://$work/billing.db?mode=rwc"
"$bin/billing-service" --config config/billing.toml \
  --listen "127.0.0.1:$billing_port" --admin-listen "127.0.0.1:$admin_port" \
  >"$work/billing.log" 2>&1 &
pids+=($!)

healthy=false
for _ in $(seq 100); do
  if curl -sf "http://127.0.0.1:$admin_port/healthz" >/dev/null &&
    curl -s -o /dev/null "http://127.0.0.1:$stripe_port/"; then
    healthy=true
    break
  fi
  sleep 0.1
done
if [ "$healthy" != true ]; then
  echo "contract test: billing or the Stripe stand-in did not start" >&2
  cat "$work/billing.log" "$work/stripe.log" >&2
  exit 1
fi

token=$("$bin/billing-service" mint-token --user 42)
python3 -m schemathesis.cli --config-file billing-service/schemathesis.toml \
  run "http://127.0.0.1:$billing_port/openapi.json" \
  --checks all -H "Authorization: Bearer $token"
