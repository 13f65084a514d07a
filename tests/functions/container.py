"""A handler for tests/test_containers.py, bind-mounted into the echo-lambda image's /var/task.

One handler, what it does chosen by the event: {"orphan": true} leaves a grandchild behind (it
exits 0.3 s later, re-parented to PID 1: the daemon), {"pid": N} says what became of process N,
{"sleep": S} sleeps S seconds; every answer says who runs it and what PID 1 is.
"""

import os
import time


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # R, S, Z (zombie: exited, not reaped), ...
    except FileNotFoundError:
        return "gone"


def handler(event, context):
    with open("/proc/1/cmdline", "rb") as f:
        pid1 = f.read().decode().split("\0")[:-1]
    answer = {"uid": os.getuid(), "gid": os.getgid(), "runtime_pid": os.getpid(), "pid1": pid1}
    if event.get("orphan"):
        read_fd, write_fd = os.pipe()
        child = os.fork()
        if child == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.3)
                os._exit(0)
            os.write(write_fd, str(grandchild).encode())
            os._exit(0)
        os.waitpid(child, 0)
        answer["grandchild"] = int(os.read(read_fd, 32))
        os.close(read_fd)
        os.close(write_fd)
    if "pid" in event:
        answer["state"] = state_of(event["pid"])
    if "sleep" in event:
        time.sleep(event["sleep"])
        answer["slept"] = event["sleep"]
    return answer
