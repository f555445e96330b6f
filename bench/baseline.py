"""The plain setup Taskfleet replaces, for `python -m bench` to compare against.

A minimal Celery app with Celery's defaults: only the broker and result backend URLs (the same
environment variables and env file as the kit) and the JSON serializer (already Celery's
default, stated here so the comparison is explicit). Nothing is tuned: default prefetch (4),
gossip, mingle, heartbeats, early acks, no batching on the client. The bench runs its workers as

    celery -A bench.baseline worker --pool=solo -n baseline@%h -Q bench.idle

on the same worker hosts as the kit (copied there, started, stopped and removed by
playbooks/bench.yml) and sends them the same task bodies as app.tasks under their own names, so
kit and baseline never take each other's messages.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from celery import Celery
from dotenv import load_dotenv

# Same env file the kit reads (systemd's EnvironmentFile= on hosts sets the variables first:
# override=False keeps those).
_env_file = os.environ.get("TASKFLEET_ENV_FILE")
if _env_file:
    load_dotenv(_env_file, override=False)

_broker = os.environ.get("CELERY_BROKER_URL")
app = Celery("baseline", broker=_broker, backend=os.environ.get("CELERY_RESULT_BACKEND", _broker))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

# Queue the workers start on: nothing is sent there; the bench adds the real queue with
# remote control (add_consumer) to 1, 2 or 3 workers for each run.
IDLE_QUEUE = "bench.idle"


@app.task(name="baseline.noop")
def noop() -> None:
    """Same body as app.tasks.noop."""


@app.task(name="baseline.sleep")
def sleep(seconds: float) -> dict[str, Any]:
    """Same work and result as app.tasks.sleep (I/O-bound wait)."""
    time.sleep(float(seconds))
    return {"seconds": seconds, "host": socket.gethostname()}
