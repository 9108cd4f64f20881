"""Work that several processes share through claim files: run the same command once per core
(``OMP_NUM_THREADS=1``) or per GPU, and each job is done by one of them.

    shared(jobs, "train", fit_one, claims=OUT / "claims", desc="train", name=lambda j: f"{j[0]}-s{j[1]}")
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .estimator.store import holding
from .progress import progress_bar

POLL_S = 30.0  # how often a process waits for the jobs another one is working on
SLOW_S = 1.0  # a job that took longer did work (a finished one returns at once): the bar shows it at once


def shared(jobs, step: str, fn, claims: Path, desc: str, name=str, progress: bool = True, unit: str = "model") -> None:
    """``fn(job)`` for every job (``fn`` resumes: on a finished job it returns at once), as one
    of any number of processes running the same command: a job another live process is on (its
    claim CLAIMS/NAME.STEP.claim, NAME = ``name(job)``) is skipped, then waited for, and taken
    over if that process dies; so when this returns, every job is done. The bar's rate (and so
    its time left) counts the jobs done since it started: those recorded before it, which return
    at once before any job works, are in its count but not in its rate."""
    bar = progress_bar(total=len(jobs), desc=desc, unit=unit, disable=not progress, smoothing=0)  # rate: n - initial
    said, worked = None, False
    while jobs:
        busy = []
        for job in jobs:
            with holding(Path(claims) / f"{name(job)}.{step}.claim") as mine:
                if mine:
                    t0 = time.monotonic()
                    fn(job)
                    slow = time.monotonic() - t0 > SLOW_S
                    if not (slow or worked or bar.disable):  # recorded before this invocation
                        bar.initial += 1
                    worked |= slow
                    bar.update()
                    if slow:  # real work: shown now, with the finished jobs skipped before it
                        bar.refresh()
                else:
                    busy.append(job)
        if busy and busy != said and progress:  # said again only when the set of held jobs changes
            said = busy
            bar.write(f"{desc}: waiting for {len(busy)} {unit}(s) other processes hold (claims in {claims}; "
                      "delete the claim of a process that is gone)", file=sys.stderr)
        if busy:
            time.sleep(POLL_S)
        jobs = busy
    bar.close()
