# graftq developer entry points.
#
#   make demo    fresh machine -> venv -> run examples/quickstart.yaml -> report.html, results table
#   make test    install what the tests need, then ruff and the whole pytest suite
#   make lint    ruff only
#   make bench   benchmarks/run_all.py
#
# Everything runs from the virtual environment in $(VENV); the first target that
# needs it creates it. The install is skipped while the stamp file is newer than
# pyproject.toml, so a second `make test` goes straight to the checks.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graftq-installed

# torch goes in first with an exact pin: on these machines torch==2.13.0 resolves to the
# CPU build that lies on disk, whereas the worker extra's plain `torch>=2.2`, met with no
# torch installed, would pull a multi-GB CUDA build. Once 2.13.0 is present the extra is
# already satisfied and pip leaves it alone. Override on a GPU host: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= worker,dev

# Tests never reach a model hub: random presets only. One compute thread per process: the two
# test processes and the workers they start share the cores, and torch's default (a thread per
# core in every process) oversubscribes them.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
# Tests and the demo may start `graftq` or `celery` as subprocesses: the venv's come first.
VENV_PATH := PATH="$(abspath $(BIN)):$$PATH"
# Two test processes, one test file each at a time (pytest-xdist): much of the suite waits on
# worker subprocesses and Redis, so two processes use two cores; a file's tests stay in order.
PYTEST_ARGS ?= -q -n 2 --dist loadfile

.PHONY: demo test lint bench install redis-server chromium clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x "$(BIN)/python" || { \
	    test -n "$(PYTHON)" || { echo "make: no python3.11 or python3 on PATH" >&2; exit 1; }; \
	    echo "creating $(VENV) with $(PYTHON)"; \
	    "$(PYTHON)" -m venv "$(VENV)"; }
	"$(BIN)/python" -m pip install --quiet "$(TORCH_SPEC)"
	"$(BIN)/python" -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch "$@"

# The tests start their own redis-server on a free port; they only need the binary.
redis-server:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (Debian package)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null && \
	    command -v redis-server >/dev/null; \
	else \
	    echo "make: the tests need the redis-server binary on PATH." >&2; \
	    echo "      install it (e.g. 'sudo apt-get install redis-server' or 'brew install redis') and re-run." >&2; \
	    exit 1; \
	fi

# The report test opens the HTML report in a headless Chromium; it only needs the binary.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && \
	    command -v chromium >/dev/null; \
	else \
	    echo "make: the report test needs a chromium binary on PATH." >&2; \
	    echo "      install it (e.g. 'sudo apt-get install chromium') and re-run." >&2; \
	    exit 1; \
	fi

lint: install
	"$(BIN)/ruff" check .

# Both checks run even when the first fails, so one CI log shows every problem.
test: install redis-server chromium
	@status=0; \
	echo "ruff check ."; "$(BIN)/ruff" check . || status=1; \
	echo "pytest $(PYTEST_ARGS)"; $(VENV_PATH) $(TEST_ENV) "$(BIN)/pytest" $(PYTEST_ARGS) || status=1; \
	exit $$status

DEMO_BATCH ?= examples/quickstart.yaml
DEMO_REPORT ?= graftq-data/report.html

# The quickstart adapts a base model pre-trained to copy its input; the script trains it once
# (it does nothing while graftq-data/demo-base matches its recipe). The table is the batch just run,
# in the order its jobs ran.
demo: install
	$(VENV_PATH) "$(BIN)/python" scripts/pretrain_demo_base.py
	$(VENV_PATH) "$(BIN)/graftq" run $(DEMO_BATCH)
	$(VENV_PATH) "$(BIN)/graftq" report --metric exact_match --out $(DEMO_REPORT)
	@echo "report: $(abspath $(DEMO_REPORT))"
	@batch=$$($(VENV_PATH) "$(BIN)/graftq" results --format json --sort -created_at --limit 1 | \
	    "$(BIN)/python" -c 'import json, sys; print(json.load(sys.stdin)[0]["batch_id"])') && \
	$(VENV_PATH) "$(BIN)/graftq" results --batch "$$batch" --sort started_at

bench: install
	"$(BIN)/python" benchmarks/run_all.py

clean-venv:
	rm -rf "$(VENV)"
