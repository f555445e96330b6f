"""Late acks on Redis: a task whose worker dies mid-run is run again, not lost.

These tests start their own two workers on database 1 with a 10 s visibility timeout (and a
hard time limit below it, as app.config requires), so a dead worker's message comes back fast.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .itkit import client_app, node_env, start_workers, stop_workers, wait_for

pytestmark = pytest.mark.integration
VISIBILITY = 10
TASK_SECONDS = 2


@pytest.fixture(scope="module")
def kill_cluster(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("killtests")
    env = node_env(tmp, redis_server.url(1), TASKFLEET_VISIBILITY_TIMEOUT=str(VISIBILITY),
                   TASKFLEET_TASK_TIME_LIMIT="8")
    workers = start_workers(env, ["k1", "k2"], tmp)
    client = client_app(env)
    yield client, workers
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
    client, workers = kill_cluster
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
    assert took < VISIBILITY, "requeued at once, not after the visibility timeout"
    log = next(w for w in workers if w.name == node).log_text()
    assert f"pid:{child} exited with 'signal 9 (SIGKILL)'" in log
    print(f"\npool child SIGKILLed: task ran again and finished {took:.1f} s later "
          f"(task takes {TASK_SECONDS} s)")


def test_killed_worker_task_runs_on_the_other_worker(kill_cluster):
    client, workers = kill_cluster
    assert all(w.alive() for w in workers)
    result = client.send_task("app.tasks.sleep", args=[TASK_SECONDS])
    info = wait_for(lambda: started(result), 15, "the sleep task to start")
    victim = next(w for w in workers if w.name == info["hostname"])
    other = next(w for w in workers if w is not victim)
    victim.kill_all()  # main process and pool children: nobody can requeue the message
    killed = time.monotonic()
    # kombu keeps the message in the 'unacked' hash; the surviving worker's restore sweep
    # puts it back in the queue once it is older than the visibility timeout.
    def started_again():
        now = started(result)
        return result.ready() or (now is not None and now["hostname"] == other.name)

    wait_for(started_again, VISIBILITY + 15, "the task to start again", 0.2)
    restarted = time.monotonic() - killed
    value = result.get(timeout=TASK_SECONDS + 10)
    done = time.monotonic() - killed
    assert value["seconds"] == TASK_SECONDS
    assert result.worker == other.name  # result_extended stores the node that ran it
    print(f"\nworker SIGKILLed: task restarted on {other.name} after {restarted:.1f} s, "
          f"done after {done:.1f} s (visibility timeout {VISIBILITY} s, task {TASK_SECONDS} s)")
