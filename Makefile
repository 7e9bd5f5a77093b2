# Quick start:  make demo   (train + evaluate DiffMIC on HAM10000 on a CPU, about 14 min on 2 cores)
#               make test   (the test suite)
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.diffmic-installed
# HAM10000 for the demo: ../shared/data when it is there, else data/ (downloaded by `make demo-data`)
DATA    ?= $(if $(wildcard ../shared/data/ham10000),../shared/data,data)

.PHONY: venv demo demo-data test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the builds this machine serves from disk
	$(VPY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -q -e ".[test,weights]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP) demo-data
	# the demo starts afresh each time: --overwrite removes only the files an earlier demo wrote
	$(VENV)/bin/diffmic fit --overwrite --config src/diffmic/configs/demo_cpu.yaml data.root=$(DATA)/ham10000 run.dir=runs/demo
	$(VENV)/bin/diffmic test --run runs/demo

# HAM10000: used as is when $(DATA)/ham10000 exists, downloaded there otherwise (about 3 GB)
demo-data: $(STAMP)
	test -d $(DATA)/ham10000 || $(VENV)/bin/diffmic data download ham10000 --root $(DATA)

# lint (ruff check + format check, mypy on the whole package and the benchmarks), then the test suite
test: lint
	$(VPY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check --no-cache src tests benchmarks
	$(VENV)/bin/ruff format --no-cache --check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VPY) benchmarks/run_all.py

# the decoded-image cache only: runs/ holds trained models (yours too), delete what you no longer need
clean:
	rm -rf .cache/diffmic
