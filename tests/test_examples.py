"""examples/echo: the seed's echo-lambda (entrypoint script, docker run script, standalone mode, every
curl and AWS CLI line of its README) and the echo clients, against the real daemon.

Docker has no engine here. The entrypoint's two branches run for real, with the one path that a
container would bind-mount (/usr/local/bin/aws-lambda-rie) pointed at bin/lambda-runtime-api-daemon;
echo-lambda.sh runs with a stand-in ``docker`` on PATH that records what it was asked to run and
checks the bind-mounted file is the single-file daemon at that moment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import BIN, ECHO_DIR, ROOT, Proc, daemon_env, free_port, start_daemon, wait_until
from single_file import built_bin

CLIENTS = ROOT / "examples" / "echo" / "echo-clients"
ENTRYPOINT = ECHO_DIR / "lambda-entrypoint.sh"
RIE_PATH = "/usr/local/bin/aws-lambda-rie"
AMQP_URI = "amqp://guest:guest@127.0.0.1:5672/?heartbeat=0"
SEED_ENTRYPOINT = """#!/bin/sh
if [ $# -ne 1 ]; then
  echo "entrypoint requires the handler name to be the first argument" 1>&2
  exit 142
fi

if [ -z "${AWS_LAMBDA_RUNTIME_API}" ]; then
  exec /usr/local/bin/aws-lambda-rie python3 -m awslambdaric "$1"
else
  exec python3 -m awslambdaric "$1"
fi
"""


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return built_bin()


@pytest.fixture
def entrypoint(tmp_path, bin_dir) -> Path:
    """lambda-entrypoint.sh with the bind-mount target replaced by bin/lambda-runtime-api-daemon."""
    text = ENTRYPOINT.read_text()
    assert text.count(RIE_PATH) == 1
    script = tmp_path / "lambda-entrypoint.sh"
    script.write_text(text.replace(RIE_PATH, str(bin_dir / "lambda-runtime-api-daemon")))
    script.chmod(0o755)
    return script


def test_entrypoint_is_the_seeds():
    assert ENTRYPOINT.read_text() == SEED_ENTRYPOINT
    assert os.access(ENTRYPOINT, os.X_OK)


@pytest.mark.parametrize("args", [[], ["echo.handler", "extra"]])
def test_entrypoint_without_exactly_one_handler_exits_142(args):
    r = subprocess.run([str(ENTRYPOINT), *args], env=daemon_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 142
    assert "entrypoint requires the handler name" in r.stderr


def test_entrypoint_outside_lambda_execs_the_daemon(entrypoint, bin_dir):
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    proc = Proc([str(entrypoint), "echo.handler"], env, ECHO_DIR, port, runtime_port)
    try:
        proc.wait_healthy()
        # exec: the script's process is now the daemon itself (PID 1 in a container).
        cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(bin_dir / "lambda-runtime-api-daemon").encode() in cmdline
        status, _, body = proc.invoke({"key": "value"}, name="echo-lambda")
        assert (status, json.loads(body)) == (200, {"key": "value"})
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.stderr


def test_entrypoint_on_lambda_execs_awslambdaric(entrypoint, tmp_path):
    """With AWS_LAMBDA_RUNTIME_API set (as on AWS) the script runs awslambdaric against that API:
    here a daemon's main Runtime API port, which uses runtimes started by hand."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "echo.py").write_text("def handler(event, context):\n    return {'from': 'entrypoint', 'event': event}\n")
    daemon = start_daemon(AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    env = daemon_env(AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{daemon.runtime_port}")
    runtime = subprocess.Popen([str(entrypoint), "echo.handler"], env=env, cwd=task, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def served_by_entrypoint():
            status, _, body = daemon.invoke({"n": 1}, name="echo-lambda")
            assert status == 200
            return json.loads(body) == {"from": "entrypoint", "event": {"n": 1}}
        wait_until(served_by_entrypoint, 30, interval=0.1, message="an invocation served by the entrypoint's runtime")
        cmdline = Path(f"/proc/{runtime.pid}/cmdline").read_bytes().split(b"\0")
        assert b"awslambdaric" in cmdline and b"echo.handler" in cmdline
    finally:
        runtime.kill()
        runtime.wait(10)
        daemon.stop()


def test_echo_lambda_sh_runs_the_seeds_docker_command(bin_dir, tmp_path):
    work = tmp_path / "examples" / "echo" / "echo-lambda"
    work.mkdir(parents=True)
    script = work / "echo-lambda.sh"
    script.write_bytes((ECHO_DIR / "echo-lambda.sh").read_bytes())
    script.chmod(0o755)
    (tmp_path / "bin").symlink_to(bin_dir)
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    record = tmp_path / "docker-run.json"
    (fake / "docker").write_text(f"""#!{sys.executable}
import json, os, sys, zipfile
args = sys.argv[1:]
mounts = [args[i + 1] for i, a in enumerate(args) if a == "-v"]
source = mounts[0].split(":")[0]
with open({str(record)!r}, "w") as f:
    json.dump({{"args": args, "env": {{k: os.environ.get(k) for k in ("AMQP_USERNAME", "AMQP_PASSWORD")}},
               "mounted_is_daemon": zipfile.is_zipfile(source) and os.access(source, os.X_OK)}}, f)
""")
    (fake / "docker").chmod(0o755)
    (fake / "hostname").write_text("#!/bin/sh\necho 192.0.2.10 10.0.0.1\n")
    (fake / "hostname").chmod(0o755)
    env = daemon_env()
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"

    def run(**extra) -> dict:
        r = subprocess.run(["./echo-lambda.sh"], cwd=work, env={**env, **extra}, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert not (work / "lambda-runtime-api-daemon").exists()  # the copy is removed afterwards
        return json.loads(record.read_text())

    seen = run()
    args = seen["args"]
    assert args[:2] == ["run", "--rm"] and args[-1] == "echo-lambda"
    assert seen["mounted_is_daemon"]
    assert f"{work}/lambda-runtime-api-daemon:/usr/local/bin/aws-lambda-rie" in args
    assert args[args.index("-p") + 1] == "8080:8080"
    assert args[args.index("-u") + 1] == f"{os.getuid()}:{os.getgid()}"
    values = [args[i + 1] for i, a in enumerate(args) if a == "-e"]
    assert "AWS_LAMBDA_FUNCTION_NAME=echo-lambda" in values
    assert "AMQP_URI=amqp://192.0.2.10:5672?connection_attempts=20&retry_delay=10&heartbeat=0" in values
    # The URI the seed builds is one the daemon accepts.
    from lambda_rapid import config
    config.validate_amqp_uri("amqp://192.0.2.10:5672?connection_attempts=20&retry_delay=10&heartbeat=0")

    seen = run(AMQP_URI="", AMQP_USERNAME="user", AMQP_PASSWORD="secret")
    values = [seen["args"][i + 1] for i, a in enumerate(seen["args"]) if a == "-e"]
    assert "AMQP_URI=" in values  # set but empty: AMQP off
    assert {"AMQP_USERNAME", "AMQP_PASSWORD"} <= set(values)
    assert seen["env"] == {"AMQP_USERNAME": "user", "AMQP_PASSWORD": "secret"}


def test_dockerfile_matches_the_example():
    text = (ECHO_DIR / "Dockerfile").read_text()
    # Ubuntu by default; the base is a build argument (tests/test_containers.py builds from a local Debian).
    assert re.search(r"^ARG BASE=ubuntu:", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert "python3 python3-pip" in text
    pinned = re.search(r"awslambdaric==([\d.]+)", text).group(1)
    assert f'"awslambdaric=={pinned}"' in (ROOT / "pyproject.toml").read_text()
    for copied in re.search(r"^COPY (.+) \./$", text, re.M).group(1).split():
        assert (ECHO_DIR / copied).is_file()
    assert 'ENTRYPOINT ["/var/task/lambda-entrypoint.sh"]' in text and 'CMD ["echo.handler"]' in text


def readme_commands() -> list:
    text = (ECHO_DIR / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks if b.startswith(("curl ", "aws lambda invoke"))]


def test_standalone_mode_and_every_readme_command(bin_dir):
    """`../../../bin/lambda-runtime-api-daemon python3 -m awslambdaric echo.handler`, as written, with
    python3 = a Python that has awslambdaric; then each curl / aws line of the README."""
    standalone = "../../../bin/lambda-runtime-api-daemon python3 -m awslambdaric echo.handler"
    assert standalone in (ECHO_DIR / "README.md").read_text()
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, AWS_LAMBDA_FUNCTION_NAME="echo-lambda")
    assert Path(env["PATH"].split(os.pathsep)[0], "python3").exists()  # the venv's, which has awslambdaric
    daemon = Proc(shlex.split(standalone), env, ECHO_DIR, port, runtime_port)
    try:
        daemon.wait_healthy()
        commands = readme_commands()
        assert len(commands) == 6
        cli_env = {**env, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
        version = subprocess.run(["aws", "--version"], env=cli_env, capture_output=True, text=True, timeout=60)
        v1 = (version.stdout + version.stderr).startswith("aws-cli/1.")
        # Only one AWS CLI can be installed: run the README line written for it (v2 is no pip package).
        cli_lines = [c for c in commands if c.startswith("aws ")]
        assert len(cli_lines) == 2 and "--cli-binary-format" in cli_lines[0]
        commands.remove(cli_lines[0] if v1 else cli_lines[1])
        outputs = []
        for command in commands:
            command = command.replace("localhost:8080", f"127.0.0.1:{port}")
            if command.startswith("curl"):
                command = command.replace("curl ", "curl -sS -w '\\n%{http_code}' ", 1)
            r = subprocess.run(["sh", "-c", command], env=cli_env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (command, r.stderr)
            outputs.append(r)
        curl = [r.stdout.rsplit("\n", 1) for r in outputs[:4]]
        assert [json.loads(body) for body, _ in curl[:3]] == [{"key": "value"}, {"key": "value"}, "hello"]
        assert [code for _, code in curl] == ["200", "200", "200", "400"]
        assert "InvalidRequestContent" in curl[3][0] or "Could not parse request body into json" in curl[3][0]
        assert json.loads(outputs[4].stderr) == {"key": "value"}  # the CLI writes the payload to /dev/stderr
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.stderr



CHROOT_ROOTFS = Path(os.environ.get("ROOTFS", "/tmp/echo-lambda-rootfs"))


@pytest.mark.skipif(not (CHROOT_ROOTFS / ".echo-lambda-ready").exists(),
                    reason="no Debian root filesystem: run examples/echo/echo-lambda/chroot-demo.sh --build once "
                           "(as root; 3-4 minutes, downloads Debian packages)")
def test_chroot_demo_bind_mounts_the_daemon_into_a_debian_root(bin_dir):
    """The bind-mount story without Docker: lambda-entrypoint.sh in a debootstrapped Debian, as an
    unprivileged user, runs the bind-mounted single-file daemon with Debian's own python3."""
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, ROOTFS=str(CHROOT_ROOTFS))
    proc = Proc([str(ECHO_DIR / "chroot-demo.sh")], env, ECHO_DIR, port, runtime_port)
    try:
        proc.wait_healthy(60)
        status, _, body = proc.invoke({"key": "value"}, name="echo-lambda")
        assert (status, json.loads(body)) == (200, {"key": "value"}), proc.stderr
        pid = proc.proc.pid  # every step exec()s: the script's process is now the daemon
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"/usr/local/bin/aws-lambda-rie", b"python3"], cmdline
        assert os.readlink(f"/proc/{pid}/exe").startswith(str(CHROOT_ROOTFS))  # Debian's python3
        uid_line = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")]
        assert uid_line[0].split()[1] == "65534"  # docker run -u
    finally:
        proc.stop()
    assert proc.proc.returncode == 0, proc.stderr


# ---- the echo clients ----------------------------------------------------------------------------

def run_client(*args: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    match = re.search(r"(\d+) invocations in [\d.]+ s: ([\d.]+) invocations/s, (\d+) failed", r.stdout)
    assert match, r.stdout
    assert float(match.group(2)) > 0 and match.group(3) == "0"
    return match.group(1)


@pytest.fixture(scope="module")
def echo_for_clients():
    function = f"echo-clients-{uuid.uuid4().hex[:8]}"
    daemon = start_daemon(AWS_LAMBDA_FUNCTION_NAME=function, MAX_CONCURRENCY=2, AMQP_URI=AMQP_URI)
    yield daemon, function
    daemon.stop()


@pytest.mark.parametrize("mode", [[], ["--threads", "4"]], ids=["loop", "threads"])
def test_boto3_client(echo_for_clients, mode):
    daemon, function = echo_for_clients
    assert run_client(str(CLIENTS / "echo_boto3.py"), "--function", function, "--endpoint", daemon.url,
                      "--iterations", "100", *mode) == "100"


def test_aiobotocore_client(echo_for_clients):
    daemon, function = echo_for_clients
    assert run_client(str(CLIENTS / "echo_aiobotocore.py"), "--function", function, "--endpoint", daemon.url,
                      "--iterations", "100", "--concurrency", "4") == "100"


def test_clients_fail_loudly_on_a_wrong_function(echo_for_clients):
    daemon, _ = echo_for_clients
    r = subprocess.run([sys.executable, str(CLIENTS / "echo_boto3.py"), "--function", "no-such-function",
                        "--endpoint", daemon.url, "--iterations", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ResourceNotFoundException" in r.stderr


def test_amqp_client(echo_for_clients):
    daemon, function = echo_for_clients
    wait_until(lambda: function in daemon.stderr and "consuming" in daemon.stderr, 30,
               message="the daemon to consume its queue")
    assert run_client(str(CLIENTS / "echo_amqp.py"), "--function", function, "--uri", AMQP_URI,
                      "--iterations", "200", "--concurrency", "8") == "200"
    # A queue nobody declared: the broker returns the messages and the client says so.
    r = subprocess.run([sys.executable, str(CLIENTS / "echo_amqp.py"), "--function", f"nobody-{uuid.uuid4().hex}",
                        "--uri", AMQP_URI, "--iterations", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "returned by the broker" in r.stderr


def test_console_scripts_are_where_the_tests_expect():
    assert (BIN / "lambda-runtime-api-daemon").exists()


# ---- Kubernetes manifests ------------------------------------------------------------------------

K8S_DIR = ROOT / "examples" / "kubernetes"


def manifests() -> dict:
    import yaml

    objects = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def container_env(container: dict, secrets: dict) -> dict:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return env


def test_kubernetes_manifests_hang_together():
    objects = manifests()
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "Service", "Secret", "ScaledObject", "TriggerAuthentication"} <= kinds

    # Every Service selects the pods of some Deployment, on a port those pods expose.
    for (kind, name), service in objects.items():
        if kind != "Service":
            continue
        pods = [d["spec"]["template"] for (k, _), d in objects.items() if k == "Deployment"
                and all(d["spec"]["template"]["metadata"]["labels"].get(k2) == v
                        for k2, v in service["spec"]["selector"].items())]
        assert len(pods) == 1, name
        port_names = {p.get("name") for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names, name
    for (kind, name), deployment in objects.items():
        if kind == "Deployment":
            assert deployment["spec"]["selector"]["matchLabels"].items() <= \
                deployment["spec"]["template"]["metadata"]["labels"].items(), name


def test_kubernetes_echo_lambda_is_what_the_daemon_accepts():
    from lambda_rapid import config

    objects = manifests()
    secrets = {name: doc for (kind, name), doc in objects.items() if kind == "Secret"}
    pod = objects[("Deployment", "echo-lambda")]["spec"]["template"]["spec"]
    init, = pod["initContainers"]
    function, = pod["containers"]

    # The init container copies the daemon to /tmp/<its file name> on the shared volume ...
    assert "KUBERNETES_INIT_CONTAINER" in container_env(init, secrets)
    daemon_file = Path(init["command"][0]).name
    assert daemon_file == "lambda-runtime-api-daemon"
    init_mount, = [m for m in init["volumeMounts"] if m["mountPath"] == "/tmp"]
    # ... and the function container mounts that file where lambda-entrypoint.sh execs it.
    mount, = [m for m in function["volumeMounts"] if m["name"] == init_mount["name"]]
    assert mount["subPath"] == daemon_file
    assert mount["mountPath"] in (ECHO_DIR / "lambda-entrypoint.sh").read_text()
    assert {"name": init_mount["name"], "emptyDir": {}} in pod["volumes"]
    assert "command" not in function and "args" not in function  # the image's ENTRYPOINT/CMD, unchanged

    # The daemon accepts the function container's environment, and it means what the manifests say.
    env = container_env(function, secrets)
    loaded = config.load(["python3", "-m", "awslambdaric", "echo.handler"], {**env, "PATH": os.environ["PATH"]},
                         cwd=str(ECHO_DIR))
    assert loaded.invoke_port == function["ports"][0]["containerPort"] == 8080
    assert loaded.amqp_uri and loaded.amqp_durable
    assert loaded.amqp_uri.startswith(f"amqp://{env['AMQP_USERNAME']}:{env['AMQP_PASSWORD']}@rabbitmq:5672/")
    assert ("Service", "rabbitmq") in objects
    assert {p["httpGet"]["path"] for p in (function["readinessProbe"], function["livenessProbe"])} == \
        {"/_/ready", "/_/health"}
    # A pod is given time to drain its in-flight invocations on SIGTERM.
    assert pod["terminationGracePeriodSeconds"] > loaded.timeout + 2

    # KEDA scales this Deployment on this function's queue (the queue is named after the function).
    scaled = objects[("ScaledObject", "echo-lambda")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "echo-lambda"
    trigger, = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == loaded.function_name
    assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) > 0
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    ref, = auth["spec"]["secretTargetRef"]
    uri = secrets[ref["name"]]["stringData"][ref["key"]]
    management, = [p for p in objects[("Service", "rabbitmq")]["spec"]["ports"] if p["name"] == "management"]
    assert uri == f"http://{env['AMQP_USERNAME']}:{env['AMQP_PASSWORD']}@rabbitmq:{management['port']}/"


def test_kubernetes_queue_settings_are_the_ones_scale_to_zero_needs():
    """KEDA may take the function to zero replicas: its queue must outlive the last daemon (durable,
    not auto-delete; a quorum queue, replicated), and the trigger must count what replicas hold
    (unacknowledged), or a busy replica would look idle."""
    from lambda_rapid import config

    objects = manifests()
    secrets = {name: doc for (kind, name), doc in objects.items() if kind == "Secret"}
    function, = objects[("Deployment", "echo-lambda")]["spec"]["template"]["spec"]["containers"]
    env = container_env(function, secrets)
    scaled = objects[("ScaledObject", "echo-lambda")]["spec"]
    assert scaled["minReplicaCount"] == 0
    loaded = config.load(["python3", "-m", "awslambdaric", "echo.handler"], {**env, "PATH": os.environ["PATH"]},
                         cwd=str(ECHO_DIR))
    assert loaded.amqp_durable  # declared durable and not auto-delete
    assert env["AMQP_QUEUE_TYPE"] == "quorum"
    if hasattr(loaded, "amqp_queue_type"):  # the daemon's own reading, where it has the setting
        assert str(getattr(loaded.amqp_queue_type, "value", loaded.amqp_queue_type)) == "quorum"
    trigger, = scaled["triggers"]
    assert trigger["metadata"]["protocol"] == "http"
    assert trigger["metadata"].get("excludeUnacknowledged", "false") == "false"


def manifest_daemon_env(function: str, **changes) -> dict:
    """The echo-lambda container's environment from the manifests, for a daemon on this host: the
    broker at 127.0.0.1 (guest), the function name given."""
    objects = manifests()
    secrets = {name: doc for (kind, name), doc in objects.items() if kind == "Secret"}
    container, = objects[("Deployment", "echo-lambda")]["spec"]["template"]["spec"]["containers"]
    env = container_env(container, secrets)
    env.update(AWS_LAMBDA_FUNCTION_NAME=function, AMQP_USERNAME="guest", AMQP_PASSWORD="guest",
               AMQP_URI=env["AMQP_URI"].replace("rabbitmq:5672", "127.0.0.1:5672"), **changes)
    return {k: v for k, v in env.items() if v is not None}


def test_kubernetes_queue_settings_carry_a_request_across_zero_replicas():
    """Scale to zero, for real: the daemon with the manifest's queue settings consumes, stops (its last
    replica gone), a request comes through the Lambda Server and waits in the queue, a daemon starts
    again (KEDA's scale-up) and answers it. An auto-delete queue would be gone: 404."""
    import pika

    from amqp_support import BROKER, consumers, start_server, unique_name, wait_consumers

    function = unique_name("k8s-zero")
    server = start_server()
    try:
        first = start_daemon(**manifest_daemon_env(function))
        wait_consumers(function)
        first.stop()
        assert first.proc.returncode == 0, first.stderr
        assert consumers(function) == 0  # no replica, and the queue is still there
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.invoke, {"woke": "up"}, function, None, None, 60)
            wait_until(lambda: queued(function) == 1, 15, interval=0.05, message="the request waiting in the queue")
            second = start_daemon(**manifest_daemon_env(function))
            try:
                status, _, body = waiting.result(60)
            finally:
                second.stop()
        assert (status, json.loads(body)) == (200, {"woke": "up"})

        # The Go daemon's auto-delete queue (AMQP_DURABLE_QUEUE=false): gone with its last consumer.
        plain = unique_name("k8s-zero-plain")
        daemon = start_daemon(**manifest_daemon_env(plain, AMQP_DURABLE_QUEUE="false", AMQP_QUEUE_TYPE=None))
        wait_consumers(plain)
        daemon.stop()
        assert consumers(plain) == -1
        status, headers, _ = server.invoke({}, plain)
        assert (status, headers["x-amzn-errortype"]) == (404, "ResourceNotFoundException")
    finally:
        server.stop()
        with pika.BlockingConnection(pika.URLParameters(BROKER)) as conn:
            conn.channel().queue_delete(function)


def queued(queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare)."""
    import pika

    from amqp_support import BROKER

    with pika.BlockingConnection(pika.URLParameters(BROKER)) as conn:
        return conn.channel().queue_declare(queue, passive=True).method.message_count


# KEDA's documented fields, https://keda.sh/docs/2.18/reference/scaledobject-spec/ and
# https://keda.sh/docs/2.18/scalers/rabbitmq-queue/ (no schema of KEDA's ships in a package).
KEDA_SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                           "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                           "triggers"}
KEDA_SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
KEDA_TRIGGER = {"type", "metadata", "name", "useCachedMetrics", "authenticationRef", "metricType"}
KEDA_RABBITMQ_METADATA = {"host", "protocol", "mode", "value", "activationValue", "queueName", "vhostName",
                          "hostFromEnv", "usernameFromEnv", "passwordFromEnv", "unsafeSsl", "timeout", "useRegex",
                          "pageSize", "operation", "excludeUnacknowledged"}
KEDA_RABBITMQ_MODES = {"QueueLength", "MessageRate", "DeliverGetRate", "PublishedToDeliveredRatio",
                       "ExpectedQueueConsumptionTime"}
KEDA_RABBITMQ_AUTH_PARAMETERS = {"host", "vhostName", "username", "password", "tls", "ca", "cert", "key"}


def test_kubernetes_keda_objects_use_kedas_documented_fields():
    objects = manifests()
    secrets = {name: doc for (kind, name), doc in objects.items() if kind == "Secret"}
    keda = {key: doc for key, doc in objects.items() if doc["apiVersion"] == "keda.sh/v1alpha1"}
    assert {kind for kind, _ in keda} == {"ScaledObject", "TriggerAuthentication"}
    for (kind, name), doc in keda.items():
        if kind != "ScaledObject":
            continue
        spec = doc["spec"]
        assert set(spec) <= KEDA_SCALED_OBJECT_SPEC, name
        assert set(spec["scaleTargetRef"]) <= KEDA_SCALE_TARGET_REF and spec["scaleTargetRef"]["name"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert ("Deployment", spec["scaleTargetRef"]["name"]) in objects
        for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec.get(field, 0), int) and spec.get(field, 0) >= 0, field
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert set(trigger) <= KEDA_TRIGGER and trigger["type"] == "rabbitmq"
            metadata = trigger["metadata"]
            assert set(metadata) <= KEDA_RABBITMQ_METADATA, set(metadata) - KEDA_RABBITMQ_METADATA
            # The trigger's metadata is a map of strings: a YAML number there is refused by the CRD.
            assert all(isinstance(v, str) for v in metadata.values()), metadata
            assert metadata["queueName"] and metadata["mode"] in KEDA_RABBITMQ_MODES
            assert metadata.get("protocol", "auto") in {"auto", "amqp", "http"}
            float(metadata["value"])
            auth = keda[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
            assert set(auth["spec"]) == {"secretTargetRef"}
            for ref in auth["spec"]["secretTargetRef"]:
                assert set(ref) == {"parameter", "name", "key"} and ref["parameter"] in KEDA_RABBITMQ_AUTH_PARAMETERS
                value = secrets[ref["name"]]["stringData"][ref["key"]]
                if ref["parameter"] == "host":
                    scheme = {"http": "http://", "amqp": "amqp://"}.get(metadata.get("protocol", "auto"), "")
                    assert value.startswith(scheme) and value.count("/") >= 3, value  # KEDA wants the trailing /


K8S_VERSIONS = ("1.25.0", "1.37.0")  # the oldest and newest Kubernetes schemas kubernetes-validate 1.37.0 ships


def test_kubernetes_core_kinds_match_the_kubernetes_schemas():
    import kubernetes_validate

    checked = set()
    for (kind, _), doc in manifests().items():
        if doc["apiVersion"] in ("v1", "apps/v1"):
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or mistyped field
            checked.add(kind)
    assert checked == {"Deployment", "Service", "Secret"}
    # strict: a misspelt field is an error, not ignored.
    broken = manifests()[("Deployment", "echo-lambda")]
    broken["spec"]["template"]["spec"]["initContainer"] = broken["spec"]["template"]["spec"].pop("initContainers")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_lambda_server_is_what_the_server_accepts():
    from lambda_rapid.server import config as server_config

    objects = manifests()
    secrets = {name: doc for (kind, name), doc in objects.items() if kind == "Secret"}
    container, = objects[("Deployment", "lambda-server")]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["lambda-server"]
    loaded = server_config.load(container_env(container, secrets))
    assert loaded.invoke_port == container["ports"][0]["containerPort"]
    assert "@rabbitmq:5672/" in loaded.amqp_uri


def test_kubernetes_image_carries_the_single_files():
    text = (K8S_DIR / "Dockerfile").read_text()
    assert "COPY bin/lambda-runtime-api-daemon bin/lambda-server /usr/local/bin/" in text
    pods = [d["spec"]["template"]["spec"] for (kind, _), d in manifests().items() if kind == "Deployment"]
    images = {c["image"] for pod in pods for c in pod.get("initContainers", []) + pod["containers"]}
    assert "lambda-rapid:0.1.0" in images
    assert "lambda-rapid:0.1.0" in (K8S_DIR / "README.md").read_text()
