"""Reload on change (RELOAD_ON_CHANGE): the real daemon with awslambdaric runs a handler file from a
temp directory, and the tests edit that file for real while it serves. The daemon stays up (same pid,
same ports, same AMQP consumer); idle instances are replaced at once, a busy one finishes its
invocation on the old code; broken code gives the usual init error and fixing it brings it back.
Every wait is a bounded poll on what the daemon says or answers. The pool's part
(``Pool.retire_all``) is also tested in-process at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from amqp_support import AMQP_URI, RpcClient, broker_up, consumers, unique_name, wait_consumers
from conftest import BIN, PYTHON, RIC, Proc, daemon_env, free_port, wait_until
from extsupport import ExtLog, make_extensions_dir
from single_file import bare_python, built_bin

HANDLER = '''\
import os
import time

ANSWER = {answer!r}


def handler(event, context):
    gate = event.get("wait_for")
    if gate:
        print("waiting for", gate, flush=True)
        while not os.path.exists(gate):
            time.sleep(0.01)
    return ANSWER
'''


def save(path: Path, text: str) -> None:
    """An editor's safe save: the new text is written beside, then renamed over the file at once
    (from outside the watched directories, so the rename is the only change seen). An in-place
    rewrite has its own test."""
    staging = path.parent.parent / "staging"
    staging.mkdir(exist_ok=True)
    temporary = staging / f"{path.name}.{os.getpid()}.{threading.get_ident()}"
    temporary.write_text(text)
    os.replace(temporary, path)


def write_handler(directory: Path, answer: str, source: str = None) -> None:
    save(directory / "app.py", source if source is not None else HANDLER.format(answer=answer))


def reload_lines(proc: Proc) -> list:
    return [line.split(" INFO ", 1)[1] for line in proc.stderr.splitlines() if " INFO reload: " in line]


def wait_reloads(proc: Proc, count: int, timeout: float = 15.0) -> list:
    """The daemon's reload lines once there are ``count`` of them."""
    wait_until(lambda: len(reload_lines(proc)) >= count, timeout, message=f"{count} reload line(s)")
    return reload_lines(proc)


def answer_of(proc: Proc, payload=None, timeout: float = 30.0):
    """(answer, function error header) of one invocation; AssertionError unless it was a 200."""
    status, headers, body = proc.invoke(payload, timeout=timeout)
    assert status == 200, (status, body)
    return json.loads(body), headers.get("x-amz-function-error")


@pytest.fixture
def function_dir(tmp_path) -> Path:
    directory = tmp_path / "function"
    directory.mkdir()
    write_handler(directory, "old")
    return directory


@pytest.fixture
def reloading(daemon_factory, function_dir):
    """Start a daemon that reloads ``function_dir``'s app.py (env overrides as keyword arguments)."""

    def start(**env) -> Proc:
        proc = daemon_factory(RIC + ["app.handler"], cwd=function_dir, RELOAD_ON_CHANGE="true",
                              AWS_LAMBDA_FUNCTION_TIMEOUT=30, **env)
        wait_until(lambda: "reload on change: watching" in proc.stderr, 10, message="the watcher")
        return proc

    return start


# ---- a real edit while the daemon serves ----------------------------------------------------------

def test_edit_while_invoking_in_a_loop_switches_answers_without_errors(reloading, function_dir):
    proc = reloading()
    answers: list = []
    failures: list = []
    stop = threading.Event()

    def invoke_continuously():
        while not stop.is_set() and len(answers) < 2000:
            try:
                answers.append(answer_of(proc))
            except Exception as e:  # noqa: BLE001  (every failure is reported below)
                failures.append(repr(e))
                return

    loop = threading.Thread(target=invoke_continuously, daemon=True)
    loop.start()
    try:
        wait_until(lambda: len(answers) >= 5 or failures, 30, message="answers before the edit")
        write_handler(function_dir, "new")
        wait_until(lambda: ("new", None) in answers or failures, 30, message="the new answer")
        seen = len(answers)
        wait_until(lambda: len(answers) >= seen + 5 or failures, 30, message="answers after the edit")
    finally:
        stop.set()
        loop.join(30)
    assert not failures
    assert {error for _, error in answers} == {None}
    values = [value for value, _ in answers]
    first_new = values.index("new")
    assert first_new >= 5 and set(values[:first_new]) == {"old"} and set(values[first_new:]) == {"new"}
    assert reload_lines(proc) == ["reload: app.py changed; replacing 1 instance"]
    assert proc.proc.poll() is None  # the daemon itself never restarted
    metrics = proc.metrics()
    assert 'lambda_instance_kills_total{reason="reload"} 1' in metrics
    assert "lambda_instance_spawns_total 2" in metrics
    assert f'lambda_invocations_total{{outcome="success"}} {len(answers)}' in metrics
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0  # the watcher's thread does not hold the exit up


