"""Scale-out on simulated hosts: daemons and lambda-servers in network namespaces, one RabbitMQ.

Every daemon and every lambda-server runs in a network namespace of its own (a "host") with one
veth link to the root namespace, where RabbitMQ listens on 127.0.0.1:5672 only. A host reaches the
broker at the root end of its own link (10.200.X.4k+1, a /30 per host); one DNAT rule per link,
tagged with this run's id, hands those connections to 127.0.0.1:5672 (``route_localnet`` on that
link only). Hosts have no other route, and an ``unreachable`` route for the run's /22 in the root
namespace keeps anything addressed to a host whose link is gone from leaving by the default route.
The load generators (wrk, or a Python client that records every request) run in the root namespace
and talk to the lambda-servers at their hosts' addresses. Nothing else is a target. The function
is ``tests/functions/scale_handler.py``: sleeps 20 ms, answers with the host that ran it, and (for
the churn cases) appends each run to a file, which says what ran twice and what never ran.

Sections (all by default, ~6 minutes on 2 cores; ``docs/scale-out.md`` has the figures):

* ``scaling``: N = 1, 2, 4, 8 daemons (``MAX_CONCURRENCY=4`` each) behind 2 lambda-servers (and
  N = 8 behind 1), wrk with 64 connections: throughput, p50/p99, each daemon's share, the ready
  messages in the queue (what KEDA reads), CPU per request of every process (broker included),
  the machine's total and the part that is not ours, and what limits each point.
* ``churn``: while a Python client (16 connections, one request in four an ``Event``) runs,
  daemons leave (SIGTERM one, SIGKILL one), two join, one host's link goes down for 10 s; then the
  only daemon of a function is replaced; then a host vanishes for good. Every request is
  accounted for: answered, failed (by status), reset, no answer, lost, run twice. Each with the
  recommended settings (durable queue, quorum when the daemon supports ``AMQP_QUEUE_TYPE``, tried
  at start-up; heartbeat 5 s) and with the Go daemon's auto-delete queue (heartbeat off).
* ``functions``: 20 functions, each with its own daemon, behind one lambda-server; an unknown
  function; a function scaled to zero (durable queue, auto-delete queue, and a caller that gives
  up before a daemon comes).
* ``servers``: two lambda-servers, either answers for any function; one is SIGKILLed mid-load.

Usage (root: it creates network namespaces; RabbitMQ on 127.0.0.1:5672, guest/guest; wrk):

    .venv/bin/python bench/scale.py                       # everything, prints Markdown tables
    .venv/bin/python bench/scale.py --only scaling --rounds 1 --seconds 5
    .venv/bin/python bench/scale.py --only churn,servers --output /tmp/scale.json

Everything it starts (processes, namespaces, DNAT rules, durable queues) is removed when it ends;
the guard route too, once no socket in the root namespace still talks to that range. Leftovers of
a run that was killed are removed by the next run. The whole run stops itself after
``--max-minutes`` (15).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
HANDLER_DIR = ROOT / "tests" / "functions"
BIN = Path(sys.executable).parent
BROKER = ("127.0.0.1", 5672)
BROKER_URI = "amqp://guest:guest@127.0.0.1:5672/"
SUBNET = "10.200"
TAG = "lrs"  # namespaces lrs-<run>-<host>, links ls<run><k>h / ...n, DNAT comment lrs-<run>
PORT = 8080  # every host has its own port space
SLOTS = 4  # MAX_CONCURRENCY of a daemon
SLEEP_MS = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- small helpers -------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list:
    """Direct children of ``pid`` (a daemon's runtimes), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def machine_ticks() -> tuple:
    """(busy, total) ticks of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def broker_pid() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "beam.smp":
                    return int(entry)
            except OSError:
                pass
    raise SystemExit("no beam.smp process: is RabbitMQ running on this machine?")


def uptime() -> str:
    return sh("uptime").strip()


def broker_starts() -> Optional[int]:
    """How often the broker's log says it started: a change during a section means someone else
    restarted the shared broker meanwhile (its figures are then not clean). None without a log."""
    count = None
    for path in Path("/var/log/rabbitmq").glob("rabbit@*.log"):
        if path.name.endswith("_upgrade.log"):
            continue
        try:
            with open(path, errors="replace") as f:
                count = (count or 0) + sum(1 for line in f if "Starting RabbitMQ" in line)
        except OSError:
            pass
    return count


def percentile(values: list, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- hosts: network namespaces -------------------------------------------------------------------

class Host:
    """One network namespace with a veth link to the root namespace."""

    def __init__(self, net: Net, index: int, name: str) -> None:
        self.net = net
        self.index = index
        self.name = name
        self.ns = f"{TAG}-{net.run}-{name}"
        self.root_if = f"ls{net.run}-{index}h"
        self.ns_if = f"ls{net.run}-{index}n"
        third, fourth = net.octet + index // 64, 4 * (index % 64)
        self.gateway = f"{SUBNET}.{third}.{fourth + 1}"  # the root end: where this host finds the broker
        self.addr = f"{SUBNET}.{third}.{fourth + 2}"
        self.rule = ["PREROUTING", "-i", self.root_if, "-p", "tcp", "-d", self.gateway, "--dport", str(BROKER[1]),
                     "-m", "comment", "--comment", f"{TAG}-{net.run}", "-j", "DNAT",
                     "--to-destination", f"{BROKER[0]}:{BROKER[1]}"]

    def create(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.gateway}/30", "dev", self.root_if)
        Path(f"/proc/sys/net/ipv4/conf/{self.root_if}/route_localnet").write_text("1")
        sh("ip", "link", "set", self.root_if, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.addr}/30", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("iptables", "-t", "nat", "-A", *self.rule)

    def link(self, up: bool) -> None:
        """Pull (or put back) the host's cable: its end of the link goes down, so the host can neither
        send nor receive; the root end stays, so nothing for it is routed anywhere else."""
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up" if up else "down")

    def pids(self) -> list:
        out = sh("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in out.split()]

    def destroy(self) -> None:
        # Link up first: the processes' sockets then close toward the broker (FIN/RST), instead of
        # leaving it a connection that retransmits into the void.
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up", check=False)
        deadline = time.monotonic() + 5.0
        while True:
            pids = self.pids()
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        sh("iptables", "-t", "nat", "-D", *self.rule, check=False)
        sh("ip", "netns", "del", self.ns, check=False)  # takes the veth pair with it


class Net:
    """The run's hosts, addresses and the root namespace's side (DNAT rules, guard route)."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                raise PermissionError(f"{tool} is not installed")
        self.run = f"{os.getpid():x}"
        self.hosts: dict = {}
        # Host numbers are never reused within a run: a deleted namespace's link goes away asynchronously.
        self.next_index = 0
        self.started = 0  # processes started, for their log files' names
        remove_stale()
        used = {int(o) for o in re.findall(rf"{SUBNET}\.(\d+)\.", sh("ip", "-4", "route", "show", "table", "all")
                                          + sh("ip", "-4", "addr"))}
        # A /22 of our own (256 hosts of a /30 each).
        self.octet = next(o for o in range(4, 252, 4) if not used & set(range(o, o + 4)))
        # Anything of ours without a link of its own is dropped here, never sent by the default route.
        self.guard = ["unreachable", f"{SUBNET}.{self.octet}.0/22", "metric", str(os.getpid())]
        sh("ip", "route", "add", *self.guard)

    def host(self, name: str) -> Host:
        if name in self.hosts:
            return self.hosts[name]
        if self.next_index >= 256:
            raise RuntimeError("more than 256 hosts in one run")
        host = Host(self, self.next_index, name)
        self.next_index += 1
        self.hosts[name] = host
        try:
            host.create()
        except Exception:
            host.destroy()
            raise
        return host

    def remove(self, host: Host) -> None:
        host.destroy()
        self.hosts.pop(host.name, None)

    def close(self) -> None:
        for host in list(self.hosts.values()):
            self.remove(host)
        # A root-namespace socket still talking to one of our (now deleted) hosts would, without the
        # guard, retransmit by the default route: keep the guard until they are closed.
        deadline = time.monotonic() + 15.0
        while open_sockets(self.guard[1]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = open_sockets(self.guard[1])
        if left:
            log(f"keeping the route 'unreachable {self.guard[1]}': {len(left)} socket(s) toward it still open "
                "(the next run removes it once they are gone)")
            return
        sh("ip", "route", "del", *self.guard, check=False)


def open_sockets(prefix: str) -> list:
    """Root-namespace TCP sockets with a peer in ``prefix`` that may still send (TIME-WAIT only answers)."""
    out = sh("ss", "-tanH", "dst", prefix, check=False)
    return [line for line in out.splitlines() if line.strip() and not line.startswith("TIME-WAIT")]


def remove_stale() -> None:
    """Namespaces, DNAT rules and guard routes left by a run of this tool that is no longer alive."""
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{TAG}-([0-9a-f]+)-", name)
        if m and not pid_alive(int(m.group(1), 16)):
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", name, check=False)
    for line in sh("iptables", "-t", "nat", "-S", "PREROUTING", check=False).splitlines():
        m = re.search(rf"--comment {TAG}-([0-9a-f]+)\b", line)
        if m and line.startswith("-A ") and not pid_alive(int(m.group(1), 16)):
            sh("iptables", "-t", "nat", "-D", *line.split()[1:], check=False)
    for line in sh("ip", "route", "show", "type", "unreachable", check=False).splitlines():
        m = re.match(rf"unreachable ({SUBNET}\.\d+\.0/22) .*metric (\d+)", line)
        if m and not pid_alive(int(m.group(2))) and not open_sockets(m.group(1)):
            sh("ip", "route", "del", "unreachable", m.group(1), "metric", m.group(2), check=False)


# ---- queue settings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueSettings:
    """How the daemons of a function declare its queue, and the AMQP heartbeat of every process."""

    name: str
    durable: bool
    queue_type: Optional[str] = None  # AMQP_QUEUE_TYPE, where the daemon supports it
    heartbeat: int = 0  # seconds, 0 = off

    def env(self) -> dict:
        out = {"AMQP_DURABLE_QUEUE": "true" if self.durable else "false"}
        if self.queue_type:
            out["AMQP_QUEUE_TYPE"] = self.queue_type
        return out

    def describe(self) -> str:
        kind = "durable" if self.durable else "auto-delete"
        if self.queue_type:
            kind += f" {self.queue_type}"
        return f"{kind}, heartbeat={self.heartbeat or 'off'}"


# The Go daemon's queue (and this daemon's default before durable queues were): non-durable, auto-delete,
# with heartbeats off as the README's AMQP_URI examples have them. The contrast to the recommended one.
AUTO_DELETE = QueueSettings("auto-delete", durable=False, heartbeat=0)
# RabbitMQ sends heartbeats every timeout/2 and drops a peer after two missed ones; it calls 5-20 s
# optimal for most environments (https://www.rabbitmq.com/docs/heartbeats). 5 s finds a vanished
# host in about 10 s.
HEARTBEAT = 5


def recommended(quorum: bool) -> QueueSettings:
    return QueueSettings("recommended", durable=True, queue_type="quorum" if quorum else None, heartbeat=HEARTBEAT)


# ---- processes -----------------------------------------------------------------------------------

def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_", "SCALE_"))}
    env.pop("PORT", None)
    env.pop("RUNTIME_API_PORT", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def amqp_uri(host: Host, heartbeat: int) -> str:
    return (f"amqp://guest:guest@{host.gateway}:{BROKER[1]}/?connection_attempts=30&retry_delay=0.5"
            f"&heartbeat={heartbeat}")


class Node:
    """One process (a daemon or a lambda-server) on a host, its output in a file of the run."""

    def __init__(self, fleet: Fleet, host: Host, role: str, argv: list, env: dict, cwd: Path) -> None:
        self.fleet = fleet
        self.host = host
        self.role = role
        self.env = env
        self.port = int(env.get("PORT", PORT))
        self.url = f"http://{host.addr}:{self.port}"
        fleet.net.started += 1
        self.log_path = fleet.logs / f"{fleet.net.started:03d}-{host.name}-{role}.log"
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], env=env, cwd=str(cwd), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        fleet.nodes.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    async def wait_exit(self, timeout: float) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.popen.poll()

    def cpu(self) -> tuple:
        """(own ticks, children's ticks): a daemon's event loop and its runtimes, apart."""
        return ticks(self.pid), sum(ticks(c) for c in children(self.pid))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.role} on {self.host.name} exited {self.popen.returncode}:\n"
                                   f"{self.output()[-2000:]}")
            try:
                if (await http(self.host.addr, self.port, "GET", "/_/ready", timeout=1.0))[0] == 200:
                    return
            except (OSError, asyncio.TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.role} on {self.host.name} not ready within {timeout}s:\n{self.output()[-2000:]}")

    async def successes(self) -> int:
        """Invocations this daemon completed, from its /metrics."""
        body = (await http(self.host.addr, self.port, "GET", "/metrics", timeout=5.0))[2].decode()
        total = 0
        for line in body.splitlines():
            if line.startswith("lambda_invocations_total{") and ('"success"' in line or '"function_error"' in line):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total


