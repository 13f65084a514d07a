"""Every setting of the daemon, read from argv and the environment once, validated, frozen.

This is the only module that interprets the environment (it is handed a mapping; it does not read
``os.environ`` itself). Invalid values raise :class:`ConfigError` naming the variable and the value;
nothing here falls back silently to a default.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .invoke.contract import ACCOUNT_ID as ACCOUNT_ID  # re-exported: the account of every ARN here
from .invoke.contract import function_arn

BOOTSTRAP_CANDIDATES = ("/var/task/bootstrap", "/opt/bootstrap", "/var/runtime/bootstrap")
DEFAULT_AMQP_URI = "amqp://guest:guest@localhost:5672/?connection_attempts=20&retry_delay=10&heartbeat=0"
LOG_LEVELS = {
    "DEBUG": "DEBUG",
    "TRACE": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARNING",
    "WARN": "WARNING",
    "ERROR": "ERROR",
}
# Variables that belong to the daemon's AMQP connection and must never reach the function.
AMQP_SECRETS = ("AMQP_URI", "AMQP_USERNAME", "AMQP_PASSWORD")
# Function URL invoke modes, as AWS's FunctionUrlConfig.InvokeMode names them.
FUNCTION_URL_INVOKE_MODES = ("BUFFERED", "RESPONSE_STREAM")
# RabbitMQ queue types the function's queue can be (its x-queue-type); quorum queues are always
# durable and never auto-delete (https://www.rabbitmq.com/docs/quorum-queues#feature-matrix).
QUEUE_TYPES = ("classic", "quorum")
# AWS_LAMBDA_INITIALIZATION_TYPE of a SnapStart function (what awslambdaric's bootstrap checks).
SNAP_START = "snap-start"
# AWS's TenancyConfig.TenantIsolationMode has one value (Lambda API Reference, TenancyConfig).
TENANT_ISOLATION_MODES = ("PER_TENANT",)


class ConfigError(Exception):
    """A setting is missing or invalid; the message is the one line shown to the user."""


@dataclass(frozen=True)
class Config:
    command: tuple = ()
    handler: str = ""
    cwd: str = "/var/task"
    invoke_host: str = "0.0.0.0"
    invoke_port: int = 8080
    runtime_host: str = "127.0.0.1"
    runtime_port: int = 9001
    function_name: str = "function"
    function_version: str = "$LATEST"
    region: str = "us-east-1"
    timeout: float = 3.0
    memory_size: int = 3008
    idle_timeout: float = 1800.0
    init_timeout: float = 10.0
    max_concurrency: int = 1
    min_instances: int = 0
    max_queued: int = 1000
    runtime_max_concurrency: int = 1
    # AWS_LAMBDA_MAX_CONCURRENCY is set: AWS's Lambda Managed Instances rules apply to extensions and
    # the Telemetry API (sandbox/extensions_api.py, sandbox/telemetry.py).
    managed_instances: bool = False
    # AWS_LAMBDA_INITIALIZATION_TYPE as the runtime sees it (the user's value, else on-demand);
    # "snap-start" turns on the SnapStart phases (sandbox/lifecycle.py).
    initialization_type: str = "on-demand"
    amqp_uri: Optional[str] = None
    # The function's queue outlives its daemons (KEDA scale-to-zero) and broker restarts; False is
    # the Go daemon's non-durable auto-delete queue.
    amqp_durable: bool = True
    amqp_queue_type: str = "classic"
    print_reports: bool = False
    log_level: str = "INFO"
    structured_logging: bool = False
    enable_openfaas: bool = False
    kubernetes_init_container: bool = False
    extensions_dir: str = "/opt/extensions"
    function_url_port: Optional[int] = None  # the Function URL listener (on invoke_host); None: off
    function_url_invoke_mode: str = "BUFFERED"
    reload_on_change: bool = False  # RELOAD_ON_CHANGE: replace the instances when the code changes
    reload_dirs: tuple = ()  # what it watches (absolute): the function's directory, then RELOAD_DIRS
    # TENANT_ISOLATION_MODE: "PER_TENANT" makes the function tenant-isolated (AWS's TenancyConfig);
    # None: it is not.
    tenant_isolation_mode: Optional[str] = None
    # The environment each runtime instance starts from (the daemon's own, minus AMQP secrets,
    # plus the Lambda defaults; user-set values win). Per-instance values are added at spawn.
    runtime_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def function_arn(self) -> str:
        return function_arn(self.region, self.function_name)

    @property
    def snap_start(self) -> bool:
        return self.initialization_type == SNAP_START

    @property
    def tenant_isolated(self) -> bool:
        return self.tenant_isolation_mode is not None


# ---- value parsers: each names the variable and the bad value -------------------------------

def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use true/false/1/0/yes/no)")


def parse_number(name: str, value: str, *, integer: bool = False, minimum: float = 0.0,
                 allow_equal: bool = True) -> float:
    try:
        number = float(value.strip()) if not integer else int(value.strip())
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r} is not {kind}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} is not a finite number")
    if number < minimum or (not allow_equal and number == minimum):
        bound = f">= {minimum:g}" if allow_equal else f"> {minimum:g}"
        raise ConfigError(f"{name}={value!r} must be {bound}")
    return number


def parse_port(name: str, value: str) -> int:
    port = int(parse_number(name, value, integer=True))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}={value!r} is not a TCP port (0-65535)")
    return port


def parse_address(flag: str, value: str) -> tuple:
    """``HOST:PORT`` as the RIE's flags take it (``:8080`` means all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{flag}={value!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, parse_port(flag, port)


