"""The monitoring side of the app on a real redis-server: `taskfleet exporter` (queues and
workers, read from Redis with the read-only ACL user the redis role creates for it) and the
worker's own per-task counters (TASKFLEET_METRICS_PORT, prometheus_client multiprocess mode).

One worker of two pool processes on database 5, with its metrics on a loopback port.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .itkit import (
    LocalWorkers,
    client_app,
    free_port,
    node_env,
    run_cli,
    start_workers,
    stop_workers,
    wait_for,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DB = 5
IDLE = "mon.idle"  # a queue nobody consumes


def exporter_acl() -> str:
    """The ACL rules the redis role gives the exporter's user (one source: its defaults)."""
    defaults = yaml.safe_load((ROOT / "deploy/roles/redis/defaults/main.yml").read_text())
    return defaults["redis_taskfleet_exporter_acl"]


@pytest.fixture(scope="module")
def monitored(redis_server, tmp_path_factory) -> Iterator[LocalWorkers]:
    tmp = tmp_path_factory.mktemp("monitored")
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    password = secrets.token_hex(12)
    redis_server.admin().execute_command(
        "ACL", "SETUSER", "taskfleet_exporter", "reset", "on", f">{password}",
        *exporter_acl().split())
    env = node_env(tmp, redis_server.url(DB), TASKFLEET_METRICS_PORT=str(free_port()),
                   TASKFLEET_METRICS_ADDRESS="127.0.0.1",
                   PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
                   TASKFLEET_EXPORTER_REDIS_USER="taskfleet_exporter",
                   TASKFLEET_EXPORTER_REDIS_PASSWORD=password)
    c = LocalWorkers(env, start_workers(env, ["mon"], tmp))
    yield c
    stop_workers(c.workers)


def metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][^ ]*) (\S+)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def export(env: dict[str, str], *queues: str) -> dict[str, float]:
    args = [a for q in queues for a in ("--queue", q)]
    proc = run_cli(env, "exporter", "--once", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return metrics(proc.stdout)


def scrape_worker(env: dict[str, str]) -> dict[str, float]:
    url = f"http://127.0.0.1:{env['TASKFLEET_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return metrics(response.read().decode())


def test_depth_counts_priority_sub_queues_and_the_oldest_age_grows(monitored, redis_server):
    from app import metrics  # noqa: F401 -- stamps what this process publishes, like app/celery.py

    app = client_app(monitored.env)
    app.send_task("app.tasks.add", (1, 2), queue=IDLE)
    time.sleep(1.0)  # the oldest is 1 s old when the others are sent
    for priority in (0, 5, 9):
        app.send_task("app.tasks.add", (1, 2), queue=IDLE, priority=priority)
    oldest = f'taskfleet_queue_oldest_message_age_seconds{{queue="{IDLE}"}}'
    first = export(monitored.env, IDLE)
    assert first[f'taskfleet_queue_messages{{queue="{IDLE}"}}'] == 4, first
    age = first[oldest]
    assert 1.0 <= age < 10, age
    assert first['taskfleet_queue_messages{queue="celery"}'] == 0  # the default, always
    assert first["taskfleet_redis_up"] == 1
    time.sleep(1.5)
    later = export(monitored.env, IDLE)[oldest]
    assert later >= age + 1.4, (age, later)
    # The read-only user was enough: Redis refused it nothing.
    denied = [e for e in redis_server.admin().acl_log(50)
              if e["username"] == "taskfleet_exporter"]
    assert not denied, denied
    assert redis_server.admin(DB).delete(IDLE, f"{IDLE}\x06\x163", f"{IDLE}\x06\x169") >= 1


def test_in_flight_and_heartbeat_age_per_worker(monitored):
    app = client_app(monitored.env)
    result = app.send_task("app.tasks.sleep", (4,))
    def holding():
        found = export(monitored.env)
        return found if any(k.startswith("taskfleet_worker_messages_in_flight")
                            and v == 1 for k, v in found.items()) else None

    found = wait_for(holding, 10, "the exporter to see the task held")
    owner = next(k for k in found if k.startswith("taskfleet_worker_messages_in_flight"))
    labels = owner[owner.index("{"):]
    assert found[f"taskfleet_worker_heartbeat_age_seconds{labels}"] < 3, found
    assert found[f"taskfleet_worker_alive{labels}"] == 1
    assert labels.startswith('{host="') and ':' in labels  # worker="host:pid"
    result.get(timeout=15)
    after = export(monitored.env)
    assert not any(k.startswith("taskfleet_worker_messages_in_flight") for k in after), after


def test_worker_counts_successes_failures_and_run_times(monitored):
    app = client_app(monitored.env)
    before = scrape_worker(monitored.env)
    ok = 'taskfleet_tasks_succeeded_total{task="app.tasks.add"}'
    bad = 'taskfleet_tasks_failed_total{task="app.tasks.add"}'
    runs = 'taskfleet_task_runtime_seconds_count{task="app.tasks.add"}'
    results = [app.send_task("app.tasks.add", (i, 1)) for i in range(6)]
    failing = app.send_task("app.tasks.add", ("a", 1))  # str + int: TypeError in the task
    assert [r.get(timeout=15) for r in results] == [i + 1 for i in range(6)]
    with pytest.raises(TypeError):
        failing.get(timeout=15)

    def counted():  # each counter of a task is its own write: wait for all of them
        now = scrape_worker(monitored.env)
        grown = [now.get(k, 0) - before.get(k, 0) for k in (runs, ok, bad)]
        return now if grown[0] >= 7 and grown[1] + grown[2] >= 7 else None

    after = wait_for(counted, 10, "the worker's counters")
    assert after[ok] - before.get(ok, 0) == 6, after
    assert after[bad] - before.get(bad, 0) == 1, after
    assert after[runs] - before.get(runs, 0) == 7, after
    slow = 'taskfleet_task_runtime_seconds_bucket{le="0.005",task="app.tasks.add"}'
    assert slow in after  # the histogram's buckets are there


def test_exporter_refuses_half_a_user_and_a_bad_password(monitored):
    half = monitored.env | {"TASKFLEET_EXPORTER_REDIS_PASSWORD": ""}
    proc = run_cli(half, "exporter", "--once")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "taskfleet: error: set both TASKFLEET_EXPORTER_REDIS_USER and "
        "TASKFLEET_EXPORTER_REDIS_PASSWORD, or neither (then the app's user reads Redis)"]
    wrong = monitored.env | {"TASKFLEET_EXPORTER_REDIS_PASSWORD": "wrong"}
    proc = run_cli(wrong, "exporter", "--once")
    assert proc.returncode == 1 and "refused the password for user 'taskfleet_exporter'" \
        in proc.stderr, proc.stderr
