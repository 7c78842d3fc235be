# Two commands on a fresh machine with Python 3.11:  make run  |  make test
# Both install what they need first; a second call does not reinstall.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of PyTorch goes in first, so pip never pulls a multi-GB CUDA build.
# GPU users: make install TORCH_SPEC="torch" ORT_EXTRA=gpu  (keeps/gets a CUDA build, onnxruntime-gpu)
TORCH_SPEC ?= torch==2.13.0
ORT_EXTRA ?= cpu
STAMP := $(VENV)/.genflow-installed-$(ORT_EXTRA)

.PHONY: install browser run quick lint test test-fast bench ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(ORT_EXTRA),dev]"
	rm -f $(VENV)/.genflow-installed-*
	touch $@

install: $(STAMP)

run: install            ## the main job on the embedded defaults (MLflow on SQLite, local Prefect, local DVC remote)
	$(BIN)/genflow run

quick: install          ## the same chain with tiny budgets (a first look in minutes)
	$(BIN)/genflow run --quick

# The MLflow UI test drives Debian's chromium; installed only when missing and when root (else skipped).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "browser: not root, chromium not installed: the MLflow UI test will be skipped"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
	  || echo "browser: apt-get could not install chromium: the MLflow UI test will be skipped"; fi

lint: install           ## ruff (settings in pyproject.toml): a lint failure fails the tests
	$(BIN)/ruff check .

test: install browser   ## lint, then the whole test suite, real servers included
	$(BIN)/ruff check .
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

test-fast: install      ## lint, then unit tests only
	$(BIN)/ruff check .
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	for b in bench/bench_*.py; do OMP_WAIT_POLICY=PASSIVE $(BIN)/python $$b || exit 1; done

ui: install
	$(BIN)/genflow ui

clean:
	rm -rf $(VENV) .genflow
