# berdiff developer commands. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override e.g. `make TORCH_SPEC="torch==2.14.1" test` for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# a Project-MONAI/model-zoo checkout and a local copy of its metadata schema (zoo-verify; SCHEMA also for test)
ZOO ?=
SCHEMA ?=

DEMO_ARGS ?=

.PHONY: install test demo bundles zoo-verify test-monailabel clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# SCHEMA=<meta_schema_20240725.json> also validates every bundle's metadata.json against the zoo's schema
test: $(VENV)/.installed
	BERDIFF_META_SCHEMA="$(SCHEMA)" $(PY) -m pytest -q $(PYTEST_ARGS) tests

# the whole job on built-in synthetic brain MRI: train both stages, anomaly maps as NIfTI, metrics, overview.png
demo: $(VENV)/.installed
	$(PY) -m berdiff demo --out outputs/demo $(DEMO_ARGS)

# self-contained release bundles: dist/<bundle>/ and dist/<bundle>.zip (configs, docs, weights, vendored berdiff)
bundles: $(VENV)/.installed
	$(PY) -m berdiff build_bundles --out dist

# the model zoo's own bundle checks on the built bundles, offline:
#   make zoo-verify ZOO=<Project-MONAI/model-zoo checkout> SCHEMA=<meta_schema_20240725.json>
zoo-verify: bundles
	test -n "$(ZOO)" -a -n "$(SCHEMA)" || { echo "usage: make zoo-verify ZOO=<model-zoo checkout> SCHEMA=<schema json>"; exit 2; }
	$(PY) .ci/zoo_verify.py --zoo $(ZOO) --dist dist --schema $(SCHEMA) --mode min
	$(PY) .ci/zoo_verify.py --zoo $(ZOO) --dist dist --schema $(SCHEMA) --mode full

# a real MONAI Label 0.8.5 server serving the built brain bundle (venv cached in ~/.cache/berdiff, keyed by its pins)
test-monailabel: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) BASE_PYTHON=$(PYTHON) .ci/test_monailabel.sh

clean:
	rm -rf $(VENV) build *.egg-info custom/*.egg-info .pytest_cache
