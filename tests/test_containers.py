"""The seed's container story, run for real with podman: the echo-lambda image built from the
project's Dockerfile, the single-file daemon bind-mounted onto /usr/local/bin/aws-lambda-rie and
running as the container's PID 1, started by echo-lambda.sh as the seed writes it.

scripts/setup-containers.sh provides podman (with runc) and the base image, a debootstrapped Debian
(no image registry is reachable here); scripts/test.sh runs it first, and the fixture below again
(a check, well under a second, once done). Where it cannot (not root, no apt-get), every test here
is skipped with its reason. podman reads scripts/containers.conf (CONTAINERS_CONF): the ulimits and
the OCI runtime these machines need.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from amqp_support import RpcClient, unique_name, wait_consumers
from conftest import ECHO_DIR, ROOT, Proc, daemon_env, free_port, wait_until
from single_file import built_bin
from support import metric

# The first test to run pays for the set-up (packages, base image: about a minute here) and the
# image build; each wait inside a test is bounded on its own.
pytestmark = pytest.mark.timeout(600)

SETUP = ROOT / "scripts" / "setup-containers.sh"
CONTAINERS_CONF = os.environ.get("CONTAINERS_CONF") or str(ROOT / "scripts" / "containers.conf")
IMAGE = "localhost/echo-lambda:latest"  # `docker build -t echo-lambda .`, the name echo-lambda.sh runs
RIE_PATH = "/usr/local/bin/aws-lambda-rie"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
FUNCTION_PY = Path(__file__).resolve().parent / "functions" / "container.py"


def engine_env() -> dict:
    return {**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=engine_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def say(request, line: str) -> None:
    """A line on the terminal, past pytest's capture (the set-up's cost, once)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[test_containers] {line}", flush=True)


