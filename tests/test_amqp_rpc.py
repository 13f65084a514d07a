"""The daemon's AMQP-RPC front door against the real RabbitMQ, with a plain pika client.

Each test runs real daemons (real awslambdaric) on free ports and a queue named for the test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
import uuid

import pika
import pytest

from amqp_support import (
    BROKER,
    BrokerPath,
    RpcClient,
    amqp_daemon,
    broker_up,
    consumers,
    delete_queue,
    metric,
    queues_deleted,
    rabbitmqctl,
    rabbitmqctl_out,
    require_broker,  # noqa: F401  (autouse: fail clearly when RabbitMQ is not running)
    unique_name,
    wait_consumers,
)
from conftest import FUNCTIONS_DIR, RIC, wait_until

SUCCESS = 'lambda_invocations_total{outcome="success"}'


@pytest.fixture
def rpc():
    with RpcClient() as client:
        yield client


@pytest.fixture(autouse=True)
def _delete_queues():
    """The daemons' queues are durable: gone after each test (after its daemons stopped)."""
    with queues_deleted():
        yield


def test_echo_reply_properties_and_headers(daemon_factory, rpc):
    name = unique_name("amqp-echo")
    amqp_daemon(daemon_factory, name)
    cid = "6f0c9a4e-1d2b-4c3d-8e9f-0a1b2c3d4e5f"
    props, body = rpc.call(name, b'{"key": "value"}', correlation_id=cid)
    assert json.loads(body) == {"key": "value"}
    assert props.correlation_id == cid
    assert props.content_type == "application/json"
    assert props.headers["X-Amz-Executed-Version"] == "$LATEST"
    assert props.headers["x-amzn-RequestId"] == cid  # a UUID not in flight becomes the request id
    assert "X-Amz-Function-Error" not in props.headers

    # Tail: the invocation's log, START to REPORT, base64 in X-Amz-Log-Result
    props, body = rpc.call(name, b'{"tail": 1}', headers={"X-Amz-Log-Type": "Tail"})
    tail = base64.b64decode(props.headers["X-Amz-Log-Result"]).decode()
    assert "START RequestId: " in tail and "REPORT RequestId: " in tail
    # a correlation id that is not a UUID is echoed back, and a fresh request id is used
    props, body = rpc.call(name, b"[1, 2]", correlation_id="not-a-uuid")
    assert props.correlation_id == "not-a-uuid" and json.loads(body) == [1, 2]
    assert props.headers["x-amzn-RequestId"] != "not-a-uuid"


