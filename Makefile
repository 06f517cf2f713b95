# DefectOps developer entry points. `make run` and `make test` create .venv with pinned dependencies when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS := --disable-pip-version-check -q
export MLFLOW_DISABLE_TELEMETRY := true
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: run test unit lint typecheck bench clean help .venv-triton .venv-checkov

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install $(PIP_FLAGS) -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install $(PIP_FLAGS) -c requirements.lock -e ".[test]"
	touch $@

# The real Triton Inference Server for the serving tests (tests/triton_backend/server.py): the tritonserver binary of
# the nvidia-pytriton wheel, in a venv of its own because its python backend needs numpy<2. Exact pins, no project.
TRITON_VENV := .venv-triton
TRITON_REQS := tests/triton_backend/requirements.txt

$(TRITON_VENV)/.installed: $(TRITON_REQS)
	rm -rf $(TRITON_VENV)
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r $(TRITON_REQS)
	$(TRITON_VENV)/bin/pip check $(PIP_FLAGS)
	touch $@

.venv-triton: $(TRITON_VENV)/.installed  ## the Triton server venv the serving tests start tritonserver from

# checkov for the Terraform tests (tests/test_terraform.py): a venv of its own because checkov pins an old boto3.
CHECKOV_VENV := .venv-checkov
CHECKOV_REQS := terraform/ci/checkov-requirements.txt

$(CHECKOV_VENV)/.installed: $(CHECKOV_REQS)
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r $(CHECKOV_REQS)
	$(CHECKOV_VENV)/bin/pip check $(PIP_FLAGS)
	touch $@

.venv-checkov: $(CHECKOV_VENV)/.installed  ## the checkov venv the Terraform tests scan terraform/ with

run: $(VENV)/.installed  ## train, gate, register and export on the embedded synthetic data (ARGS="key=value ...")
	$(BIN)/defectops run $(ARGS)

test: $(VENV)/.installed-test $(TRITON_VENV)/.installed $(CHECKOV_VENV)/.installed  ## run the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(VENV)/.installed-test $(CHECKOV_VENV)/.installed  ## the unit tests alone (tests/unit, no servers, no trained run)
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

# mypy reads packages from folders, not through setuptools' editable import hook: it checks `defectops` through a view
# of symlinks (build/namespace/defectops/<package> -> <package>/) that mirrors the installed names.
NAMESPACE_VIEW := build/namespace/defectops
PACKAGES := core pipelines training evaluation registry serving

$(NAMESPACE_VIEW):
	mkdir -p $@
	for p in $(PACKAGES); do ln -sfn ../../../$$p $@/$$p; done

lint: $(VENV)/.installed-test $(NAMESPACE_VIEW)  ## ruff, mypy and the import-layer contracts (lint-imports)
	$(BIN)/ruff check .
	MYPYPATH=build/namespace $(BIN)/mypy
	$(BIN)/lint-imports

bench: $(VENV)/.installed  ## wall time of each step of the default run
	$(BIN)/python benchmarks/bench_run.py

clean:  ## remove the venvs and the default home
	rm -rf $(VENV) $(TRITON_VENV) $(CHECKOV_VENV) defectops-home