def test_busy_instance_finishes_on_the_old_code_and_the_next_invocation_gets_the_new(reloading, function_dir,
                                                                                        tmp_path):
    proc = reloading()
    gate = tmp_path / "release"  # outside the watched directory
    result: dict = {}
    slow = threading.Thread(target=lambda: result.update(slow=answer_of(proc, {"wait_for": str(gate)})))
    slow.start()
    wait_until(lambda: "waiting for" in proc.stdout, 15, message="the slow invocation to start")
    write_handler(function_dir, "new")
    assert wait_reloads(proc, 1) == ["reload: app.py changed; replacing 1 instance"]
    # Queued behind the busy instance (MAX_CONCURRENCY=1): it must not run on the old code.
    after = threading.Thread(target=lambda: result.update(after=answer_of(proc)))
    after.start()
    wait_until(lambda: "lambda_queue_depth 1" in proc.metrics(), 10, message="the second invocation queued")
    assert "lambda_instance_spawns_total 1" in proc.metrics()
    gate.touch()
    slow.join(30)
    after.join(30)
    assert result == {"slow": ("old", None), "after": ("new", None)}
    assert answer_of(proc) == ("new", None)
    assert "lambda_instance_spawns_total 2" in proc.metrics()


def test_edit_while_the_instance_is_starting_runs_the_waiting_invocation_on_the_new_code(reloading, function_dir,
                                                                                          tmp_path):
    proc = reloading()
    gate = tmp_path / "import-gate"
    slow_import = ("import os, time\nprint('importing', flush=True)\n"
                   f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n"
                   "def handler(event, context):\n    return 'old'\n")
    write_handler(function_dir, "old", slow_import)
    assert wait_reloads(proc, 1)[0].endswith("replacing 0 instances")
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(answer=answer_of(proc)))
    waiting.start()
    wait_until(lambda: "importing" in proc.stdout, 15, message="the instance to be importing")
    write_handler(function_dir, "new")
    assert wait_reloads(proc, 2)[1] == "reload: app.py changed; replacing 1 instance"
    waiting.join(30)
    assert result == {"answer": ("new", None)}  # not an init error: the starting instance was replaced
    metrics = proc.metrics()
    assert "lambda_instance_init_failures_total 0" in metrics and "lambda_instance_spawns_total 2" in metrics


def test_broken_import_gives_the_init_error_and_fixing_it_works(reloading, function_dir):
    proc = reloading()
    assert answer_of(proc) == ("old", None)
    steps = [
        ("def handler(event, context)\n    return 'no colon'\n", "Runtime.UserCodeSyntaxError"),
        ("import no_such_module_anywhere\n", "Runtime.ImportModuleError"),
    ]
    for n, (source, error_type) in enumerate(steps, 1):
        write_handler(function_dir, "", source)
        wait_reloads(proc, n)
        for _ in range(2):  # every invocation gets a fresh init, and the same error
            body, error = answer_of(proc)
            assert error == "Unhandled" and body["errorType"] == error_type, body
    write_handler(function_dir, "fixed")
    wait_reloads(proc, len(steps) + 1)
    assert answer_of(proc) == ("fixed", None)
    assert answer_of(proc) == ("fixed", None)
    assert proc.proc.poll() is None


def test_in_place_rewrite_reloads(reloading, function_dir):
    proc = reloading()
    assert answer_of(proc) == ("old", None)
    (function_dir / "app.py").write_text(HANDLER.format(answer="new"))  # truncated, then written
    wait_until(lambda: answer_of(proc) == ("new", None), 20, 0.05, "the new answer")
    assert all(line.startswith("reload: app.py changed") for line in reload_lines(proc))


