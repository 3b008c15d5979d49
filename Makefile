# deem — the two commands in README.md, plus build and bench.
# Every target sets up the project-local libtorch first (scripts/setup.sh is idempotent).
SHELL := /bin/bash
ENV := source scripts/env.sh &&
CARGO_TEST_FLAGS ?=

.PHONY: setup build run test bench bench-reference serve fmt clippy

setup:
	@bash scripts/setup.sh

build: setup
	$(ENV) cargo build --release -p deem-actors --bin deem

run: build
	./target/release/deem info
	./target/release/deem topology check --topology topologies/cpu.toml --config configs/tiny.toml
	./target/release/deem train --topology topologies/cpu.toml --config configs/tiny.toml --steps 30 --run-dir runs/tiny

test:
	@bash scripts/setup.sh --test
	$(ENV) cargo test --workspace $(CARGO_TEST_FLAGS)

bench: setup
	$(ENV) cargo bench -p deem-actors --bench pipeline --bench serve

# deem vs transformers `generate` and a diffusers DDIM loop on the same weights (needs transformers and
# diffusers in .venv: .venv/bin/pip install transformers diffusers).
bench-reference: build
	.venv/bin/python scripts/bench_reference.py

# Serve the model `make run` trained (http://127.0.0.1:8000: playground at /, API at /v1).
serve: build
	./target/release/deem serve --topology topologies/cpu.toml --config configs/tiny.toml --checkpoint runs/tiny

fmt:
	cargo fmt --all

clippy: setup
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
