"""Heartbeats tie the messages a worker holds to its liveness (app/transport.py).

Real redis-server (AOF on, as deployed), real `celery worker` processes, the production
visibility timeout (3600 s) unless a test is about a short one. `app.tasks.mark` records
every run in a ledger list, so each test counts runs: lost = never ran, duplicated = ran twice.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import celery_settings, read_settings

from .itkit import (
    REDIS_SERVER,
    CrashableRedis,
    Worker,
    client_app,
    node_env,
    run_cli,
    start_workers,
    stop_workers,
    wait_for,
)

pytestmark = pytest.mark.integration
MARK = "app.tasks.mark"
DEFAULTS = read_settings({"CELERY_BROKER_URL": "redis://h"})
DEAD_AFTER = DEFAULTS.dead_after  # the production default, not shortened for the tests
INTERVAL = DEFAULTS.heartbeat_interval


@pytest.fixture
def redis_aof(tmp_path: Path) -> Iterator[CrashableRedis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = CrashableRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class Bench:
    """Workers, a client and the ledger of one test."""

    def __init__(self, redis: CrashableRedis, tmp: Path, names: list[str], **settings: str):
        self.redis, self.tmp = redis, tmp
        self.env = node_env(tmp, redis.url(), **settings)
        self.workers = start_workers(self.env, names, tmp)
        self.client = client_app(self.env)
        self.batch = f"hb-{uuid.uuid4().hex[:8]}"

    def close(self) -> None:
        self.client.close()
        stop_workers(self.workers)

    def mark(self, n: int, seconds: float, **options):
        return self.client.send_task(MARK, args=[self.batch, n, seconds], **options)

    def runs(self) -> Counter[int]:
        entries = self.redis.admin().lrange(f"taskfleet:ledger:{self.batch}", 0, -1)
        return Counter(int(e.split(b"@")[0]) for e in entries)

    def run_times(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for e in self.redis.admin().lrange(f"taskfleet:ledger:{self.batch}", 0, -1):
            n, _host, t = e.decode().split("@")
            out.setdefault(int(n), []).append(float(t))
        return out

    def held_by(self) -> dict[str, list[int]]:
        """Numbers of this batch each worker runs now (inspect active)."""
        active = self.client.control.inspect(timeout=1.0, limit=len(self.workers)).active() or {}
        return {node: sorted(t["args"][1] for t in tasks if t["args"][0] == self.batch)
                for node, tasks in active.items()}

    def idle(self) -> bool:
        admin = self.redis.admin()
        return admin.llen("celery") == 0 and admin.hlen("unacked") == 0

    def worker(self, node: str) -> Worker:
        return next(w for w in self.workers if w.name == node)


@pytest.fixture
def bench_factory(redis_aof: CrashableRedis, tmp_path: Path):
    made: list[Bench] = []

    def make(names: list[str], **settings: str) -> Bench:
        b = Bench(redis_aof, tmp_path, names, **settings)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_dead_worker_tasks_run_again_within_dead_after(bench_factory):
    """Visibility timeout 3600 s: a SIGKILLed worker's tasks run elsewhere within seconds."""
    b = bench_factory(["d1", "d2"])
    for n in range(4):
        b.mark(n, 4)
    held = wait_for(lambda: (h := b.held_by()) and all(len(v) == 2 for v in h.values())
                    and len(h) == 2 and h, 20, "both workers to run two tasks each")
    victim = b.worker(sorted(held)[0])
    victim_numbers = held[victim.name]
    victim.kill_all()
    killed = time.time()
    wait_for(lambda: set(b.runs()) == {0, 1, 2, 3}, DEAD_AFTER + 20, "every task to run")
    times = b.run_times()
    restarted = max(min(times[n]) - 4 - killed for n in victim_numbers)
    assert all(len(times[n]) == 1 for n in range(4)), times  # the dead worker ran nothing
    assert restarted <= DEAD_AFTER + 2 * INTERVAL + 1, \
        f"started again {restarted:.1f} s after the crash (dead after {DEAD_AFTER} s)"
    wait_for(b.idle, 10, "the broker to be idle")
    print(f"\nworker SIGKILLed: its tasks started again on the other worker after "
          f"{restarted:.1f} s (visibility timeout 3600 s, dead after {DEAD_AFTER:g} s)")


