"""lambda-server end to end: boto3 / AWS CLI -> lambda-server -> RabbitMQ -> daemon -> awslambdaric.

Real processes, the real broker on 127.0.0.1:5672, a function (queue) name per test. The broker
restart test stops RabbitMQ's app for a few seconds and always starts it again.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import subprocess
import threading
import time
import uuid

import boto3
import botocore.config
import pytest

from amqp_support import (
    amqp_daemon,
    metric,
    queue_depth,
    queues_deleted,
    rabbitmqctl,
    rabbitmqctl_out,
    require_broker,  # noqa: F401  (autouse: fail clearly when RabbitMQ is not running)
    start_server,
    unique_name,
    wait_consumers,
)
from conftest import BIN, free_port, wait_until

SUCCESS = 'lambda_invocations_total{outcome="success"}'


@pytest.fixture
def server_factory():
    started: list = []

    def factory(**kwargs):
        proc = start_server(**kwargs)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop()


def client(url: str, read_timeout: float = 30.0):
    return boto3.client("lambda", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                                      read_timeout=read_timeout, connect_timeout=5))


@pytest.fixture(autouse=True)
def _delete_queues():
    """The daemons' queues are durable: gone after each test (after its daemons stopped)."""
    with queues_deleted():
        yield


def ready_server(server_factory, **env):
    server = server_factory(**env)
    server.wait_ready()
    return server


def test_boto3_through_lambda_server(daemon_factory, server_factory):
    name = unique_name("srv-echo")
    amqp_daemon(daemon_factory, name)
    server = ready_server(server_factory)
    lam = client(server.url)
    r = lam.invoke(FunctionName=name, Payload=b'{"key": "value"}')
    assert r["StatusCode"] == 200 and json.loads(r["Payload"].read()) == {"key": "value"}
    assert r["ExecutedVersion"] == "$LATEST" and "FunctionError" not in r

    r = lam.invoke(FunctionName=f"arn:aws:lambda:eu-west-1:111122223333:function:{name}", LogType="Tail",
                   Payload=b"[1]")
    assert json.loads(r["Payload"].read()) == [1]
    assert "REPORT RequestId: " in base64.b64decode(r["LogResult"]).decode()

    context = base64.b64encode(json.dumps({"custom": {"a": 1}}).encode()).decode()
    r = lam.invoke(FunctionName=f"{name}:$LATEST", ClientContext=context, Payload=b"{}")
    assert r["StatusCode"] == 200

    r = lam.invoke(FunctionName=name, InvocationType="DryRun")
    assert r["StatusCode"] == 204
    r = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b"{}")
    assert r["StatusCode"] == 202

    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName=name, Payload=b"not json")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=name, Qualifier="42", Payload=b"{}")  # the daemon checks the version


def test_function_error_and_sdk_request_id(daemon_factory, server_factory):
    name = unique_name("srv-fail")
    amqp_daemon(daemon_factory, name, "handlers.fail")
    server = ready_server(server_factory)
    rid = str(uuid.uuid4())
    status, headers, body = server.invoke({}, name=name, headers={"Amz-Sdk-Invocation-Id": rid})
    assert status == 200
    assert headers["x-amz-function-error"] == "Unhandled"
    assert headers["x-amzn-requestid"] == rid
    assert json.loads(body)["errorType"] == "ValueError"


def test_unknown_function_is_404_at_once(server_factory):
    server = ready_server(server_factory)
    lam = client(server.url)
    started = time.monotonic()
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as info:
        lam.invoke(FunctionName=unique_name("srv-nobody"), Payload=b"{}")
    assert time.monotonic() - started < 2
    assert "Function not found: arn:aws:lambda:us-east-1:012345678912:function:srv-nobody-" in str(info.value)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=unique_name("srv-nobody"), InvocationType="DryRun")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=unique_name("srv-nobody"), InvocationType="Event", Payload=b"{}")
    assert metric(server, 'lambda_server_requests_total{outcome="not_found"}') == 3


