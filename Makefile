# The two commands of the README: `make bench` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: setup test bench lint

# torch first, pinned to the CPU build this machine kind ships, and only when no torch is present:
# a bare `torch` requirement on a machine without it pulls a multi-GB CUDA build.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev,bench]"

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m subquad bench all --preset quick

lint: setup
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m ruff format --check src tests