def test_eta_and_long_task_beyond_the_visibility_timeout_run_once(bench_factory):
    """countdown = 3 x the visibility timeout, and a task running 3 x as long: with heartbeats
    each runs once (the timeout no longer has to exceed the hard limit)."""
    vt = 2
    b = bench_factory(["e1", "e2"], TASKFLEET_VISIBILITY_TIMEOUT=str(vt),
                      TASKFLEET_TASK_TIME_LIMIT="60")
    sent = time.time()
    b.mark(0, 0, countdown=3 * vt)
    b.mark(1, 3 * vt)
    wait_for(lambda: set(b.runs()) == {0, 1}, 3 * vt + 15, "both tasks to run")
    # A second copy, had one been handed out, would still be held or queued: wait for none.
    wait_for(b.idle, 10, "the broker to be idle")
    assert b.runs() == Counter({0: 1, 1: 1})
    assert min(b.run_times()[0]) >= sent + 3 * vt - 0.5, "the ETA task ran early"


def test_eta_task_beyond_the_visibility_timeout_without_heartbeats(bench_factory):
    """The same ETA task on kombu as shipped (heartbeats off; the hard limit must then stay
    below the timeout): the held message is handed out again every timeout (celery#6236)."""
    vt = 2
    b = bench_factory(["o1", "o2"], TASKFLEET_VISIBILITY_TIMEOUT=str(vt),
                      TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_TASK_TIME_LIMIT="1")
    b.mark(0, 0, countdown=3 * vt)
    wait_for(lambda: b.runs()[0] >= 1, 3 * vt + 15, "the ETA task to run")
    wait_for(b.idle, 3 * vt + 10, "the broker to be idle")
    print(f"\nETA {3 * vt} s, visibility timeout {vt} s, heartbeats off: ran {b.runs()[0]}x")
    assert b.runs()[0] >= 2, "kombu as shipped ran it once: the comparison shows nothing"


def test_worker_without_heartbeats_keeps_its_tasks(bench_factory):
    """A worker of an older version (no heartbeats, records without an owner) beside current
    ones during a rolling update: its long task is not taken for dead, it runs once."""
    old = bench_factory(["old"], TASKFLEET_HEARTBEAT_INTERVAL="0", TASKFLEET_TASK_TIME_LIMIT="60")
    new = bench_factory(["new"], TASKFLEET_TASK_TIME_LIMIT="60")
    new.client.control.cancel_consumer("celery", destination=[new.workers[0].name], reply=True)
    old.batch = new.batch
    old.mark(0, DEAD_AFTER + 2)
    wait_for(lambda: old.held_by().get(old.workers[0].name), 15, "the old worker to start it")
    new.client.control.add_consumer("celery", destination=[new.workers[0].name], reply=True)
    assert old.redis.admin().hlen("unacked_owner") == 0  # the old worker's record: no owner
    wait_for(lambda: old.runs()[0] >= 1, DEAD_AFTER + 20, "the task to finish")
    wait_for(old.idle, 10, "the broker to be idle")
    assert old.runs() == Counter({0: 1})


def test_warm_shutdown_keeps_a_long_task(bench_factory):
    """SIGTERM while a task runs for longer than the dead-after time: the worker finishes it
    (warm shutdown); the other worker does not take it over meanwhile."""
    b = bench_factory(["s1", "s2"], TASKFLEET_TASK_TIME_LIMIT="60")
    b.mark(0, DEAD_AFTER + 2)
    held = wait_for(lambda: {n: v for n, v in b.held_by().items() if v}, 15, "the task to start")
    worker = b.worker(next(iter(held)))
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(DEAD_AFTER + 20)
    wait_for(lambda: b.runs()[0] >= 1, 10, "the task to be done")
    wait_for(b.idle, 10, "the broker to be idle")
    assert b.runs() == Counter({0: 1})
    assert "Warm shutdown" in worker.log_text()


def test_stopped_worker_is_dead_and_carries_on_when_it_returns(bench_factory):
    """SIGSTOP (hung, or cut off) past the dead-after time: its task runs elsewhere. SIGCONT:
    it finishes its own copy, acks (nothing left to ack) and goes on working."""
    b = bench_factory(["p1", "p2"], TASKFLEET_TASK_TIME_LIMIT="60")
    b.mark(0, 3)
    held = wait_for(lambda: {n: v for n, v in b.held_by().items() if v}, 15, "the task to start")
    stopped = b.worker(next(iter(held)))
    other = next(w for w in b.workers if w is not stopped)
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: b.runs()[0] >= 2, DEAD_AFTER + 15,
                 "the task to run again on the other worker")
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
    # It goes on: a task only it consumes runs there.
    b.client.control.add_consumer("only-stopped", destination=[stopped.name], reply=True)
    result = b.client.send_task("app.tasks.whoami", queue="only-stopped")
    assert result.get(timeout=20)["worker"] == stopped.name
    assert stopped.alive() and other.alive()
    wait_for(b.idle, 10, "the broker to be idle")
    assert b.runs() == Counter({0: 2}), "ran on both: once each, counted"
    assert "Traceback" not in stopped.log_text()


