"""Shared fixtures: run the real daemon (and lambda-server) as subprocesses on free ports.

Every test gets its own ports, so test files can run side by side. Helpers here start real
processes and poll for readiness; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
ECHO_DIR = ROOT / "examples" / "echo" / "echo-lambda"
FUNCTIONS_DIR = Path(__file__).resolve().parent / "functions"
PYTHON = sys.executable
BIN = Path(sys.executable).parent
RIC = [PYTHON, "-m", "awslambdaric"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class Proc:
    """A daemon (or lambda-server) subprocess with its output in files."""

    def __init__(self, argv: list, env: dict, cwd: Path, port: int, runtime_port: Optional[int]) -> None:
        self.argv = argv
        self.port = port
        self.runtime_port = runtime_port
        self.url = f"http://127.0.0.1:{port}"
        self._out = tempfile.NamedTemporaryFile(prefix="daemon-out-", suffix=".log", delete=False)  # noqa: SIM115
        self._err = tempfile.NamedTemporaryFile(prefix="daemon-err-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    # ---- output ----------------------------------------------------------------------------
    @property
    def stdout(self) -> str:
        return Path(self._out.name).read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return Path(self._err.name).read_text(errors="replace")

    # ---- HTTP helpers ----------------------------------------------------------------------
    def invoke_url(self, name: str = "function") -> str:
        return f"{self.url}/2015-03-31/functions/{name}/invocations"

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
                timeout: float = 30.0):
        """(status, headers dict lower-cased, body bytes) of one request."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def invoke(self, payload=None, name: str = "function", headers: Optional[dict] = None, raw: Optional[bytes] = None,
               timeout: float = 30.0):
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        return self.request("POST", f"/2015-03-31/functions/{name}/invocations", body, headers, timeout)

    def wait_healthy(self, timeout: float = 15.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited with {self.proc.returncode}: {self.stderr}")
            try:
                return self.request("GET", "/_/health", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until(up, timeout, message="/_/health")

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready():
            try:
                return self.request("GET", "/_/ready", timeout=1)[0] == 200
            except OSError:
                return False
        wait_until(ready, timeout, message="/_/ready")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    # ---- lifecycle -------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Whatever the daemon left behind in its session is a bug, but never leak it into other tests.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def daemon_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_"))}
    env.pop("PORT", None)
    env.pop("RUNTIME_API_PORT", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start_daemon(command: Optional[list] = None, *, cwd: Path = ECHO_DIR, wait: bool = True, flags=(),
                 **env_overrides) -> Proc:
    """Start ``lambda-runtime-api-daemon`` on free ports (env overrides as keyword arguments)."""
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, **env_overrides)
    argv = [str(BIN / "lambda-runtime-api-daemon"), *flags, *(RIC + ["echo.handler"] if command is None else command)]
    proc = Proc(argv, env, cwd, port, runtime_port)
    if wait:
        proc.wait_healthy()
    return proc


@pytest.fixture
def daemon_factory():
    started: list = []

    def factory(*args, **kwargs) -> Proc:
        proc = start_daemon(*args, **kwargs)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture
def echo_daemon(daemon_factory) -> Proc:
    return daemon_factory(AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
