# One-command set-up: `make demo` and `make test` install what a fresh Debian 12 machine
# lacks (apt packages, a .venv with the project) and are idempotent: stamp files under
# .stamps/ make a second run skip every install step.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# FFCV 1.0.2 compiles against libturbojpeg and OpenCV, found with pkg-config.
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
# A one-node Slurm on localhost for the launch-script tests (pytest -m slurm).
APT_TEST_PKGS := slurmctld slurmd slurm-client munge
# Tested here: torch 2.14.1 + torchvision 0.29.1 (pip takes both from this machine's disk).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

setup: $(STAMPS)/venv

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PKGS) $(APT_TEST_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[ffcv,dev]"
	@touch $@

# The main job: generate the embedded dataset, write .beton files, train a small CNN on
# the CPU, print val/acc1 and where the checkpoint and logs are.
demo: setup
	$(VENV)/bin/zoo fit

test: setup
	launch/slurm/local_cluster.sh start
	$(PY) -m pytest $(PYTEST_ARGS)

# Without the slow tests (a few seconds to a minute).
test-fast: setup
	$(PY) -m pytest -m "not slow and not ddp and not slurm" $(PYTEST_ARGS)

# Every CPU benchmark table (augmentation, framework overhead, data- vs compute-bound, loader);
# the GPU script is `$(PY) benchmarks/gpu.py` (benchmarks/README.md).
bench: setup
	$(VENV)/bin/zoo bench

clean:
	rm -rf $(STAMPS) runs .pytest_cache
