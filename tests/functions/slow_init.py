"""Takes SLOW_INIT_SECONDS (default 30) to import."""
import os
import time

time.sleep(float(os.environ.get("SLOW_INIT_SECONDS", "30")))


def handler(event, context):
    return event
