"""The function bench/faults.py runs under the real awslambdaric (handler ``faults_function.handler``).

``event["action"]`` picks what one invocation does:

* ``echo`` (default): return the event, so the caller can check it got its own answer back.
* ``record``: append one line ``<event id> <FAULTS_TAG> <pid>`` to the file ``FAULTS_RUN_LOG``
  names (one O_APPEND write: lines from concurrent runtimes never interleave), sleep
  ``event["seconds"]``, return the id. Every run of the function leaves a line, so a request that
  ran twice shows up twice.
* ``crash``: exit at once with status 3, as a runtime that dies mid-invocation.
* ``hang``: start a ``sleep`` grandchild in the runtime's process group, then sleep past any
  timeout, so the daemon must kill the whole group.
"""

import os
import subprocess
import time


def handler(event, context):
    action = event.get("action", "echo") if isinstance(event, dict) else "echo"
    if action == "record":
        line = f"{event['id']} {os.environ.get('FAULTS_TAG', '-')} {os.getpid()}\n".encode()
        fd = os.open(os.environ["FAULTS_RUN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        time.sleep(float(event.get("seconds", 0)))
        return {"id": event["id"]}
    if action == "crash":
        os._exit(3)
    if action == "hang":
        subprocess.Popen(["sleep", "300"])
        time.sleep(300)
    return event
