"""The docs check: README.md and docs/*.md say only what runs and link only what exists.

- Every `memtool ...` and `python -m ...` command in their code blocks (and in inline code)
  names a subcommand or module that runs with --help, and every --flag it uses is one that
  --help lists. The helps run in one subprocess of this interpreter (the venv's python), so the
  check costs one import of memtool; the `memtool` entry point itself is run once.
- Every `memtool.NAME` a python code block uses exists.
- Every relative link points to an existing file, and an anchor (#section) to a heading there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"^(?:\S*/)?(memtool|python3?\s+-m\s+([\w.]+))(?=\s|$)(.*)$")
FLAG = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _strip_code(text: str) -> str:
    """The prose of a page: fenced blocks blanked (line count kept), inline code removed."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE.sub("", text)


def _command_lines(text: str) -> list[str]:
    """Candidate command lines: every line of a fenced block (continuations joined) and every
    inline code span."""
    lines = []
    for _lang, body in FENCE.findall(text):
        lines += re.sub(r"\\\n\s*", " ", body).splitlines()
    lines += INLINE.findall(FENCE.sub("", text))
    return lines


def _parse(line: str):
    """(key, flags) of a memtool / python -m command line, or None. key: ("memtool", sub or
    None) or ("module", name)."""
    line = re.sub(r"^\s*\$\s+", "", line.strip())
    line = re.sub(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+", "", line)  # leading VAR=value assignments
    m = COMMAND.match(line)
    if not m:
        return None
    rest = re.split(r"\s#", m.group(3), maxsplit=1)[0]  # a trailing shell comment
    if m.group(2):
        key = ("module", m.group(2))
    else:
        words = rest.split()
        key = ("memtool", words[0] if words and not words[0].startswith("-") and words[0] != "..." else None)
    return key, sorted({f.split("=")[0] for f in FLAG.findall(rest)})


def documented_commands() -> dict:
    """key -> [(page, flags, line)] over README.md and docs/*.md."""
    found: dict = {}
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            parsed = _parse(line)
            if parsed:
                key, flags = parsed
                found.setdefault(key, []).append((_rel(page), flags, line.strip()))
    return found


def api_names() -> dict:
    """Dotted memtool names used by the python code blocks -> the pages that use them."""
    found: dict = {}
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang.strip() not in ("python", "py"):
                continue
            names = set(re.findall(r"(?<![\w.])(memtool(?:\.\w+)+)", body))
            for mod, imported in re.findall(r"^\s*from\s+(memtool[\w.]*)\s+import\s+([^\n#]+)", body, re.MULTILINE):
                names |= {f"{mod}.{n.strip()}" for n in imported.strip("() ").split(",") if n.strip()}
            for n in names:
                found.setdefault(n, set()).add(_rel(page))
    return found


HELPER = r"""
import contextlib, importlib, io, json, runpy, sys
keys, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
from memtool.cli import main
out = {}
for kind, name in keys:
    buf, code = io.StringIO(), None
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if kind == "memtool":
                main(([name] if name else []) + ["--help"])
            else:
                sys.argv = [name, "--help"]
                runpy.run_module(name, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    out[f"{kind} {name}"] = {"code": code, "text": buf.getvalue()}
missing = []
for dotted in names:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            missing.append(dotted)
            break
print(json.dumps({"helps": out, "missing": missing}))
"""


@pytest.fixture(scope="module")
def helps():
    commands = documented_commands()
    names = api_names()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", HELPER, json.dumps(sorted(commands, key=str)),
                           json.dumps(sorted(names))], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return commands, names, json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_docs_name_commands():
    commands = documented_commands()
    assert ("memtool", "estimate") in commands and ("memtool", "figures") in commands
    assert any(kind == "module" for kind, _ in commands)


def test_every_documented_command_runs_with_help_and_knows_its_flags(helps):
    commands, _, result = helps
    problems = []
    for (kind, name), uses in commands.items():
        r = result["helps"][f"{kind} {name}"]
        where = ", ".join(sorted({page for page, _, _ in uses}))
        if r["code"] not in (0, None) or "usage:" not in r["text"]:
            problems.append(f"{kind} {name or ''} --help failed ({r['code']}) in {where}: {r['text'][-300:]}")
            continue
        for page, flags, line in uses:
            unknown = [f for f in flags if f != "--help" and not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])",
                                                                           r["text"])]
            if unknown:
                problems.append(f"{page}: {', '.join(unknown)} not in `{kind} {name} --help`: {line}")
    assert not problems, "\n".join(problems)


def test_the_memtool_entry_point_runs():
    script = Path(sys.executable).parent / "memtool"
    if not script.exists():
        pytest.skip(f"no memtool script beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(script), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 0 and "usage: memtool" in proc.stdout, proc.stderr[-2000:]


def test_every_api_name_in_the_python_examples_exists(helps):
    _, names, result = helps
    assert not result["missing"], {n: sorted(names[n]) for n in result["missing"]}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", FENCE.sub("", page.read_text()), re.MULTILINE):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_matches_github_anchors():
    assert slug("1. Memorization and influence (Feldman & Zhang)") == "1-memorization-and-influence-feldman--zhang"
    assert slug("Default eps warm-up: `python benchmarks/eps_warmup.py`") == \
        "default-eps-warm-up-python-benchmarkseps_warmuppy"


def test_every_relative_link_points_to_an_existing_file():
    problems = []
    for page in PAGES:
        prose = _strip_code(page.read_text())
        for target in LINK.findall(prose) + REF_LINK.findall(prose):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{_rel(page)}: {target} (no heading #{anchor} in {dest.name})")
    assert not problems, "\n".join(problems)
