"""Configuration (the settings and the command line): unit tests of ``config.load`` and end-to-end start-up
errors (the real console script must exit non-zero with one clear line naming the variable), the
RIE's flags and ``python -m lambda_rapid``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from conftest import BIN, ECHO_DIR, FUNCTIONS_DIR, PYTHON, RIC, Proc, daemon_env, free_port
from lambda_rapid import config as cfg

CMD = ["python3", "-m", "awslambdaric", "echo.handler"]
ENV = {"PATH": os.environ.get("PATH", os.defpath)}


def load(args=CMD, **env):
    return cfg.load(list(args), {**ENV, **{k: str(v) for k, v in env.items()}}, cwd=str(ECHO_DIR))


def error_of(args=CMD, **env) -> str:
    with pytest.raises(cfg.ConfigError) as e:
        load(args, **env)
    return str(e.value)


# ---- unit: defaults and the command line --------------------------------------------------------

def test_defaults():
    c = load()
    assert c.command == tuple(CMD)
    assert c.handler == "echo.handler"
    assert c.function_name == "echo"
    assert c.function_version == "$LATEST"
    assert (c.invoke_host, c.invoke_port) == ("0.0.0.0", 8080)
    assert (c.runtime_host, c.runtime_port) == ("127.0.0.1", 9001)
    assert c.timeout == 3.0 and c.memory_size == 3008 and c.init_timeout == 10.0 and c.idle_timeout == 1800.0
    assert c.max_concurrency == 1 and c.min_instances == 0 and c.max_queued == 1000
    assert c.runtime_max_concurrency == 1
    assert c.amqp_uri is None and c.amqp_durable is True and c.amqp_queue_type == "classic"
    assert c.print_reports is False and c.log_level == "INFO" and c.structured_logging is False
    assert c.enable_openfaas is False
    assert c.extensions_dir == "/opt/extensions"
    assert c.region == "us-east-1"
    assert c.function_arn == "arn:aws:lambda:us-east-1:012345678912:function:echo"
    assert c.cwd == str(ECHO_DIR)


def test_handler_rules():
    assert load(["python3", "-m", "awslambdaric", "pkg/mod.fn"]).handler == "pkg/mod.fn"
    assert load(["python3", "-m", "awslambdaric", "pkg/mod.fn"]).function_name == "mod"
    one = load(["python3"], _HANDLER="app.main")
    assert one.command == ("python3",) and one.handler == "app.main" and one.function_name == "app"
    assert load(["python3"]).function_name == "function"
    assert load(AWS_LAMBDA_FUNCTION_NAME="my-fn").function_name == "my-fn"


def test_bootstrap_discovery(tmp_path, monkeypatch):
    bootstrap = tmp_path / "task" / "bootstrap"
    bootstrap.parent.mkdir()
    bootstrap.write_text("#!/bin/sh\n")
    bootstrap.chmod(0o755)
    monkeypatch.setattr(cfg, "BOOTSTRAP_CANDIDATES", (str(tmp_path / "missing"), str(bootstrap)))
    c = load([], _HANDLER="x.y")
    assert c.command == (str(bootstrap),)
    assert c.handler == "x.y"
    bootstrap.chmod(0o644)
    assert "not executable" in error_of([])


def test_missing_bootstrap(monkeypatch, tmp_path):
    monkeypatch.setattr(cfg, "BOOTSTRAP_CANDIDATES", (str(tmp_path / "a"), str(tmp_path / "b")))
    message = error_of([])
    assert "no runtime command" in message and str(tmp_path / "a") in message


def test_command_checks(tmp_path):
    assert "was not found on PATH" in error_of(["no-such-runtime-xyz", "h.h"])
    assert "does not exist" in error_of([str(tmp_path / "nope"), "h.h"])
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert "not executable" in error_of([str(script), "h.h"])
    assert "not executable" in error_of([str(tmp_path), "h.h"])


def test_rie_flags():
    c = load(["--runtime-interface-emulator-address", "127.0.0.1:9100", "--runtime-api-address=127.0.0.1:9101",
              "--log-level", "debug", *CMD], PORT=1, RUNTIME_API_PORT=2, LOG_LEVEL="ERROR")
    assert (c.invoke_host, c.invoke_port) == ("127.0.0.1", 9100)
    assert (c.runtime_host, c.runtime_port) == ("127.0.0.1", 9101)
    assert c.log_level == "DEBUG"
    assert c.command == tuple(CMD)
    assert load(["--runtime-interface-emulator-address", ":8081", *CMD]).invoke_host == "0.0.0.0"
    assert "unknown option --bogus" in error_of(["--bogus", *CMD])
    assert "needs a value" in error_of(["--log-level"])
    assert "--runtime-api-address" in error_of(["--runtime-api-address", "nohostport", *CMD])
    assert "--runtime-interface-emulator-address" in error_of(["--runtime-interface-emulator-address", "h:99999"])


# ---- unit: values -------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), ("1", True), ("Yes", True),
                                            ("false", False), ("0", False), ("NO", False), ("False", False)])
def test_booleans(value, expected):
    c = load(PRINT_REPORTS=value, ENABLE_OPENFAAS=value, AMQP_DURABLE_QUEUE=value)
    assert c.print_reports is expected and c.enable_openfaas is expected and c.amqp_durable is expected


@pytest.mark.parametrize("name", ["PRINT_REPORTS", "ENABLE_OPENFAAS", "AMQP_DURABLE_QUEUE", "USE_STRUCTURED_LOGGING"])
@pytest.mark.parametrize("value", ["maybe", "2", "on"])
def test_bad_booleans(name, value):
    message = error_of(**{name: value})
    assert name in message and value in message


def test_structured_logging():
    assert load(USE_STRUCTURED_LOGGING="").structured_logging is True
    assert load(USE_STRUCTURED_LOGGING="true").structured_logging is True
    assert load(USE_STRUCTURED_LOGGING="0").structured_logging is False


@pytest.mark.parametrize("value,level", [("debug", "DEBUG"), ("TRACE", "DEBUG"), ("info", "INFO"),
                                         ("Warn", "WARNING"), ("WARNING", "WARNING"), ("error", "ERROR")])
def test_log_levels(value, level):
    assert load(LOG_LEVEL=value).log_level == level


@pytest.mark.parametrize("name,value", [
    ("LOG_LEVEL", "LOUD"),
    ("PORT", "abc"), ("PORT", "70000"), ("PORT", "-1"), ("RUNTIME_API_PORT", "x"),
    ("MAX_CONCURRENCY", "0"), ("MAX_CONCURRENCY", "-2"), ("MAX_CONCURRENCY", "1.5"), ("MAX_CONCURRENCY", "many"),
    ("MIN_INSTANCES", "-1"), ("MAX_QUEUED_INVOCATIONS", "-1"), ("MAX_QUEUED_INVOCATIONS", "lots"),
    ("AWS_LAMBDA_FUNCTION_TIMEOUT", "0"), ("AWS_LAMBDA_FUNCTION_TIMEOUT", "-3"),
    ("AWS_LAMBDA_FUNCTION_TIMEOUT", "nan"), ("AWS_LAMBDA_FUNCTION_TIMEOUT", "inf"),
    ("AWS_LAMBDA_FUNCTION_TIMEOUT", "3s"),
    ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0"), ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1GB"),
    ("AWS_LAMBDA_FUNCTION_IDLETIMEOUT", "0"), ("AWS_LAMBDA_INIT_TIMEOUT", "never"),
    ("AWS_LAMBDA_MAX_CONCURRENCY", "0"),
])
def test_bad_values_name_the_variable(name, value):
    message = error_of(**{name: value})
    assert name in message
    assert repr(value) in message


def test_numbers():
    c = load(AWS_LAMBDA_FUNCTION_TIMEOUT="0.25", MAX_CONCURRENCY="4", MIN_INSTANCES="2", MAX_QUEUED_INVOCATIONS="0",
             AWS_LAMBDA_FUNCTION_MEMORY_SIZE="128", AWS_LAMBDA_MAX_CONCURRENCY="3", PORT="0")
    assert c.timeout == 0.25 and c.max_concurrency == 4 and c.min_instances == 2 and c.max_queued == 0
    assert c.memory_size == 128 and c.runtime_max_concurrency == 3 and c.invoke_port == 0


def test_min_instances_above_max():
    message = error_of(MIN_INSTANCES=3, MAX_CONCURRENCY=2)
    assert "MIN_INSTANCES" in message and "MAX_CONCURRENCY" in message


def test_bad_function_name():
    assert "AWS_LAMBDA_FUNCTION_NAME" in error_of(AWS_LAMBDA_FUNCTION_NAME="a:b")
    assert "AWS_LAMBDA_FUNCTION_NAME" in error_of(AWS_LAMBDA_FUNCTION_NAME="a/b")


def test_amqp_settings():
    assert load(AMQP_URI="amqp://h:5672/").amqp_uri == "amqp://h:5672/"
    c = load(AMQP_URI="amqp://h:5672/?heartbeat=0", AMQP_USERNAME="u", AMQP_PASSWORD="p@ss")
    assert c.amqp_uri == "amqp://u:p%40ss@h:5672/?heartbeat=0"
    # Credentials in the URI win; credentials without a URI do not turn AMQP on.
    assert load(AMQP_URI="amqp://a:b@h/", AMQP_USERNAME="u", AMQP_PASSWORD="p").amqp_uri == "amqp://a:b@h/"
    assert load(AMQP_USERNAME="u", AMQP_PASSWORD="p").amqp_uri is None
    message = error_of(AMQP_URI="http://u:secret@h/")
    assert "AMQP_URI" in message and "secret" not in message
    assert "connection_attempts" in error_of(AMQP_URI="amqp://h/?connection_attempts=x")


@pytest.mark.parametrize("env,expected", [
    ({}, (True, "classic")),
    ({"AMQP_DURABLE_QUEUE": "false"}, (False, "classic")),  # the Go daemon's auto-delete queue
    ({"AMQP_QUEUE_TYPE": "quorum"}, (True, "quorum")),
    ({"AMQP_QUEUE_TYPE": " Quorum ", "AMQP_DURABLE_QUEUE": "true"}, (True, "quorum")),
    ({"AMQP_QUEUE_TYPE": "CLASSIC", "AMQP_DURABLE_QUEUE": "0"}, (False, "classic")),
])
def test_queue_settings(env, expected):
    c = load(AMQP_URI="amqp://h/", **env)
    assert (c.amqp_durable, c.amqp_queue_type) == expected


def test_queue_settings_that_cannot_work():
    message = error_of(AMQP_QUEUE_TYPE="stream")
    assert "AMQP_QUEUE_TYPE='stream'" in message and "classic or quorum" in message
    message = error_of(AMQP_QUEUE_TYPE="quorum", AMQP_DURABLE_QUEUE="false")
    assert "AMQP_QUEUE_TYPE=quorum" in message and "AMQP_DURABLE_QUEUE=false" in message


def test_runtime_env():
    env = load(AWS_LAMBDA_FUNCTION_NAME="fn", AMQP_URI="amqp://u:p@h/", AMQP_USERNAME="u", AMQP_PASSWORD="p",
               TZ="Europe/Paris", AWS_REGION="eu-west-1", AWS_LAMBDA_RUNTIME_API="1.2.3.4:5",
               AWS_LAMBDA_FUNCTION_MEMORY_SIZE="256").runtime_env
    assert not [k for k in env if k.startswith("AMQP_")]
    assert "AWS_LAMBDA_RUNTIME_API" not in env  # set per instance
    assert env["TZ"] == "Europe/Paris"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "fn"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/fn"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["LAMBDA_TASK_ROOT"] == str(ECHO_DIR)
    assert env["_HANDLER"] == "echo.handler"
    assert "AWS_LAMBDA_MAX_CONCURRENCY" not in env
    assert load(AWS_LAMBDA_MAX_CONCURRENCY="2").runtime_env["AWS_LAMBDA_MAX_CONCURRENCY"] == "2"
    assert load(AWS_DEFAULT_REGION="ap-south-1").region == "ap-south-1"


def test_reload_settings(tmp_path):
    off = load()
    assert off.reload_on_change is False and off.reload_dirs == ()
    assert "PYTHONDONTWRITEBYTECODE" not in off.runtime_env
    assert load(RELOAD_ON_CHANGE="false").reload_on_change is False
    on = load(RELOAD_ON_CHANGE="true")
    assert on.reload_on_change is True and on.reload_dirs == (str(ECHO_DIR),)  # the function's directory
    # A .pyc is checked against its source's mtime in whole seconds: no stale bytecode after a quick edit.
    assert on.runtime_env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert load(RELOAD_ON_CHANGE="1", PYTHONDONTWRITEBYTECODE="").runtime_env["PYTHONDONTWRITEBYTECODE"] == ""
    (tmp_path / "lib").mkdir()
    dirs = load(RELOAD_ON_CHANGE="yes", RELOAD_DIRS=f"{tmp_path / 'lib'}::{ECHO_DIR}:../echo-lambda:").reload_dirs
    assert dirs == (str(ECHO_DIR), str(tmp_path / "lib"))  # relative to the daemon's directory, each once
    assert error_of(RELOAD_ON_CHANGE="true", RELOAD_DIRS="/no/such") == "RELOAD_DIRS entry '/no/such' does not exist"
    assert error_of(RELOAD_ON_CHANGE="true", RELOAD_DIRS="echo.py") == (
        f"RELOAD_DIRS entry 'echo.py' ({ECHO_DIR / 'echo.py'}) is not a directory")
    assert error_of(RELOAD_DIRS="/tmp") == "RELOAD_DIRS='/tmp' is set but RELOAD_ON_CHANGE is not true"
    assert error_of(RELOAD_ON_CHANGE="off") == "RELOAD_ON_CHANGE='off' is not a boolean (use true/false/1/0/yes/no)"
    assert load(RELOAD_DIRS="").reload_dirs == ()
    with pytest.raises(cfg.ConfigError, match="would watch the whole file system"):
        cfg.load(CMD, {**ENV, "RELOAD_ON_CHANGE": "true"}, cwd="/")


def test_redact_uri():
    assert cfg.redact_uri("amqp://user:hunter2@host:5672/") == "amqp://user:xxxxx@host:5672/"
    assert cfg.redact_uri("amqp://host/") == "amqp://host/"


# ---- end to end: start-up errors ----------------------------------------------------------------

def run_daemon(args, timeout=20, cwd=ECHO_DIR, **env) -> subprocess.CompletedProcess:
    environment = daemon_env(**{"PORT": free_port(), "RUNTIME_API_PORT": free_port(), **env})
    return subprocess.run([str(BIN / "lambda-runtime-api-daemon"), *args], env=environment, cwd=str(cwd),
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode != 0
    lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr.decode()
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert done.stdout == b""
    return lines[0]


@pytest.mark.parametrize("name,value", [
    ("MAX_CONCURRENCY", "0"), ("LOG_LEVEL", "LOUD"), ("PORT", "abc"), ("RUNTIME_API_PORT", "99999"),
    ("PRINT_REPORTS", "maybe"), ("ENABLE_OPENFAAS", "nah"), ("AWS_LAMBDA_FUNCTION_TIMEOUT", "-1"),
    ("MAX_QUEUED_INVOCATIONS", "x"), ("AMQP_DURABLE_QUEUE", "2"), ("AMQP_QUEUE_TYPE", "lazy"),
])
def test_startup_error_bad_env(name, value):
    started = time.monotonic()
    done = run_daemon(RIC + ["echo.handler"], **{name: value})
    assert_one_line_error(done, name, value)
    assert time.monotonic() - started < 10


def test_startup_error_quorum_queue_that_auto_deletes():
    done = run_daemon(RIC + ["echo.handler"], AMQP_URI="amqp://127.0.0.1:5672/", AMQP_QUEUE_TYPE="quorum",
                      AMQP_DURABLE_QUEUE="false")
    assert_one_line_error(done, "AMQP_QUEUE_TYPE=quorum", "AMQP_DURABLE_QUEUE=false")


def test_startup_error_missing_bootstrap():
    if any(os.path.exists(p) for p in cfg.BOOTSTRAP_CANDIDATES):
        pytest.skip("this machine has a Lambda bootstrap")
    assert_one_line_error(run_daemon([]), "bootstrap", "/var/task/bootstrap")


def test_startup_error_command_not_executable(tmp_path):
    script = tmp_path / "runtime"
    script.write_text("#!/bin/sh\n")
    assert_one_line_error(run_daemon([str(script), "h.h"]), str(script), "not executable")
    assert_one_line_error(run_daemon(["no-such-runtime-xyz", "h.h"]), "no-such-runtime-xyz")


def test_startup_error_unknown_flag():
    assert_one_line_error(run_daemon(["--verbose", *RIC, "echo.handler"]), "--verbose")


def test_startup_error_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = run_daemon(RIC + ["echo.handler"], PORT=port, INVOKE_API_HOST="127.0.0.1")
        assert_one_line_error(done, str(port))
        done = run_daemon(RIC + ["echo.handler"], RUNTIME_API_PORT=port)
        assert_one_line_error(done, str(port))


def test_help_and_version():
    done = run_daemon(["--help"])
    assert done.returncode == 0 and b"usage:" in done.stdout
    done = run_daemon(["--version"])
    assert done.returncode == 0 and b"lambda-runtime-api-daemon" in done.stdout


# ---- end to end: RIE flags and python -m ---------------------------------------------------------

def test_rie_flags_end_to_end():
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=free_port(), RUNTIME_API_PORT=free_port(), AWS_LAMBDA_FUNCTION_NAME="rie-fn")
    argv = [str(BIN / "lambda-runtime-api-daemon"),
            "--runtime-interface-emulator-address", f"127.0.0.1:{port}",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--log-level", "debug",
            *RIC, "e2e_handlers.handler"]
    proc = Proc(argv, env, FUNCTIONS_DIR, port, runtime_port)
    try:
        proc.wait_healthy()
        status, _, body = proc.invoke({"action": "whoami"}, name="rie-fn")
        assert status == 200
        me = json.loads(body)
        # The runtime's own listener is on the --runtime-api-address host.
        assert me["env"]["AWS_LAMBDA_RUNTIME_API"].startswith("127.0.0.1:")
        # --log-level debug: the daemon logs at DEBUG.
        assert "DEBUG" in proc.stderr
        with socket.create_connection(("127.0.0.1", runtime_port), timeout=5):
            pass
    finally:
        proc.stop()


def test_python_dash_m(tmp_path):
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    proc = Proc([PYTHON, "-m", "lambda_rapid", *RIC, "echo.handler"], env, ECHO_DIR, port, runtime_port)
    try:
        proc.wait_healthy()
        status, headers, body = proc.invoke({"key": "value"}, name="echo-lambda")
        assert status == 200 and json.loads(body) == {"key": "value"}
    finally:
        proc.stop()
    assert proc.proc.returncode == 0
    done = subprocess.run([PYTHON, "-m", "lambda_rapid"], env=daemon_env(MAX_CONCURRENCY="0"),
                          capture_output=True, timeout=20, cwd=str(ECHO_DIR))
    assert_one_line_error(done, "MAX_CONCURRENCY")