def test_event_runs_exactly_as_many_times_as_sent(daemon_factory, server_factory):
    name = unique_name("srv-event")
    daemon = amqp_daemon(daemon_factory, name, MAX_CONCURRENCY=2)
    server = ready_server(server_factory)
    lam = client(server.url)
    sent = 40
    for i in range(sent):
        assert lam.invoke(FunctionName=name, InvocationType="Event", Payload=json.dumps({"i": i}))["StatusCode"] == 202
    wait_until(lambda: metric(daemon, SUCCESS) >= sent, 30, message=f"{sent} events ran")
    time.sleep(1.0)  # anything extra (a duplicate delivery) would show up by now
    assert metric(daemon, SUCCESS) == sent


def test_fail_safe_timeout(daemon_factory, server_factory):
    name = unique_name("srv-slow")
    amqp_daemon(daemon_factory, name, "handlers.sleep", AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    server = ready_server(server_factory, AWS_LAMBDA_FUNCTION_TIMEOUT=1)
    started = time.monotonic()
    status, headers, body = server.invoke({"seconds": 3}, name=name)
    assert 0.9 < time.monotonic() - started < 3
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in json.loads(body)["errorMessage"]


def test_no_broker_means_503_not_a_hang(server_factory):
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/?connection_attempts=1&retry_delay=0.2"
    server = server_factory(AMQP_URI=dead)
    assert server.request("GET", "/_/health")[0] == 200
    assert server.request("GET", "/_/ready")[0] == 503
    started = time.monotonic()
    status, headers, body = server.invoke({}, name="anything")
    assert status == 503 and headers["x-amzn-errortype"] == "ServiceException"
    assert time.monotonic() - started < 2
    server.stop()
    assert server.proc.returncode == 0


def test_aws_cli_invoke(daemon_factory, server_factory, tmp_path):
    """AWS CLI v1 (the test extra) sends --payload as is; v2 needs --cli-binary-format raw-in-base64-out."""
    name = unique_name("srv-cli")
    amqp_daemon(daemon_factory, name)
    server = ready_server(server_factory)
    out = tmp_path / "out.json"
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([str(BIN / "aws"), "lambda", "invoke", "--endpoint-url", server.url, "--function-name",
                             name, "--payload", '{ "key": "value" }',
                             str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["StatusCode"] == 200
    assert json.loads(out.read_text()) == {"key": "value"}


def test_broker_restart_during_a_stream(daemon_factory, server_factory):
    """stop_app / start_app while requests flow: each is answered or fails fast (502/503, never a
    hang), and both programs recover by themselves."""
    name = unique_name("srv-restart")
    daemon = amqp_daemon(daemon_factory, name, "handlers.sleep", MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    server = ready_server(server_factory)
    results: list = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = server.invoke({"seconds": 0.2}, name=name, timeout=25)[0]
            except OSError as e:
                status = repr(e)
            results.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len([r for r in results if r[0] == 200]) >= 8, 20, message="requests flowing")
        rabbitmqctl("stop_app")
        try:
            wait_until(lambda: server.request("GET", "/_/ready")[0] == 503, 10, message="server not ready")
            during = len(results)
            wait_until(lambda: len(results) >= during + 4, 10, message="requests answered while down")
            # the daemon's HTTP endpoint is not affected by the broker being away
            assert daemon.invoke({"seconds": 0}, name=name)[0] == 200
        finally:
            rabbitmqctl("start_app")
        wait_until(lambda: server.request("GET", "/_/ready")[0] == 200, 30, message="server ready again")
        wait_consumers(name, 1, 30)
        after = len(results)
        wait_until(lambda: len([r for r in results[after:] if r[0] == 200]) >= 8, 30,
                   message="requests succeeding again")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    statuses = {r[0] for r in results}
    assert statuses <= {200, 502, 503}, statuses
    assert {502, 503} & statuses  # the outage was seen, as a clear error
    assert max(seconds for _, seconds in results) < 10  # nothing hung
    assert "lost" in server.stderr and "lost" in daemon.stderr


def test_bad_requests_are_refused_before_the_broker(server_factory):
    server = ready_server(server_factory)
    name = unique_name("srv-bad")
    status, headers, body = server.invoke(raw=b"x" * (6 * 1024 * 1024 + 1), name=name)
    assert status == 413 and headers["x-amzn-errortype"] == "RequestEntityTooLargeException"
    status, headers, _ = server.invoke(raw=b"{" * 10, name=name, headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidRequestContentException"
    status, headers, _ = server.invoke({}, name=name, headers={"X-Amz-Client-Context": "%%%"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidRequestContentException"
    status, headers, _ = server.invoke({}, name=name, headers={"X-Amz-Invocation-Type": "Later"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    status, headers, _ = server.request("POST", f"/2015-03-31/functions/{name}:1/invocations?Qualifier=2", b"{}")
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    assert server.request("GET", f"/2015-03-31/functions/{name}/invocations")[0] == 405
    assert metric(server, 'lambda_server_requests_total{outcome="rejected"}') == 5
    assert metric(server, "lambda_server_broker_connected") == 1


def test_large_request_and_reply_cross_the_broker(daemon_factory, server_factory):
    name = unique_name("srv-big")
    amqp_daemon(daemon_factory, name, "handlers.big")
    server = ready_server(server_factory)
    size = 5 * 1024 * 1024
    payload = json.dumps({"size": size, "pad": "y" * (5 * 1024 * 1024)}).encode()
    status, headers, body = server.invoke(raw=payload, name=name, timeout=60)
    assert status == 200 and "x-amz-function-error" not in headers
    assert len(body) == size + 2 and body[:3] == b'"xx'
    status, headers, body = server.invoke({"size": 7 * 1024 * 1024}, name=name, timeout=60)
    assert headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "Function.ResponseSizeTooLarge"


def test_throttled_invoke_is_429_through_the_broker(daemon_factory, server_factory):
    """The daemon's 429 (no runtime free and no waiting allowed) travels back as an error reply and
    becomes boto3's TooManyRequestsException."""
    name = unique_name("srv-429")
    daemon = amqp_daemon(daemon_factory, name, "handlers.sleep", MAX_QUEUED_INVOCATIONS=0,
                         AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    server = ready_server(server_factory)
    first = threading.Thread(target=server.invoke, args=({"seconds": 2},), kwargs={"name": name})
    first.start()
    try:
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in daemon.metrics(), 15, message="first running")
        lam = client(server.url)
        with pytest.raises(lam.exceptions.TooManyRequestsException):
            lam.invoke(FunctionName=name, Payload=b'{"seconds": 0}')
        status, headers, _ = server.invoke({"seconds": 0}, name=name)
        # the daemon says when to retry (a runtime frees within one function timeout)
        assert (status, headers["retry-after"]) == (429, "10")
    finally:
        first.join(20)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_queue_outlives_its_last_daemon(daemon_factory, server_factory, queue_type):
    """Scale to zero (KEDA): with no daemon left, the function's queue stays, so the lambda-server
    takes the requests that should wake one up instead of answering 404 (DryRun's passive declare
    and the mandatory publish see the queue, of either type); a daemon that starts answers them."""
    name = unique_name(f"srv-zero-{queue_type}")
    amqp_daemon(daemon_factory, name, AMQP_QUEUE_TYPE=queue_type).stop()
    server = ready_server(server_factory)
    lam = client(server.url)
    assert lam.invoke(FunctionName=name, InvocationType="DryRun")["StatusCode"] == 204
    assert lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"event": 1}')["StatusCode"] == 202
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lam.invoke, FunctionName=name, Payload=b'{"woke": 1}')
        wait_until(lambda: queue_depth(name) == 2, 10, 0.05, "both requests waiting in the queue")
        if queue_type == "classic":  # the Event was confirmed, so it must survive a broker restart
            assert rabbitmqctl_out("list_queues", "name", "messages_persistent").count(f"{name}\t1") == 1
        daemon = amqp_daemon(daemon_factory, name, AMQP_QUEUE_TYPE=queue_type)
        r = waiting.result(30)
    assert r["StatusCode"] == 200 and json.loads(r["Payload"].read()) == {"woke": 1}
    wait_until(lambda: metric(daemon, SUCCESS) == 2, 10, message="the Event ran too")
