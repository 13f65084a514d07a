"""The single-file executables (bin/lambda-runtime-api-daemon, bin/lambda-server) run by a python3
that has no packages at all (``-I -S``): no uvloop, no httptools (h11, bundled in the file, parses HTTP),
the AMQP client from inside the file (aio-pika 10 on 3.11+, its 9.4.3 set on 3.9/3.10),
awslambdaric from the function's own environment.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest

from conftest import ECHO_DIR, RIC, ROOT, Proc, daemon_env, free_port, wait_until
from single_file import BUILD, bare_python, built_bin

AMQP_URI = "amqp://guest:guest@127.0.0.1:5672/?heartbeat=0"
CLIENTS = ROOT / "examples" / "echo" / "echo-clients"


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return built_bin()


def start_single_file(python: str, program: Path, command: list, cwd: Path = ECHO_DIR, **env) -> Proc:
    port, runtime_port = free_port(), free_port()
    environment = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, **env)
    proc = Proc([python, "-I", "-S", str(program), *command], environment, cwd, port, runtime_port)
    proc.wait_healthy()
    return proc


def test_build_is_reproducible_and_carries_no_c_extensions(tmp_path):
    for out in ("a", "b"):
        r = subprocess.run([*BUILD, "--out-dir", str(tmp_path / out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    first = (tmp_path / "a" / "lambda-runtime-api-daemon").read_bytes()
    assert first == (tmp_path / "b" / "lambda-runtime-api-daemon").read_bytes()
    assert first.startswith(b"#!/usr/bin/env python3\n")
    assert os.access(tmp_path / "a" / "lambda-runtime-api-daemon", os.X_OK)
    with zipfile.ZipFile(tmp_path / "a" / "lambda-runtime-api-daemon") as archive:
        names = archive.namelist()
        assert archive.testzip() is None
    expected = {"__main__.py", "lambda_rapid/http/h11_parser.py", "h11/__init__.py", "aio_pika/__init__.py",
                "_py39/aio_pika/__init__.py"}
    assert expected <= set(names)
    assert "lambda_rapid/http/pyparser.py" not in names
    assert not [n for n in names if n.endswith((".so", ".pyc", ".pyd")) or "__pycache__" in n]


def test_bare_python_really_has_no_packages():
    """The premise of the tests below: with -I -S neither httptools nor awslambdaric can be imported."""
    for module in ("httptools", "uvloop", "awslambdaric"):
        r = subprocess.run([sys.executable, "-I", "-S", "-c", f"import {module}"], capture_output=True)
        assert r.returncode != 0, module


@pytest.mark.parametrize("version", ["", "3.9", "3.13"])
def test_the_single_file_parses_http_with_h11(bin_dir, version):
    python = bare_python(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    program = bin_dir / "lambda-runtime-api-daemon"
    r = subprocess.run([python, "-I", "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "import lambda_rapid.http.server as s, h11; print(s.BACKEND.__name__, h11.__file__)",
                        str(program)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    backend, h11_file = r.stdout.split()
    assert backend == "lambda_rapid.http.h11_parser"
    assert h11_file.startswith(str(program))  # the copy inside the file, not an installed one


@pytest.mark.parametrize("version", ["", "3.9", "3.10", "3.12", "3.13"])
def test_serves_echo_with_a_bare_python(bin_dir, version):
    python = bare_python(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    daemon = start_single_file(python, bin_dir / "lambda-runtime-api-daemon", [*RIC, "echo.handler"],
                               AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    try:
        status, headers, body = daemon.invoke({"key": "value"}, name="echo-lambda")
        assert (status, json.loads(body)) == (200, {"key": "value"})
        assert headers["x-amz-executed-version"] == "$LATEST"
        # Not JSON: refused by the daemon itself, as AWS does.
        assert daemon.invoke(raw=b"hello")[0] == 400

        # Keep-alive, a chunked body and a pipelined pair through h11.
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
        for i in range(20):
            conn.request("POST", "/2015-03-31/functions/function/invocations", body=json.dumps({"i": i}))
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())) == (200, {"i": i})
        conn.request("POST", "/2015-03-31/functions/function/invocations", body=iter([b'{"chunked"', b": true}"]),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"chunked": True})
        conn.close()
        request = b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
            s.sendall(request % (7, b'"first"') + request % (8, b'"second"'))
            received = b""
            while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b'"second"'):
                chunk = s.recv(65536)
                assert chunk, received
                received += chunk
        assert received.index(b'"first"') < received.index(b'"second"')
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr


def test_kubernetes_init_container_copies_the_single_file(bin_dir, tmp_path):
    name = f"lambda-runtime-api-daemon-{uuid.uuid4().hex[:8]}"
    program = tmp_path / name
    program.write_bytes((bin_dir / "lambda-runtime-api-daemon").read_bytes())
    program.chmod(0o755)
    env = daemon_env(KUBERNETES_INIT_CONTAINER="")
    copied = Path("/tmp") / name
    try:
        r = subprocess.run([sys.executable, "-I", "-S", str(program)], env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert copied.read_bytes() == program.read_bytes()
        assert copied.stat().st_mode & 0o777 == 0o755
        # The copy is the daemon, runnable where the init container left it.
        r = subprocess.run([sys.executable, "-I", "-S", str(copied), "--version"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("lambda-runtime-api-daemon ")
    finally:
        copied.unlink(missing_ok=True)


@contextlib.contextmanager
def private_tmp():
    """(run, written): ``run(argv, env)`` runs ``argv`` in a private mount namespace whose /tmp is
    this /tmp with an overlay on top, so everything under /tmp stays visible (the checkout may be
    there) but what the run writes to /tmp (the init container's fixed target,
    /tmp/lambda-runtime-api-daemon) lands in ``written``, seen by no other test."""
    base = Path(tempfile.mkdtemp(prefix="private-tmp-", dir="/var/tmp"))  # an overlay's upper layer: not in /tmp
    (base / "upper").mkdir()
    (base / "work").mkdir()

    def run(argv: list, env: dict) -> subprocess.CompletedProcess:
        mount = f"mount -t overlay overlay -o lowerdir=/tmp,upperdir={base}/upper,workdir={base}/work /tmp"
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount + ' && exec "$@"',
                               "sh", *argv], env=env, capture_output=True, text=True, timeout=120)

    try:
        yield run, base / "upper"
    finally:
        shutil.rmtree(base)


needs_unshare = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(),
                                   reason="needs root and unshare (a private /tmp)")


@needs_unshare
def test_kubernetes_init_container_from_a_pip_install_builds_the_single_file(tmp_path):
    """A non-editable pip install (the package in site-packages, not src/): the console script
    builds /tmp/lambda-runtime-api-daemon from it, and that file serves with a bare python3."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = daemon_env(KUBERNETES_INIT_CONTAINER="true", PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import lambda_rapid; print(lambda_rapid.__file__)"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert where.stdout.strip() == str(target / "lambda_rapid" / "__init__.py")  # not src/
    with private_tmp() as (run, written):
        r = run([str(target / "bin" / "lambda-runtime-api-daemon")], env)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "lambda-runtime-api-daemon: built /tmp/lambda-runtime-api-daemon from the " \
                                   "installed lambda_rapid 0.1.0"
        assert [p.name for p in written.iterdir()] == ["lambda-runtime-api-daemon"]  # and no temporary left
        built = tmp_path / "lambda-runtime-api-daemon"
        shutil.copy2(written / "lambda-runtime-api-daemon", built)
    assert built.stat().st_mode & 0o777 == 0o755
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
    assert {"__main__.py", "lambda_rapid/cli.py", "lambda_rapid/http/h11_parser.py", "h11/__init__.py",
            "aio_pika/__init__.py"} <= names
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]
    daemon = start_single_file(sys.executable, built, [*RIC, "echo.handler"], AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    try:
        status, _, body = daemon.invoke({"key": "value"}, name="echo-lambda")
        assert (status, json.loads(body)) == (200, {"key": "value"})
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr


@needs_unshare
def test_kubernetes_init_container_from_python_dash_m_builds_too():
    with private_tmp() as (run, written):
        r = run([sys.executable, "-m", "lambda_rapid"], daemon_env(KUBERNETES_INIT_CONTAINER=""))
        assert r.returncode == 0, r.stderr
        assert zipfile.is_zipfile(written / "lambda-runtime-api-daemon")


@needs_unshare
def test_kubernetes_init_container_that_cannot_write_tmp_says_so():
    """/tmp read-only (no shared volume mounted there): one line, exit 1."""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && exec "$@"', "sh",
                        str(Path(sys.executable).parent / "lambda-runtime-api-daemon")],
                       env=daemon_env(KUBERNETES_INIT_CONTAINER="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("lambda-runtime-api-daemon: error: KUBERNETES_INIT_CONTAINER: cannot build "
                               "/tmp/lambda-runtime-api-daemon from the installed package: ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_single_file_build_names_a_missing_amqp_distribution(monkeypatch):
    from lambda_rapid import singlefile

    monkeypatch.setattr(singlefile, "AMQP_DISTRIBUTIONS", (*singlefile.AMQP_DISTRIBUTIONS, "no-such-distribution"))
    with pytest.raises(singlefile.BuildError, match="no-such-distribution is not installed"):
        singlefile.amqp_files()


def test_without_the_py39_amqp_set_amqp_on_an_old_python_is_refused_clearly(tmp_path):
    python = bare_python("3.9")
    if python is None:
        pytest.skip("no python3.9 on this machine")
    r = subprocess.run([*BUILD, "--out-dir", str(tmp_path), "--without-py39-amqp"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    env = daemon_env(PORT=free_port(), RUNTIME_API_PORT=free_port(), AMQP_URI=AMQP_URI)
    r = subprocess.run([python, "-I", "-S", str(tmp_path / "lambda-runtime-api-daemon"), *RIC, "echo.handler"],
                       env=env, cwd=ECHO_DIR, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "needs Python 3.11" in r.stderr and "3.9" in r.stderr
    r = subprocess.run([python, "-I", "-S", str(tmp_path / "lambda-server")], env=daemon_env(PORT=free_port()),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "needs Python 3.11" in r.stderr


@pytest.mark.parametrize("version", ["", "3.9", "3.10", "3.12", "3.13"])
def test_amqp_and_lambda_server_from_single_files(bin_dir, version):
    """Daemon and Lambda Server both from bin/, on a bare python, through the real RabbitMQ
    (aio-pika 10 on 3.11+, the archive's aio-pika 9.4.3 set on 3.9 and 3.10)."""
    python = bare_python(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    function = f"zipapp-echo-{uuid.uuid4().hex[:8]}"
    daemon = start_single_file(python, bin_dir / "lambda-runtime-api-daemon", [*RIC, "echo.handler"],
                               AWS_LAMBDA_FUNCTION_NAME=function, AMQP_URI=AMQP_URI)
    server = None
    try:
        wait_until(lambda: f"queue {function!r}" in daemon.stderr or f"queue {function}" in daemon.stderr, 30,
                   message="the daemon to consume its queue")
        r = subprocess.run([sys.executable, str(CLIENTS / "echo_amqp.py"), "--function", function, "--uri", AMQP_URI,
                            "--iterations", "20"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "20 invocations" in r.stdout and "0 failed" in r.stdout

        port = free_port()
        server = Proc([python, "-I", "-S", str(bin_dir / "lambda-server")],
                      daemon_env(PORT=port, AMQP_URI=AMQP_URI), ROOT, port, None)
        server.wait_healthy()
        server.wait_ready(30)
        status, _, body = server.invoke({"via": "lambda-server"}, name=function)
        assert (status, json.loads(body)) == (200, {"via": "lambda-server"}), server.stderr
    finally:
        if server is not None:
            server.stop()
        daemon.stop()


@pytest.mark.timeout(600)
def test_security_suite_on_the_single_files_code_paths():
    """tests/test_security.py (bad HTTP, slow clients, limits) again, with httptools and uvloop
    hidden in every process: the daemon then runs on asyncio and h11, as the single file does on
    any python3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(ROOT / "tools" / "pure-python")
    probe = subprocess.run([sys.executable, "-c", "import lambda_rapid.http.server as h; print(h.BACKEND.__name__)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "lambda_rapid.http.h11_parser", probe.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_security.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]
