#!/usr/bin/env python3
"""Build the single-file executables ``bin/lambda-runtime-api-daemon`` and ``bin/lambda-server``.

Each is a zipapp (``#!/usr/bin/env python3`` + a zip archive) holding the ``lambda_rapid`` package
from ``src/`` and the pure-Python parts of the AMQP client (aio-pika, aiormq, pamqp, yarl,
multidict, propcache, idna), copied from the Python that runs this script (so run it with the
project's venv: ``.venv/bin/python tools/build_zipapp.py``). C extensions are left out: the
daemon then uses the default asyncio loop instead of uvloop, ``lambda_rapid.httpparser`` instead
of httptools, and the pure-Python fallbacks of yarl, multidict and propcache.

Needs at run time: any ``python3`` >= 3.9, nothing installed. AMQP (``AMQP_URI``, and so the
whole of ``lambda-server``) needs ``python3`` >= 3.11, the floor of the bundled aio-pika 10.

The archives are reproducible: same sources in, same bytes out (sorted entries, fixed
timestamps), so a rebuild that changes nothing changes no file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "src" / "lambda_rapid"
AMQP_DISTRIBUTIONS = ("aio-pika", "aiormq", "pamqp", "yarl", "multidict", "propcache", "idna")
AMQP_MIN_PYTHON = (3, 11)
SKIP_SUFFIXES = (".so", ".pyd", ".dylib", ".c", ".h", ".pyx", ".pxd", ".pyi", ".pyc")
SKIP_METADATA = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "entry_points.txt")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)

ENTRY_POINTS = {
    "lambda-runtime-api-daemon": ("lambda_rapid.cli", "main", False),
    "lambda-server": ("lambda_rapid.server.cli", "main", True),
}

# Kept to syntax every python3 parses, so an old one gets the message rather than a SyntaxError.
MAIN_TEMPLATE = '''\
# {prog}: single-file build of lambda-rapid {version}. Built by tools/build_zipapp.py.
import os
import sys

if sys.version_info < (3, 9):
    sys.exit("{prog}: error: needs Python 3.9 or newer, this is " + sys.version.split()[0])
_AMQP = {needs_amqp} or bool(os.environ.get("AMQP_URI"))
if _AMQP and "KUBERNETES_INIT_CONTAINER" not in os.environ and sys.version_info < {amqp_min!r}:
    sys.exit("{prog}: error: AMQP in the single-file build needs Python {amqp_min_text} or newer "
             "(the bundled aio-pika's floor), this is " + sys.version.split()[0]
             + {advice!r})

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


def version() -> str:
    namespace: dict = {}
    exec((PACKAGE_DIR / "__init__.py").read_text(), namespace)
    return str(namespace.get("__version__", "0"))


def build(prog: str, contents: dict, out_dir: Path, with_amqp: bool) -> Path:
    module, function, needs_amqp = ENTRY_POINTS[prog]
    advice = (": run it with python3.11+" if with_amqp
              else ": this build has no AMQP client (built with --without-amqp)")
    main = MAIN_TEMPLATE.format(
        prog=prog, version=version(), module=module, function=function, needs_amqp=needs_amqp,
        amqp_min=AMQP_MIN_PYTHON if with_amqp else (99,),
        amqp_min_text=".".join(map(str, AMQP_MIN_PYTHON)), advice=advice)
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
    args = parser.parse_args(argv)
    contents = package_files()
    with_amqp = not args.without_amqp
    if with_amqp:
        for name in AMQP_DISTRIBUTIONS:
            contents.update(distribution_files(name))
    for prog, (module, _, needs_amqp) in ENTRY_POINTS.items():
        if needs_amqp and not with_amqp:
            continue
        if module.replace(".", "/") + ".py" not in {n[:-3] + ".py" for n in contents if n.endswith(".py")}:
            print(f"build_zipapp: skipping {prog}: {module} is not in src/", file=sys.stderr)
            continue
        target = build(prog, contents, args.out_dir, with_amqp)
        print(f"built {target} ({target.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
