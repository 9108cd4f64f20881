"""Progress bars that suit where they are written.

On a terminal (and in a notebook) :func:`progress_bar` is tqdm's live bar. Written to a file
or a pipe (``nohup memtool train ... > log``) the same bar becomes a plain line about once a
minute (:data:`LOG_INTERVAL` seconds) plus the first and the last, instead of a
carriage-return redraw every 0.1 s for the whole run. Every bar in memtool is made here.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 60.0  # seconds between two lines of a bar written to a file or pipe


class _Lines:
    """A text stream for tqdm that writes each redraw of a bar as one line: the carriage
    returns, the padding and the cursor moves that redraw it in place are dropped."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").replace("\x1b[A", "").strip()
        if s:
            self._stream.write(s + "\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, fileno, ...: the stream's
        return getattr(self._stream, name)


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``; to a stream that is not a terminal (``file``, default
    stderr), one line per redraw and a redraw at most every :data:`LOG_INTERVAL` seconds."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    console = not any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # a notebook's bar is a widget
    if console and not (isatty and isatty()):
        kwargs.update(file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, dynamic_ncols=False)
    return tqdm(iterable, **kwargs)