def test_redis_restart_while_workers_hold_tasks(bench_factory, redis_aof):
    """Redis SIGKILLed and restarted while both workers run tasks: the tasks they cancel on
    the connection loss run again within seconds of Redis being back (not after 3600 s)."""
    b = bench_factory(["r1", "r2"], TASKFLEET_TASK_TIME_LIMIT="60")
    for n in range(4):
        b.mark(n, 3)
    wait_for(lambda: sum(len(v) for v in b.held_by().values()) == 4, 20, "4 tasks to start")
    redis_aof.kill()
    time.sleep(1)
    redis_aof.start()
    back = time.time()
    wait_for(lambda: set(b.runs()) == {0, 1, 2, 3}, DEAD_AFTER + 30, "every task to run")
    wait_for(b.idle, 20, "the broker to be idle")
    times = b.run_times()
    done = max(min(t) for t in times.values()) - back
    print(f"\nRedis restarted under 4 running tasks: all done {done:.1f} s after it was back; "
          f"runs {dict(b.runs())}")
    assert done <= DEAD_AFTER + 2 * INTERVAL + 3 + 5


def test_result_waits_for_the_result_backend(bench_factory, tmp_path: Path):
    """The result backend (its own Redis here, so the worker keeps its broker connection and
    does not cancel the task) dies while the task runs: the result waits for it and is
    SUCCESS, not a BackendStoreError FAILURE (no retry limit, app/config.py)."""
    backend = CrashableRedis(tmp_path / "backend")
    (tmp_path / "backend").mkdir()
    backend.start()
    try:
        b = bench_factory(["b1"], CELERY_RESULT_BACKEND=backend.url(),
                          TASKFLEET_TASK_TIME_LIMIT="120")
        result = b.client.send_task("app.tasks.sleep", args=[2])
        wait_for(lambda: any(b.held_by().values()) or result.ready(), 15, "the task to start")
        backend.kill()
        time.sleep(12)
        backend.start()
        assert result.get(timeout=30)["seconds"] == 2
        assert result.status == "SUCCESS"
    finally:
        backend.stop()


def test_submit_wait_names_the_first_failure(bench_factory):
    b = bench_factory(["f1"])
    proc = run_cli(b.env, "submit", "add", "1", '"x"', "--count", "3", "--wait", "--timeout", "30")
    assert proc.returncode != 0
    assert "done 0, failed 3" in proc.stdout, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "first failure" in line]
    assert len(lines) == 1 and "TypeError" in lines[0], proc.stderr


def sweep_threads(url: str, rounds: int = 20, tolerate: bool = False) -> None:
    """Two workers' sweeps at the same moment, each on its own connection, with the transport
    options a deployed worker has."""
    from kombu import Connection

    options = celery_settings(read_settings({"CELERY_BROKER_URL": url}))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def sweeper() -> None:
        try:
            with Connection(url, transport="app.transport:Transport",
                            transport_options=options["broker_transport_options"]) as conn:
                qos = conn.default_channel.qos
                barrier.wait(10)
                for _ in range(rounds):
                    qos.restore_visible()
        except Exception as exc:  # reported below unless the test expects it (Redis killed)
            errors.append(exc)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert tolerate or not errors, errors


def plant(redis: CrashableRedis, queue: str, n: int, *, age: float, owner: str | None) -> list[str]:
    """n messages taken from `queue` and recorded as unacked `age` seconds ago (by Redis's
    clock), held by `owner` (None: a record without heartbeats)."""
    from kombu import Connection
    from kombu.utils.json import dumps, loads

    admin = redis.admin()
    with Connection(redis.url()) as conn:
        q = conn.SimpleQueue(queue)
        for i in range(n):
            q.put({"i": i})
        q.close()
    now = float(admin.time()[0]) + admin.time()[1] / 1e6
    tags = []
    with admin.pipeline() as pipe:
        for _ in range(n):
            raw = admin.rpop(queue)
            tag = loads(raw)["properties"]["delivery_tag"]
            tags.append(tag)
            pipe.zadd("unacked_index", {tag: now - age})
            pipe.hset("unacked", tag, dumps([loads(raw), "", queue]))
            if owner is not None:
                pipe.hset("unacked_owner", tag, owner)
        pipe.execute()
    return tags


