"""Progress bars: a live bar on a terminal, a few plain lines in a log file or a pipe."""

import io
import re

from memtool import progress
from memtool.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(stream, steps=2000, **kw):
    bar = progress_bar(total=steps, file=stream, desc="train", **kw)
    for _ in range(steps):
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_a_bar_written_to_a_file_is_a_few_whole_lines():
    text = _run(io.StringIO())  # 2000 updates in well under a minute: the first and the last state
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train:   0%") and "2000/2000" in lines[1]
    assert text.endswith("\n")


def test_a_file_gets_a_line_per_log_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # every redraw is due
    lines = _run(io.StringIO(), steps=5, leave=False).splitlines()
    assert [line.split("|")[0].split()[-1] for line in lines] == ["0%", "20%", "40%", "60%", "80%", "100%"]


def test_a_terminal_keeps_the_live_bar():
    text = _run(_Terminal())
    assert "\r" in text and "2000/2000" in text


def test_memtool_train_into_a_log_file_writes_lines_not_redraws(tmp_path):
    """`memtool train ... > log 2>&1`: the epoch lines and a few bar lines, no carriage return."""
    import os
    import subprocess
    import sys

    log = tmp_path / "log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "memtool", "train", "--dataset", "digits", "--hidden", "16", "--epochs", "3",
                        "--eval-samples", "20", "--out", str(tmp_path / "run")], stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=600)
    raw = log.read_bytes()  # bytes: reading text would turn carriage returns into newlines
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert len(lines) <= 3 + 2 + 3  # the epochs, the bar's first and last line, the closing messages


def test_shared_work_shows_each_real_job_at_once_in_a_log(tmp_path, monkeypatch, capsys):
    """Jobs finished earlier return at once and their count waits; a job that works is shown as
    soon as it ends (not a minute later, after the next one), with the skipped ones counted, but
    its rate (the time left) is that of the jobs this run did: one of 0.1 s, not four."""
    import time

    from memtool import sharing

    monkeypatch.setattr(sharing, "SLOW_S", 0.05)
    sharing.shared(["a", "b", "c", "slow", "d"], "train", lambda j: time.sleep(0.1) if j == "slow" else None,
                   tmp_path / "claims", "models")
    lines = capsys.readouterr().err.splitlines()
    states = [line.split("|")[-1].split()[0] for line in lines]
    assert states == ["0/5", "4/5", "5/5"]
    value, unit = re.search(r"([\d.]+)(model/s|s/model)\]", lines[1]).groups()
    per_s = float(value) if unit == "model/s" else 1 / float(value)
    assert per_s <= 15, lines[1]  # one job in >= 0.1 s (at most 10/s), not four (about 40/s)