def parse_log_level(name: str, value: str) -> str:
    level = LOG_LEVELS.get(value.strip().upper())
    if level is None:
        raise ConfigError(f"{name}={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return level


def structured_logging_enabled(env: Mapping[str, str]) -> bool:
    value = env.get("USE_STRUCTURED_LOGGING")
    if value is None:
        return False
    if value.strip() == "":
        return True  # set-but-empty turns JSON on, as the Go daemon does
    return parse_bool("USE_STRUCTURED_LOGGING", value)


def inject_amqp_credentials(uri: str, username: Optional[str], password: Optional[str]) -> str:
    """Put AMQP_USERNAME/AMQP_PASSWORD into a URI that carries no userinfo of its own."""
    if not username or not password:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if "@" in parts.netloc:
        return uri
    userinfo = urllib.parse.quote(username, safe="") + ":" + urllib.parse.quote(password, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def redact_uri(uri: str) -> str:
    """The URI with its password replaced, for logs."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if parts.password is None:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:xxxxx@{host}"))


def validate_amqp_uri(uri: str) -> None:
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise ConfigError(f"AMQP_URI={redact_uri(uri)!r} is not a valid URI: {e}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"AMQP_URI={redact_uri(uri)!r} must start with amqp:// or amqps://")
    query = urllib.parse.parse_qs(parts.query)
    for key in ("connection_attempts", "retry_delay", "heartbeat"):
        for value in query.get(key, []):
            parse_number(f"AMQP_URI {key}", value, integer=key == "connection_attempts")


def parse_queue(env: Mapping[str, str]) -> tuple:
    """(durable, queue type) of the function's queue from AMQP_DURABLE_QUEUE and AMQP_QUEUE_TYPE."""
    durable = parse_bool("AMQP_DURABLE_QUEUE", env["AMQP_DURABLE_QUEUE"]) if "AMQP_DURABLE_QUEUE" in env else True
    value = env.get("AMQP_QUEUE_TYPE", "classic")
    queue_type = value.strip().lower()
    if queue_type not in QUEUE_TYPES:
        raise ConfigError(f"AMQP_QUEUE_TYPE={value!r} is not a queue type (use classic or quorum)")
    if queue_type == "quorum" and not durable:
        raise ConfigError("AMQP_QUEUE_TYPE=quorum needs a durable queue, but AMQP_DURABLE_QUEUE=false asks for "
                          "an auto-delete one (RabbitMQ's quorum queues cannot be non-durable or auto-delete)")
    return durable, queue_type


# ---- command line ---------------------------------------------------------------------------

RIE_FLAGS = ("--runtime-interface-emulator-address", "--runtime-api-address", "--log-level")


def split_flags(argv: Sequence[str]) -> tuple:
    """Split the RIE's flags (which come first) from the runtime command."""
    flags: dict = {}
    args = list(argv)
    while args and args[0].startswith("--"):
        arg = args.pop(0)
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name not in RIE_FLAGS:
            raise ConfigError(f"unknown option {name} (accepted before the command: {', '.join(RIE_FLAGS)})")
        if not eq:
            if not args:
                raise ConfigError(f"option {name} needs a value")
            value = args.pop(0)
        flags[name] = value
    return flags, args


def resolve_command(args: Sequence[str], env: Mapping[str, str], cwd: str) -> tuple:
    """(command, handler, cwd) following the Go daemon's rules; checks the command can run."""
    if args:
        command = tuple(args)
        handler = args[-1] if len(args) >= 2 else env.get("_HANDLER", "")
    else:
        found = [p for p in BOOTSTRAP_CANDIDATES if os.path.isfile(p)]
        if not found:
            raise ConfigError(
                "no runtime command given and no bootstrap found "
                f"(looked for {', '.join(BOOTSTRAP_CANDIDATES)})")
        command, handler, cwd = (found[0],), env.get("_HANDLER", ""), "/var/task"
        if not os.path.isdir(cwd):
            cwd = os.path.dirname(found[0])
    check_executable(command[0], env.get("PATH", os.defpath), cwd)
    return command, handler, cwd


def check_executable(program: str, path: str, cwd: str) -> None:
    if "/" in program:
        candidate = program if os.path.isabs(program) else os.path.join(cwd, program)
        if not os.path.exists(candidate):
            raise ConfigError(f"runtime command {program!r} does not exist")
        if os.path.isdir(candidate) or not os.access(candidate, os.X_OK):
            raise ConfigError(f"runtime command {program!r} is not executable")
        return
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return
    raise ConfigError(f"runtime command {program!r} was not found on PATH")


def infer_function_name(handler: str) -> str:
    base = os.path.basename(handler.rstrip("/"))
    return base.split(".", 1)[0] or "function"


# ---- the whole configuration ----------------------------------------------------------------

def load(argv: Sequence[str], env: Mapping[str, str], cwd: Optional[str] = None) -> Config:
    """Build the daemon's Config from its arguments (without argv[0]) and environment."""
    flags, args = split_flags(argv)
    cwd = cwd or os.getcwd()
    kubernetes = "KUBERNETES_INIT_CONTAINER" in env
    if kubernetes:
        return Config(kubernetes_init_container=True)

    def get(name: str, default: str) -> str:
        return env.get(name, default)

    invoke_host, invoke_port = get("INVOKE_API_HOST", "0.0.0.0"), parse_port("PORT", get("PORT", "8080"))
    if "--runtime-interface-emulator-address" in flags:
        invoke_host, invoke_port = parse_address("--runtime-interface-emulator-address",
                                                 flags["--runtime-interface-emulator-address"])
    runtime_host = get("RUNTIME_API_HOST", "127.0.0.1")
    runtime_port = parse_port("RUNTIME_API_PORT", get("RUNTIME_API_PORT", "9001"))
    if "--runtime-api-address" in flags:
        runtime_host, runtime_port = parse_address("--runtime-api-address", flags["--runtime-api-address"])
    log_level = parse_log_level("LOG_LEVEL", get("LOG_LEVEL", "INFO"))
    if "--log-level" in flags:
        log_level = parse_log_level("--log-level", flags["--log-level"])

    timeout = parse_number("AWS_LAMBDA_FUNCTION_TIMEOUT", get("AWS_LAMBDA_FUNCTION_TIMEOUT", "3"),
                           allow_equal=False)
    memory = int(parse_number("AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                              get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008"), integer=True, minimum=1))
    idle = parse_number("AWS_LAMBDA_FUNCTION_IDLETIMEOUT", get("AWS_LAMBDA_FUNCTION_IDLETIMEOUT", "1800"),
                        allow_equal=False)
    init_timeout = parse_number("AWS_LAMBDA_INIT_TIMEOUT", get("AWS_LAMBDA_INIT_TIMEOUT", "10"),
                                allow_equal=False)
    max_conc = int(parse_number("MAX_CONCURRENCY", get("MAX_CONCURRENCY", "1"), integer=True, minimum=1))
    min_inst = int(parse_number("MIN_INSTANCES", get("MIN_INSTANCES", "0"), integer=True))
    if min_inst > max_conc:
        raise ConfigError(f"MIN_INSTANCES={min_inst} is larger than MAX_CONCURRENCY={max_conc}")
    max_queued = int(parse_number("MAX_QUEUED_INVOCATIONS", get("MAX_QUEUED_INVOCATIONS", "1000"),
                                  integer=True))
    runtime_conc = 1
    if "AWS_LAMBDA_MAX_CONCURRENCY" in env:
        runtime_conc = int(parse_number("AWS_LAMBDA_MAX_CONCURRENCY", env["AWS_LAMBDA_MAX_CONCURRENCY"],
                                        integer=True, minimum=1))

    amqp_uri = env.get("AMQP_URI") or None
    if amqp_uri:
        amqp_uri = inject_amqp_credentials(amqp_uri, env.get("AMQP_USERNAME"), env.get("AMQP_PASSWORD"))
        validate_amqp_uri(amqp_uri)
    flags_bool = {}
    for name in ("PRINT_REPORTS", "ENABLE_OPENFAAS"):
        flags_bool[name] = parse_bool(name, env[name]) if name in env else False
    durable, queue_type = parse_queue(env)
    structured = structured_logging_enabled(env)
    function_url_port, function_url_mode = function_url_settings(env, invoke_port, runtime_port)
    tenancy = tenancy_settings(env, function_url_port, min_inst)

    command, handler, run_cwd = resolve_command(args, env, cwd)
    name = env.get("AWS_LAMBDA_FUNCTION_NAME") or infer_function_name(handler)
    if "/" in name or ":" in name or not name.strip():
        raise ConfigError(f"function name {name!r} is not valid (set AWS_LAMBDA_FUNCTION_NAME)")
    version = env.get("AWS_LAMBDA_FUNCTION_VERSION") or "$LATEST"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"

    runtime_env = build_runtime_env(env, name=name, version=version, memory=memory, region=region,
                                    handler=handler, cwd=run_cwd)
    reload_dirs = reload_settings(env, cwd, run_cwd)
    if reload_dirs:
        # A .pyc records its source's mtime in whole seconds (and its size): an edit within the
        # second after an import could otherwise bring the old code back in the fresh instance.
        runtime_env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return Config(
        command=command, handler=handler, cwd=run_cwd,
        invoke_host=invoke_host, invoke_port=invoke_port,
        runtime_host=runtime_host, runtime_port=runtime_port,
        function_name=name, function_version=version, region=region,
        timeout=timeout, memory_size=memory, idle_timeout=idle, init_timeout=init_timeout,
        max_concurrency=max_conc, min_instances=min_inst, max_queued=max_queued,
        runtime_max_concurrency=runtime_conc, managed_instances="AWS_LAMBDA_MAX_CONCURRENCY" in env,
        initialization_type=runtime_env["AWS_LAMBDA_INITIALIZATION_TYPE"],
        amqp_uri=amqp_uri, amqp_durable=durable, amqp_queue_type=queue_type,
        print_reports=flags_bool["PRINT_REPORTS"], log_level=log_level, structured_logging=structured,
        enable_openfaas=flags_bool["ENABLE_OPENFAAS"],
        extensions_dir=env.get("LAMBDA_EXTENSIONS_DIR") or "/opt/extensions",
        function_url_port=function_url_port, function_url_invoke_mode=function_url_mode,
        reload_on_change=bool(reload_dirs), reload_dirs=reload_dirs,
        tenant_isolation_mode=tenancy,
        runtime_env=runtime_env,
    )


def function_url_settings(env: Mapping[str, str], invoke_port: int, runtime_port: int) -> tuple:
    """(FUNCTION_URL_PORT or None, FUNCTION_URL_INVOKE_MODE)."""
    mode = env.get("FUNCTION_URL_INVOKE_MODE")
    if "FUNCTION_URL_PORT" not in env:
        if mode is not None:
            raise ConfigError(f"FUNCTION_URL_INVOKE_MODE={mode!r} is set but FUNCTION_URL_PORT is not "
                              "(set it to open the Function URL listener)")
        return None, "BUFFERED"
    port = parse_port("FUNCTION_URL_PORT", env["FUNCTION_URL_PORT"])
    if port != 0 and port in (invoke_port, runtime_port):
        which = "PORT (the Invoke API)" if port == invoke_port else "RUNTIME_API_PORT (the Runtime API)"
        raise ConfigError(f"FUNCTION_URL_PORT={port} is already {which}; give the Function URL its own port")
    mode = "BUFFERED" if mode is None else mode.strip().upper()
    if mode not in FUNCTION_URL_INVOKE_MODES:
        raise ConfigError(f"FUNCTION_URL_INVOKE_MODE={env['FUNCTION_URL_INVOKE_MODE']!r} is not an invoke mode "
                          f"(use {' or '.join(FUNCTION_URL_INVOKE_MODES)})")
    return port, mode


def tenancy_settings(env: Mapping[str, str], function_url_port: Optional[int], min_instances: int) -> Optional[str]:
    """TENANT_ISOLATION_MODE (None when unset). A tenant-isolated function has no Function URL, no
    provisioned (here: pre-started) instances and no SnapStart: "Tenant isolation mode is not
    supported with functions that use function URLs, provisioned concurrency, or SnapStart"
    ("Tenant isolation", Supported features and limitations, AWS Lambda Developer Guide)."""
    if "TENANT_ISOLATION_MODE" not in env:
        return None
    value = env["TENANT_ISOLATION_MODE"]
    mode = value.strip().upper()
    if mode not in TENANT_ISOLATION_MODES:
        raise ConfigError(f"TENANT_ISOLATION_MODE={value!r} is not a tenant isolation mode (use PER_TENANT, "
                          "or leave it unset for a function that is not tenant-isolated)")
    if function_url_port is not None:
        raise ConfigError("FUNCTION_URL_PORT cannot be used with TENANT_ISOLATION_MODE=PER_TENANT: AWS does not "
                          "support function URLs on tenant-isolated functions")
    if min_instances:
        raise ConfigError(f"MIN_INSTANCES={min_instances} cannot be used with TENANT_ISOLATION_MODE=PER_TENANT: an "
                          "instance serves one tenant, and AWS has no provisioned concurrency for tenant-isolated "
                          "functions")
    if env.get("AWS_LAMBDA_INITIALIZATION_TYPE", "").strip() == SNAP_START:
        raise ConfigError("AWS_LAMBDA_INITIALIZATION_TYPE=snap-start cannot be used with "
                          "TENANT_ISOLATION_MODE=PER_TENANT: AWS does not support SnapStart on tenant-isolated "
                          "functions")
    return mode


def reload_settings(env: Mapping[str, str], cwd: str, task_root: str) -> tuple:
    """The directories RELOAD_ON_CHANGE watches (the function's own, then RELOAD_DIRS, colon-separated,
    relative ones from the daemon's working directory); () when it is off."""
    dirs = env.get("RELOAD_DIRS") or ""
    if "RELOAD_ON_CHANGE" not in env or not parse_bool("RELOAD_ON_CHANGE", env["RELOAD_ON_CHANGE"]):
        if dirs:
            raise ConfigError(f"RELOAD_DIRS={dirs!r} is set but RELOAD_ON_CHANGE is not true")
        return ()
    watched = [os.path.abspath(task_root)]
    if not os.path.isdir(watched[0]):
        raise ConfigError(f"RELOAD_ON_CHANGE: the function's directory {task_root!r} is not a directory")
    if watched[0] == os.path.abspath(os.sep):
        raise ConfigError("RELOAD_ON_CHANGE would watch the whole file system (the function runs from /): "
                          "start the daemon in the function's directory")
    for entry in dirs.split(":"):
        if not entry:
            continue
        path = os.path.abspath(os.path.join(cwd, entry))
        if not os.path.isdir(path):
            where = "" if entry == path else f" ({path})"
            missing = "does not exist" if not os.path.exists(path) else "is not a directory"
            raise ConfigError(f"RELOAD_DIRS entry {entry!r}{where} {missing}")
        if path not in watched:
            watched.append(path)
    return tuple(watched)


def build_runtime_env(env: Mapping[str, str], *, name: str, version: str, memory: int, region: str,
                      handler: str, cwd: str) -> dict:
    defaults = {
        "_HANDLER": handler,
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_VERSION": version,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "LAMBDA_TASK_ROOT": cwd,
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "TZ": ":UTC",
    }
    result = dict(defaults)
    result.update((k, v) for k, v in env.items() if k not in AMQP_SECRETS)
    if not handler and "_HANDLER" not in env:
        del result["_HANDLER"]
    result.pop("AWS_LAMBDA_RUNTIME_API", None)  # always the daemon's own, set per instance
    return result