class Fleet:
    """The processes of one section, on its hosts; everything stopped and removed on close."""

    def __init__(self, net: Net, logs: Path) -> None:
        self.net = net
        self.logs = logs
        self.nodes: list = []
        self.hosts: list = []

    def host(self, name: str) -> Host:
        host = self.net.host(name)
        if host not in self.hosts:
            self.hosts.append(host)
        return host

    def daemon(self, host_name: str, function: str, settings: QueueSettings, *, slots: int = SLOTS,
               runs_file: Optional[Path] = None, timeout: float = 10.0) -> Node:
        host = self.host(host_name)
        env = base_env()
        env.update(PORT=str(PORT), RUNTIME_API_PORT="9001", AWS_LAMBDA_FUNCTION_NAME=function,
                   MAX_CONCURRENCY=str(slots), MIN_INSTANCES=str(slots), AWS_LAMBDA_FUNCTION_TIMEOUT=str(timeout),
                   AMQP_URI=amqp_uri(host, settings.heartbeat), SCALE_HOST=host.name,
                   SCALE_SLEEP_MS=str(SLEEP_MS), **settings.env())
        if runs_file is not None:
            env["SCALE_RUNS_FILE"] = str(runs_file)
        argv = [str(BIN / "lambda-runtime-api-daemon"), sys.executable, "-m", "awslambdaric", "scale_handler.handler"]
        return Node(self, host, "daemon", argv, env, HANDLER_DIR)

    def server(self, host_name: str, settings: QueueSettings, *, port: int = PORT, timeout: float = 30.0) -> Node:
        host = self.host(host_name)
        env = base_env()
        env.update(PORT=str(port), AMQP_URI=amqp_uri(host, settings.heartbeat),
                   AWS_LAMBDA_FUNCTION_TIMEOUT=str(timeout))
        return Node(self, host, "server", [str(BIN / "lambda-server")], env, ROOT)

    async def close(self) -> None:
        live = [n for n in self.nodes if n.alive()]
        for node in live:
            node.signal(signal.SIGTERM)
        for node in live:
            if await node.wait_exit(15.0) is None:
                node.signal(signal.SIGKILL)
                await node.wait_exit(5.0)
        for host in self.hosts:
            self.net.remove(host)
        self.hosts = []


