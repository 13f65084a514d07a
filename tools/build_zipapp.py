#!/usr/bin/env python3
"""Build the single-file executables ``bin/lambda-runtime-api-daemon`` and ``bin/lambda-server``.

Each is a zipapp (``#!/usr/bin/env python3`` + a zip archive, made by ``lambda_rapid.singlefile``)
holding the ``lambda_rapid`` package from ``src/``, h11 (the HTTP/1.1 parser used without httptools)
and the pure-Python parts of the AMQP client (aio-pika, aiormq, pamqp, yarl, multidict, propcache,
idna), copied from the Python that runs this script (so run it with the project's venv:
``.venv/bin/python tools/build_zipapp.py``). C extensions are left out: the daemon then uses the
default asyncio loop instead of uvloop, h11 (through ``lambda_rapid.http.h11_parser``) instead of
httptools, and the pure-Python fallbacks of yarl, multidict and propcache.

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
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the sources of this checkout, whatever is installed

from lambda_rapid import singlefile  # noqa: E402

# The AMQP client for Python 3.9 and 3.10 (aio-pika 10 needs 3.11): pure-Python parts of these wheels.
PY39_REQUIREMENTS = ("aio-pika==9.4.3", "aiormq==6.8.1", "pamqp==3.3.0", "yarl==1.22.0", "multidict==6.7.1",
                     "propcache==0.4.1", "idna==3.20", "typing-extensions==4.16.0")
WHEEL_CACHE = ROOT / "build" / "zipapp-wheels"


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
                if name.endswith("/") or name.endswith(singlefile.SKIP_SUFFIXES) or "__pycache__" in parts:
                    continue
                if parts[0].endswith((".dist-info", ".data")) and "licenses" not in parts and \
                        not parts[-1].startswith(("LICENSE", "COPYING", "NOTICE")):
                    continue
                files[f"{singlefile.PY39_DIR}/{name}"] = archive.read(name)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bin", help="where to write (default: bin/)")
    parser.add_argument("--without-amqp", action="store_true",
                        help="leave the AMQP client out (HTTP only; no lambda-server)")
    parser.add_argument("--without-py39-amqp", action="store_true",
                        help="leave out the AMQP client for Python 3.9/3.10 (no download needed)")
    args = parser.parse_args(argv)
    contents = singlefile.package_files(ROOT / "src" / "lambda_rapid")
    with_amqp = not args.without_amqp
    with_py39 = with_amqp and not args.without_py39_amqp
    amqp_min = (3, 9)
    if with_amqp:
        try:
            amqp, amqp_min = singlefile.amqp_files()
        except singlefile.BuildError as e:
            raise SystemExit(f"build_zipapp: {e} ({sys.executable}): run this script with the project's venv "
                             "(.venv/bin/python), or pass --without-amqp") from None
        contents.update(amqp)
    if with_py39:
        contents.update(py39_files())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    built = singlefile.programs(contents, with_amqp)
    for prog in singlefile.ENTRY_POINTS:
        if prog not in built:
            print(f"build_zipapp: skipping {prog}", file=sys.stderr)
            continue
        target = args.out_dir / prog
        main_py = singlefile.main_py(prog, with_amqp, amqp_min, with_py39)
        singlefile.write_executable(singlefile.archive(main_py, contents), target)
        print(f"built {target} ({target.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
