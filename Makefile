# One command each: `make demo` runs the whole pipeline on the built-in offline demo,
# `make test` runs the test suite. Both create the Python environment (.venv) when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's tools come first on PATH: Snakemake's jobs call `python -m landmarks.<stage>`.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo predict test env lint dryrun report bench lock clean

env: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores all
	@cat results/summary.md

predict: $(STAMP)
	$(BIN)/snakemake --cores all predict
	@ls results/experiments/*/predict/index.html

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/snakemake --lint

dryrun: $(STAMP)
	$(BIN)/snakemake -n

report: $(STAMP)
	$(BIN)/snakemake --report report.html

lock: $(STAMP)
	( echo "# Every package the project needs, pinned (pip freeze of a working environment)."; \
	  echo "# torch/torchvision are CUDA builds (they also run on the CPU); regenerate with 'make lock'."; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -vi "^landmarks" \
	    | grep -viE "^($$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements-nodeps.lock | paste -sd'|' -))( @ |==)" \
	  ) > requirements.lock  # the packages of requirements-nodeps.lock stay in that file only

clean:
	rm -rf results/* .snakemake data/demo
	touch results/.gitkeep
