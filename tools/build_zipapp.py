#!/usr/bin/env python3
"""Build the single-file executables ``bin/lambda-runtime-api-daemon`` and ``bin/lambda-server``.

Each is a zipapp (``#!/usr/bin/env python3`` + a zip archive) holding the ``lambda_rapid`` package
from ``src/``, h11 (the HTTP/1.1 parser used without httptools) and the pure-Python parts of the
AMQP client (aio-pika, aiormq, pamqp, yarl, multidict, propcache, idna), copied from the Python that
runs this script (so run it with the project's venv: ``.venv/bin/python tools/build_zipapp.py``).
C extensions are left out: the daemon then uses the default asyncio loop instead of uvloop, h11
(through ``lambda_rapid.http.h11_parser``) instead of httptools, and the pure-Python fallbacks of
yarl, multidict and propcache.

Needs at run time: any ``python3`` >= 3.9, nothing installed. aio-pika 10 needs Python 3.11, so,
as ``pyproject.toml`` does for pip, the archive also carries aio-pika 9.4.3 and the versions of its
dependencies that support 3.9 and 3.10, under ``_py39/``; ``__main__`` puts that folder first on
``sys.path`` on those Pythons. Those wheels are downloaded once with pip (into build/, ignored by
git); ``--without-py39-amqp`` leaves them out, and AMQP then needs Python 3.11 or newer.

The archives are reproducible: same sources in, same bytes out (sorted entries, fixed
timestamps), so a rebuild that changes nothing changes no file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "src" / "lambda_rapid"
HTTP_DISTRIBUTIONS = ("h11",)  # pure Python, any python3 >= 3.8: one copy serves every Python
AMQP_DISTRIBUTIONS = ("aio-pika", "aiormq", "pamqp", "yarl", "multidict", "propcache", "idna")
AMQP_MIN_PYTHON = (3, 11)
SKIP_SUFFIXES = (".so", ".pyd", ".dylib", ".c", ".h", ".pyx", ".pxd", ".pyi", ".pyc")
SKIP_METADATA = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "entry_points.txt")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
# The AMQP client for Python 3.9 and 3.10 (aio-pika 10 needs 3.11): pure-Python parts of these wheels.
PY39_DIR = "_py39"
PY39_REQUIREMENTS = ("aio-pika==9.4.3", "aiormq==6.8.1", "pamqp==3.3.0", "yarl==1.22.0", "multidict==6.7.1",
                     "propcache==0.4.1", "idna==3.20", "typing-extensions==4.16.0")
WHEEL_CACHE = ROOT / "build" / "zipapp-wheels"

ENTRY_POINTS = {
    "lambda-runtime-api-daemon": ("lambda_rapid.cli", "main", False),
    "lambda-server": ("lambda_rapid.server.cli", "main", True),
}

# Kept to syntax every python3 parses, so an old one gets the message rather than a SyntaxError.
MAIN_HEAD = '''\
# {prog}: single-file build of lambda-rapid {version}. Built by tools/build_zipapp.py.
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


def package_files() -> dict:
    """Archive name -> bytes for the lambda_rapid package (sources only)."""
    files = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        files["lambda_rapid/" + path.relative_to(PACKAGE_DIR).as_posix()] = path.read_bytes()
    return files


def distribution_files(name: str) -> dict:
    """Archive name -> bytes for an installed distribution, pure-Python parts and metadata only."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"build_zipapp: {name} is not installed in {sys.executable}: run this script with the "
                         "project's venv (.venv/bin/python), or pass --without-amqp") from None
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
        raise SystemExit(f"build_zipapp: found no Python sources for {name}")
    return files


def py39_files() -> dict:
    """Archive name -> bytes for the 3.9/3.10 AMQP client, from wheels downloaded once with pip."""
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    wanted = {r.split("==")[0].replace("-", "_").lower(): r.split("==")[1] for r in PY39_REQUIREMENTS}

    def cached() -> dict:
        found = {}
        for wheel in WHEEL_CACHE.glob("*.whl"):
            name, ver = wheel.name.split("-")[:2]
            if wanted.get(name.lower()) == ver:
                found[name.lower()] = wheel
        return found

    if len(cached()) < len(wanted):
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.9", "--dest", str(WHEEL_CACHE), *PY39_REQUIREMENTS]
        if subprocess.run(command).returncode != 0:
            raise SystemExit("build_zipapp: could not download the Python 3.9/3.10 AMQP wheels "
                             f"({' '.join(PY39_REQUIREMENTS)}); pass --without-py39-amqp to build without them")
    files = {}
    for wheel in sorted(cached().values()):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                parts = name.split("/")
                if name.endswith("/") or name.endswith(SKIP_SUFFIXES) or "__pycache__" in parts:
                    continue
                if parts[0].endswith((".dist-info", ".data")) and "licenses" not in parts and \
                        not parts[-1].startswith(("LICENSE", "COPYING", "NOTICE")):
                    continue
                files[f"{PY39_DIR}/{name}"] = archive.read(name)
    return files


def version() -> str:
    namespace: dict = {}
    exec((PACKAGE_DIR / "__init__.py").read_text(), namespace)
    return str(namespace.get("__version__", "0"))


def build(prog: str, contents: dict, out_dir: Path, with_amqp: bool, with_py39: bool) -> Path:
    module, function, needs_amqp = ENTRY_POINTS[prog]
    main = MAIN_HEAD.format(prog=prog, version=version())
    if with_py39:
        main += MAIN_PY39.format(py39_dir=PY39_DIR)
    elif with_amqp:
        main += MAIN_AMQP_CHECK.format(needs_amqp=needs_amqp, amqp_min=AMQP_MIN_PYTHON, prog=prog, reason=(
            "AMQP in this single-file build needs Python 3.11 or newer (built with --without-py39-amqp)"))
    else:
        main += MAIN_AMQP_CHECK.format(needs_amqp=needs_amqp, amqp_min=(99,), prog=prog,
                                       reason="this single-file build has no AMQP client (built with --without-amqp)")
    main += MAIN_TAIL.format(module=module, function=function)
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")  # as zipapp does: the archive's offsets count it
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in sorted({"__main__.py", *contents}):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, main.encode() if name == "__main__.py" else contents[name])
    data = buffer.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / prog
    # Write beside the target and rename: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{prog}.", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bin", help="where to write (default: bin/)")
    parser.add_argument("--without-amqp", action="store_true",
                        help="leave the AMQP client out (HTTP only; no lambda-server)")
    parser.add_argument("--without-py39-amqp", action="store_true",
                        help="leave out the AMQP client for Python 3.9/3.10 (no download needed)")
    args = parser.parse_args(argv)
    contents = package_files()
    for name in HTTP_DISTRIBUTIONS:
        contents.update(distribution_files(name))
    with_amqp = not args.without_amqp
    with_py39 = with_amqp and not args.without_py39_amqp
    if with_amqp:
        for name in AMQP_DISTRIBUTIONS:
            contents.update(distribution_files(name))
    if with_py39:
        contents.update(py39_files())
    for prog, (module, _, needs_amqp) in ENTRY_POINTS.items():
        if needs_amqp and not with_amqp:
            continue
        if module.replace(".", "/") + ".py" not in {n[:-3] + ".py" for n in contents if n.endswith(".py")}:
            print(f"build_zipapp: skipping {prog}: {module} is not in src/", file=sys.stderr)
            continue
        target = build(prog, contents, args.out_dir, with_amqp, with_py39)
        print(f"built {target} ({target.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
