# Every target creates .venv and installs what it needs by itself.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: run test lint typecheck unit bench bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/smtp-session worker --beat

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered --cov-fail-under=90

# Benchmarks, not tests (not part of `make test`): each script prints a table and its
# ratios and writes bench/results/<name>.json. Loopback only, a few minutes in all.
BENCH_STAMP   := $(VENV)/.bench-stamp
BENCH_SCRIPTS := core_overhead sweep_scaling worker_path fallback_cost peers profile_core \
                 embedded_broker chaos
# redis-server for bench/worker_path.py and bench/chaos.py, rabbitmq-server for the latter;
# the peers of bench/peers.py.
BENCH_DEBS    := redis-server rabbitmq-server prometheus-blackbox-exporter monitoring-plugins-basic
CHECK_SMTP    := /usr/lib/nagios/plugins/check_smtp

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Installs the Debian packages only when one is missing and we are root; otherwise says
# so, and bench/peers.py reports and skips the peer it cannot find.
bench-deps:
	@if command -v redis-server >/dev/null && command -v prometheus-blackbox-exporter >/dev/null \
	    && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
	    && [ -x $(CHECK_SMTP) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $(BENCH_DEBS) >/dev/null; \
	else \
	    echo "bench-deps: not root or no apt-get; missing peers will be skipped:" \
	        "apt-get install $(BENCH_DEBS)"; \
	fi

bench: $(BENCH_STAMP) bench-deps
	@set -e; for script in $(BENCH_SCRIPTS); do \
	    echo "=== bench/$$script.py"; $(BIN)/python -m bench.$$script; echo; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .coverage .coverage.* .mypy_cache .pytest_cache .ruff_cache
