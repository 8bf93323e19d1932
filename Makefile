# fedws — every target installs what it needs, into a project virtual environment (.venv),
# so it works on a Python whose site-packages is managed by the system (PEP 668: Debian,
# Ubuntu) as well as in CI. `make PYTHON=/path/to/python ...` uses that interpreter instead.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  ifeq ($(shell $(SYSTEM_PYTHON) -c "import venv, ensurepip" 2>/dev/null && echo yes),yes)
    PYTHON := $(VENV)/bin/python
    PYTHON_DEP := $(PYTHON)
  else
    $(info make: $(SYSTEM_PYTHON) has no venv module (Debian/Ubuntu: apt install python3-venv); installing into $(SYSTEM_PYTHON) itself)
    PYTHON := $(SYSTEM_PYTHON)
  endif
endif
PIP = $(PYTHON) -m pip
TORCH_PIN = torch==2.13.0
STAMP = $(if $(PYTHON_DEP),$(VENV)/.fedws-installed,.make-installed)

.PHONY: install test lint types demo tutorial bench workers workers-stop coverage clean fuzz notebook docs

$(VENV)/bin/python:
	$(SYSTEM_PYTHON) -m venv $(VENV)

# The pinned CPU torch goes first: a bare `torch` requirement would pull CUDA wheels.
$(STAMP): pyproject.toml Makefile $(PYTHON_DEP)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo,dev,dp,docs,sandbox,secagg,compress]"
	@touch $(STAMP)

install: $(STAMP)

# Two pytest workers, one test file each at a time (module fixtures stay in one process):
# much of the suite waits on node processes starting, so two workers overlap on 2 cores.
test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(PYTHON) -m ruff check fedws tests bench examples

types: $(STAMP)
	$(PYTHON) -m mypy --strict fedws

coverage: $(STAMP)
	$(PYTHON) -m pip install -q coverage
	$(PYTHON) -m coverage run -m pytest -q && $(PYTHON) -m coverage report

# The main job: a federation of worker nodes trained with FedAvg (starts and stops its nodes).
demo: $(STAMP)
	$(PYTHON) examples/federated_demo.py

tutorial: $(STAMP)
	$(PYTHON) examples/remote_tensors.py

# Start the federation in workers/ in the background; PIDs go to workers/run/. Safe to repeat:
# running nodes are left alone (and say so), the data is prepared once.
workers/data/manifest.json: $(STAMP)
	$(PYTHON) examples/prepare_data.py

workers: $(STAMP) workers/data/manifest.json
	$(PYTHON) -m fedws up workers/alice.toml workers/bob.toml workers/charlie.toml --run-dir workers/run

# Needs nothing installed: stopping nodes is plain Python (works even after `make clean`).
workers-stop:
	$(if $(wildcard $(PYTHON)),$(PYTHON),$(SYSTEM_PYTHON)) -m fedws down --run-dir workers/run

bench: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) bench/run_all.py

# Jupyter and ipywidgets (FedAvg's progress bar in a notebook), then the tutorials' notebooks.
notebook: $(STAMP)
	$(PIP) install -q -e ".[notebook]"
	$(PYTHON) -m jupyter notebook examples/

# The documentation site (docs/, mkdocs.yml); warnings are errors, as in tests/deploy.
docs: $(STAMP)
	$(PYTHON) -m mkdocs build --strict --site-dir site

clean:
	rm -rf .make-installed $(VENV)/.fedws-installed .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# A long fuzz run of the decoder and Node.handle (10^6 frames, children isolate crashes).
FUZZ_FRAMES ?= 1000000
fuzz: $(STAMP)
	$(PYTHON) bench/fuzz.py --frames $(FUZZ_FRAMES)
