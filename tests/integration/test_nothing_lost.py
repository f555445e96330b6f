"""Late acks on Redis: a task whose pool process dies mid-run is run again at once, not lost.

Two workers of their own on database 1, production settings. A whole worker dying (its main
process too) is in test_heartbeats.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .itkit import client_app, node_env, start_workers, stop_workers, wait_for

pytestmark = pytest.mark.integration
TASK_SECONDS = 2


@pytest.fixture(scope="module")
def kill_cluster(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("killtests")
    env = node_env(tmp, redis_server.url(1))
    workers = start_workers(env, ["k1", "k2"], tmp)
    client = client_app(env)
    yield client, workers, env
    client.close()
    stop_workers(workers)


def started(result):
    """Where the task runs now: {"hostname", "pid"} of the pool process, from inspect active."""
    # limit: return as soon as both test workers answered, not after the whole timeout.
    active = result.app.control.inspect(timeout=1.0, limit=2).active() or {}
    for node, tasks in active.items():
        for t in tasks:
            if t["id"] == result.id:
                return {"hostname": node, "pid": t["worker_pid"]}
    return None


def test_killed_pool_process_task_is_requeued_and_completes(kill_cluster):
    client, workers, _env = kill_cluster
    result = client.send_task("app.tasks.sleep", args=[TASK_SECONDS])
    info = wait_for(lambda: started(result), 15, "the sleep task to start")
    node, child = info["hostname"], info["pid"]
    assert child not in {w.pid for w in workers}  # a pool child, not the main process
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    # task_reject_on_worker_lost: the main process requeues the message at once.
    value = result.get(timeout=20)
    took = time.monotonic() - killed
    assert value["seconds"] == TASK_SECONDS
    log = next(w for w in workers if w.name == node).log_text()
    assert f"pid:{child} exited with 'signal 9 (SIGKILL)'" in log
    # The worker lives and keeps stamping the message: it was requeued by the worker (reject
    # on worker lost, as soon as billiard reports the lost child), not by a sweep that took
    # the worker for dead.
    assert not any("returned" in w.log_text() and "silent worker" in w.log_text()
                   for w in workers), "a sweep handed back a live worker's message"
    assert took < 15, f"took {took:.1f} s"
    print(f"\npool child SIGKILLed: task ran again and finished {took:.1f} s later "
          f"(task takes {TASK_SECONDS} s)")
