"""SnapStart runtime hooks registered with snapshot-restore-py, run by the real awslambdaric
(module ``snapstart_handlers``, cwd = this folder). Each hook and each invocation records itself in
``EVENTS``, which the handler returns, so the test sees the order they ran in.

``FAIL_AFTER_RESTORE_ONCE`` (a path): the after-restore hook raises if that file does not exist
yet, and creates it, so the first instance fails its restore and the next one succeeds.
"""

import os

from snapshot_restore_py import register_after_restore, register_before_snapshot

EVENTS = []


@register_before_snapshot
def before_snapshot():
    EVENTS.append("before_snapshot")


def after_restore(tag):
    EVENTS.append(tag)
    marker = os.environ.get("FAIL_AFTER_RESTORE_ONCE")
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("the after-restore hook failed on purpose")


register_after_restore(after_restore, "after_restore")


def handler(event, context):
    EVENTS.append("handler")
    return {"events": EVENTS, "pid": os.getpid(), "init_type": os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE")}
