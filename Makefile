# One-command set-up: `make demo` and `make test` install what a fresh Debian 12 machine
# lacks (system libraries as root, a .venv with the project) and are idempotent: stamp files
# under .stamps/ make a second run skip every install step. Without root nothing is
# apt-installed: see $(STAMPS)/deps.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
# FFCV 1.0.2 compiles against OpenCV and libjpeg-turbo, found with pkg-config: whoever
# installed them (apt, conda-forge, the cluster's modules). Only root runs apt-get, and only
# for what pkg-config does not find; anyone else gets one line saying what to install, and the
# project is installed without the [ffcv] extra (the torchvision backend runs everything).
FFCV_PC_MODULES := opencv4 libturbojpeg
APT_FOR_pkg-config := pkg-config
APT_FOR_opencv4 := libopencv-dev
APT_FOR_libturbojpeg := libturbojpeg0-dev
# A one-node Slurm on localhost for the launch-script tests (pytest -m slurm), and headless
# Chromium for the run-report test (tests/test_report.py opens the HTML): root only.
APT_TEST_PKGS := slurmctld slurmd slurm-client munge chromium
# Tested here: torch 2.14.1 + torchvision 0.29.1 (pip takes both from this machine's disk).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` and `make test-fast`: one per CPU, at most 4 (a DDP test
# starts two ranks of its own, so more workers only oversubscribe a small machine); none on one
# CPU. TEST_WORKERS=0 runs the suite in one process. tests/xdist_units.py says how tests are grouped.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 2 ? 0 : (n < 4 ? n : 4) )))
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
# The suite starts many `zoo` and python processes; where PYTHONDONTWRITEBYTECODE is set (some CI
# images and containers), each would compile this project's modules again (~0.7 s): compile once.
PRECOMPILE := $(PY) -m compileall -q zoo datamodules callbacks launch tests benchmarks >/dev/null
IS_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: setup demo test test-fast bench docs clean

setup: $(STAMPS)/venv

# Writes the pip extras the machine can build ("ffcv," or nothing) to $(STAMPS)/extras.
$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; command -v pkg-config >/dev/null 2>&1 || missing="pkg-config"; \
	for m in $(FFCV_PC_MODULES); do pkg-config --exists $$m 2>/dev/null || missing="$$missing $$m"; done; \
	missing=$$(echo $$missing); \
	if [ -n "$$missing" ] && [ "$(IS_ROOT)" = yes ] && command -v apt-get >/dev/null 2>&1; then \
	  pkgs=""; for m in $$missing; do case $$m in \
	    pkg-config) pkgs="$$pkgs $(APT_FOR_pkg-config)";; opencv4) pkgs="$$pkgs $(APT_FOR_opencv4)";; \
	    libturbojpeg) pkgs="$$pkgs $(APT_FOR_libturbojpeg)";; esac; done; \
	  echo "apt-get install$$pkgs"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null && missing=""; \
	fi; \
	if [ -z "$$missing" ]; then echo "ffcv," > $(STAMPS)/extras; else \
	  echo "ffcv needs $$missing (pkg-config): without root, 'conda install -c conda-forge opencv libjpeg-turbo pkg-config' (or 'module load' your cluster's OpenCV and libjpeg-turbo), then make setup again; installing without ffcv now, use --data.backend torchvision"; \
	  : > $(STAMPS)/extras; fi
	@touch $@

# The Slurm test cluster needs root (slurmctld/slurmd run as root); others skip it.
$(STAMPS)/test-deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for c in slurmctld slurmd sbatch munged chromium; do command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || echo $$c; done); \
	if [ -n "$$missing" ] && [ "$(IS_ROOT)" = yes ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "apt-get install $(APT_TEST_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST_PKGS) >/dev/null; \
	elif [ -n "$$missing" ]; then echo "no local Slurm or Chromium (needs root: apt-get install $(APT_TEST_PKGS)): the slurm tests and the report's browser test are skipped"; fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$$(cat $(STAMPS)/extras)dev,docs]"
	@touch $@

# The main job: generate the embedded dataset, write .beton files, train a small CNN on
# the CPU, print val/acc1 and where the checkpoint and logs are.
demo: setup
	$(VENV)/bin/zoo fit

test: setup $(STAMPS)/test-deps
	@$(PRECOMPILE)
	@if [ "$(IS_ROOT)" = yes ] && command -v slurmctld >/dev/null 2>&1; then launch/slurm/local_cluster.sh start; \
	 elif ! timeout 5 sinfo -h >/dev/null 2>&1; then echo "no Slurm here: pytest -m 'not slurm'"; \
	   exec $(PY) -m pytest $(XDIST) -m "not slurm" $(PYTEST_ARGS); fi; \
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Without the slow tests: the unmarked ones, each under 10 s (tests/time_limit.py fails one that is
# not: mark it slow; on a loaded machine ZOO_TEST_TIME_LIMIT=<seconds> raises the limit, 0 = off).
test-fast: setup
	@$(PRECOMPILE)
	$(PY) -m pytest $(XDIST) -m "not slow and not ddp and not slurm" $(PYTEST_ARGS)

# Every CPU benchmark table (augmentation, framework overhead, data- vs compute-bound, loader);
# the GPU script is `$(PY) benchmarks/gpu.py` (benchmarks/README.md).
bench: setup
	$(VENV)/bin/zoo bench

# The documentation site into site/ (mkdocs.yml; --strict: a warning or a dead link fails).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(STAMPS) runs .pytest_cache site