# ---- the broker, seen from the root namespace ----------------------------------------------------

class Broker:
    """aio-pika on 127.0.0.1 for probes (consumers, waiting messages) and removing our queues."""

    def __init__(self) -> None:
        self.connection = None
        self.queues: set = set()
        self.pid = broker_pid()

    async def open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(BROKER_URI, timeout=10)

    async def channel(self):
        """A fresh channel; the connection is opened again if it was closed (other users of the
        shared broker may restart it or close every connection, to test reconnects), for 60 s at most."""
        deadline = time.monotonic() + 60.0
        while True:
            try:
                if self.connection is None or self.connection.is_closed:
                    await self.open()
                return await self.connection.channel()
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                log(f"broker probe connection: {type(e).__name__}: {e}; again in 0.5 s")
                self.connection = None
                await asyncio.sleep(0.5)

    async def probe(self, queue: str) -> Optional[tuple]:
        """(ready messages, consumers) of a queue, None when it does not exist. A passive declare of a
        missing queue closes its channel, so each probe has a channel of its own."""
        channel = await self.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            result = q.declaration_result
            return result.message_count, result.consumer_count
        except Exception as e:
            if type(e).__name__ == "ChannelNotFoundEntity":
                return None
            raise
        finally:
            if not channel.is_closed:
                await channel.close()

    async def wait_consumers(self, queue: str, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = await self.probe(queue)
            if state is not None and state[1] == count:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"queue {queue}: not {count} consumers within {timeout}s (now {await self.probe(queue)})")

    def track(self, queue: str) -> str:
        self.queues.add(queue)
        return queue

    async def close(self) -> None:
        if self.connection is None:
            return
        for queue in self.queues:
            for _attempt in range(3):  # the shared broker may be restarting right now
                channel = await self.channel()
                try:
                    await channel.queue_delete(queue)
                    break
                except Exception as e:
                    log(f"deleting queue {queue}: {type(e).__name__}: {e}")
                finally:
                    if not channel.is_closed:
                        await channel.close()
        await self.connection.close()


def queue_type(queue: str) -> Optional[str]:
    out = sh("rabbitmqctl", "-q", "list_queues", "--no-table-headers", "name", "type", check=False)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return parts[1]
    return None


async def quorum_supported(net: Net, broker: Broker, logs: Path) -> bool:
    """Does the daemon declare a quorum queue when told ``AMQP_QUEUE_TYPE=quorum``? Tried, not assumed."""
    fleet = Fleet(net, logs)
    queue = broker.track(f"scale-probe-{net.run}")
    try:
        node = fleet.daemon("probe", queue, QueueSettings("probe", durable=True, queue_type="quorum"), slots=1)
        try:
            await node.ready(20)
            await broker.wait_consumers(queue, 1, 20)
        except RuntimeError as e:
            log(f"AMQP_QUEUE_TYPE=quorum probe: the daemon did not come up ({str(e).splitlines()[0]})")
            return False
        kind = queue_type(queue)
        log(f"AMQP_QUEUE_TYPE=quorum probe: the daemon declared a {kind} queue")
        return kind == "quorum"
    finally:
        await fleet.close()


