# fedws — every target installs what it needs. PYTHON may point at a venv's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_PIN = torch==2.13.0
STAMP = .make-installed

.PHONY: install test lint types demo tutorial bench workers workers-stop coverage clean fuzz

# The pinned CPU torch goes first: a bare `torch` requirement would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo,dev,dp]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

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

# Start the federation in workers/ in the background; PIDs go to workers/run/.
workers: $(STAMP)
	$(PYTHON) examples/prepare_data.py
	$(PYTHON) -m fedws up workers/alice.toml workers/bob.toml workers/charlie.toml --run-dir workers/run

workers-stop:
	$(PYTHON) -m fedws down --run-dir workers/run

bench: $(STAMP)
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(STAMP) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# A long fuzz run of the decoder and Node.handle (10^6 frames, children isolate crashes).
FUZZ_FRAMES ?= 1000000
fuzz: $(STAMP)
	$(PYTHON) bench/fuzz.py --frames $(FUZZ_FRAMES)
