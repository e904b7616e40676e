# Two commands set everything up: `make train` and `make test`.
# Each creates .venv if missing and installs the project with the pinned, tested versions.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: install train test test-fast lint format ui serve server clean

install: $(STAMP)

NATIVE_SOURCES := $(wildcard src/pocketgpt/native/csrc/*.cpp src/pocketgpt/native/csrc/*.hpp)

$(STAMP): pyproject.toml constraints.txt setup.py src/pocketgpt/tokenizer/_bpe_core.c $(NATIVE_SOURCES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m pocketgpt.train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# Everything but the tests that train or spawn processes (marked slow): under 2 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Opens the MLflow UI on the local store that `make train` writes to.
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

# Serves a logged model over HTTP (MLflow's scoring server), read from the same ./mlruns store.
MODEL ?= models:/pocketgpt@best
PORT  ?= 5001
serve: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db \
		$(BIN)/mlflow models serve -m $(MODEL) \
		--env-manager local -h 127.0.0.1 -p $(PORT)

# A tracking server for a team: SQLite and artifacts in ./mlserver, artifacts proxied over HTTP.
# Point training at it with tracking.uri=http://HOST:$(SERVER_PORT) (or MLFLOW_TRACKING_URI).
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5050
server: $(STAMP)
	mkdir -p mlserver
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
		--backend-store-uri sqlite:///mlserver/mlflow.db \
		--artifacts-destination mlserver/artifacts --serve-artifacts \
		--host $(SERVER_HOST) --port $(SERVER_PORT) --workers 1

clean:
	rm -rf outputs multirun .cache
