"""Extensions API end to end: real daemon, real awslambdaric, extensions in Python (stdlib) and
bash+curl started from a temp LAMBDA_EXTENSIONS_DIR, an internal extension registering at import."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import FUNCTIONS_DIR, RIC, ROOT, wait_until
from extsupport import ExtLog, alive, make_extensions_dir


def start(daemon_factory, tmp_path, names, handler="ext_handlers.seen", **env):
    log = ExtLog(tmp_path / "ext.log")
    directory = make_extensions_dir(tmp_path, *names)
    proc = daemon_factory(RIC + [handler], cwd=FUNCTIONS_DIR, LAMBDA_EXTENSIONS_DIR=str(directory),
                          EXT_LOG=str(log.path), **env)
    return proc, log


def function_error(response):
    status, headers, body = response
    assert status == 200, response
    assert headers.get("x-amz-function-error") == "Unhandled", response
    return json.loads(body)


def test_python_and_bash_extensions_get_invoke_then_spindown(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["rec-py", "bash-curl"], AWS_LAMBDA_FUNCTION_IDLETIMEOUT="1.5")
    status, headers, body = proc.invoke({"expect": ["rec-py", "bash-curl"]})
    assert status == 200, body
    result = json.loads(body)
    request_id = headers["x-amzn-requestid"]
    assert result["seen"] == ["bash-curl", "rec-py"]
    # Both registered before the runtime's init went on, and run in the runtime's process group.
    registered = log.records("registered")
    assert {r["ext"] for r in registered} == {"rec-py", "bash-curl"}
    py = log.records("registered", "rec-py")[0]
    assert py["pgid"] == result["pgid"]
    assert py["body"] == {"functionName": "ext_handlers", "functionVersion": "$LATEST", "handler": "ext_handlers.seen"}
    for ext in ("rec-py", "bash-curl"):
        (invoke,) = log.events("INVOKE", ext)
        assert invoke["requestId"] == request_id
        assert invoke["invokedFunctionArn"] == "arn:aws:lambda:us-east-1:012345678912:function:ext_handlers"
        assert invoke["tracing"]["type"] == "X-Amzn-Trace-Id" and invoke["tracing"]["value"].startswith("Root=1-")
        assert abs(invoke["deadlineMs"] - time.time() * 1000) < 5000
    # A second invocation goes out only after both extensions are back in event/next.
    status, headers, body = proc.invoke({"expect": ["rec-py", "bash-curl"]})
    assert status == 200 and json.loads(body)["seen"] == ["bash-curl", "rec-py"]
    # Idle stop: SHUTDOWN with reason spindown, then the extensions exit.
    wait_until(lambda: len(log.events("SHUTDOWN")) == 2, 10, message="SHUTDOWN to both extensions")
    for event in log.events("SHUTDOWN"):
        assert event["shutdownReason"] == "spindown"
    wait_until(lambda: not alive(py["pid"]), 5, message="the extension to exit")
    assert proc.proc.poll() is None


def test_timeout_kill_sends_shutdown_timeout_and_next_invoke_gets_a_fresh_sandbox(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["rec-py"], handler="ext_handlers.sleep",
                      AWS_LAMBDA_FUNCTION_TIMEOUT="1")
    error = function_error(proc.invoke({"seconds": 5}))
    assert error["errorType"] == "Sandbox.Timedout"
    wait_until(lambda: log.events("SHUTDOWN"), 5, message="SHUTDOWN after the timeout")
    (shutdown,) = log.events("SHUTDOWN")
    assert shutdown["shutdownReason"] == "timeout"
    got_at = [r for r in log.records("event") if r["event"]["eventType"] == "SHUTDOWN"][0]["t"]
    assert 1000 <= shutdown["deadlineMs"] - got_at * 1000 <= 2500  # AWS's 2 s for external extensions
    status, _, body = proc.invoke({"seconds": 0})
    assert status == 200, body
    assert len(log.records("registered")) == 2


def test_runtime_crash_sends_shutdown_failure(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["rec-py"], handler="ext_handlers.crash")
    error = function_error(proc.invoke({}))
    assert error["errorType"] == "Runtime.ExitError"
    wait_until(lambda: log.events("SHUTDOWN"), 5, message="SHUTDOWN after the crash")
    assert log.events("SHUTDOWN")[0]["shutdownReason"] == "failure"


def test_daemon_sigterm_sends_shutdown_before_exit(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["rec-py", "bash-curl"])
    assert proc.invoke({"expect": ["rec-py"]})[0] == 200
    pid = log.records("registered", "rec-py")[0]["pid"]
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert sorted(e["shutdownReason"] for e in log.events("SHUTDOWN")) == ["spindown", "spindown"]
    assert log.records("exit", "rec-py")
    assert not alive(pid)


def test_internal_extension_registers_at_import_and_gets_invoke(daemon_factory, tmp_path):
    proc = daemon_factory(RIC + ["internal_ext.handler"], cwd=FUNCTIONS_DIR,
                          LAMBDA_EXTENSIONS_DIR=str(tmp_path / "none"))
    ids = []
    for _ in range(2):
        status, headers, body = proc.invoke({})
        assert status == 200, body
        ids.append(headers["x-amzn-requestid"])
        result = json.loads(body)
        assert result["registered"]["functionName"] == "internal_ext"
    assert result["received"] == ids


def test_never_registering_extension_fails_init_in_time_and_next_invoke_retries(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["silent-one"], AWS_LAMBDA_INIT_TIMEOUT="1.5")
    for attempt in (1, 2):
        began = time.monotonic()
        error = function_error(proc.invoke({}))
        elapsed = time.monotonic() - began
        assert error["errorType"] == "Extension.InitTimeout", error
        assert "silent-one" in error["errorMessage"] and "did not register" in error["errorMessage"]
        assert elapsed < 1.5 + 2.0, elapsed
        assert len(log.records("start", "silent-one")) == attempt  # a fresh init each time
    wait_until(lambda: not any(alive(r["pid"]) for r in log.records("start")), 5, message="silent ones killed")
    assert proc.request("GET", "/_/health")[0] == 200


def test_crashing_extension_fails_init_at_once(daemon_factory, tmp_path):
    proc, _ = start(daemon_factory, tmp_path, ["crash-early"], AWS_LAMBDA_INIT_TIMEOUT="10")
    began = time.monotonic()
    error = function_error(proc.invoke({}))
    assert time.monotonic() - began < 5
    assert error["errorType"] == "Extension.Crash"
    assert "crash-early" in error["errorMessage"] and "exit status 3" in error["errorMessage"]


def test_extension_init_error_fails_init_with_its_error(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["initerr-conf"])
    error = function_error(proc.invoke({}))
    assert error["errorType"] == "Extension.ConfigInvalid"
    assert "initerr-conf" in error["errorMessage"] and "missing API key" in error["errorMessage"]
    # The extension gets its 202 before its process group is torn down (it exits by itself after it).
    (answer,) = wait_until(lambda: log.records("init_error"), 10, message="the extension's answer to init/error")
    assert answer["status"] == 202
    (started,) = log.records("start")
    wait_until(lambda: not alive(started["pid"]), 5, message="the extension to be gone")


def test_every_misuse_gets_aws_error(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["probe-x"])
    status, headers, body = proc.invoke({"expect": ["probe-x"]})
    assert status == 200, body
    (probe,) = log.records("probe")
    r = probe["results"]

    def refused(key, status, error_type):
        assert r[key]["status"] == status, (key, r[key])
        assert r[key]["body"]["errorType"] == error_type, (key, r[key])

    refused("no_name", 403, "Extension.InvalidExtensionName")
    refused("bad_body", 403, "InvalidRequestFormat")
    refused("bad_event", 403, "Extension.InvalidEventType")
    assert r["wrong_method"]["status"] == 405
    # The refused registration left nothing behind: the same name then registers fine.
    assert r["register"]["status"] == 200
    assert r["register"]["body"] == {"functionName": "ext_handlers", "functionVersion": "$LATEST",
                                     "handler": "ext_handlers.seen", "accountId": "012345678912"}
    refused("again", 403, "Extension.InvalidExtensionState")
    refused("internal_shutdown", 403, "Extension.InvalidEventType")
    refused("next_no_id", 403, "Extension.MissingExtensionIdentifier")
    refused("next_bad_id", 403, "Extension.InvalidExtensionIdentifier")
    refused("next_unknown_id", 403, "Extension.UnknownExtensionIdentifier")
    refused("init_error_no_type", 403, "Extension.MissingHeader")
    refused("subscribe_remote", 400, "ValidationError")
    refused("subscribe_bad", 400, "ValidationError")
    wait_until(lambda: log.records("late"), 5, message="the late registration attempt")
    late = log.records("late")[0]["answer"]
    assert late["status"] == 403 and late["body"]["errorType"] == "Extension.RegistrationClosed"
    # Misuse changed nothing: the next invocation works.
    assert proc.invoke({"expect": ["probe-x"]})[0] == 200


def test_eleventh_extension_fails_init(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["many-x"])
    error = function_error(proc.invoke({}))
    assert error["errorType"] == "Extension.TooManyExtensions"
    assert "many-x-10" in error["errorMessage"]
    answers = log.records("many")
    assert [a["status"] for a in answers[:10]] == [200] * 10
    # The 11th answer (403) may not get recorded: the failed init kills the extension at once.
    for late in answers[10:]:
        assert late["status"] == 403 and late["body"]["errorType"] == "Extension.TooManyExtensions"


def test_each_instance_has_its_own_extensions(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["rec-py"], MAX_CONCURRENCY="2")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: proc.invoke({"expect": ["rec-py"], "hold": 1.0}), range(2)))
    groups = {}
    for status, headers, body in answers:
        assert status == 200, body
        result = json.loads(body)
        assert result["seen"] == ["rec-py"]
        groups[headers["x-amzn-requestid"]] = result["pgid"]
    assert len(set(groups.values())) == 2  # two instances ran them
    for rec in log.records("event", "rec-py"):
        # The INVOKE went to the extension of the instance that ran the invocation.
        assert rec["pgid"] == groups[rec["event"]["requestId"]]


def test_examples_walkthrough(daemon_factory):
    example = ROOT / "examples" / "extensions"
    proc = daemon_factory(RIC + ["hello.handler"], cwd=example / "function",
                          LAMBDA_EXTENSIONS_DIR=str(example / "extensions"))
    status, headers, body = proc.invoke({"name": "extensions"})
    assert status == 200 and json.loads(body) == {"hello": "extensions"}
    request_id = headers["x-amzn-requestid"]
    wait_until(lambda: f'platform.report: {{"requestId": "{request_id}"' in proc.stdout, 10,
               message="the telemetry printer's report line")
    out = proc.stdout
    assert f"[print-events] INVOKE {request_id}" in out
    assert '[bash-events] {"eventType": "INVOKE", "deadlineMs"' in out and request_id in out
    assert "[telemetry-printer]" in out and f"function: hello from {request_id}" in out
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "[print-events] SHUTDOWN (spindown)" in proc.stdout


def test_post_invoke_phase_is_bounded_by_the_deadline(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["busy-x"], handler="ext_handlers.sleep",
                      AWS_LAMBDA_FUNCTION_TIMEOUT="2", BUSY_SECONDS="30")
    began = time.monotonic()
    status, _, body = proc.invoke({"seconds": 0})
    assert status == 200, body  # the caller has its answer as soon as the runtime gave it
    assert time.monotonic() - began < 1.5
    # The instance is busy until its extension is back in event/next; it never is, so at the
    # deadline (2 s after dispatch) the instance is reset (SHUTDOWN timeout) and the next
    # invocation gets a fresh one. It is sent 1 s in, so that its own 2 s wait in the queue
    # outlasts the reset and the new instance's init.
    time.sleep(1.0)
    status, _, body = proc.invoke({"seconds": 0})
    assert status == 200, body
    assert time.monotonic() - began < 8.0
    assert len(log.records("start", "busy-x")) == 2
    first = log.records("start", "busy-x")[0]["pid"]
    wait_until(lambda: not alive(first), 5, message="the busy extension to be killed after its 2 s")


def test_extension_dying_mid_invocation_fails_it_with_extension_crash(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["die-x"], handler="ext_handlers.sleep")
    error = function_error(proc.invoke({"seconds": 2}))
    assert error["errorType"] == "Extension.Crash"
    assert "die-x" in error["errorMessage"] and "exit status 1" in error["errorMessage"]
    # The instance was reset: the next invocation runs on a fresh one (with a fresh extension).
    status, _, body = proc.invoke({"seconds": 0})
    assert status == 200, body
    assert len(log.records("start", "die-x")) == 2