def queued_tags(redis: CrashableRedis, queue: str) -> Counter[str]:
    from kombu.utils.json import loads

    return Counter(loads(m)["properties"]["delivery_tag"]
                   for m in redis.admin().lrange(queue, 0, -1))


def test_two_sweepers_return_each_message_once(redis_aof):
    dead = plant(redis_aof, "swept", 300, age=DEAD_AFTER + 5, owner="gone:1")
    live = plant(redis_aof, "kept", 20, age=0, owner="alive:2")
    legacy_young = plant(redis_aof, "kept", 20, age=DEAD_AFTER + 5, owner=None)
    legacy_old = plant(redis_aof, "swept", 20, age=3700, owner=None)
    sweep_threads(redis_aof.url())
    swept = queued_tags(redis_aof, "swept")
    assert swept == Counter(dead + legacy_old), "each message of a dead holder exactly once"
    assert queued_tags(redis_aof, "kept") == Counter()
    admin = redis_aof.admin()
    left = {t.decode() for t in admin.hkeys("unacked")}
    assert left == set(live + legacy_young)
    assert {t.decode() for t in admin.hkeys("unacked_owner")} == set(live)


def test_redis_killed_mid_sweep_loses_and_doubles_nothing(tmp_path: Path):
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = CrashableRedis(tmp_path)
    redis.start()
    try:
        tags = plant(redis, "swept", 4000, age=DEAD_AFTER + 5, owner="gone:1")
        # appendfsync always (as deployed): what the sweep did is what survives.
        sweeper = threading.Thread(target=sweep_threads, args=(redis.url(), 1, True))
        sweeper.start()
        admin = redis.admin()
        wait_for(lambda: admin.llen("swept") > 0, 10, "the sweep to start", 0.001)
        redis.kill()
        sweeper.join(30)
        redis.start()
        midway = redis.admin().llen("swept")
        assert 0 < midway < len(tags), f"the kill did not land mid-sweep ({midway})"
        # The sweep lock may have survived in the AOF: sweeps resume once it expires.
        wait_for(lambda: sweep_threads(redis.url(), 1) or redis.admin().hlen("unacked") == 0,
                 20, "the next sweeps to return the rest", 0.5)
        assert queued_tags(redis, "swept") == Counter(tags)
        print(f"\nRedis SIGKILLed mid-sweep at {midway}/{len(tags)}: after the restart every "
              "message is in its queue exactly once")
    finally:
        redis.stop()


def test_a_message_whose_ack_or_reject_failed_is_let_go(redis_aof: CrashableRedis):
    """Redis away when the worker acks one message and rejects (requeues) another: the worker
    is done with both, so its heartbeats must not keep them. Neither is re-stamped, and the
    sweep hands both back after DEAD_AFTER. (kombu keeps a tag whose ack failed among the
    delivered ones: a live worker would re-stamp it for as long as it runs.)"""
    from kombu import Connection, Exchange, Producer, Queue

    url = redis_aof.url()
    options = celery_settings(read_settings({"CELERY_BROKER_URL": url}))
    queue = Queue("letgo", Exchange("letgo"), "letgo")
    with Connection(url) as conn:
        producer = Producer(conn)
        for n in range(2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="letgo",
                             declare=[queue], serializer="json")
    admin = redis_aof.admin()
    with Connection(url, transport="app.transport:Transport",
                    transport_options=options["broker_transport_options"]) as conn:
        conn.transport.heartbeating = True  # as once a worker's event loop runs
        channel = conn.default_channel
        acked, rejected = channel.basic_get("letgo"), channel.basic_get("letgo")
        assert acked is not None and rejected is not None
        assert admin.hlen("unacked") == 2 and admin.hlen("unacked_owner") == 2
        redis_aof.kill()
        for call in (acked.ack, lambda: rejected.reject(requeue=True)):
            with pytest.raises(Exception):  # noqa: B017 -- whatever redis-py raises for it
                call()
        assert not channel.qos._delivered, "the worker still holds what it acked or rejected"
        redis_aof.start()
        admin = redis_aof.admin()
        assert admin.hlen("unacked") == 2, "the records were on disk before Redis answered"

        def returned() -> bool:
            conn.transport.beat()  # a live worker's heartbeat, as often as it can
            channel.qos.restore_visible()
            return admin.llen("letgo") == 2

        wait_for(returned, DEAD_AFTER + 10, "both messages back in their queue", 0.5)
    assert admin.hlen("unacked") == 0 and admin.hlen("unacked_owner") == 0