def test_reload_dirs_watches_a_helper_module_in_another_directory(daemon_factory, tmp_path):
    function, lib = tmp_path / "function", tmp_path / "lib"
    function.mkdir()
    lib.mkdir()
    (function / "app.py").write_text("import helper\n\ndef handler(event, context):\n    return helper.VALUE\n")
    (lib / "helper.py").write_text("VALUE = 'helper one'\n")
    proc = daemon_factory(RIC + ["app.handler"], cwd=function, RELOAD_ON_CHANGE="true", RELOAD_DIRS=f"{lib}:",
                          PYTHONPATH=str(lib))
    wait_until(lambda: f"reload on change: watching {function}, {lib}" in proc.stderr, 10, message="the watcher")
    assert answer_of(proc) == ("helper one", None)
    save(lib / "helper.py", "VALUE = 'helper two'\n")
    assert wait_reloads(proc, 1) == [
        "reload: ../lib/helper.py changed; replacing 1 instance"]
    assert answer_of(proc) == ("helper two", None)


def test_ignored_files_do_not_reload_and_the_lines_name_the_changed_files(reloading, function_dir):
    (function_dir / "sub").mkdir()  # before the start: a file made at once in a new directory can be missed
    proc = reloading()
    assert answer_of(proc) == ("old", None)
    # What Python and editors leave beside the code (watchfiles' DefaultFilter): never a reload.
    (function_dir / "__pycache__").mkdir()
    (function_dir / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (function_dir / ".app.py.swp").write_bytes(b"\0")
    (function_dir / "app.py~").write_text("backup")
    # A save through a temporary file in the same directory (it comes and goes: not named), and a
    # file in a subdirectory.
    (function_dir / ".app.py.tmp1234").write_text(HANDLER.format(answer="new"))
    os.replace(function_dir / ".app.py.tmp1234", function_dir / "app.py")
    (function_dir / "sub" / "data.json").write_text("{}")

    def named() -> set:
        lines = reload_lines(proc)
        return {name for line in lines for name in line[len("reload: "):].split(" changed;")[0].split(", ")}

    wait_until(lambda: named() >= {"app.py", "sub/data.json"}, 15, message="both files named")
    assert named() == {"app.py", "sub/data.json"}
    assert answer_of(proc) == ("new", None)


def test_extensions_get_shutdown_and_the_whole_sandbox_restarts(reloading, tmp_path):
    log = ExtLog(tmp_path / "ext.log")
    proc = reloading(LAMBDA_EXTENSIONS_DIR=str(make_extensions_dir(tmp_path, "rec-one")), EXT_LOG=str(log.path))
    assert answer_of(proc) == ("old", None)
    first = [r["pid"] for r in log.records("registered")]
    write_handler(tmp_path / "function", "new")
    wait_reloads(proc, 1)
    wait_until(lambda: log.events("SHUTDOWN"), 10, message="SHUTDOWN to the extension")
    assert [e["shutdownReason"] for e in log.events("SHUTDOWN")] == ["spindown"]
    assert answer_of(proc) == ("new", None)
    registered = [r["pid"] for r in log.records("registered")]
    assert len(first) == 1 and len(registered) == 2 and registered[1] != first[0]  # a fresh extension too


def test_amqp_queue_stays_consumed_across_a_reload(reloading, function_dir):
    if not broker_up():
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest); .ci/run starts it")
    name = unique_name("reload")
    proc = reloading(AWS_LAMBDA_FUNCTION_NAME=name, AMQP_URI=AMQP_URI)
    wait_consumers(name)
    with RpcClient() as rpc:
        _, body = rpc.call(name, b"{}")
        assert json.loads(body) == "old"
        write_handler(function_dir, "new")
        wait_reloads(proc, 1)
        assert consumers(name) == 1
        _, body = rpc.call(name, b"{}")
        assert json.loads(body) == "new"
    assert consumers(name) == 1


# ---- off by default, and what stops it from starting --------------------------------------------

