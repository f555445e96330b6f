"""The Celery instance, like Celery's examples/next-steps/proj/celery.py.

`celery -A app worker` finds it here (Celery looks for `app.celery:app`). Settings come from
app.config, which validates the environment once; a bad value stops the process with one line
and exit code 2 instead of a traceback from deep inside Celery or the worker's retry loop.
"""

from __future__ import annotations

import os
import socket
import sys

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from .config import ConfigError, celery_settings, get_settings

try:
    settings = get_settings()
except ConfigError as exc:
    print(f"taskfleet: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

# `celery worker` takes its log level from -l or, through click's auto env vars, from
# CELERY_WORKER_LOGLEVEL; default that to TASKFLEET_LOG_LEVEL so one variable drives both.
# This module is imported by `celery -A app` before the worker's own options are parsed.
os.environ.setdefault("CELERY_WORKER_LOGLEVEL", settings.log_level)

app = Celery("app", include=["app.tasks"])
app.config_from_object(celery_settings(settings))


def notify_systemd(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd's notify socket, if the service has one.

    The worker unit is Type=notify: `systemctl (re)start` returns once the worker is connected
    to Redis and consuming, so a rolling deploy waits for real readiness, and a worker that
    cannot get ready fails its start instead of counting as running. (The sd_notify protocol
    is one datagram on a Unix socket; no library needed.)
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


@worker_ready.connect
def _worker_ready(**_: object) -> None:
    notify_systemd("READY=1\nSTATUS=consuming")


@worker_shutting_down.connect
def _worker_stopping(**_: object) -> None:
    notify_systemd("STOPPING=1\nSTATUS=warm shutdown: finishing running tasks")
