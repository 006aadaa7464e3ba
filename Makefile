# Every target sets up what it needs first: on a fresh clone `make demo` and `make test` are enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# A CPU-only machine still installs the registry's standard (CUDA) torch build: see pyproject.toml.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint protos image clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# requirements.lock pins every package exactly; pyproject.toml pins the direct ones by minor.
	$(PIP_INSTALL) --constraint requirements.lock --editable '.[dev]'
	touch $(STAMP)

## demo: start a server on a local store, train on digits through it, predict with the result
demo: venv
	$(BIN)/convserve demo --store runs/demo/store

## test: lint, then the whole test suite (what CI runs)
test: venv lint
	$(BIN)/python -m pytest

## protos: regenerate service/pb from protos/ (a test fails while they are stale)
protos: venv
	$(BIN)/python protos/generate.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

## image: build the container with podman from a local Debian base (no Docker engine needed)
image:
	../shared/tools/podman-build . -- --format docker --build-arg BASE_IMAGE=localhost/debian-python:bookworm

clean:
	rm -rf runs .pytest_cache .ruff_cache