def mapped(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return name in f.read()


def test_off_by_default_no_watcher_and_watchfiles_not_loaded(daemon_factory, reloading, function_dir):
    off = daemon_factory(RIC + ["app.handler"], cwd=function_dir)
    assert answer_of(off) == ("old", None)
    assert "reload" not in off.stderr
    assert not mapped(off.proc.pid, "_rust_notify")  # watchfiles' compiled extension was never loaded
    on = reloading()
    assert mapped(on.proc.pid, "_rust_notify")  # the same probe sees it when the setting is on
    probe = ("import sys, lambda_rapid.cli, lambda_rapid.daemon; print('watchfiles' in sys.modules); "
             "import lambda_rapid.reload; print('watchfiles' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # not even the reload module imports it before it is used


def start_failure(argv: list, cwd: Path, **env) -> str:
    """The daemon's stderr when it must refuse to start (exit status 1, one line)."""
    port, runtime_port = free_port(), free_port()
    r = subprocess.run(argv, env=daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, **env), cwd=cwd,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r
    assert len(r.stderr.splitlines()) == 1, r.stderr
    return r.stderr.strip()


@pytest.mark.parametrize(("env", "message"), [
    ({"RELOAD_ON_CHANGE": "true", "RELOAD_DIRS": "/no/such/dir"}, "RELOAD_DIRS entry '/no/such/dir' does not exist"),
    ({"RELOAD_ON_CHANGE": "true", "RELOAD_DIRS": "app.py"}, "is not a directory"),
    ({"RELOAD_DIRS": "/tmp"}, "RELOAD_DIRS='/tmp' is set but RELOAD_ON_CHANGE is not true"),
    ({"RELOAD_ON_CHANGE": "sometimes"}, "RELOAD_ON_CHANGE='sometimes' is not a boolean"),
])
def test_bad_settings_are_one_line_start_up_errors(function_dir, env, message):
    line = start_failure([str(BIN / "lambda-runtime-api-daemon"), *RIC, "app.handler"], function_dir, **env)
    assert line.startswith("lambda-runtime-api-daemon: error: ") and message in line, line


def test_single_file_build_says_to_install_watchfiles(function_dir):
    python = bare_python()
    line = start_failure([python, "-I", "-S", str(built_bin() / "lambda-runtime-api-daemon"), PYTHON, "-m",
                          "awslambdaric", "app.handler"], function_dir, RELOAD_ON_CHANGE="true")
    assert "RELOAD_ON_CHANGE=true needs the watchfiles package" in line and "pip install 'watchfiles==" in line, line


# ---- the reloader in-process (Pool.retire_all's rules are in test_pool_inprocess.py) ---------------

class PoolStandIn:
    """What the reloader needs of the pool: whether it still accepts, and retire_all (recorded)."""

    def __init__(self) -> None:
        self.accepting = True
        self.retired = 0

    def retire_all(self) -> int:
        self.retired += 1
        return 0


def test_reloader_names_files_relative_and_skips_files_that_came_and_went(tmp_path, caplog):
    from watchfiles import Change

    from lambda_rapid.reload import Reloader

    caplog.set_level("INFO", "lambda_rapid.reload")
    pool = PoolStandIn()
    reloader = Reloader(pool, str(tmp_path / "fn"), [str(tmp_path / "fn")])
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "app.py").write_text("")
    temp = str(tmp_path / "fn" / "sedX1b2c3")
    reloader.reload({(Change.added, temp), (Change.deleted, temp)})
    assert pool.retired == 0  # only a temporary file: nothing to reload
    app = str(tmp_path / "fn" / "app.py")
    reloader.reload({(Change.added, temp), (Change.deleted, temp), (Change.deleted, app), (Change.added, app),
                     (Change.modified, str(tmp_path / "lib" / "helper.py"))})
    assert pool.retired == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "lambda_rapid.reload"]
    assert lines == ["reload: ../lib/helper.py, app.py changed; replacing 0 instances"]
    (tmp_path / "fn" / "new-dir").mkdir()
    reloader.reload({(Change.added, str(tmp_path / "fn" / "new-dir"))})
    assert pool.retired == 1  # a new, empty directory is not a change of the code
    pool.accepting = False  # shutting down: no more reloads
    reloader.reload({(Change.modified, app)})
    assert pool.retired == 1
