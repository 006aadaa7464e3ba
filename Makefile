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

## image: build both container images from the Dockerfile, with docker or podman (whichever is
## installed; docker first): convserve:serve (serving replicas, no torch) and convserve:full
## (serving + training), the names deploy/compose.yaml uses. `make image-serve`, `make image-full`:
## one each. Overrides: ENGINE=docker|podman; BASE_IMAGE=... (empty: the Dockerfile's default,
## python:3.11-slim-bookworm; any image with Python 3.11); IMAGE=... (the name before `:serve`).
## With podman, `--format docker` keeps the HEALTHCHECK (OCI, podman's default, drops it).
ENGINE     ?= $(firstword $(foreach e,docker podman,$(if $(shell command -v $(e) 2>/dev/null),$(e))))
BASE_IMAGE ?=
IMAGE      ?= convserve
# One line and a non-zero status when no engine can build: make's $(error), expanded in the recipe.
IMAGE_NEEDS_ENGINE = $(if $(ENGINE),$(if $(shell command -v $(ENGINE) 2>/dev/null),,$(error make image: ENGINE=$(ENGINE) is not installed; set ENGINE=docker or ENGINE=podman)),$(error make image: needs docker or podman (neither is installed); set ENGINE=... to choose one))
IMAGE_BUILD = $(strip $(ENGINE) build $(if $(filter podman,$(notdir $(ENGINE))),--format docker) \
	$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)))

image: image-serve image-full

image-serve:
	$(IMAGE_NEEDS_ENGINE)$(IMAGE_BUILD) --target serve --tag $(IMAGE):serve .

image-full:
	$(IMAGE_NEEDS_ENGINE)$(IMAGE_BUILD) --target full --tag $(IMAGE):full .

clean:
	rm -rf runs build .pytest_cache .ruff_cache
