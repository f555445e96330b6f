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


def test_result_store_never_overwrites_a_success(redis_server, tmp_path):
    """app.transport.ResultBackend (one script per store) keeps Celery's rule: a second run of a
    task (late ack) never overwrites its SUCCESS; other states are overwritten; every store is
    published to the result's channel and expires like Celery's."""
    from app.transport import ResultBackend

    client = client_app(node_env(tmp_path, redis_server.url(5)))
    backend = ResultBackend(app=client, url=redis_server.url(5))
    admin = redis_server.admin(5)
    listener = admin.pubsub()
    done, again = "store-done", "store-again"
    listener.subscribe(backend.get_key_for_task(done), backend.get_key_for_task(again))
    try:
        backend.store_result(done, 30, "SUCCESS")
        backend.store_result(done, ValueError("second run"), "FAILURE")
        meta = backend.get_task_meta(done)
        assert (meta["status"], meta["result"]) == ("SUCCESS", 30)
        backend.store_result(again, None, "STARTED")
        backend.store_result(again, 7, "SUCCESS")
        assert backend.get_task_meta(again)["result"] == 7
        assert 0 < admin.ttl(backend.get_key_for_task(done)) <= backend.expires
        published = []
        deadline = time.monotonic() + 5
        while len(published) < 3 and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
            if message and message["type"] == "message":
                published.append(client.backend.decode(message["data"])["status"])
        assert published == ["SUCCESS", "STARTED", "SUCCESS"]  # not the refused FAILURE
    finally:
        listener.close()
        admin.delete(backend.get_key_for_task(done), backend.get_key_for_task(again))
        client.close()
