# Tollgate: `make run` starts the stack locally, `make test` runs every test.

CARGO ?= cargo
PROFILE ?= debug
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)

.PHONY: build run test fmt-check lint

build:
	$(CARGO) build --workspace --bins $(CARGO_PROFILE_FLAG)

## Start billing, the gateway and the demo app with local defaults; Ctrl-C stops all three.
run: build
	PROFILE=$(PROFILE) ./scripts/run-stack.sh

## Every test: formatting, unit tests and the end-to-end suites over real sockets.
test: fmt-check
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