# ---- an HTTP client of our own: every request recorded -------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def request_bytes(method: str, path: str, body: bytes = b"", headers: Optional[dict] = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"{method} {path} HTTP/1.1\r\nHost: scale\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def http(host: str, port: int, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
               timeout: float = 10.0) -> tuple:
    """One request on a connection of its own: (status, headers, body)."""
    async def exchange() -> tuple:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request_bytes(method, path, body, headers))
            return await read_response(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


def invoke_path(function: str) -> str:
    return f"/2015-03-31/functions/{urllib.parse.quote(function, safe='')}/invocations"


@dataclass
class Call:
    """One request as its caller saw it."""

    id: str
    kind: str  # "rr" (RequestResponse) or "event"
    server: int
    function: str
    t0: float
    t1: float = 0.0
    status: Optional[int] = None
    error: Optional[str] = None  # "reset" (connection closed before an answer) or "timeout" (no answer)
    host: Optional[str] = None  # who ran it, from a RequestResponse answer
    function_error: Optional[str] = None  # errorType of a 200 with X-Amz-Function-Error (e.g. Sandbox.Timedout)

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


BACKOFF = 0.02  # seconds a connection pauses after a 429 / 5xx answer


class Caller:
    """``connections`` keep-alive connections, one request at a time each, until ``seconds`` are up.

    Connection ``c`` sends to ``servers[c % len]`` and ``functions[c % len]``; every ``event_every``-th
    request of a connection is an ``Event``. A connection that breaks is reopened (first to its own
    server, then the next one). Nothing is retried: a request that got no answer is recorded so."""

    def __init__(self, servers: list, functions: list, connections: int, *, event_every: int = 0,
                 timeout: float = 45.0, tag: str = "") -> None:
        self.servers = servers
        self.functions = functions
        self.connections = connections
        self.event_every = event_every
        self.timeout = timeout
        self.tag = tag or uuid.uuid4().hex[:6]
        self.calls: list = []
        self.connect_failures = 0
        self.stop_at = 0.0

    async def run(self, seconds: float) -> list:
        self.stop_at = time.monotonic() + seconds
        await asyncio.gather(*(self._connection(c) for c in range(self.connections)))
        return self.calls

    async def _connection(self, c: int) -> None:
        home = c % len(self.servers)
        function = self.functions[c % len(self.functions)]
        path = invoke_path(function)
        target, writer, reader, n = home, None, None, 0
        try:
            while time.monotonic() < self.stop_at:
                if writer is None:
                    try:
                        host, port = self.servers[target]
                        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                    except (OSError, asyncio.TimeoutError):
                        self.connect_failures += 1
                        target = (target + 1) % len(self.servers)
                        writer = None
                        await asyncio.sleep(0.05)
                        continue
                n += 1
                event = self.event_every > 0 and n % self.event_every == 0
                call = Call(f"{self.tag}-{c}-{n}", "event" if event else "rr", target, function, time.monotonic())
                self.calls.append(call)
                headers = {"X-Amz-Invocation-Type": "Event"} if event else None
                try:
                    writer.write(request_bytes("POST", path, json.dumps({"id": call.id}).encode(), headers))
                    call.status, answer, body = await asyncio.wait_for(read_response(reader), self.timeout)
                    if call.status == 200:
                        try:
                            data = json.loads(body)
                            call.host = data.get("host")
                            if "x-amz-function-error" in answer:
                                call.function_error = str(data.get("errorType"))
                        except (ValueError, AttributeError):
                            call.function_error = call.function_error or "unreadable"
                except asyncio.TimeoutError:
                    call.error = "timeout"
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
                    call.error = "reset"
                call.t1 = time.monotonic()
                if call.error is not None:
                    writer.close()
                    writer = None
                    target = home
                elif call.status is not None and call.status >= 429:
                    await asyncio.sleep(BACKOFF)  # as an SDK backs off before it tries again
        finally:
            if writer is not None:
                writer.close()


def confirmed(call: Call) -> bool:
    """The caller was told the function ran (200 from the function) or will run (202 for an Event)."""
    if call.error is not None:
        return False
    if call.kind == "event":
        return call.status == 202
    return call.status == 200 and call.function_error is None


def read_runs(path: Path) -> Counter:
    """How many times each request id ran."""
    return Counter(request for request, _host in run_lines(path))


def run_lines(path: Path) -> list:
    """(request id, host) of every run recorded, in order."""
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if len(line.split()) >= 2]


def doubled_first_on(path: Path) -> dict:
    """For every request that ran more than once: the host of its first run, counted."""
    hosts: dict = {}
    for request, host in run_lines(path):
        hosts.setdefault(request, []).append(host)
    return dict(Counter(h[0] for h in hosts.values() if len(h) > 1))


async def wait_events_ran(calls: list, runs_file: Path, timeout: float = 30.0, quiet: float = 5.0) -> Counter:
    """Wait until every confirmed Event has run (and no copy is still running), or nothing has run
    for ``quiet`` seconds (what has not run then is reported lost), or ``timeout``."""
    wanted = {c.id for c in calls if c.kind == "event" and confirmed(c)}
    deadline = time.monotonic() + timeout
    last, quiet_since = -1, time.monotonic()
    while True:
        runs = read_runs(runs_file)
        total = sum(runs.values())
        if total != last:
            last, quiet_since = total, time.monotonic()
        still = time.monotonic() - quiet_since
        if (wanted <= runs.keys() and still > 1.5) or still > quiet or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.2)


def outcome(call: Call) -> str:
    if call.error is not None:
        return call.error
    if call.function_error is not None:
        return f"{call.status} {call.function_error}"
    return str(call.status)


def account(calls: list, runs: Counter) -> dict:
    """Every request: answered (200 from the function / 202), failed (any other answer, by status and
    error type), reset, no answer; lost = confirmed (answered) but never run; ran twice = recorded
    more than once."""
    out: dict = {"sent": len(calls), "answered": 0, "events_confirmed": 0, "failed": Counter(), "reset": 0,
                 "no_answer": 0, "lost": 0, "ran_twice": 0, "ran_twice_by_answer": Counter(),
                 "unconfirmed_runs": Counter(), "max_latency_s": 0.0}
    for call in calls:
        ran = runs.get(call.id, 0)
        out["max_latency_s"] = max(out["max_latency_s"], call.latency)
        if call.error == "reset":
            out["reset"] += 1
        elif call.error == "timeout":
            out["no_answer"] += 1
        elif confirmed(call):
            out["answered"] += 1
            out["events_confirmed"] += call.kind == "event"
            if ran == 0:
                out["lost"] += 1
        else:
            out["failed"][outcome(call)] += 1
        if ran >= 2:
            out["ran_twice"] += 1
            out["ran_twice_by_answer"][outcome(call)] += 1
        if not confirmed(call):
            out["unconfirmed_runs"][f"{outcome(call)}: ran {ran}x"] += 1
    out["max_latency_s"] = round(out["max_latency_s"], 2)
    for key in ("failed", "ran_twice_by_answer", "unconfirmed_runs"):
        out[key] = dict(out[key])
    return out


# ---- wrk ---------------------------------------------------------------------------------------

WRK_SCRIPT = """\
local servers = {%s}
local next_server = 0
function setup(thread)
  local s = servers[next_server %% #servers + 1]
  next_server = next_server + 1
  thread.addr = wrk.lookup(s[1], s[2])[1]
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"id": "wrk"}'
"""


