# Every target sets up what it needs first: on a fresh clone `make demo` and `make test` are enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LAYOUT := build/layout
# A CPU-only machine still installs the registry's standard (CUDA) torch build: see pyproject.toml.
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: venv demo test lint layout protos image image-serve image-full clean

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

## protos: regenerate service/pb from protos/ (a test fails while they are stale)
protos: venv
	$(BIN)/python protos/generate.py

lint: venv layout
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	cd $(LAYOUT) && $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml
	cd $(LAYOUT) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml

## layout: the package as the wheel lays it out (service/ is convserve, training/ convserve.training),
## for the tools that read files instead of importing through the editable install
layout:
	rm -rf $(LAYOUT) && mkdir -p $(LAYOUT)
	cp -r service $(LAYOUT)/convserve && cp -r training $(LAYOUT)/convserve/training
	find $(LAYOUT) -name __pycache__ -prune -exec rm -rf {} +

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
