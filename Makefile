# twofold — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
DATA   ?= data
SERVE_ARGS ?=   # e.g. make run SERVE_ARGS="--config twofold.toml" (other ports, PostgreSQL …)

.PHONY: run test lint typecheck unit bench bench-gateway bench-replay bench-scale soak system-deps clean walkthrough

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

SSLYZE := $(VENV)/sslyze/bin/sslyze

# Reinstall when pyproject.toml changes.
$(DEPS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,dev,bench]'
	touch $@

# sslyze (the TLS scan of tests/test_tls_scan.py) in a virtualenv of its own: see pyproject.toml.
$(SSLYZE): pyproject.toml | $(BIN)/python
	$(PYTHON) -m venv $(VENV)/sslyze
	$(VENV)/sslyze/bin/python -m pip install -q --upgrade pip
	$(VENV)/sslyze/bin/python -m pip install -q --group tls-scan
	touch $@

## make run: the main job — portal, gateways (cat :8443, prod :9443) and sandbox on SQLite.
run: $(DEPS)
	$(BIN)/twofold serve --data $(DATA) $(SERVE_ARGS)

## make walkthrough: the client toolkit walkthrough against a throwaway local mTLS endpoint.
walkthrough: $(DEPS)
	$(BIN)/python scripts/walkthrough.py

## make test: install what the tests need (Python packages; openssl, curl, nginx,
## chromium from Debian when missing), then lint, type-check and run every suite.
test: $(DEPS) $(SSLYZE) system-deps lint typecheck unit

system-deps:
	@scripts/system-deps.sh

lint: $(DEPS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(DEPS)
	$(BIN)/mypy

unit: $(DEPS)
	$(BIN)/pytest -n 2 --dist loadgroup -q

bench: $(DEPS) system-deps
	$(BIN)/python bench/jws_bench.py

## make bench-gateway: the gateway against nginx as an mTLS reverse proxy (keep-alive signed
## requests/s and new mTLS handshakes/s, direct and behind the nginx edge, about 6-7 minutes);
## exits 1 when a target is missed.
bench-gateway: $(DEPS) system-deps
	$(BIN)/python bench/gateway_bench.py

## make bench-replay: what replay protection and signed responses cost (the pieces, then
## through serve under wrk beside plain signed requests; about two minutes).
bench-replay: $(DEPS) system-deps
	$(BIN)/python bench/replay_bench.py

## make soak: 100 keep-alive clients x 60 s of signed payments through the gateway; exits 1
## on any error or when serve's memory grows 10% or more between the first and last third.
soak: $(DEPS)
	$(BIN)/python bench/soak.py --clients 100 --seconds 60

## make bench-scale: 100,000 registered certificates against 10 (PostgreSQL, behind the nginx
## edge): start-up, memory, one change, rates; and what direct TLS would take
bench-scale: $(DEPS) system-deps
	$(BIN)/python bench/scale_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist src/*.egg-info
