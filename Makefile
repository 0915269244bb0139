# connection-proxy — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := redis-server redis-sentinel chromium prometheus nginx

.PHONY: run test test-fast lint typecheck check-system bench clean docs image image-smoke

# Debian's python3 needs python3-venv for `-m venv`: installed when root, else named.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "python3 -m venv failed. Install it with: sudo apt-get install -y python3-venv"; exit 1; \
	  fi; }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

## make run: start the service on the embedded store at 127.0.0.1:8080 (dev mode)
run: $(VENV)/.installed
	$(BIN)/connection-proxy serve

## make test: lint, type-check and run the whole suite against a real redis-server
test: $(VENV)/.installed-test check-system lint
	$(BIN)/pytest -q

## make test-fast: the pure and in-process tests only, on every core (no lint; needs redis-server, not chromium)
test-fast: $(VENV)/.installed-test
	$(BIN)/pytest -q -n auto -m "not system and not browser"

## make docs: regenerate docs/configuration.md from proxy/settings.py (a test fails while it is stale)
docs: $(VENV)/.installed
	$(BIN)/python -m proxy.configref --write

lint: $(VENV)/.installed-test
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

# The suite needs real binaries: redis-server (tests start their own), chromium (connect pages)
# and promtool (Debian's prometheus: checks and unit-tests deploy/prometheus/alerts.yaml).
check-system:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-sentinel >/dev/null 2>&1 || missing="$$missing redis-sentinel"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 || missing="$$missing nginx"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "The test suite needs:$$missing. Install them with:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

## make bench: each benchmark side by side with its references, then charts and SUMMARY.md in bench/results/
BENCH_RESULTS := bench/results
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

bench: $(VENV)/.installed-bench check-system
	$(BIN)/python bench/connection_service.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/proxy.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/tunnel.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/ratelimit.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/resources.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/offload.py --results $(BENCH_RESULTS)
	$(BIN)/python bench/report.py --results $(BENCH_RESULTS)

## make image: build deploy/Dockerfile with podman on a debootstrapped local base (no registry
## needed; root, debootstrap, podman) and smoke-run it; not part of `make test`. With a registry:
## make image IMAGE_BASE=python:3.11-slim-bookworm. See deploy/image.sh.
image:
	deploy/image.sh build
	deploy/image.sh smoke

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