def test_function_error_and_client_context(daemon_factory, rpc):
    name = unique_name("amqp-fail")
    amqp_daemon(daemon_factory, name, "handlers.fail")
    props, body = rpc.call(name, b"{}")
    assert props.headers["X-Amz-Function-Error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "ValueError"

    who = unique_name("amqp-whoami")
    amqp_daemon(daemon_factory, who, "handlers.whoami", AMQP_USERNAME="guest", AMQP_PASSWORD="guest")
    context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    props, body = rpc.call(who, b'{"x": 1}', headers={"X-Amz-Client-Context": context,
                                                        "X-Amzn-Trace-Id": "Root=1-5e1b4151-5ac6c58f5b5dbd6a2b3c4d5e"})
    seen = json.loads(body)
    assert seen["client_context"] == {"k": "v"}
    assert seen["trace_id"].startswith("Root=1-5e1b4151-5ac6c58f5b5dbd6a2b3c4d5e")
    assert seen["arn"].endswith(f":function:{who}")
    # the broker's credentials never reach the function
    assert not [k for k in seen["env"] if k.startswith("AMQP_")]


def test_malformed_messages_get_error_replies_and_change_nothing(daemon_factory, rpc):
    name = unique_name("amqp-bad")
    daemon = amqp_daemon(daemon_factory, name, AWS_LAMBDA_FUNCTION_VERSION="7")
    cases = [
        ({"X-Amz-Client-Context": "!!not base64"}, b"{}", "InvalidRequestContentException"),
        ({"X-Amz-Client-Context": base64.b64encode(b"[1]").decode()}, b"{}", "InvalidRequestContentException"),
        ({"X-Amz-Client-Context": 42}, b"{}", "InvalidParameterValueException"),
        ({"X-Amz-Invocation-Type": "Sometimes"}, b"{}", "InvalidParameterValueException"),
        ({"X-Amz-Log-Type": True}, b"{}", "InvalidParameterValueException"),
        ({"X-Amz-Qualifier": "9"}, b"{}", "ResourceNotFoundException"),
        (None, b"x" * (6 * 1024 * 1024 + 1), "RequestEntityTooLargeException"),
    ]
    for headers, body, code in cases:
        props, reply = rpc.call(name, body, headers=headers)
        assert props.headers["x-amzn-ErrorType"] == code, (headers, reply)
        assert json.loads(reply)["Type"] == "User"
    # bytes header values are text to us; other odd headers are ignored; the body is not JSON-checked
    props, reply = rpc.call(name, b'"just a string"', headers={"X-Amz-Log-Type": b"None", "x-other": [1, 2]})
    assert reply == b'"just a string"'
    # a reply-less request still runs, and nothing above broke the consumer or the daemon
    before = metric(daemon, SUCCESS)
    rpc.send(name, b"{}", reply=False)
    wait_until(lambda: metric(daemon, SUCCESS) == before + 1, 10, message="reply-less request ran")
    props, reply = rpc.call(name, b'{"still": "alive"}', headers={"X-Amz-Qualifier": "7"})
    assert json.loads(reply) == {"still": "alive"}
    assert daemon.proc.poll() is None


def test_event_runs_once_without_reply(daemon_factory, rpc):
    name = unique_name("amqp-event")
    daemon = amqp_daemon(daemon_factory, name)
    for _ in range(5):
        rpc.send(name, b'{"e": 1}', headers={"X-Amz-Invocation-Type": "Event"})
    wait_until(lambda: metric(daemon, SUCCESS) == 5, 15, message="5 events ran")
    rpc.conn.process_data_events(0.5)
    assert rpc.replies == {}
    assert metric(daemon, SUCCESS) == 5


def test_two_daemons_share_the_queue(daemon_factory):
    name = unique_name("amqp-share")
    first = amqp_daemon(daemon_factory, name, "handlers.sleep", MAX_CONCURRENCY=2)
    second = amqp_daemon(daemon_factory, name, "handlers.sleep", MAX_CONCURRENCY=2)
    wait_consumers(name, 2)
    client = RpcClient()
    try:
        ids = [client.send(name, b'{"seconds": 0.3}') for _ in range(16)]
        pids = {json.loads(client.wait(cid, 30)[1])["pid"] for cid in ids}
    finally:
        client.close()
    served = (metric(first, SUCCESS), metric(second, SUCCESS))
    assert sum(served) == 16
    assert min(served) >= 3, served  # both took a fair part
    assert len(pids) >= 3  # and each ran more than one runtime


def test_sigkill_mid_invocation_is_answered_by_the_other_daemon(daemon_factory):
    name = unique_name("amqp-kill")
    doomed = amqp_daemon(daemon_factory, name, "handlers.sleep", AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    client = RpcClient()
    try:
        cid = client.send(name, b'{"seconds": 4}')  # still running when the second daemon is up
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in doomed.metrics(), 15, message="request running")
        survivor = amqp_daemon(daemon_factory, name, "handlers.sleep", AWS_LAMBDA_FUNCTION_TIMEOUT=10)
        wait_consumers(name, 2)
        doomed.proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        props, body = client.wait(cid, 30)
        assert json.loads(body)["slept"] == 4
        assert metric(survivor, SUCCESS) == 1
        assert time.monotonic() - started < 15
    finally:
        client.close()


def test_sigterm_gives_queued_messages_back(daemon_factory):
    """Messages the daemon holds but has not started go back to the broker at shutdown; the
    running one is finished and answered."""
    name = unique_name("amqp-term")
    leaving = amqp_daemon(daemon_factory, name, "handlers.sleep", AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    client = RpcClient()
    try:
        ids = [client.send(name, b'{"seconds": 4}')]  # long enough to start the second daemon meanwhile
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in leaving.metrics(), 15, message="first running")
        ids.append(client.send(name, b'{"seconds": 0.1}'))  # held in the prefetch window, not started
        wait_until(lambda: "lambda_queue_depth 1" in leaving.metrics(), 10, message="second held")
        staying = amqp_daemon(daemon_factory, name, "handlers.sleep", AWS_LAMBDA_FUNCTION_TIMEOUT=10)
        wait_consumers(name, 2)
        leaving.signal(signal.SIGTERM)
        assert json.loads(client.wait(ids[0], 20)[1])["slept"] == 4
        assert json.loads(client.wait(ids[1], 20)[1])["slept"] == 0.1
        assert leaving.wait(15) == 0
        assert metric(staying, SUCCESS) == 1
    finally:
        client.close()


def test_broker_away_at_start_http_serves_and_password_never_logged(daemon_factory):
    secret = "pw-S3cret-do-not-log"
    name = unique_name("amqp-auth")
    daemon = daemon_factory(RIC + ["handlers.whoami"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME=name,
                            AMQP_URI="amqp://127.0.0.1:5672/?connection_attempts=2&retry_delay=0.2",
                            AMQP_USERNAME="guest", AMQP_PASSWORD=secret)
    status, _, body = daemon.invoke({"over": "http"})
    assert status == 200
    env = json.loads(body)["env"]
    assert not [k for k in env if k.startswith("AMQP_")]
    wait_until(lambda: "after 2 attempts" in daemon.stderr, 15, message="the give-up-and-keep-trying log")
    assert daemon.invoke({"still": "http"})[0] == 200
    assert consumers(name) == -1
    started = time.monotonic()
    daemon.stop()
    assert daemon.proc.returncode == 0 and time.monotonic() - started < 5  # no broker does not hold up exit
    assert secret not in daemon.stderr and secret not in daemon.stdout
    assert "guest:xxxxx@" in daemon.stderr


def test_redelivered_work_of_a_dead_connection_is_not_lost(daemon_factory):
    """Closing the daemon's connection from the broker side (as a network cut would): the daemon
    reconnects by itself and keeps consuming; a request sent meanwhile is answered."""
    name = unique_name("amqp-cut")
    daemon = amqp_daemon(daemon_factory, name)
    _cut_connections(name)
    with RpcClient() as client:
        cid = client.send(name, b'{"after": "cut"}')
        props, body = client.wait(cid, 20)
        assert json.loads(body) == {"after": "cut"}
    wait_until(lambda: "reconnecting" in daemon.stderr, 5, message="the lost-connection log")


def _cut_connections(name: str) -> None:
    """Close the daemon's broker connection from the broker's side, as a network cut would."""
    conn_name = f"lambda-runtime-api-daemon {name}"
    out = rabbitmqctl_out("list_connections", "pid", "client_properties")
    pids = [line.split("\t")[0] for line in out.splitlines() if conn_name in line]
    assert pids, out
    for pid in pids:
        rabbitmqctl_out("close_connection", pid, "test cut")


def test_connection_cut_mid_invocation_runs_the_function_once(daemon_factory):
    """The broker requeues the unacked request when the connection drops; the daemon is back at once
    and its redelivered copy is answered from the run still going here, not run a second time."""
    name = unique_name("amqp-cut-running")
    with BrokerPath() as path, RpcClient() as client:
        daemon = amqp_daemon(daemon_factory, name, "handlers.sleep", AMQP_URI=path.uri(),
                             AWS_LAMBDA_FUNCTION_TIMEOUT=10)
        cid = client.send(name, b'{"seconds": 1.5}')
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in daemon.metrics(), 15, message="running")
        path.cut()
        path.restore()
        props, body = client.wait(cid, 20)
        assert json.loads(body)["slept"] == 1.5
        assert "came back" in daemon.stderr
        wait_until(lambda: _queue_counts(name) == (0, 0), 5, 0.1, "the copy acked")
        client.conn.process_data_events(0.3)
        assert client.replies == {}  # one reply, not two
        assert metric(daemon, SUCCESS) == 1
        assert consumers(name) == 1


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_redelivery_after_an_outage_is_answered_from_the_run(daemon_factory, queue_type):
    """The run ends while the broker is out of reach, so its reply cannot go out; when the daemon is
    back the broker redelivers the request: it is answered from that run (one run, one reply), not
    run a second time."""
    name = unique_name(f"amqp-outage-{queue_type}")
    with BrokerPath() as path, RpcClient() as client:
        daemon = amqp_daemon(daemon_factory, name, "handlers.sleep", AMQP_URI=path.uri(), AMQP_QUEUE_TYPE=queue_type,
                             AWS_LAMBDA_FUNCTION_TIMEOUT=10)
        cid = client.send(name, b'{"seconds": 1}', persistent=True)
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in daemon.metrics(), 15, message="running")
        path.cut()
        wait_until(lambda: "no AMQP connection" in daemon.stderr, 10, message="the run ending while cut off")
        path.restore()
        props, body = client.wait(cid, 30)
        assert json.loads(body)["slept"] == 1
        assert "came back" in daemon.stderr
        wait_until(lambda: _queue_counts(name) == (0, 0), 5, 0.1, "the copy acked")
        client.conn.process_data_events(0.3)
        assert client.replies == {}  # one reply, not two
        assert metric(daemon, SUCCESS) == 1


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_partition_mid_reply_runs_nothing_twice(daemon_factory, queue_type):
    """A network partition (nothing passes, nothing is seen to close) while runs end: their replies
    wait for a confirm that never comes until the daemon's heartbeat check gives the connection up
    (aiormq then cancels the confirms), while the broker's own heartbeat check has requeued the
    requests. The redelivered copies are answered from the runs here, not run again."""
    name = unique_name(f"amqp-partition-{queue_type}")
    with BrokerPath() as path, RpcClient() as client:
        daemon = amqp_daemon(daemon_factory, name, "handlers.sleep", AMQP_QUEUE_TYPE=queue_type,
                             AMQP_URI=path.uri("connection_attempts=100&retry_delay=0.5&heartbeat=1"),
                             AWS_LAMBDA_FUNCTION_TIMEOUT=10)
        cids = [client.send(name, b'{"seconds": 0.5}', persistent=True) for _ in range(2)]
        wait_until(lambda: 'lambda_instances{state="busy"} 1' in daemon.metrics(), 15, message="running")
        path.freeze()
        wait_until(lambda: "lost" in daemon.stderr, 30, 0.1, "the daemon giving the connection up")
        answers = [json.loads(client.wait(cid, 30)[1])["slept"] for cid in cids]
        assert answers == [0.5, 0.5]
        wait_until(lambda: _queue_counts(name) == (0, 0), 10, 0.1, "the copies acked")
        client.conn.process_data_events(0.3)
        assert client.replies == {}  # one reply each, not two
        assert metric(daemon, SUCCESS) == 2, daemon.stderr  # each ran once


