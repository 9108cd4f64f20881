"""Run-directory I/O shared by every job (estimate, train, evaluate, import, analyses).

- :func:`atomic_write`: write to a temporary name in the same folder, fsync, rename; a file
  under its final name is always complete.
- :func:`write_json` / :func:`read_json`.
- :func:`write_table` / :func:`read_table`: parquet with memtool's settings as JSON in the
  key-value metadata (key ``memtool``), so a table explains itself (``df.attrs["memtool"]``).
- :func:`open_settings`: create-or-compare. The first call writes ``settings`` to a JSON file;
  a later call with other settings raises :class:`RunMismatchError` naming each differing
  field, so results made with different settings never mix.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"memtool"
SCHEMA_KEY = b"memtool.schema_version"
SCHEMA_VERSION = 1  # of every parquet table memtool writes: bump when a column changes meaning or goes


class RunMismatchError(ValueError):
    """A run directory was reopened with different settings or data."""


def atomic_write(path: str | os.PathLike, write: Callable) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)  # the file the user knows, not the temporary one
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(e: OSError, out_flag: bool = True) -> str | None:
    """What to tell a user whose output could not be written (disk full, read-only), or None
    for other errors. Every memtool file is written by :func:`atomic_write`, so a failed write
    leaves nothing under the final name and finished work (earlier files) is kept.
    ``out_flag``: whether the command has ``--out`` (``memtool scores`` writes into its RUN)."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in _FULL:
        return (f"cannot write{where}: the disk is full ({e.strerror}); nothing was half-written. Free space or "
                "choose another output directory, then run the same command again: finished work is kept")
    if e.errno in _READ_ONLY:
        fix = "Choose a writable one (--out) or fix" if out_flag else "Copy the run directory somewhere writable, or fix"
        return (f"cannot write{where}: {e.strerror}; the output directory is not writable. {fix} its permissions; "
                "nothing was half-written")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and out_flag:
        return f"cannot write{where}: a file stands where the output directory should be; choose another --out"
    return None


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    return atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def write_table(df: pd.DataFrame, path: str | os.PathLike, metadata: dict) -> Path:
    """``df`` as parquet with ``metadata`` (JSON) and the table format's ``schema_version``
    in the file's key-value metadata (``df.attrs`` after :func:`read_table`)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata, default=str).encode()
    meta[SCHEMA_KEY] = str(SCHEMA_VERSION).encode()
    return atomic_write(path, lambda f: pq.write_table(table.replace_schema_metadata(meta), f))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    table = pq.read_table(path)
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(META_KEY)
    df.attrs["memtool"] = json.loads(raw) if raw else {}
    version = (table.schema.metadata or {}).get(SCHEMA_KEY)
    df.attrs["schema_version"] = int(version) if version else None  # None: written before versions
    return df


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts, field by field (nested dicts
    are compared field by field too)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: run has {a!r}, this call asks for {b!r}")
    return out


def check_settings(old: dict, new: dict, where: str | os.PathLike, what: str = "settings") -> None:
    """Raise :class:`RunMismatchError` naming every field where ``old`` and ``new`` differ."""
    diffs = diff_settings(old, new)
    if diffs:
        raise RunMismatchError(f"{where} holds a run with other {what}:\n  " + "\n  ".join(diffs)
                               + "\nUse a new --out directory, or repeat the run's settings to resume it.")


def open_settings(path: str | os.PathLike, settings: dict, what: str = "settings") -> dict:
    """Create ``path`` (a JSON file) holding ``settings``, or check that it holds the same ones."""
    path = Path(path)
    if path.exists():
        old = read_json(path)
        check_settings(old, settings, path.parent, what)
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
    return settings
