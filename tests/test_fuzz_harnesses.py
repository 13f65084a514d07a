"""The atheris harnesses in tests/fuzz/ still run against the current code (a few hundred inputs each).

They are the fuzzing half of bench/faults.py; this keeps them from rotting when the code they
target moves. Each harness writes its seeds, fuzzes a fixed number of inputs with a fixed libFuzzer
seed (the same inputs every time), and must end without a crash; it also replays the corpus for
line coverage. Broken invariants (findings) are the fault suite's figures, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"

pytest.importorskip("atheris", reason="atheris is pinned for Linux (pip install -e '.[test]')")


@pytest.mark.parametrize("script, extra", [("fuzz_http.py", "--backend=httptools"),
                                           ("fuzz_http.py", "--backend=fallback"),
                                           ("fuzz_invoke.py", None)])
def test_harness_fuzzes_without_a_crash(tmp_path, script, extra):
    args = [sys.executable, str(FUZZ / script)] + ([extra] if extra else [])
    corpus, artifacts, findings = tmp_path / "corpus", tmp_path / "artifacts", tmp_path / "findings"
    for folder in (artifacts, findings):
        folder.mkdir()
    subprocess.run([*args, "--write-seeds", str(corpus)], check=True, timeout=60)
    done = subprocess.run([*args, "-runs=300", "-seed=1", f"-artifact_prefix={artifacts}/", str(corpus)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, FUZZ_FINDINGS=str(findings)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 300 runs" in done.stderr, done.stderr[-3000:]
    assert not list(artifacts.iterdir())
    coverage = subprocess.run([*args, "--line-coverage", str(corpus)], capture_output=True, text=True, timeout=120)
    report = json.loads(coverage.stdout.strip().splitlines()[-1])
    assert report["inputs"] >= 1
    assert all(v["covered"] > 0 for k, v in report.items() if k != "inputs"), report
