"""Handlers the tests run under the real awslambdaric (module ``handlers``, cwd = this folder)."""

import os
import signal
import sys
import time


def echo(event, context):
    return event


def fail(event, context):
    raise ValueError("boom")


def sleep(event, context):
    time.sleep(float(event.get("seconds", 1)))
    return {"slept": event.get("seconds", 1), "pid": os.getpid()}


def crash(event, context):
    sys.stdout.flush()
    os._exit(int(event.get("code", 3)))


def kill_self(event, context):
    os.kill(os.getpid(), signal.SIGKILL)


def shout(event, context):
    for i in range(int(event.get("lines", 3))):
        print(f"line {i} of {context.aws_request_id}")
    return {"printed": event.get("lines", 3)}


def flood(event, context):
    """Print ``mb`` megabytes of output."""
    line = "x" * 1023
    for _ in range(int(event.get("mb", 10)) * 1024):
        print(line)
    return {"ok": True}


def big(event, context):
    return "x" * int(event.get("size", 7 * 1024 * 1024))


def allocate(event, context):
    block = bytearray(int(event.get("mb", 100)) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"allocated_mb": len(block) // (1024 * 1024)}


def whoami(event, context):
    """Everything the runtime was told about this invocation and its environment."""
    return {
        "request_id": context.aws_request_id,
        "arn": context.invoked_function_arn,
        "deadline_ms_left": context.get_remaining_time_in_millis(),
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "client_context": (context.client_context.custom if context.client_context else None),
        "client_context_env": (context.client_context.env if context.client_context else None),
        "trace_id": os.environ.get("_X_AMZN_TRACE_ID"),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "env": dict(os.environ),
        "event": event,
    }


def orphan(event, context):
    """Leave a grandchild behind that exits a moment later: as PID 1 the daemon must reap it."""
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(float(event.get("linger", 0.3)))
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    return {"ok": True}