def test_broker_restart_mid_invocation_runs_nothing_twice(daemon_factory):
    """A broker restart while a request runs (RabbitMQ stopped 0.3 s after the persistent requests
    were published, the function sleeping 1 s), for both queue types in one short restart of the
    shared broker: the running request is answered from its run after the restart, the one that
    waited behind it runs then; each runs once and is answered once, and nothing is lost."""
    replies = unique_name("amqp-restart-replies")
    daemons, sent = {}, {}
    for queue_type in ("classic", "quorum"):
        name = unique_name(f"amqp-restart-{queue_type}")
        daemons[name] = amqp_daemon(daemon_factory, name, "handlers.sleep", AMQP_QUEUE_TYPE=queue_type,
                                    AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    channel = conn.channel()
    channel.queue_declare(replies, durable=True)  # replies must outlive the restart too
    channel.confirm_delivery()
    for name in daemons:
        for seconds in (1, 0.1):
            cid = str(uuid.uuid4())
            sent[cid] = name
            channel.basic_publish("", name, json.dumps({"seconds": seconds}).encode(), pika.BasicProperties(
                reply_to=replies, correlation_id=cid, delivery_mode=2), mandatory=True)
    conn.close()
    time.sleep(0.3)  # as the outage in the field: the broker goes while the first requests run
    try:
        rabbitmqctl("stop_app")
        for daemon in daemons.values():
            wait_until(lambda d=daemon: "no AMQP connection" in d.stderr, 10, message="runs ending off the broker")
    finally:
        rabbitmqctl("start_app")
        wait_until(broker_up, 60, 0.2, "RabbitMQ back")  # other tests share it
    answered: dict = {}
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    try:
        channel = conn.channel()
        deadline = time.monotonic() + 60
        while len(answered) < len(sent) and time.monotonic() < deadline:
            method, props, body = channel.basic_get(replies, auto_ack=True)
            if method is None:
                conn.process_data_events(0.1)
                continue
            answered.setdefault(props.correlation_id, []).append(json.loads(body)["slept"])
        conn.process_data_events(0.5)
        while True:  # a duplicate would come right after its first copy
            method, props, body = channel.basic_get(replies, auto_ack=True)
            if method is None:
                break
            answered.setdefault(props.correlation_id, []).append(json.loads(body)["slept"])
        channel.queue_delete(replies)
    finally:
        conn.close()
    assert sorted(answered) == sorted(sent), (answered, [d.stderr[-2000:] for d in daemons.values()])
    assert all(len(slept) == 1 for slept in answered.values()), answered
    for name, daemon in daemons.items():
        assert metric(daemon, SUCCESS) == 2, (name, daemon.stderr)
        assert "came back" in daemon.stderr


@pytest.mark.parametrize("env,declared", [
    ({}, ["true", "false", "classic"]),  # the default: outlives its daemons and broker restarts
    ({"AMQP_QUEUE_TYPE": "quorum"}, ["true", "false", "quorum"]),
    ({"AMQP_DURABLE_QUEUE": "false"}, ["false", "true", "classic"]),  # the Go daemon's auto-delete queue
])
def test_queue_follows_the_settings(daemon_factory, rpc, env, declared):
    """Each queue type end to end: declared as set, requests answered, requeued at shutdown; the
    durable ones outlive their last daemon (a request waits in it), the auto-delete one does not."""
    name = unique_name("amqp-queue")
    daemon = amqp_daemon(daemon_factory, name, **env)
    out = rabbitmqctl_out("list_queues", "name", "durable", "auto_delete", "type")
    line = next(x for x in out.splitlines() if x.split("\t")[0] == name)
    assert line.split("\t")[1:] == declared
    props, body = rpc.call(name, b'{"type": 1}', headers={"X-Amz-Log-Type": "Tail"})
    assert json.loads(body) == {"type": 1} and "X-Amz-Log-Result" in props.headers
    daemon.stop()
    if declared[0] == "false":
        assert consumers(name) == -1  # gone with its last consumer
        return
    cid = rpc.send(name, b'{"waited": true}')
    wait_until(lambda: _queue_counts(name) == (1, 0), 5, 0.05, "the request waiting in the queue")
    amqp_daemon(daemon_factory, name, **env)
    assert json.loads(rpc.wait(cid, 20)[1]) == {"waited": True}


def test_many_in_flight_all_answered(daemon_factory):
    name = unique_name("amqp-many")
    amqp_daemon(daemon_factory, name, MAX_CONCURRENCY=2)
    client = RpcClient()
    try:
        ids = [client.send(name, json.dumps({"n": i}).encode()) for i in range(200)]
        for i, cid in enumerate(ids):
            assert json.loads(client.wait(cid, 30)[1]) == {"n": i}
    finally:
        client.close()


def test_http_only_daemon_does_not_import_the_amqp_library():
    probe = ("import sys, lambda_rapid.cli, lambda_rapid.daemon, lambda_rapid.invoke.http_api; "
             "print('aio_pika' in sys.modules, 'aiormq' in sys.modules); "
             "import lambda_rapid.invoke.amqp_rpc; print('aio_pika' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


def test_deleted_queue_is_declared_again(daemon_factory, rpc):
    """The broker cancels a consumer whose queue is deleted; the daemon declares it again and goes on
    consuming instead of sitting on a connection that receives nothing."""
    name = unique_name("amqp-deleted")
    daemon = amqp_daemon(daemon_factory, name)
    delete_queue(name)
    wait_consumers(name, 1, 10)
    props, body = rpc.call(name, b'{"after": "delete"}')
    assert json.loads(body) == {"after": "delete"}
    assert "cancelled the consumer" in daemon.stderr


def _queue_counts(name: str) -> tuple:
    """(ready, unacknowledged) messages of a queue, as the broker counts them."""
    out = rabbitmqctl_out("list_queues", "name", "messages_ready", "messages_unacknowledged")
    line = next(x for x in out.splitlines() if x.split("\t")[0] == name)
    ready, unacked = line.split("\t")[1:3]
    return int(ready), int(unacked)


def test_answered_requests_are_acked_without_more_traffic(daemon_factory):
    """Acks wait to share the next reply's socket write; the last ones must still go out on their
    own when no more replies come, or they would hold prefetch slots (and come back on a cut)."""
    name = unique_name("amqp-acked")
    daemon = amqp_daemon(daemon_factory, name, MAX_CONCURRENCY=2)
    with RpcClient() as client:
        ids = [client.send(name, json.dumps({"n": i}).encode()) for i in range(30)]
        for i, cid in enumerate(ids):
            assert json.loads(client.wait(cid, 30)[1]) == {"n": i}
        wait_until(lambda: _queue_counts(name) == (0, 0), 5, 0.1, "every request acked")
        assert client.call(name, b'{"alone": 1}')[1] == b'{"alone": 1}'
        wait_until(lambda: _queue_counts(name) == (0, 0), 5, 0.1, "the lone request acked")
        # SIGTERM right after a reply: its ack is written before the connection closes, so
        # the request does not come back to the queue.
        assert client.call(name, b'{"last": 1}')[1] == b'{"last": 1}'
    assert metric(daemon, SUCCESS) == 32
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert _queue_counts(name) == (0, 0)


def test_kept_runs_are_bounded_in_count_and_bytes(monkeypatch):
    """What the daemon keeps for redelivered copies (in-process: no broker needed)."""
    from lambda_rapid.config import Config
    from lambda_rapid.invocation import Invocation, Result
    from lambda_rapid.invoke import amqp_rpc

    monkeypatch.setattr(amqp_rpc, "KEPT_COUNT", 3)
    monkeypatch.setattr(amqp_rpc, "KEPT_BYTES", 100)

    async def run() -> None:
        rpc = amqp_rpc.AmqpRpc(pool=None, config=Config(amqp_uri="amqp://127.0.0.1/"))
        for n in range(5):
            key = (f"cid-{n}", "reply", 2)
            kept = amqp_rpc.Kept(Invocation(f"id-{n}", b"{}", arn="arn"), None, None, False)
            rpc._keep(key, kept)
            rpc._hold(key, kept, Result("success", b"x" * 40))
            rpc._keep(key, kept)  # re-keeping counts its bytes once
        assert list(rpc.kept) == [("cid-3", "reply", 2), ("cid-4", "reply", 2)]  # 3 x 40 bytes > 100
        assert rpc.kept_bytes == 80
        key, kept = next(iter(rpc.kept.items()))
        rpc._settled(key, kept, True)  # a reply confirmed: the result goes, the entry stays for the ack
        assert kept.replied and kept.result is None and rpc.kept_bytes == 40
        rpc._forget(key)
        rpc._forget(key)
        assert len(rpc.kept) == 1 and rpc.kept_bytes == 40

    asyncio.run(run())
