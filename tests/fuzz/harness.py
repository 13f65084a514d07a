"""What the atheris harnesses in this folder share: their command line, seeds, line coverage.

Each harness (``fuzz_http.py``, ``fuzz_invoke.py``) is run as a script::

    python tests/fuzz/fuzz_http.py [--backend=httptools|fallback] [libFuzzer flags] CORPUS_DIR
    python tests/fuzz/fuzz_http.py --write-seeds DIR      # the hand-written starting inputs
    python tests/fuzz/fuzz_http.py --line-coverage DIR    # replay DIR, print the lines it reached (JSON)

Fuzzing runs under libFuzzer (``-max_total_time=S``, ``-runs=N``, ...) with the project's modules
instrumented for coverage; an uncaught exception or a failed invariant is a crash (libFuzzer writes
the input to ``crash-*``). ``--line-coverage`` runs the same input function without atheris'
instrumentation, under a tracer, and reports executed/executable lines of the code under test.
bench/faults.py drives all three modes.

A harness may also report *findings* with ``finding(problems, data)``: broken invariants that are
not crashes (an answer missing, a framing rule bent). Fuzzing goes on; with ``FUZZ_FINDINGS=DIR``
set, the first input of each kind of finding is written to DIR (``<kind hash>.json``: the message,
how many seen so far, the input in base64).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable

INSTRUMENTED = ["lambda_rapid", "h11"]
_FINDINGS: dict = {}


def finding(problems: list, data: bytes) -> None:
    """Record broken invariants for ``data`` (see the module docstring)."""
    folder = os.environ.get("FUZZ_FINDINGS")
    if not problems or not folder:
        return
    for message in problems:
        kind = re.sub(r"\d+", "N", message)[:200]
        seen = _FINDINGS[kind] = _FINDINGS.get(kind, 0) + 1
        if seen & (seen - 1) == 0:  # the first time, then at 2, 4, 8, ...: the count stays near the truth
            path = Path(folder) / f"{hashlib.sha1(kind.encode()).hexdigest()[:12]}.json"
            example = json.loads(path.read_text())["input"] if path.exists() else base64.b64encode(data).decode()
            path.write_text(json.dumps({"kind": kind, "message": message, "seen": seen, "input": example}))


def executable_lines(code) -> set:
    """(filename, line) of every line a code object and the code objects nested in it can run."""
    lines = set()
    stack = [code]
    while stack:
        co = stack.pop()
        for _start, _end, line in co.co_lines():
            if line is not None and line != co.co_firstlineno:
                lines.add((co.co_filename, line))
        stack.extend(c for c in co.co_consts if hasattr(c, "co_lines"))
    return lines


def code_of(obj) -> list:
    """The code objects of a function, of every method of a class, or of every function and class
    defined in a module."""
    if hasattr(obj, "__code__"):
        return [obj.__code__]
    if isinstance(obj, type):
        found = []
        for value in vars(obj).values():
            value = getattr(value, "__func__", value)
            if isinstance(value, property):
                found.extend(f.__code__ for f in (value.fget, value.fset) if f is not None)
            elif hasattr(value, "__code__"):
                found.append(value.__code__)
        return found
    found = []
    for value in vars(obj).values():
        defined_here = getattr(value, "__module__", None) == obj.__name__
        if defined_here and (hasattr(value, "__code__") or isinstance(value, type)):
            found.extend(code_of(value))
    return found


def line_coverage(one_input: Callable[[bytes], None], inputs: Iterable[bytes], targets: dict) -> dict:
    """Run every input under a tracer; per target (label -> objects): lines covered of lines there."""
    wanted = {label: set().union(*(executable_lines(c) for obj in objs for c in code_of(obj)))
              for label, objs in targets.items()}
    files = {f for lines in wanted.values() for f, _ in lines}
    hit: set = set()

    def local(frame, event, _arg):
        if event == "line":
            hit.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def tracer(frame, _event, _arg):
        return local if frame.f_code.co_filename in files else None

    count = 0
    sys.settrace(tracer)
    try:
        for data in inputs:
            count += 1
            try:
                one_input(data)
            except Exception:
                pass  # a crash is the fuzz run's finding; here only the lines count
    finally:
        sys.settrace(None)
    report = {label: {"covered": len(lines & hit), "lines": len(lines),
                      "percent": round(100.0 * len(lines & hit) / len(lines), 1) if lines else 0.0}
              for label, lines in wanted.items()}
    report["inputs"] = count
    return report


def main(load: Callable[[], object], make_input: Callable[[object], Callable[[bytes], None]],
         seeds: list, targets: Callable[[object], dict]) -> None:
    """``load()`` imports the code under test (instrumented when fuzzing) and returns what
    ``make_input`` and ``targets`` need; ``make_input(loaded)`` is the libFuzzer input function."""
    args = [a for a in sys.argv[1:] if not a.startswith("--backend")]
    if args and args[0] == "--write-seeds":
        folder = Path(args[1])
        folder.mkdir(parents=True, exist_ok=True)
        for data in seeds:
            (folder / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
        return
    if args and args[0] == "--line-coverage":
        loaded = load()
        files = sorted(p for p in Path(args[1]).iterdir() if p.is_file())
        report = line_coverage(make_input(loaded), (p.read_bytes() for p in files), targets(loaded))
        print(json.dumps(report))
        return
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        loaded = load()
    atheris.Setup([sys.argv[0], *args], make_input(loaded))
    atheris.Fuzz()
