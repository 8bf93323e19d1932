# fedws — every target installs what it needs. PYTHON may point at a venv's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_PIN = torch==2.13.0
STAMP = .make-installed

.PHONY: install test lint types demo bench workers workers-stop coverage clean

# The pinned CPU torch goes first: a bare `torch` requirement would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo,dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	$(PYTHON) -m ruff check fedws tests bench examples

types: $(STAMP)
	$(PYTHON) -m mypy fedws

coverage: $(STAMP)
	$(PYTHON) -m pip install -q coverage
	$(PYTHON) -m coverage run -m pytest -q && $(PYTHON) -m coverage report

demo: $(STAMP)
	$(PYTHON) examples/remote_tensors.py

bench: $(STAMP)
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(STAMP) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
