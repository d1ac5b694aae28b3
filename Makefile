# driftlane — `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATASETS ?= ../shared/datasets
DEMO_STORE ?= demo-store
DEMO_STREAM ?= demo-stream
DEMO_DATASETS ?= scifact cosqa cisi
PREFECT_HOME ?= $(CURDIR)/.prefect
PORT ?= 4200
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help env demo test test-all bench bench-gpu lint server clean

help: ## Show this help
	@echo "driftlane — continual retrieval sessions on Prefect"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The pinned CPU build first: an unpinned torch would pull a CUDA build of several GB.
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[cpu,dask,tensorboard,dev]'
	touch $(STAMP)

env: $(STAMP) ## Create .venv/ (CPU torch first) if it is missing or stale

demo: env ## Build a 3-session stream from real data and run every stage on it into ./demo-store
	$(BIN)/driftlane make-stream $(DEMO_DATASETS) --datasets-dir $(DATASETS) \
		--out $(DEMO_STREAM) --docs-per-session 150 --force
	$(BIN)/driftlane run-stream $(DEMO_STREAM)/*/ --store $(DEMO_STORE) --config configs/demo.toml
	$(BIN)/driftlane show --store $(DEMO_STORE)

test: env ## Run the test suite (slow tests deselected)
	$(BIN)/pytest

test-all: env ## Run every test, slow ones included
	$(BIN)/pytest -m ''

bench: env ## Run the benchmarks (CPU configuration) into benchmarks/results/
	$(BIN)/python -m benchmarks.embedding --out benchmarks/results/embedding_cpu.json
	$(BIN)/python -m benchmarks.clustering --out benchmarks/results/clustering_cpu.json
	$(BIN)/python -m benchmarks.prototypes --out benchmarks/results/prototypes_cpu.json
	$(BIN)/python -m benchmarks.continual --config small

bench-gpu: env ## Run the continual benchmark's GPU configuration (full stream, 3 seeds)
	$(BIN)/driftlane bench --config gpu

lint: env ## ruff over the code
	$(BIN)/ruff check flows tasks infra tests benchmarks

server: env ## Start a local Prefect server on 127.0.0.1 (PORT=4200)
	@echo "Prefect UI: http://127.0.0.1:$(PORT)"
	PREFECT_HOME=$(PREFECT_HOME) PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_API_PORT=$(PORT) $(BIN)/prefect server start

clean: ## Remove the demo store and caches (not .venv)
	rm -rf $(DEMO_STORE) $(DEMO_STREAM) .pytest_cache .ruff_cache
