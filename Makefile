# Every target sets up what it needs first: on a fresh clone `make demo` and `make test` are enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# A CPU-only machine still installs the registry's standard (CUDA) torch build: see pyproject.toml.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint protos image image-serve image-full clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# requirements.lock pins every package exactly; pyproject.toml holds ranges (docs/deploy.md).
	$(PIP_INSTALL) --constraint requirements.lock --editable '.[all,dev]'
	touch $(STAMP)

## demo: start a server on a local store, train on digits through it, predict with the result
demo: venv
	$(BIN)/convserve demo --store runs/demo/store

## test: lint, then the whole test suite (what CI runs)
test: venv lint
	$(BIN)/python -m pytest

## protos: regenerate service/convserve/pb from protos/ (a test fails while they are stale)
protos: venv
	$(BIN)/python protos/generate.py

## lint: ruff, hadolint, import-linter (the layers in pyproject.toml) and mypy, on the tree as it
## is: service/ and training/ each hold a portion of the `convserve` namespace package
lint: venv
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	PYTHONPATH=service:training $(BIN)/lint-imports
	$(BIN)/mypy

## image: build both container images with podman from a local Debian base (no Docker engine
## needed): localhost/convserve:serve (serving replicas, no torch) and localhost/convserve:full
## (serving + training). `--format docker` keeps the HEALTHCHECK (docs/deploy.md).
PODMAN_BUILD := ../shared/tools/podman-build . -- --format docker \
	--build-arg BASE_IMAGE=localhost/debian-python:bookworm

image: image-serve image-full

image-serve:
	TAG=localhost/convserve:serve $(PODMAN_BUILD) --target serve

image-full:
	TAG=localhost/convserve:full $(PODMAN_BUILD) --target full

clean:
	rm -rf runs build .pytest_cache .ruff_cache
