"""Helpers for the extension and telemetry tests: a temp extensions dir and the extensions' records."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

EXTENSIONS_SRC = Path(__file__).resolve().parent / "extensions"


def make_extensions_dir(tmp_path: Path, *names: str) -> Path:
    """A LAMBDA_EXTENSIONS_DIR holding the test extension under each name (``bash-*``: the bash one)."""
    directory = tmp_path / "extensions"
    directory.mkdir()
    for name in names:
        source = EXTENSIONS_SRC / ("bash_ext.sh" if name.startswith("bash") else "ext.py")
        shutil.copy(source, directory / name)
        os.chmod(directory / name, 0o755)
    return directory


class ExtLog:
    """The JSON lines the test extensions append to $EXT_LOG."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self, what: str = None, ext: str = None) -> list:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if (what is None or rec.get("what") == what) and (ext is None or rec.get("ext") == ext):
                out.append(rec)
        return out

    def events(self, event_type: str, ext: str = None) -> list:
        return [r["event"] for r in self.records("event", ext) if r["event"].get("eventType") == event_type]

    def telemetry(self, type_: str = None) -> list:
        items = [r["item"] for r in self.records("telemetry")]
        return [i for i in items if type_ is None or i.get("type") == type_]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
