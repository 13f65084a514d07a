"""Composition root: build the pool, the APIs and the listeners from a Config, run until a signal,
then shut down gracefully (drain, stop the runtimes' process groups, exit 0).

This is where lifecycles meet: the only place that starts listeners, installs signal handlers and
starts the optional AMQP front door (imported only when ``AMQP_URI`` is set) and the optional code
watcher (imported only when ``RELOAD_ON_CHANGE`` is on).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from typing import Optional

from . import metrics
from .config import Config, redact_uri
from .http.server import HttpServer
from .instances import READY, Instance
from .invoke.http_api import InvokeApi
from .pool import Pool
from .sandbox.extensions_api import ExtensionsApi
from .sandbox.lifecycle import SandboxLifecycle
from .sandbox.process import Child, OutputSink, ProcessManager, peak_rss_of_group
from .sandbox.runtime_api import RuntimeApi

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for the runtimes at exit (AWS: 2 s for extensions)
IDLE_CLOSE_TIMEOUT = 2.0  # at exit, how long kept-alive Invoke API connections may take to become idle


class StartupError(Exception):
    pass


class InstanceProcess:
    """What the pool keeps of a launched instance: its runtime process."""

    __slots__ = ("child", "pid")

    def __init__(self, child: Child) -> None:
        self.child = child
        self.pid = child.pid

    def read_output(self) -> None:
        self.child.read_available()

    def peak_rss(self) -> int:
        return peak_rss_of_group(self.pid)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_event_loop()
        self.procs = ProcessManager(self.loop)
        self.sink = OutputSink(self.loop)
        # The sandbox layer is built first: the pool calls it (its hooks and its killer); each
        # sandbox is given the pool when its instance is launched (_launch).
        self.sandboxes = SandboxLifecycle(config, self.loop, self.procs, self.sink.write)
        pool_class = Pool
        if config.tenant_isolated:
            from .tenant_pool import TenantPool  # only paid for when TENANT_ISOLATION_MODE is set

            pool_class = TenantPool
        self.pool = pool_class(config, launcher=self._launch, killer=self.sandboxes.shutdown.kill,
                               output=self.sink.write, hooks=self.sandboxes)
        self.extensions_api = ExtensionsApi(config, self.sandboxes)
        self.runtime_api = RuntimeApi(self.pool, config, routes=self.extensions_api.routes(),
                                      restore=self.sandboxes.restore)
        self.invoke_api = InvokeApi(self.pool, config, metrics=lambda: metrics.render(self.pool), ready=self.ready)
        self.runtime_http = HttpServer(self.runtime_api, request_timeout=60.0, idle_timeout=None)
        self.invoke_http = HttpServer(self.invoke_api, request_timeout=60.0, idle_timeout=600.0)
        self.function_url_http: Optional[HttpServer] = None
        if config.function_url_port is not None:
            from .invoke.function_url import FunctionUrlApi  # only paid for when FUNCTION_URL_PORT is set

            self.function_url_http = HttpServer(FunctionUrlApi(self.pool, config), request_timeout=60.0,
                                                idle_timeout=600.0)
        self.instance_host = config.runtime_host
        if self.instance_host in ("0.0.0.0", "", "::"):
            self.instance_host = "127.0.0.1"
        self.stopping: Optional[asyncio.Event] = None
        self.signals = 0
        self.amqp = None
        self.reloader = None
        if config.reload_on_change:
            from .reload import Reloader, ReloadUnavailable  # only paid for when RELOAD_ON_CHANGE is on

            try:
                self.reloader = Reloader(self.pool, config.cwd, config.reload_dirs)
            except ReloadUnavailable as e:
                raise StartupError(str(e)) from None

    def ready(self) -> bool:
        if not self.pool.accepting:
            return False
        return self.pool.instances.count(READY) >= self.config.min_instances

    # ---- instances ---------------------------------------------------------------------------
    def _launch(self, instance: Instance) -> InstanceProcess:
        """Start an instance: its own Runtime API listener, then its runtime process group."""
        family = socket.AF_INET6 if ":" in self.instance_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.instance_host, 0))
            sock.listen(64)
            sock.setblocking(False)
            port = sock.getsockname()[1]
            env = dict(self.config.runtime_env)
            host = f"[{self.instance_host}]" if family == socket.AF_INET6 else self.instance_host
            env["AWS_LAMBDA_RUNTIME_API"] = f"{host}:{port}"
            env["_INSTANCE"] = str(instance.number)
            log_stream = (time.strftime("%Y/%m/%d/", time.gmtime())
                          + f"[{self.config.function_version}]{os.urandom(16).hex()}")
            env.setdefault("AWS_LAMBDA_LOG_STREAM_NAME", log_stream)
            child = self.procs.spawn(
                self.config.command, env, self.config.cwd,
                on_output=lambda data: self._output(instance, data),
                on_exit=lambda status: self._runtime_exited(instance, status))
        except BaseException:
            sock.close()
            raise
        log.info("started instance #%d: pid %d, runtime API %s", instance.number, child.pid,
                 env["AWS_LAMBDA_RUNTIME_API"])
        listening = self.loop.create_task(self.runtime_http.listen("", sock=sock, context=instance))

        def close() -> None:
            if listening.done() and not listening.cancelled() and listening.exception() is None:
                self.runtime_http.forget(listening.result())
            else:
                listening.cancel()
                sock.close()

        self.sandboxes.launch(instance, child, env, log_stream, self.pool.failures, release=close)
        return InstanceProcess(child)

    def _output(self, instance: Instance, data: bytes) -> None:
        self.sink.write(data)
        self.sandboxes.function_output(instance, data)
        for inv in instance.held.values():
            if inv.log is not None:
                inv.add_log(data)

    def _runtime_exited(self, instance: Instance, status: str, tries: int = 0) -> None:
        """The runtime process has exited. What it sent before (a streamed piece, a /response) is
        in its sockets already, maybe on a connection not accepted yet (asyncio accepts over a few
        loop iterations): let the loop read it first, 5 ms and as long as bytes wait (0.1 s at most)."""
        if tries == 0 or (tries < 20 and self.runtime_http.unread(instance)):
            self.loop.call_later(0.005, self._runtime_exited, instance, status, tries + 1)
            return
        self._runtime_gone(instance, status)

    def _runtime_gone(self, instance: Instance, status: str) -> None:
        self.pool.failures.instance_exited(instance, status)  # first: its invocations are answered with why
        self.sandboxes.runtime_exited(instance)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self.procs.install()
        try:
            await self.runtime_http.listen(config.runtime_host, config.runtime_port)
        except OSError as e:
            raise StartupError(f"cannot listen on the Runtime API address "
                               f"{config.runtime_host}:{config.runtime_port}: {e.strerror or e}") from None
        # Before the Invoke API: once /_/health answers, the Function URL is up too.
        if self.function_url_http is not None:
            try:
                await self.function_url_http.listen(config.invoke_host, config.function_url_port)
            except OSError as e:
                raise StartupError(f"cannot listen on the Function URL address "
                                   f"{config.invoke_host}:{config.function_url_port}: {e.strerror or e}") from None
            log.info("Function URL (%s) on %s:%d", config.function_url_invoke_mode, config.invoke_host,
                     config.function_url_port)
        try:
            await self.invoke_http.listen(config.invoke_host, config.invoke_port)
        except OSError as e:
            raise StartupError(f"cannot listen on the Invoke API address "
                               f"{config.invoke_host}:{config.invoke_port}: {e.strerror or e}") from None
        log.info("function %s (version %s, timeout %gs, MAX_CONCURRENCY %d): Invoke API on %s:%d, "
                 "Runtime API on %s:%d", config.function_name, config.function_version, config.timeout,
                 config.max_concurrency, config.invoke_host, config.invoke_port, config.runtime_host,
                 config.runtime_port)
        self.pool.instances.start_idle_reaper()
        self.pool.instances.spawn_to_minimum()
        # Everything built so far lives as long as the daemon: keep it out of the collector's way.
        gc.collect()
        gc.freeze()
        if config.amqp_uri:
            from .invoke.amqp_rpc import AmqpRpc  # only paid for when AMQP is on

            log.info("AMQP-RPC on %s, queue %s", redact_uri(config.amqp_uri), config.function_name)
            self.amqp = AmqpRpc(self.pool, config)
            await self.amqp.start()
        if self.reloader is not None:
            from .reload import ReloadUnavailable

            try:
                await self.reloader.start()
            except ReloadUnavailable as e:
                raise StartupError(str(e)) from None

    async def run(self) -> int:
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        await self.start()
        await self.stopping.wait()
        await self.shutdown()
        return 0

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("received %s: draining", signal.Signals(sig).name)
            self.pool.stop_accepting()
            assert self.stopping is not None
            self.stopping.set()
        else:
            log.info("received %s again: shortening the grace period", signal.Signals(sig).name)
            for task in asyncio.all_tasks(self.loop):
                if task.get_name() == "drain":
                    task.cancel()

    async def shutdown(self) -> None:
        pool = self.pool
        pool.stop_accepting()
        self.invoke_http.start_draining()  # every answer from now on closes its connection
        if self.reloader is not None:
            await self.reloader.stop()
        if self.amqp is not None:
            await self.amqp.stop_consuming()
        drain = self.loop.create_task(pool.drain(self.config.timeout + 1.0), name="drain")
        try:
            await drain
        except asyncio.CancelledError:
            pass
        pool.reject_queued()
        if self.amqp is not None:
            await self.amqp.close()
        # A request sent gets an answer or a refused connection, never a silent close: stop
        # accepting, then close kept-alive connections only while no request is on them.
        await self.invoke_http.stop_accepting()
        await self.invoke_http.close_idle(IDLE_CLOSE_TIMEOUT)
        self.invoke_http.close()
        if self.function_url_http is not None:
            self.function_url_http.close()
        await self.sandboxes.shutdown.stop_all()
        await self._stop_instances()
        self.runtime_http.close()
        self.invoke_http.close_connections()
        if self.function_url_http is not None:
            self.function_url_http.close_connections()
        self.runtime_http.close_connections()
        await self.sink.flush(1.0)
        log.info("stopped")

    async def _stop_instances(self) -> None:
        for instance in self.pool.instances.stop_all():
            self.procs.signal_group(instance.pid, signal.SIGTERM)
        deadline = self.loop.time() + (0.5 if self.signals > 1 else SHUTDOWN_GRACE)
        while self.procs.children and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for pid in list(self.procs.children):
            self.procs.signal_group(pid, signal.SIGKILL)
        deadline = self.loop.time() + 2.0
        while self.procs.children and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.procs.reap()
