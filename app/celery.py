"""The Celery instance, like Celery's examples/next-steps/proj/celery.py.

`celery -A app worker` finds it here (Celery looks for `app.celery:app`). Settings come from
app.config, which validates the environment once; a bad value stops the process with one line
and exit code 2 instead of a traceback from deep inside Celery or the worker's retry loop.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, bootsteps
from celery.signals import celeryd_init, worker_ready, worker_shutting_down

from .config import ConfigError, celery_settings, get_settings
from .metrics import setup_worker_metrics
from .systemd import notify as notify_systemd
from .systemd import watchdog_interval

try:
    settings = get_settings()
except ConfigError as exc:
    print(f"taskfleet: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

# `celery worker` takes its log level from -l or, through click's auto env vars, from
# CELERY_WORKER_LOGLEVEL; default that to TASKFLEET_LOG_LEVEL so one variable drives both.
# This module is imported by `celery -A app` before the worker's own options are parsed.
os.environ.setdefault("CELERY_WORKER_LOGLEVEL", settings.log_level)


class _NotTaskSucceeded(logging.Filter):
    """Lets every record through but Celery's "Task ... succeeded in ..." line."""

    def __init__(self) -> None:
        super().__init__()
        from celery.app.trace import LOG_SUCCESS

        self.success = LOG_SUCCESS

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.success


def quiet_task_lines(log_tasks: bool) -> None:
    """Without TASKFLEET_LOG_TASKS=yes a worker logs no line per task received and per task
    succeeded. At INFO Celery writes both for every task; at a few hundred tasks/s they cost
    about a tenth of the throughput (PERFORMANCE.md) and are more lines than journald takes
    from one service by default (10,000 per 30 s; then it drops messages, warnings included).
    Failures, retries, rejections and every other line are logged as before."""
    if log_tasks:
        return
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)  # "Task ... received"
    logging.getLogger("celery.app.trace").addFilter(_NotTaskSucceeded())


@celeryd_init.connect
def _quiet_task_lines(**_: object) -> None:
    # In the worker only (the CLI need not import Celery's tracer), before it builds its task
    # strategies (Celery checks the level once, there); pool processes inherit it.
    quiet_task_lines(settings.log_tasks)


app = Celery("app", include=["app.tasks"])
app.config_from_object(celery_settings(settings))


class SystemdWatchdog(bootsteps.StartStopStep):
    """Ping systemd's watchdog (WatchdogSec= in the unit) from the worker's event loop.

    A timer on the loop, not a thread: the ping proves the loop itself still turns, which a
    thread would not (see app/systemd.py for the hang this catches). A worker step, started
    before the consumer, so the consumer does not cancel the timer with its own when it
    reconnects. While the consumer waits for Redis outside the loop there are no pings:
    an outage longer than WatchdogSec restarts the worker, which then waits for Redis as it
    starts (Type=notify). The solo pool runs tasks inside the loop; its unit has no watchdog.
    """

    requires = ("celery.worker.components:Hub",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, parent: Any) -> None:
        interval = watchdog_interval()
        if interval and parent.hub is not None:
            self.timer = parent.hub.call_repeatedly(interval, notify_systemd, "WATCHDOG=1")

    def stop(self, parent: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


app.steps["worker"].add(SystemdWatchdog)


@worker_ready.connect
def _worker_ready(**_: object) -> None:
    notify_systemd("READY=1\nSTATUS=consuming")


@worker_shutting_down.connect
def _worker_stopping(**_: object) -> None:
    notify_systemd("STOPPING=1\nSTATUS=warm shutdown: finishing running tasks")

# Per-task counters in the worker (TASKFLEET_METRICS_PORT), and the publish time stamped in
# every message this app sends: app/metrics.py.
setup_worker_metrics(settings)
