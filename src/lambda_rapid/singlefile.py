"""The single-file build: the ``lambda_rapid`` package and the pure-Python parts of its AMQP client
in one zipapp (``#!/usr/bin/env python3`` + a zip archive) that any ``python3`` >= 3.9 runs with
nothing installed.

Used by ``tools/build_zipapp.py`` (``bin/``, from the sources) and by ``KUBERNETES_INIT_CONTAINER``
run from a pip install (``/tmp/lambda-runtime-api-daemon``, from the installed package). C
extensions are left out: the daemon then runs the default asyncio loop and h11 instead of httptools, and
yarl, multidict and propcache their pure-Python fallbacks. Same inputs, same bytes out (sorted
entries, fixed timestamps). Nothing here is imported by the daemon's serving path.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Tuple

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
HTTP_DISTRIBUTIONS = ("h11",)  # the HTTP/1.1 parser used without httptools; pure Python, one copy for every Python
AMQP_DISTRIBUTIONS = ("aio-pika", "aiormq", "pamqp", "yarl", "multidict", "propcache", "idna")
SKIP_SUFFIXES = (".so", ".pyd", ".dylib", ".c", ".h", ".pyx", ".pxd", ".pyi", ".pyc")
SKIP_METADATA = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "entry_points.txt")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
PY39_DIR = "_py39"  # tools/build_zipapp.py's aio-pika 9.4.3 set for Python 3.9/3.10

# program -> (module, function, needs AMQP)
ENTRY_POINTS = {
    "lambda-runtime-api-daemon": ("lambda_rapid.cli", "main", False),
    "lambda-server": ("lambda_rapid.server.cli", "main", True),
}

# Kept to syntax every python3 parses, so an old one gets the message rather than a SyntaxError.
MAIN_HEAD = '''\
# {prog}: single-file build of lambda-rapid {version}.
import os
import sys

if sys.version_info < (3, 9):
    sys.exit("{prog}: error: needs Python 3.9 or newer, this is " + sys.version.split()[0])
'''
MAIN_PY39 = '''\
if sys.version_info < (3, 11):
    # aio-pika 10 needs Python 3.11: use the aio-pika 9.4.3 set this archive carries for 3.9/3.10.
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "{py39_dir}"))
'''
MAIN_AMQP_CHECK = '''\
_AMQP = {needs_amqp} or bool(os.environ.get("AMQP_URI"))
if _AMQP and "KUBERNETES_INIT_CONTAINER" not in os.environ and sys.version_info < {amqp_min!r}:
    sys.exit("{prog}: error: {reason}, this is " + sys.version.split()[0])
'''
MAIN_TAIL = '''
from {module} import {function} as _main

sys.exit(_main())
'''


class BuildError(Exception):
    """What is missing for the build, in one line."""


def package_files(package_dir: Path = PACKAGE_DIR) -> dict:
    """Archive name -> bytes for the lambda_rapid package (sources only) and the HTTP parser it
    falls back to without httptools (h11)."""
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" not in path.parts:
            files["lambda_rapid/" + path.relative_to(package_dir).as_posix()] = path.read_bytes()
    for name in HTTP_DISTRIBUTIONS:
        files.update(distribution_files(name))
    return files


def distribution_files(name: str) -> dict:
    """Archive name -> bytes for an installed distribution, pure-Python parts and metadata only."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"{name} is not installed for this Python") from None
    files = {}
    for entry in dist.files or ():
        parts = entry.parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or entry.name.endswith(SKIP_SUFFIXES):
            continue
        if parts[0].endswith(".dist-info") and entry.name in SKIP_METADATA:
            continue
        if entry.name == "py.typed":
            continue
        source = Path(entry.locate())
        if source.is_file():
            files[entry.as_posix()] = source.read_bytes()
    if not any(n.endswith(".py") for n in files):
        raise BuildError(f"found no Python sources for {name}")
    return files


def amqp_files() -> Tuple[dict, Tuple[int, int]]:
    """The installed AMQP client's files, and the oldest Python all of them declare support for."""
    files: dict = {}
    oldest = (3, 9)
    for name in AMQP_DISTRIBUTIONS:
        files.update(distribution_files(name))
        found = re.search(r">=\s*(\d+)\.(\d+)", importlib.metadata.metadata(name).get("Requires-Python") or "")
        if found:
            oldest = max(oldest, (int(found.group(1)), int(found.group(2))))
    return files, oldest


def main_py(prog: str, with_amqp: bool, amqp_min: Tuple[int, int], with_py39: bool) -> str:
    module, function, needs_amqp = ENTRY_POINTS[prog]
    main = MAIN_HEAD.format(prog=prog, version=__version__)
    if with_py39:
        main += MAIN_PY39.format(py39_dir=PY39_DIR)
    elif with_amqp:
        reason = f"AMQP in this single-file build needs Python {amqp_min[0]}.{amqp_min[1]} or newer"
        main += MAIN_AMQP_CHECK.format(needs_amqp=needs_amqp, amqp_min=amqp_min, prog=prog, reason=reason)
    else:
        main += MAIN_AMQP_CHECK.format(needs_amqp=needs_amqp, amqp_min=(99,), prog=prog,
                                       reason="this single-file build has no AMQP client (built without it)")
    return main + MAIN_TAIL.format(module=module, function=function)


def archive(main: str, contents: dict) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")  # as zipapp does: the archive's offsets count it
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted({"__main__.py", *contents}):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, main.encode() if name == "__main__.py" else contents[name])
    return buffer.getvalue()


def write_executable(data: bytes, target: Path) -> None:
    """Write beside the target and rename: a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def programs(contents: Iterable[str], with_amqp: bool) -> list:
    """The entry points this build can carry: their module is in it, and their AMQP needs are met."""
    names = set(contents)
    return [prog for prog, (module, _, needs_amqp) in ENTRY_POINTS.items()
            if (with_amqp or not needs_amqp) and module.replace(".", "/") + ".py" in names]


def build_installed_daemon(target: Path) -> None:
    """``lambda-runtime-api-daemon`` from the package and AMQP client this Python has installed."""
    contents = package_files()
    amqp, amqp_min = amqp_files()
    contents.update(amqp)
    prog = "lambda-runtime-api-daemon"
    write_executable(archive(main_py(prog, True, amqp_min, False), contents), target)
