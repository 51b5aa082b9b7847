# Two entry points: `make serve` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on this machine. On a CUDA host: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint pull system-deps clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[data,dev]"
	touch $@

install: $(BIN)/.installed

# Debian's prometheus is used by the metrics test (a real scraper on loopback) and its promtool by the
# deployment tests; docker-compose validates the compose file.
system-deps:
	@command -v prometheus >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; \
	  else echo "prometheus/docker-compose not found; install Debian's prometheus and docker-compose packages for the metrics and deployment tests"; fi; }

pull: install
	$(BIN)/specdecpp models pull

serve: install pull
	$(BIN)/specdecpp serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# ruff for style and errors; vulture for dead code (settings in pyproject.toml, false positives in vulture_whitelist.py).
lint: install
	$(BIN)/ruff check .
	$(BIN)/vulture

# --capture=sys: the processes tests start (servers, tensor-parallel ranks) write to the log, so a rank that
# dies leaves its traceback there (rank 0 then exits at once, before pytest could report anything).
test: install system-deps lint
	$(BIN)/python -m pytest -q -rs --capture=sys $(PYTEST_ARGS)

# Unit tests only (no real model pair).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
