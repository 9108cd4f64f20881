"""Estimate on a Dask cluster: trial batches become Dask tasks; each worker loads the dataset
itself (by name and data root, once per worker process) and writes its trial files into the
shared run directory, claiming each trial first.

    dask scheduler                                   # on one machine: tcp://HOST:8786
    dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1   # on every GPU machine, one per GPU
    python docs/cluster/dask_estimate.py tcp://HOST:8786

The same from the command line:

    memtool estimate --scheduler tcp://HOST:8786 --out runs/cifar100/estimate --data-root /shared/datasets ...

The run directory and the data root must be paths every worker sees (a shared file system).
Interrupting the client or losing workers loses at most the batches in flight: run the same
command again. Tested with a LocalCluster of 2 worker processes (tests/test_concurrency.py).
"""

import sys

import memtool

if __name__ == "__main__":
    summary = memtool.estimate(
        "runs/cifar100/estimate", scheduler=sys.argv[1], data_root="/shared/datasets", device="cuda",
        dataset="cifar100", trials=4000, ratio=0.7, seed=0, model="preact-resnet18", epochs=40,
        batch_size=256, lr=0.2, momentum=0.9, weight_decay=0.0005, schedule="onecycle", precision="bf16",
        ensemble_size=1)
    print(summary["status"], summary.get("n_trials"))
