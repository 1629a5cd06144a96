# One command each: `make demo` runs the whole pipeline on the built-in offline demo,
# `make test` runs the test suite. Both create the Python environment (.venv) when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# GPU=1 (`make env GPU=1`, `make demo GPU=1`): faiss-gpu (requirements-gpu.lock) instead of faiss-cpu.
GPU ?= 0
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu,)
FAISS_LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,)
# The venv's tools come first on PATH: Snakemake's jobs call `python -m landmarks.<stage>`.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo predict test env lint format dryrun report bench lock clean

env: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.lock requirements-gpu.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed $(VENV)/.installed-gpu
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
ifeq ($(GPU),1)
	$(BIN)/python -m pip uninstall --quiet --yes faiss-cpu
	grep -v "^faiss-cpu==" requirements.lock | $(BIN)/python -m pip install --quiet -r /dev/stdin -r requirements-gpu.lock
else
	$(BIN)/python -m pip uninstall --quiet --yes faiss-gpu
	$(BIN)/python -m pip install --quiet -r requirements.lock
endif
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, faiss; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available(), '| faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())"
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores all
	@cat results/summary.md

predict: $(STAMP)
	$(BIN)/snakemake --cores all predict
	@ls results/experiments/*/predict/index.html

# Two workers, one test module each at a time (pytest-xdist): the SLURM and workflow runs mostly wait
# (status polls, Snakemake start-ups) and the other modules run meanwhile; --no-loadscope-reorder keeps
# conftest.py's order, which starts those two first. The slowest 15: the suite must stay under 10 min on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# Lint clean means all four pass; `make format` applies ruff's and snakefmt's formatting.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench
	$(BIN)/snakefmt Snakefile rules

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