async def run_wrk(servers: list, function: str, connections: int, seconds: float) -> dict:
    """wrk with one thread per lambda-server (each thread's connections go to its server)."""
    listing = ", ".join(f'{{"{h}", "{p}"}}' for h, p in servers)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % listing)
    url = f"http://{servers[0][0]}:{servers[0][1]}{invoke_path(function)}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = await asyncio.create_subprocess_exec(
            "wrk", f"-t{len(servers)}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "--latency",
            "-s", script.name, url, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        os.unlink(script.name)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()[-500:]}")

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\b", text, re.M)
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0.0

    count = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {"requests": int(count.group(1)) if count else 0, "p50_ms": ms("50"), "p99_ms": ms("99"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "raw": text}


# ---- section: scaling ----------------------------------------------------------------------------

def cpu_snapshot(daemons: list, servers: list, broker: Broker) -> dict:
    snap = {"broker": ticks(broker.pid), "machine": machine_ticks(), "bench": ticks(os.getpid())}
    for node in servers:
        snap[f"server:{node.host.name}"] = ticks(node.pid)
    for node in daemons:
        own, kids = node.cpu()
        snap[f"daemon:{node.host.name}"] = own
        snap[f"runtimes:{node.host.name}"] = kids
    return snap


def cpu_delta(before: dict, after: dict, seconds: float, requests: int) -> dict:
    """Per component: percent of one core, and microseconds of CPU per request."""
    busy = after["machine"][0] - before["machine"][0]
    total = after["machine"][1] - before["machine"][1]
    cores = os.cpu_count() or 1
    groups: Counter = Counter()
    single: dict = {}
    for key in before:
        if key == "machine":
            continue
        used = (after[key] - before[key]) / CLK_TCK
        groups[key.split(":")[0]] += used
        if key.startswith(("server:", "daemon:")):
            single[key] = round(100 * used / seconds, 1)
    per = 1e6 / max(1, requests)
    out = {"machine_busy_pct": round(100 * cores * busy / max(1, total), 1),
           "per_process_pct": single,
           "group_pct": {k: round(100 * v / seconds, 1) for k, v in groups.items()},
           "group_us_per_request": {k: round(v * per) for k, v in groups.items()}}
    ours = sum(groups.values())
    out["others_pct"] = round(out["machine_busy_pct"] - 100 * ours / seconds, 1)
    return out


def name_limit(row: dict, connections: int) -> str:
    """What bounds this window, from the measured CPU: a single-threaded process at a full core, the
    machine's cores all busy, the callers (fewer requests in flight than runtimes), or nothing."""
    cpu = row["cpu"]
    cores = os.cpu_count() or 1
    hot = max(cpu["per_process_pct"].items(), key=lambda kv: kv[1])
    if hot[1] >= 90:
        return f"{hot[0]} at {hot[1]:.0f}% of a core (one event loop)"
    if cpu["machine_busy_pct"] >= 90 * cores:
        ours = sum(cpu["group_pct"].values()) + cpu["wrk_pct"]
        if cpu["others_pct"] > ours / 2:
            return (f"other work on the shared machine ({cpu['machine_busy_pct']:.0f}% busy, of which "
                    f"{cpu['others_pct']:.0f}% not ours)")
        parts = sorted(cpu["group_pct"].items(), key=lambda kv: -kv[1])
        share = ", ".join(f"{k} {v:.0f}%" for k, v in parts)
        return (f"the machine's {cores} cores ({cpu['machine_busy_pct']:.0f}% busy: {share}, "
                f"wrk {cpu['wrk_pct']:.0f}%, others {cpu['others_pct']:.0f}%)")
    if connections <= row["daemons"] * SLOTS:
        return f"the callers ({connections} in flight for {row['daemons'] * SLOTS} runtimes)"
    return f"the runtimes ({row['daemons'] * SLOTS} x {SLEEP_MS} ms sleeps)"


async def sample_ready(broker: Broker, queue: str, load: asyncio.Future) -> float:
    """The mean number of ready messages in the queue while ``load`` runs, sampled every 0.25 s:
    what KEDA's RabbitMQ trigger reads over AMQP (a passive declare counts ready messages only;
    those a daemon holds unacked, up to its prefetch, are not in it)."""
    samples = []
    await asyncio.sleep(0.5)
    while not load.done():
        state = await broker.probe(queue)
        if state is not None:
            samples.append(state[0])
        await asyncio.sleep(0.25)
    return round(statistics.mean(samples), 1) if samples else 0.0


async def scaling(net: Net, broker: Broker, logs: Path, args, settings: QueueSettings) -> dict:
    fleet = Fleet(net, logs)
    function = broker.track(f"scale-{net.run}")
    result: dict = {"settings": settings.describe(), "connections": args.connections, "uptime": [uptime()],
                    "rows": []}
    try:
        servers = [fleet.server(f"s{i + 1}", settings) for i in range(args.servers)]
        for node in servers:
            await node.ready()
        before = ticks(broker.pid)
        await asyncio.sleep(2.0)
        result["broker_idle_pct"] = round(100 * (ticks(broker.pid) - before) / CLK_TCK / 2.0, 1)
        daemons: list = []
        ladder = [n for n in (1, 2, 4, 8) if n <= args.max_daemons]
        for n in ladder:
            while len(daemons) < n:
                daemons.append(fleet.daemon(f"d{len(daemons) + 1}", function, settings))
            for node in daemons:
                await node.ready()
            await broker.wait_consumers(function, n)
            for server_count in ([len(servers)] + ([1] if n == ladder[-1] and len(servers) > 1 else [])):
                targets = [(node.host.addr, node.port) for node in servers[:server_count]]
                await run_wrk(targets, function, args.connections, args.warmup)
                rounds = []
                attempts = 0
                while len(rounds) < args.rounds and attempts < args.rounds + 4:
                    attempts += 1
                    starts = broker_starts()
                    counts = [await node.successes() for node in daemons]
                    snap = cpu_snapshot(daemons, servers[:server_count], broker)
                    t0 = time.monotonic()
                    load = asyncio.ensure_future(run_wrk(targets, function, args.connections, args.seconds))
                    ready = await sample_ready(broker, function, load)
                    wrk = await load
                    elapsed = time.monotonic() - t0
                    snap2 = cpu_snapshot(daemons, servers[:server_count], broker)
                    counts = [await node.successes() - c for node, c in zip(daemons, counts)]
                    if broker_starts() != starts or wrk["non2xx"] + wrk["socket_errors"] > 0:
                        # Someone restarted the shared broker meanwhile (or errors for another reason):
                        # this window says nothing about scaling; wait for the broker and measure again.
                        log(f"N={n}: window disturbed ({wrk['non2xx']} non-2xx, {wrk['socket_errors']} socket "
                            "errors, broker restarts counted); measuring it again")
                        result["disturbed_windows"] = result.get("disturbed_windows", 0) + 1
                        await broker.wait_consumers(function, n, 60)
                        for node in servers:
                            await node.ready(60)
                        continue
                    cpu = cpu_delta(snap, snap2, elapsed, wrk["requests"])
                    cpu["wrk_pct"] = round(100 * wrk["cpu_s"] / elapsed, 1)
                    cpu["group_us_per_request"]["wrk"] = round(1e6 * wrk["cpu_s"] / max(1, wrk["requests"]))
                    total = max(1, sum(counts))
                    shares = {node.host.name: round(c / total, 4) for node, c in zip(daemons, counts)}
                    spread = max(abs(s * n - 1) for s in shares.values())
                    rounds.append({"daemons": n, "servers": server_count, "queue_ready": ready,
                                   "rps": round(wrk["requests"] / elapsed, 1),
                                   "p50_ms": wrk["p50_ms"], "p99_ms": wrk["p99_ms"],
                                   "errors": wrk["non2xx"] + wrk["socket_errors"], "shares": shares,
                                   "fairness_max_dev": round(spread, 3), "cpu": cpu, "seconds": round(elapsed, 2)})
                if not rounds:
                    raise RuntimeError(f"N={n}: every window was disturbed (the shared broker restarting?)")
                row = min(rounds, key=lambda r: abs(r["rps"] - statistics.median(x["rps"] for x in rounds)))
                row = dict(row, rounds_rps=[r["rps"] for r in rounds], ideal_rps=round(
                    min(n * SLOTS, args.connections) * 1000 / SLEEP_MS))
                row["limit"] = name_limit(row, args.connections)
                ours = sum(row["cpu"]["group_us_per_request"].values())
                # What these processes alone would reach on this machine's cores, at their measured cost.
                row["ours_us_per_request"] = ours
                row["cpu_ceiling_rps"] = round((os.cpu_count() or 1) * 1e6 / max(1, ours))
                log(f"N={n} servers={server_count}: {row['rps']} req/s (rounds {row['rounds_rps']}), "
                    f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, fairness {row['fairness_max_dev']:.1%}; "
                    f"limit: {row['limit']}")
                result["rows"].append(row)
        result["uptime"].append(uptime())
        return result
    finally:
        await fleet.close()


# ---- section: churn ------------------------------------------------------------------------------

CHURN_PLAN = [  # (seconds after the load starts, action, host[, seconds])
    (3.0, "term", "d1"),
    (7.0, "kill", "d2"),
    (11.0, "start", "d5"),
    (11.0, "start", "d6"),
    (14.0, "cut", "d3", 10.0),
]
# The only daemon of a function is replaced (a rolling update of one replica, or scale to zero and
# back): SIGTERM at 2 s, its successor starts 1 s later.
RESTART_PLAN = [(2.0, "term", "d1"), (3.0, "start", "d2")]
# A host vanishes (its link goes down and never comes back: a machine that lost power sends no FIN).
HOST_LOST_PLAN = [(2.0, "cut", "d3", None)]


async def churn(net: Net, broker: Broker, logs: Path, settings: QueueSettings, *, daemons: int = 4,
                plan: Optional[list] = None, seconds: float = 30.0, connections: int = 16,
                event_every: int = 4, server_timeout: float = 30.0, label: str = "churn") -> dict:
    """Daemons leave, join and lose their link while a Caller runs; every request accounted for.
    ``server_timeout`` is lambda-server's AWS_LAMBDA_FUNCTION_TIMEOUT (its longest wait for a reply)."""
    plan = CHURN_PLAN if plan is None else plan
    fleet = Fleet(net, logs)
    function = broker.track(f"{label}-{settings.name}-{net.run}-{uuid.uuid4().hex[:4]}")
    runs_file = logs / f"{function}.runs"
    result: dict = {"settings": settings.describe(), "daemons": daemons, "seconds": seconds, "uptime": [uptime()],
                    "server_timeout": server_timeout, "events": []}
    try:
        server = fleet.server("cs1", settings, timeout=server_timeout)
        nodes = {f"d{i + 1}": fleet.daemon(f"d{i + 1}", function, settings, runs_file=runs_file)
                 for i in range(daemons)}
        await server.ready()
        for node in nodes.values():
            await node.ready()
        await broker.wait_consumers(function, daemons)
        caller = Caller([(server.host.addr, server.port)], [function], connections, event_every=event_every)
        began = time.monotonic()

        async def act(step: tuple) -> None:
            await asyncio.sleep(max(0.0, began + step[0] - time.monotonic()))
            action, name = step[1], step[2]
            at = round(time.monotonic() - began, 2)
            if action == "term":
                nodes[name].signal(signal.SIGTERM)
            elif action == "kill":
                nodes[name].signal(signal.SIGKILL)
            elif action == "start":
                nodes[name] = fleet.daemon(name, function, settings, runs_file=runs_file)
            elif action == "cut":
                nodes[name].host.link(False)
                result["events"].append({"t": at, "action": "link down", "host": name})
                if step[3] is None:
                    return  # the host is gone for good
                await asyncio.sleep(step[3])
                nodes[name].host.link(True)
                result["events"].append({"t": round(time.monotonic() - began, 2), "action": "link up", "host": name})
                return
            result["events"].append({"t": at, "action": action, "host": name})

        acts = [asyncio.ensure_future(act(step)) for step in plan]
        calls = await caller.run(seconds)
        await asyncio.gather(*acts)
        for step in plan:
            if step[1] == "term":
                result.setdefault("exit_status", {})[step[2]] = await nodes[step[2]].wait_exit(15)
        runs = await wait_events_ran(calls, runs_file)
        result["accounting"] = account(calls, runs)
        result["ran_twice_first_on"] = doubled_first_on(runs_file)
        result["connect_failures"] = caller.connect_failures
        result["answered_by"] = dict(Counter(c.host for c in calls if c.host))
        result["timeline"] = timeline(calls, began)
        result["queue_after"] = await broker.probe(function)
        result["uptime"].append(uptime())
        acc = result["accounting"]
        log(f"{label} [{settings.describe()}]: {acc['sent']} sent, {acc['answered']} answered, failed {acc['failed']}, "
            f"reset {acc['reset']}, no answer {acc['no_answer']}, lost {acc['lost']}, ran twice {acc['ran_twice']} "
            f"{acc['ran_twice_by_answer']}, max latency {acc['max_latency_s']} s")
        return result
    finally:
        await fleet.close()


def timeline(calls: list, began: float) -> list:
    """Per second of the load: requests answered in it, and the slowest answer among those sent in it."""
    rows: dict = {}
    for call in calls:
        second = int(call.t0 - began)
        row = rows.setdefault(second, {"t": second, "sent": 0, "ok": 0, "max_latency_s": 0.0})
        row["sent"] += 1
        row["ok"] += confirmed(call)
        row["max_latency_s"] = round(max(row["max_latency_s"], call.latency), 2)
    return [rows[k] for k in sorted(rows)]


# ---- section: many functions ---------------------------------------------------------------------

async def many_functions(net: Net, broker: Broker, logs: Path, settings: QueueSettings, *, count: int = 20,
                         seconds: float = 5.0) -> dict:
    fleet = Fleet(net, logs)
    result: dict = {"functions": count, "uptime": [uptime()]}
    attempt = uuid.uuid4().hex[:4]  # names of their own for every run of the section (durable queues stay)
    names = [broker.track(f"fn{i + 1:02d}-{net.run}-{attempt}") for i in range(count)]
    try:
        server = fleet.server("fs1", settings)
        t0 = time.monotonic()
        nodes = [fleet.daemon(f"f{i + 1:02d}", name, settings, slots=1) for i, name in enumerate(names)]
        await server.ready()
        for node, name in zip(nodes, names):
            await node.ready(60)
            await broker.wait_consumers(name, 1)
        result["start_all_s"] = round(time.monotonic() - t0, 1)
        target = [(server.host.addr, server.port)]
        # Each function answered by its own daemon: 2 connections per function.
        caller = Caller(target, names, 2 * count)
        calls = await caller.run(seconds)
        ok = [c for c in calls if c.status == 200]
        per_function = Counter(c.function for c in ok)
        wrong = sum(1 for c in ok if c.host != f"f{names.index(c.function) + 1:02d}")
        result["load"] = {"connections": 2 * count, "rps": round(len(ok) / seconds, 1),
                          "ideal_rps": round(count * 1000 / SLEEP_MS),
                          "p50_ms": round(1000 * percentile([c.latency for c in ok], 0.5), 1),
                          "p99_ms": round(1000 * percentile([c.latency for c in ok], 0.99), 1),
                          "errors": len(calls) - len(ok), "answered_by_wrong_daemon": wrong,
                          "per_function_min": min(per_function.values(), default=0),
                          "per_function_max": max(per_function.values(), default=0),
                          "functions_answered": len(per_function)}
        # An unknown function: 404 at once.
        latencies, statuses = [], Counter()
        for _ in range(20):
            t = time.monotonic()
            status, headers, _ = await http(*target[0], "POST", invoke_path(f"no-such-function-{net.run}"), b"{}")
            latencies.append(time.monotonic() - t)
            statuses[f"{status} {headers.get('x-amzn-errortype', '')}"] += 1
        result["unknown"] = {"answers": dict(statuses), "p50_ms": round(1000 * percentile(latencies, 0.5), 2),
                             "max_ms": round(1000 * max(latencies), 2)}
        result["scaled_to_zero"] = await scaled_to_zero(fleet, broker, server, settings, f"{net.run}-{attempt}")
        result["uptime"].append(uptime())
        log(f"functions: {json.dumps({k: v for k, v in result.items() if k != 'uptime'})}")
        return result
    finally:
        await fleet.close()


async def scaled_to_zero(fleet: Fleet, broker: Broker, server: Node, settings: QueueSettings, run: str) -> dict:
    """A function whose only daemon stopped: with a durable queue the request waits in the queue for
    a daemon; with an auto-delete queue the queue is gone with its daemon."""
    out: dict = {}
    target = (server.host.addr, server.port)
    for label, queue_settings in (("durable", settings), ("auto-delete", AUTO_DELETE)):
        name = broker.track(f"zero-{label}-{run}")
        node = fleet.daemon(f"z{label[0]}", name, queue_settings, slots=1)
        await node.ready()
        await broker.wait_consumers(name, 1)
        status, _, _ = await http(*target, "POST", invoke_path(name), b'{"id": "warm"}')
        node.signal(signal.SIGTERM)
        await node.wait_exit(15)
        entry: dict = {"queue_after_stop": await broker.probe(name), "warm_status": status}
        if label == "durable":
            # The request waits in the queue; a daemon started 3 s later answers it.
            t = time.monotonic()
            pending = asyncio.ensure_future(http(*target, "POST", invoke_path(name), b'{"id": "cold"}', timeout=60))
            await asyncio.sleep(0.5)
            entry["queue_while_waiting"] = await broker.probe(name)
            await asyncio.sleep(2.5)
            started = time.monotonic()
            fleet.daemon(f"z{label[0]}", name, queue_settings, slots=1)
            status, _, body = await pending
            entry.update(status=status, waited_s=round(time.monotonic() - t, 2),
                         after_daemon_start_s=round(time.monotonic() - started, 2), body=body.decode()[:120])
        else:
            for who, srv in (("same server", target), ("a server that never saw it", None)):
                if srv is None:
                    fresh = fleet.server(server.host.name, AUTO_DELETE, port=PORT + 1)
                    await fresh.ready()
                    srv = (fresh.host.addr, fresh.port)
                t = time.monotonic()
                status, headers, _ = await http(*srv, "POST", invoke_path(name), b'{"id": "cold"}')
                entry[who] = {"status": status, "error_type": headers.get("x-amzn-errortype"),
                              "ms": round(1000 * (time.monotonic() - t), 1)}
        out[label] = entry
    out["durable, caller gave up"] = await gave_up(fleet, broker, server, settings, run)
    return out


async def gave_up(fleet: Fleet, broker: Broker, server: Node, settings: QueueSettings, run: str) -> dict:
    """Durable queue, no daemon, a lambda-server whose timeout (2 s) ends the wait: the caller gets
    the timeout answer, but the request stays in the queue. Does it run when a daemon comes?"""
    name = broker.track(f"zero-gaveup-{run}")
    runs_file = fleet.logs / f"{name}.runs"
    node = fleet.daemon("zg", name, settings, slots=1, runs_file=runs_file)
    await node.ready()
    await broker.wait_consumers(name, 1)
    node.signal(signal.SIGTERM)
    await node.wait_exit(15)
    impatient = fleet.server(server.host.name, settings, port=PORT + 2, timeout=2.0)
    await impatient.ready()
    request = f"gave-up-{run}"
    t = time.monotonic()
    status, headers, body = await http(impatient.host.addr, impatient.port, "POST", invoke_path(name),
                                       json.dumps({"id": request}).encode(), timeout=30)
    entry: dict = {"status": status, "function_error": headers.get("x-amz-function-error"),
                   "error_type": (json.loads(body).get("errorType") if body.startswith(b"{") else None),
                   "answered_after_s": round(time.monotonic() - t, 2), "queue_after_answer": await broker.probe(name)}
    started = time.monotonic()
    fleet.daemon("zg", name, settings, slots=1, runs_file=runs_file)
    while time.monotonic() - started < 20 and request not in read_runs(runs_file):
        await asyncio.sleep(0.1)
    ran = read_runs(runs_file).get(request, 0)
    entry.update(ran_after_the_caller_was_answered=ran, ran_s_after_daemon_start=(
        round(time.monotonic() - started, 2) if ran else None))
    return entry


# ---- section: two lambda-servers -----------------------------------------------------------------

async def two_servers(net: Net, broker: Broker, logs: Path, settings: QueueSettings, *, daemons: int = 3,
                      seconds: float = 6.0, kill_at: float = 2.0, connections: int = 16) -> dict:
    fleet = Fleet(net, logs)
    function = broker.track(f"servers-{net.run}-{uuid.uuid4().hex[:4]}")
    runs_file = logs / f"{function}.runs"
    result: dict = {"daemons": daemons, "uptime": [uptime()]}
    try:
        servers = [fleet.server(f"ss{i + 1}", settings) for i in range(2)]
        nodes = [fleet.daemon(f"d{i + 1}", function, settings, runs_file=runs_file) for i in range(daemons)]
        for node in servers + nodes:
            await node.ready()
        await broker.wait_consumers(function, daemons)
        targets = [(s.host.addr, s.port) for s in servers]
        # Stateless: either server answers any request, served by any daemon.
        either = Caller(targets, [function], 8)
        calls = await either.run(2.0)
        result["either"] = {f"server {i + 1}": dict(Counter(c.host for c in calls if c.server == i and c.status == 200))
                            for i in range(2)}
        result["either"]["errors"] = sum(1 for c in calls if c.status != 200)
        # One server SIGKILLed mid-load: half the requests are Events.
        caller = Caller(targets, [function], connections, event_every=2)

        async def kill() -> None:
            await asyncio.sleep(kill_at)
            servers[0].signal(signal.SIGKILL)

        killer = asyncio.ensure_future(kill())
        calls = await caller.run(seconds)
        await killer
        runs = await wait_events_ran(calls, runs_file)
        result["kill"] = account(calls, runs)
        result["kill"]["in_flight_at_kill"] = {
            "rr": sum(1 for c in calls if c.server == 0 and c.error and c.kind == "rr"),
            "event": sum(1 for c in calls if c.server == 0 and c.error and c.kind == "event")}
        result["kill"]["events_ran_exactly_once"] = sum(
            1 for c in calls if c.kind == "event" and c.status == 202 and runs.get(c.id) == 1)
        # Back again: a new lambda-server on the same host takes requests at once.
        again = fleet.server("ss1", settings)
        await again.ready()
        status, _, body = await http(again.host.addr, again.port, "POST", invoke_path(function), b'{"id": "again"}')
        result["restarted_server"] = {"status": status, "body": body.decode()[:100]}
        result["uptime"].append(uptime())
        log(f"servers: {json.dumps({k: v for k, v in result.items() if k != 'uptime'})}")
        return result
    finally:
        await fleet.close()


# ---- report --------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    out = []
    sc = results.get("scaling")
    if sc:
        out += [f"Scaling ({sc['settings']}, wrk {sc['connections']} connections; broker idle "
                f"{sc['broker_idle_pct']}% of a core before the load; {sc.get('disturbed_windows', 0)} windows "
                f"measured again after a broker restart; {sc['uptime'][0]})", "",
                "| daemons | lambda-servers | req/s | ideal | p50 ms | p99 ms | max share dev | ready in queue | "
                "broker us/req | server us/req | daemon us/req | runtimes us/req | wrk us/req | all ours us/req | "
                "CPU ceiling req/s | machine busy | others | limit |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sc["rows"]:
            us = r["cpu"]["group_us_per_request"]
            out.append(f"| {r['daemons']} | {r['servers']} | {r['rps']:,.0f} | {r['ideal_rps']:,} | "
                       f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['fairness_max_dev']:.1%} | {r['queue_ready']} | "
                       f"{us.get('broker', 0)} | "
                       f"{us.get('server', 0)} | {us.get('daemon', 0)} | {us.get('runtimes', 0)} | "
                       f"{us.get('wrk', 0)} | {r['ours_us_per_request']} | {r['cpu_ceiling_rps']:,} | "
                       f"{r['cpu']['machine_busy_pct']:.0f}% | {r['cpu']['others_pct']:.0f}% | {r['limit']} |")
        out.append("")
    for key in ("churn-recommended", "churn-auto-delete", "restart-recommended", "restart-auto-delete",
                "hostlost-recommended", "hostlost-auto-delete"):
        ch = results.get(key)
        if ch:
            a = ch["accounting"]
            out += [f"{key} ({ch['settings']}): {a['sent']} sent, {a['answered']} answered "
                    f"({a['events_confirmed']} Events confirmed), failed {a['failed']}, reset {a['reset']}, "
                    f"no answer {a['no_answer']}, **lost {a['lost']}**, ran twice {a['ran_twice']} "
                    f"{a['ran_twice_by_answer']}, slowest answer {a['max_latency_s']} s; answered by "
                    f"{ch['answered_by']}"
                    + ("; **the shared broker restarted during it**" if ch.get("broker_restarted_meanwhile") else ""),
                    ""]
    return "\n".join(out)


async def main_async(args) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="lrs-scale-"))
    os.chmod(logs, 0o755)
    net = Net()
    broker = Broker()
    await broker.open()
    results: dict = {"uptime_start": uptime(), "logs": str(logs), "machine": f"{os.cpu_count()} cores"}
    log(f"run {net.run}: hosts in {SUBNET}.{net.octet}.0/22, logs in {logs}; {results['uptime_start']}")
    try:
        quorum = await quorum_supported(net, broker, logs)
        settings = recommended(quorum)
        results["quorum_supported"] = quorum
        results["recommended"] = settings.describe()
        sections = args.only.split(",")
        both = [settings] + ([] if args.recommended_only else [AUTO_DELETE])
        plan: list = []
        if "scaling" in sections:
            plan.append(("scaling", lambda: scaling(net, broker, logs, args, settings)))
        if "churn" in sections:
            for qs in both:
                plan.append((f"churn-{qs.name}", lambda qs=qs: churn(net, broker, logs, qs,
                                                                    seconds=args.churn_seconds)))
            for qs in both:
                plan.append((f"restart-{qs.name}", lambda qs=qs: churn(
                    net, broker, logs, qs, daemons=1, plan=RESTART_PLAN, seconds=8.0, server_timeout=10.0,
                    label="restart")))
            for qs in both:
                plan.append((f"hostlost-{qs.name}", lambda qs=qs: churn(
                    net, broker, logs, qs, daemons=3, plan=HOST_LOST_PLAN, seconds=14.0, server_timeout=15.0,
                    label="hostlost")))
        if "functions" in sections:
            plan.append(("functions", lambda: many_functions(net, broker, logs, settings)))
        if "servers" in sections:
            plan.append(("servers", lambda: two_servers(net, broker, logs, settings)))
        for key, run in plan:
            # (scaling measures a disturbed window again by itself)
            for attempt in range(1 + (0 if key == "scaling" else args.retries)):
                starts = broker_starts()
                results[key] = await run()
                if broker_starts() == starts:
                    break
                results[key]["broker_restarted_meanwhile"] = True
                log(f"{key}: the shared broker was restarted (by someone else) during this section"
                    + ("; running it again" if attempt < args.retries else ""))
            results[key]["attempts"] = attempt + 1
        results["uptime_end"] = uptime()
        return results
    finally:
        await broker.close()
        net.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="scaling,churn,functions,servers",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--servers", type=int, default=2, choices=(1, 2), help="lambda-servers for scaling")
    parser.add_argument("--max-daemons", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for scaling (fixed for all N)")
    parser.add_argument("--seconds", type=float, default=8.0, help="one measured window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="windows per point (the median is reported)")
    parser.add_argument("--churn-seconds", type=float, default=30.0)
    parser.add_argument("--recommended-only", action="store_true",
                        help="churn with the recommended settings only (not also with the auto-delete queue)")
    parser.add_argument("--retries", type=int, default=1,
                        help="run a churn/functions/servers section again when the shared broker restarted "
                             "during it (default 1)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="stop (and clean up) after this long")
    parser.add_argument("--output", help="write every figure as JSON to this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None and "scaling" in args.only:
        raise SystemExit("wrk is needed for the scaling section (apt-get install wrk)")

    async def bounded() -> dict:
        return await asyncio.wait_for(main_async(args), args.max_minutes * 60)

    def stop(_signum, _frame) -> None:
        raise KeyboardInterrupt  # asyncio.run then cancels the run, and every section cleans up

    signal.signal(signal.SIGTERM, stop)
    results = asyncio.run(bounded())
    text = json.dumps(results, indent=1, default=str)
    if args.output:
        Path(args.output).write_text(text)
    print("BENCH_RESULT " + json.dumps(results, default=str))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
