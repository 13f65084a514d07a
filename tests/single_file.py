"""Build the single-file executables (``bin/``) once per test run, with the documented command."""

from __future__ import annotations

import functools
import glob
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = ROOT / "bin"
BUILD = [sys.executable, str(ROOT / "tools" / "build_zipapp.py")]


@functools.cache
def built_bin() -> Path:
    """``bin/`` after ``python tools/build_zipapp.py`` (the README's set-up step)."""
    r = subprocess.run(BUILD, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (BIN_DIR / "lambda-runtime-api-daemon").is_file()
    return BIN_DIR


def bare_python(version: str = "") -> Optional[str]:
    """A python3 (of that version, if given) to run with ``-I -S``: no site-packages at all."""
    if not version:
        return sys.executable  # with -S even the venv's packages are out of reach
    candidates = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"), reverse=True)
    candidates += [p for p in (shutil.which(f"python{version}"),) if p]
    for candidate in candidates:
        try:
            r = subprocess.run([candidate, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip() == version:
            return candidate
    return None
