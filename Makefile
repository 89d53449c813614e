# birdgen: `make demo` and `make test` set up everything they need on a fresh machine.
# The venv must use Python 3.11: Triton's python-backend stub embeds libpython3.11 and imports the
# venv's compiled wheels (see docs/triton-python-backend.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.birdgen-installed

.PHONY: setup demo test lint clean

# redis-server (Debian's) backs the Redis cache tests, and promtool (Debian's prometheus package) checks
# docker/prometheus and the dashboard's PromQL (tests/test_deploy.py); installed when missing and
# apt-get can run.
# chromium and chromium-driver (Debian's) run the web page's browser test (tests/test_web_page.py),
# likewise.
setup: $(STAMP)
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }; }; } || \
		echo "redis-server is missing and could not be installed: the Redis cache tests will skip"
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y --no-install-recommends prometheus || \
		{ apt-get update && apt-get install -y --no-install-recommends prometheus; }; }; } || \
		echo "promtool is missing and could not be installed: the Prometheus config checks will skip"
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y chromium chromium-driver || \
		{ apt-get update && apt-get install -y chromium chromium-driver; }; }; } || \
		echo "chromium or chromedriver is missing and could not be installed: the web page test will skip"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "birdgen needs Python 3.11 (Triton python-backend stub)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[models,train,bench,gateway,qa,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/birdgen demo --out outputs

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The slowest tests are listed at the end of every run, to keep an eye on the suite's time.
test: lint
	$(BIN)/pytest -q --durations=15

clean:
	rm -rf outputs .pytest_cache .ruff_cache