@pytest.fixture(scope="module")
def base_image(request) -> str:
    started = time.monotonic()
    r = subprocess.run([str(SETUP)], env=engine_env(), capture_output=True, text=True, timeout=1200)
    if r.returncode == 77:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    if r.stderr.strip():  # it did something: say what it cost
        say(request, f"{SETUP.name} took {time.monotonic() - started:.0f} s:\n{r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def image(request, base_image) -> str:
    """`docker build -t echo-lambda .` in examples/echo/echo-lambda, FROM the local base, with this
    host's CA bundle for pip (this machine reaches PyPI through a proxy that bundle trusts)."""
    started = time.monotonic()
    r = subprocess.run(["podman", "build", "--build-arg", f"BASE={base_image}", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
                        "-t", "echo-lambda", "."], cwd=ECHO_DIR, env=engine_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = r.stdout.count("\nSTEP ") + r.stdout.startswith("STEP ")
    cached = r.stdout.count("Using cache")
    say(request, f"podman build -t echo-lambda: {time.monotonic() - started:.1f} s ({cached} of {steps} steps cached)")
    return IMAGE


@pytest.fixture(scope="module")
def daemon_file() -> Path:
    return built_bin() / "lambda-runtime-api-daemon"


def run_container(image: str, daemon_file: Path, *args: str, handler: str = "container.handler",
                  network_host: bool = False, **env) -> Proc:
    """`docker run` of the image as echo-lambda.sh does it (daemon bind-mounted, -p), plus this
    test's handler module in /var/task. The returned Proc is the attached `podman run`."""
    name = f"lambda-rapid-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    argv = ["podman", "run", "--rm", "--name", name, "-v", f"{daemon_file}:{RIE_PATH}:ro",
            "-v", f"{FUNCTION_PY}:/var/task/container.py:ro"]
    env = {"AWS_LAMBDA_FUNCTION_NAME": "echo-lambda", **env}
    if network_host:
        env = {"PORT": port, "RUNTIME_API_PORT": free_port(), **env}
        argv += ["--network", "host"]
    else:
        argv += ["-p", f"127.0.0.1:{port}:8080"]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    proc = Proc([*argv, *args, image, handler], engine_env(), ROOT, port, None)
    proc.name = name
    return proc


def remove(proc: Proc) -> None:
    podman("rm", "--force", "--time", "0", proc.name, check=False)
    proc.stop()


def host_pid(container: str) -> int:
    return int(podman("inspect", "--format", "{{.State.Pid}}", container).stdout.strip())


def status_field(pid: int, name: str) -> list:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def invoke(proc: Proc, event: dict, timeout: float = 30) -> dict:
    status, _, body = proc.invoke(event, timeout=timeout)
    assert status == 200, body
    return json.loads(body)


# ---- the image -----------------------------------------------------------------------------------

def test_image_builds_from_the_projects_dockerfile(image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["/var/task/lambda-entrypoint.sh"] and config["Cmd"] == ["echo.handler"]
    assert config["WorkingDir"] == "/var/task"
    # python3 and awslambdaric from the Dockerfile's layers; no daemon in the image: it is bind-mounted.
    r = podman("run", "--rm", "--entrypoint", "python3", image, "-c",
               f"import awslambdaric, os; print(os.path.exists({RIE_PATH!r}))")
    assert r.stdout.strip() == "False"


# ---- echo-lambda.sh, as the seed writes it ---------------------------------------------------------

def seed_commands() -> list:
    """The curl and `aws lambda invoke` lines of the echo-lambda README (the seed's)."""
    blocks = re.findall(r"```\n(.*?)```", (ECHO_DIR / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks if b.startswith(("curl ", "aws lambda invoke"))]


def test_echo_lambda_sh_serves_the_seeds_commands(image, daemon_file, tmp_path):
    """The script's own `docker run` (engine and host port from DOCKER and PORT), then every curl
    and AWS CLI line of the README, with the seed's answers; `docker stop` ends it with status 0."""
    work = tmp_path / "examples" / "echo" / "echo-lambda"
    work.mkdir(parents=True)
    shutil.copy2(ECHO_DIR / "echo-lambda.sh", work)
    (tmp_path / "bin").mkdir()
    shutil.copy2(daemon_file, tmp_path / "bin")
    port = free_port()
    engine = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "podman"  # podman-docker
    # AMQP_URI= (HTTP only): the default points at this host's address, where this machine's broker
    # (loopback only) does not listen; the AMQP test below uses the host's network instead.
    env = {**engine_env(), "DOCKER": engine, "PORT": str(port), "AMQP_URI": ""}
    script = Proc(["./echo-lambda.sh"], env, work, port, None)
    container = None
    try:
        script.wait_healthy(60)
        running = [c for c in json.loads(podman("ps", "--format", "json").stdout)
                   if any(p.get("host_port") == port for p in c.get("Ports") or [])]
        assert len(running) == 1, running
        container = running[0]["Id"]
        assert running[0]["Image"] == IMAGE
        assert (work / "lambda-runtime-api-daemon").exists()  # the copy it bind-mounts
        commands = seed_commands()
        assert len(commands) == 6
        cli_env = {**daemon_env(), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                   "AWS_DEFAULT_REGION": "us-east-1"}
        version = subprocess.run(["aws", "--version"], env=cli_env, capture_output=True, text=True, timeout=60)
        v1 = (version.stdout + version.stderr).startswith("aws-cli/1.")
        cli_lines = [c for c in commands if c.startswith("aws ")]
        commands.remove(cli_lines[0] if v1 else cli_lines[1])  # the line written for the CLI installed
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
        assert "Could not parse request body into json" in curl[3][0]  # InvalidRequestContentException
        assert json.loads(outputs[4].stderr) == {"key": "value"}  # the CLI writes the payload to /dev/stderr

        pid = host_pid(container)
        assert status_field(pid, "Uid")[0] == str(os.getuid())  # -u $(id -u):$(id -g)
        podman("stop", container)
        assert script.wait(30) == 0, script.stderr
        assert not (work / "lambda-runtime-api-daemon").exists()  # the script removed its copy
        assert "received SIGTERM" in script.stderr
    finally:
        if container and script.proc.poll() is None:
            podman("rm", "--force", "--time", "0", container, check=False)
        script.stop()


# ---- the daemon as the container's PID 1 ----------------------------------------------------------

def test_daemon_is_pid_1_and_reaps_orphans(image, daemon_file):
    proc = run_container(image, daemon_file)
    try:
        proc.wait_healthy(60)
        answer = invoke(proc, {"orphan": True})
        assert answer["pid1"] == ["python3", RIE_PATH, "python3", "-m", "awslambdaric", "container.handler"]
        pid = host_pid(proc.name)
        assert status_field(pid, "NSpid")[-1] == "1"  # PID 1 in the container's namespace
        assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3")  # the image's python3
        # The grandchild exits after 0.3 s as a child of PID 1: a zombie ("Z") until the daemon reaps it.
        grandchild = answer["grandchild"]
        wait_until(lambda: invoke(proc, {"pid": grandchild})["state"] == "gone", 15, interval=0.1,
                   message=f"PID 1 to reap the orphan {grandchild}")
        podman("stop", proc.name)
        assert proc.wait(30) == 0, proc.stderr
    finally:
        remove(proc)


def test_an_unprivileged_user_runs_it(image, daemon_file):
    """docker run -u 65534:65534 (nobody): the daemon and the function run as that user."""
    proc = run_container(image, daemon_file, "-u", "65534:65534")
    try:
        proc.wait_healthy(60)
        answer = invoke(proc, {})
        assert (answer["uid"], answer["gid"]) == (65534, 65534)
        assert status_field(host_pid(proc.name), "Uid")[:2] == ["65534", "65534"]
        status, headers, _ = proc.invoke(raw=b"hello")
        assert (status, headers["x-amzn-errortype"]) == (400, "InvalidRequestContentException")
        podman("stop", proc.name)
        assert proc.wait(30) == 0, proc.stderr
    finally:
        remove(proc)


def test_stop_answers_in_flight_invocations_and_exits_0(image, daemon_file):
    """`podman stop` sends SIGTERM to PID 1: the daemon finishes what is in flight and exits 0."""
    proc = run_container(image, daemon_file, MAX_CONCURRENCY=2)
    try:
        proc.wait_healthy(60)
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(invoke, proc, {"sleep": 2, "n": n}) for n in range(2)]
            wait_until(lambda: metric(proc.metrics(), 'lambda_instances{state="busy"}') == 2, 30,
                       interval=0.05, message="two invocations in flight")
            podman("stop", "--time", "20", proc.name)
            answers = [c.result(30) for c in calls]
        assert [a["slept"] for a in answers] == [2, 2]
        assert proc.wait(30) == 0, proc.stderr  # 137 had podman stop needed SIGKILL
        assert "received SIGTERM" in proc.stderr
    finally:
        remove(proc)


# ---- AMQP-RPC from the container to this host's broker -----------------------------------------------

def test_amqp_rpc_from_the_container_to_the_hosts_broker(image, daemon_file):
    """RabbitMQ here listens on loopback only (and guest may only log in from there): the container
    joins the host's network and the daemon consumes its queue at 127.0.0.1."""
    function = unique_name("container-echo")
    proc = run_container(image, daemon_file, network_host=True, AWS_LAMBDA_FUNCTION_NAME=function,
                         AMQP_URI="amqp://guest:guest@127.0.0.1:5672/?heartbeat=0")
    try:
        proc.wait_healthy(60)
        wait_consumers(function, 1, timeout=60)
        with RpcClient() as client:
            _, body = client.call(function, json.dumps({"via": "amqp"}).encode(), timeout=60)
        assert json.loads(body)["pid1"][1] == RIE_PATH
        status, _, body = proc.invoke({"via": "http"}, name=function)
        assert status == 200 and json.loads(body)["pid1"][1] == RIE_PATH
        podman("stop", proc.name)
        assert proc.wait(30) == 0, proc.stderr
    finally:
        remove(proc)
