"""scripts/: the set-up behind the README's two commands (steps already done are skipped),
run-echo.sh serving, and the container set-up's refusals (scripts/setup-containers.sh, whose
success path tests/test_containers.py uses)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, Proc, daemon_env, free_port

SCRIPTS = ROOT / "scripts"
STAMPS = (ROOT / ".venv" / ".setup-installed", ROOT / ".venv" / ".setup-built")
DAEMON_FILE = ROOT / "bin" / "lambda-runtime-api-daemon"


def run(argv: list, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_setup_skips_the_steps_already_done():
    first = run([SCRIPTS / "setup.sh"])
    assert first.returncode == 0, first.stderr
    stamps = [p.read_text() for p in STAMPS]
    built = DAEMON_FILE.stat().st_mtime_ns
    again = run([SCRIPTS / "setup.sh"])
    assert again.returncode == 0 and again.stdout == again.stderr == ""  # no pip, no build
    assert [p.read_text() for p in STAMPS] == stamps
    assert DAEMON_FILE.stat().st_mtime_ns == built

    # Sources changed since the last build (here: a stale fingerprint): the single files are rebuilt.
    STAMPS[1].write_text("stale\n")
    rebuilt = run([SCRIPTS / "setup.sh"])
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert STAMPS[1].read_text() == stamps[1]
    assert DAEMON_FILE.stat().st_mtime_ns != built


def test_run_echo_serves_the_echo_lambda():
    port, runtime_port = free_port(), free_port()
    env = {**daemon_env(), "PORT": str(port), "RUNTIME_API_PORT": str(runtime_port)}
    proc = Proc([str(SCRIPTS / "run-echo.sh")], env, ROOT, port, runtime_port)
    try:
        proc.wait_healthy(60)
        status, _, body = proc.invoke({"key": "value"}, name="echo-lambda")
        assert (status, body) == (200, b'{"key": "value"}')
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.stderr


def test_setup_containers_says_why_it_cannot_as_an_ordinary_user():
    argv = [SCRIPTS / "setup-containers.sh"]
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *argv]
    r = run(argv)
    assert r.returncode == 77 and r.stdout == ""
    assert r.stderr.strip() == "setup-containers.sh: containers cannot be set up here: needs root (podman as root, " \
                               "debootstrap)"


@pytest.mark.skipif(os.geteuid() != 0, reason="the root path: run as root")
def test_setup_containers_says_why_it_cannot_without_apt(tmp_path):
    """Root, but neither podman nor apt-get on PATH: nothing to install them with."""
    for tool in ("id", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    r = run(["/bin/bash", SCRIPTS / "setup-containers.sh"], PATH=str(tmp_path))
    assert r.returncode == 77, r.stderr
    assert "podman runc debootstrap missing and no apt-get to install them" in r.stderr


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt on this machine")
def test_debian_mirror_comes_from_apt_sources():
    r = run([SCRIPTS / "debian-mirror.sh", "bookworm"])
    if r.returncode != 0:
        pytest.skip(f"this machine's apt has no Debian bookworm source: {r.stderr.strip()}")
    mirror = r.stdout.strip()
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    assert any(mirror.rstrip("/") in p.read_text() for p in sources if p.is_file()), mirror
    missing = run([SCRIPTS / "debian-mirror.sh", "no-such-suite"])
    assert missing.returncode == 1 and missing.stdout == ""
    assert "apt has no source for Debian no-such-suite" in missing.stderr and "set MIRROR" in missing.stderr
