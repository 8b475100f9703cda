#!/usr/bin/env bash
# Starts billing (:8081), the demo app (:8000) and the gateway (:8080, admin :9090) with local
# defaults, and stops all three on Ctrl-C or SIGTERM. Used by `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}"

# Development-only secrets; any variable already set in the environment wins.
export JWT_SECRET="${JWT_SECRET:-tollgate-dev-jwt-secret}"
export STRIPE_WEBHOOK_SECRET="${STRIPE_WEBHOOK_SECRET:-whsec_tollgate_dev_secret}"
export IDENTITY_HASH_KEY="${IDENTITY_HASH_KEY:-tollgate-dev-identity-key}"
export STRIPE_PUBLISHABLE_KEY="${STRIPE_PUBLISHABLE_KEY:-pk_test_tollgate_dev}"
export RUST_LOG="${RUST_LOG:-info}"
mkdir -p data

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping Tollgate..."
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

"$bin/billing-service" & pids+=($!)
"$bin/demo-app" & pids+=($!)
"$bin/gateway" --config config/gateway.toml & pids+=($!)

sleep 1
cat <<INFO

Tollgate is running:
  gateway     http://127.0.0.1:8080   (everything goes through here)
  admin       http://127.0.0.1:9090   (/healthz, /readyz, /metrics)
  billing     http://127.0.0.1:8081   (reached through the gateway)
  demo app    http://127.0.0.1:8000   (POST /api/v1/generate)

Try it:
  curl -si -X POST http://127.0.0.1:8080/api/v1/generate
  $bin/billing-service mint-token --user 42       # a bearer token for user 42

JWT_SECRET and STRIPE_WEBHOOK_SECRET are development values unless you set them.
Press Ctrl-C to stop.
INFO

# Exit (and stop the rest) as soon as any of the three exits.
wait -n "${pids[@]}"
