"""Per-task counters and run times, counted in the worker without task events.

Task events (a PUBLISH per state change) stay off for speed (docs/PERFORMANCE.md). Instead the
process that runs a task counts it: Celery's task_prerun/task_postrun signals, in the pool's
process, add to prometheus_client counters in multiprocess mode -- a few writes to a memory-
mapped file of that process in PROMETHEUS_MULTIPROC_DIR, no network, no Redis. The worker's
main process serves the sum of every process's file on TASKFLEET_METRICS_ADDRESS:PORT
(Prometheus scrapes it; the unit's RuntimeDirectory gives each start an empty directory).

On only where TASKFLEET_METRICS_PORT is set (the worker unit, when the inventory has a
monitoring host): clients and beat publish through the same app and count nothing.
Also here, for every process of the app: the publish time stamped in each message's headers
(SENT_HEADER), from which the exporter (app/exporter.py) tells the age of the oldest message
waiting in a queue; kombu's Redis lists keep no time of their own.
"""

from __future__ import annotations

import time
from typing import Any

from celery.signals import before_task_publish, task_postrun, task_prerun, worker_ready

from .config import Settings

SENT_HEADER = "taskfleet_sent"  # Unix time the message was published, by the publisher's clock
# Run times from a few milliseconds to the hard limit's order (300 s by default).
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# perf_counter at task_prerun, per task id, in the process running it; popped at postrun.
_started: dict[str, float] = {}
_counters: dict[str, Any] = {}


@before_task_publish.connect
def _stamp(headers: dict[str, Any] | None = None, **_: object) -> None:
    if headers is not None:
        headers.setdefault(SENT_HEADER, time.time())


def setup_worker_metrics(s: Settings) -> None:
    """Count tasks in this worker's processes and serve the sums (TASKFLEET_METRICS_PORT)."""
    if not s.metrics_port:
        return
    # Imported only here: prometheus_client picks its multiprocess mode at import, from
    # PROMETHEUS_MULTIPROC_DIR, which app.config has checked.
    from prometheus_client import Counter, Histogram

    _counters["succeeded"] = Counter(
        "taskfleet_tasks_succeeded", "Tasks that returned, per task name", ["task"])
    _counters["failed"] = Counter(
        "taskfleet_tasks_failed", "Tasks that raised (retries not counted), per task name",
        ["task"])
    _counters["runtime"] = Histogram(
        "taskfleet_task_runtime_seconds", "Run time of a task in the pool, per task name",
        ["task"], buckets=RUNTIME_BUCKETS)
    task_prerun.connect(_prerun, weak=False)
    task_postrun.connect(_postrun, weak=False)
    worker_ready.connect(lambda **_: serve(s), weak=False)


def _prerun(task_id: str | None = None, **_: object) -> None:
    if task_id is not None:
        _started[task_id] = time.perf_counter()


def _postrun(task_id: str | None = None, task: Any = None, state: str | None = None,
             **_: object) -> None:
    began = _started.pop(task_id, None) if task_id is not None else None
    name = getattr(task, "name", "?")
    if began is not None:
        _counters["runtime"].labels(name).observe(time.perf_counter() - began)
    if state == "SUCCESS":
        _counters["succeeded"].labels(name).inc()
    elif state == "FAILURE":
        _counters["failed"].labels(name).inc()


def serve(s: Settings) -> None:
    """Serve the sum of every pool process's counters (main process, once the pool runs)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(s.metrics_port, s.metrics_address, registry=registry)
