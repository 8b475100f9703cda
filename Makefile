# Tollgate: `make run` starts the stack locally, `make test` runs every test.

CARGO ?= cargo
PROFILE ?= debug
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: build run test fmt-check lint bench

build:
	$(CARGO) build --workspace --bins $(CARGO_PROFILE_FLAG)

## Start billing, the gateway and the demo app with local defaults; Ctrl-C stops all three.
run: build
	PROFILE=$(PROFILE) ./scripts/run-stack.sh

# Postgres for the billing suites (every billing test runs on SQLite and on this).
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/test
export TEST_POSTGRES_URL

## Every test: formatting, unit tests, end-to-end suites over real sockets, and the billing
## API contract fuzzed by schemathesis.
test: fmt-check
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	./scripts/contract-test.sh

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (not part of `make test`): the gateway against nginx, then micro-benchmarks.
bench:
	./bench/setup.sh
	$(CARGO) build --release -p gateway --bin gateway --example bare_pingora
	python3 bench/run.py
	$(CARGO) bench -p gateway --bench decisions --bench memory_per_client
	$(CARGO) bench -p billing-service --bench signature --bench webhook_throughput
