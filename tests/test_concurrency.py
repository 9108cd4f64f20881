"""Many processes on one run directory: claims, crash takeover, SIGKILL, Dask workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import DIGITS_FAST

import memtool
from memtool.estimator.store import claim, claim_path

KW = {**DIGITS_FAST, "epochs": 10}
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]


def _cli(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "memtool", "estimate", "--out", str(out), "--quiet", *FLAGS,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _trained(run) -> list[tuple[int, int]]:
    """(trial, pid) for every trial in the run's log."""
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(t, r["pid"]) for r in logs for t in range(r["trials"][0], r["trials"][1] + 1)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_processes_at_once_lose_nothing_and_train_nothing_twice(tmp_path):
    run = tmp_path / "run"
    procs = [_cli(run, "--trials=48", "--ensemble-size=2") for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    trials = [t for t, _ in _trained(run)]
    assert sorted(trials) == list(range(48))  # every trial, each once
    assert len({pid for _, pid in _trained(run)}) == 2  # both processes did part of the work
    assert not list((run / "claims").iterdir())  # every claim released
    memtool.estimate(tmp_path / "alone", trials=48, ensemble_size=2, progress=False, **KW)
    pd.testing.assert_frame_equal(memtool.load_scores(run), memtool.load_scores(tmp_path / "alone"))


def test_claims_of_dead_processes_are_taken_over_live_ones_respected(tmp_path):
    run = tmp_path / "run"
    (run / "claims").mkdir(parents=True)
    owners = {0: {"host": socket.gethostname(), "pid": _dead_pid()},  # died on this host
              1: {"host": "elsewhere", "pid": 1},  # another host, silent for too long
              2: {"host": socket.gethostname(), "pid": os.getpid()},  # alive: this very process
              3: {"host": "elsewhere", "pid": 1}}  # another host, heartbeat just now
    for t, owner in owners.items():
        claim_path(run, t).write_text(json.dumps({**owner, "since": 0}))
    old = time.time() - 3600
    os.utime(claim_path(run, 1), (old, old))
    got = claim(run, range(6))
    assert got.trials == [0, 1, 4, 5]
    got.release()

    s = memtool.estimate(run, trials=6, ensemble_size=3, progress=False, **KW)
    assert s["status"] == "partial" and s["missing_trials"] == 2 and s["held_by_others"] == 2
    assert sorted(t for t, _ in _trained(run)) == [0, 1, 4, 5]
    for t in (2, 3):  # their owners give up (or are gone): the next call trains them
        claim_path(run, t).unlink()
    assert memtool.estimate(run, trials=6, ensemble_size=3, progress=False, **KW)["status"] == "complete"
    assert sorted(t for t, _ in _trained(run)) == list(range(6))


def _kill_after_progress(proc, count, rng) -> bool:
    """SIGKILL ``proc`` at a point the test observed: once ``count()`` (trial files, epochs,
    saved batches) has grown twice past its value now, a random fraction of the time that
    last unit took later, so the kill lands in the next unit's work or in its write, at any
    machine speed. False if ``proc`` finished first."""
    seen, times = count(), []
    while len(times) < 2:
        if proc.poll() is not None:
            return False
        now = count()
        if now > seen:
            seen, times = now, times + [time.monotonic()]
        time.sleep(0.01)
    time.sleep(rng.uniform(0, times[1] - times[0]))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_sigkill_during_training_then_resume_gives_identical_scores(tmp_path):
    from memtool.estimator.store import trial_files

    run, rng = tmp_path / "run", np.random.default_rng(0)
    kills = 0
    while kills < 5:  # 24 trial files, each kill after two more: the run cannot finish before
        p = _cli(run, "--trials=48", "--ensemble-size=2")
        assert _kill_after_progress(p, lambda: len(trial_files(run)), rng), p.stderr.read().decode()
        kills += 1
    p = _cli(run, "--trials=48", "--ensemble-size=2")
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    stored = [t for first, last, _ in trial_files(run) for t in range(first, last + 1)]
    assert sorted(stored) == list(range(48))  # each trial in exactly one file
    memtool.estimate(tmp_path / "alone", trials=48, ensemble_size=2, progress=False, **KW)
    pd.testing.assert_frame_equal(memtool.load_scores(run), memtool.load_scores(tmp_path / "alone"))


def test_dask_workers_load_the_data_themselves(tmp_path):
    distributed = pytest.importorskip("distributed")
    from memtool.estimator.run import load_data

    kw = dict(trials=8, ensemble_size=2, progress=False, **{**DIGITS_FAST, "epochs": 2})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        s = memtool.estimate(tmp_path / "dask", scheduler=c.scheduler_address, **kw)
        loads = client.run(lambda: load_data.cache_info().misses)
    assert s["status"] == "complete" and s["n_trials"] == 8
    assert sum(loads.values()) >= 1 and max(loads.values()) == 1  # once per worker that got work
    memtool.estimate(tmp_path / "local", **kw)
    pd.testing.assert_frame_equal(memtool.load_scores(tmp_path / "dask"), memtool.load_scores(tmp_path / "local"))


def _memtool(*args):
    return subprocess.Popen([sys.executable, "-m", "memtool", *map(str, args), "--quiet"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


TRAIN = ["--dataset", "mnist", "--limit", "2000", "--model", "mlp", "--method", "pgd-at", "--eps", "0.1",
         "--pgd-steps", "3", "--epochs", "8", "--batch-size", "64", "--eval-samples", "200"]


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _done(path) -> int:
    try:
        with np.load(path) as z:
            return int(z["done"].sum())
    except (OSError, ValueError, KeyError):  # not there yet
        return 0


def test_train_and_evaluate_resume_after_sigkill(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    run = tmp_path / "train"
    kills = 0
    for _ in range(6):  # killed in epoch 3 or later, each resumed run two epochs on at least
        p = _memtool("train", *TRAIN, "--out", run)
        if not _kill_after_progress(p, lambda: _lines(run / "log.jsonl"), rng):
            assert p.returncode == 0, p.stderr.read().decode()
            break
        kills += 1
    assert kills >= 2
    assert _memtool("train", *TRAIN, "--out", run).wait() == 0
    alone = _memtool("train", *TRAIN, "--out", tmp_path / "alone")
    assert alone.wait() == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (run, tmp_path / "alone"))
    assert a["epoch"] == b["epoch"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise the uninterrupted model

    ev = ["evaluate", run, "--attacks", "clean,pgd30", "--n-samples", "1500", "--batch-size", "100"]
    state = tmp_path / "ev" / "state" / "pgd30.npz"
    kills = 0
    for _ in range(4):  # 15 batches of pgd30
        p = _memtool(*ev, "--out", tmp_path / "ev")
        if not _kill_after_progress(p, lambda: _done(state), rng):
            break
        kills += 1
    assert kills >= 1
    assert _memtool(*ev, "--out", tmp_path / "ev").wait() == 0
    assert _memtool(*ev, "--out", tmp_path / "ev-alone").wait() == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ev" / "per_sample.parquet"),
                                  pd.read_parquet(tmp_path / "ev-alone" / "per_sample.parquet"))
