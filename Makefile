# driftlane — `make demo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATASETS ?= ../shared/datasets
DEMO_STORE ?= demo-store
PREFECT_HOME ?= $(CURDIR)/.prefect
PORT ?= 4200
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.DEFAULT_GOAL := help
.PHONY: help env demo test test-all bench lint server clean

help: ## Show this help
	@echo "driftlane — continual retrieval sessions on Prefect"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The pinned CPU build first: an unpinned torch would pull a CUDA build of several GB.
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[cpu,dev]'
	touch $(STAMP)

env: $(STAMP) ## Create .venv/ (CPU torch first) if it is missing or stale

demo: env ## Run a two-session stream (cisi, npl_vaswani) on real data into ./demo-store
	$(BIN)/driftlane run-stream $(DATASETS)/cisi $(DATASETS)/npl_vaswani --store $(DEMO_STORE)
	$(BIN)/driftlane show --store $(DEMO_STORE)

test: env ## Run the test suite (slow tests deselected)
	$(BIN)/pytest

test-all: env ## Run every test, slow ones included
	$(BIN)/pytest -m ''

bench: env ## Run the benchmarks (CPU configuration) into benchmarks/results/
	$(BIN)/python -m benchmarks.embedding --out benchmarks/results/embedding_cpu.json
	$(BIN)/python -m benchmarks.clustering --out benchmarks/results/clustering_cpu.json
	$(BIN)/python -m benchmarks.prototypes --out benchmarks/results/prototypes_cpu.json

lint: env ## ruff over the code
	$(BIN)/ruff check flows tasks infra tests benchmarks

server: env ## Start a local Prefect server on 127.0.0.1 (PORT=4200)
	@echo "Prefect UI: http://127.0.0.1:$(PORT)"
	PREFECT_HOME=$(PREFECT_HOME) PREFECT_SERVER_API_HOST=127.0.0.1 \
	PREFECT_SERVER_API_PORT=$(PORT) $(BIN)/prefect server start

clean: ## Remove the demo store and caches (not .venv)
	rm -rf $(DEMO_STORE) .pytest_cache .ruff_cache
