"""`submit --wait` through a Redis restart: redis-server SIGKILLed under a running CLI and
started again on its AOF about a second later, as systemd does.

The CLI must wait for Redis (one line on stderr says so), then go on publishing and collecting:
every task it says it submitted runs and its result is counted once. When Redis stays away it
gives up after its bound (submit.OUTAGE_PATIENCE) with a one-line error. Workers that exit on
the lost connection are started again, as systemd's Restart=always does.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .itkit import (
    REDIS_SERVER,
    ROOT,
    CrashableRedis,
    Worker,
    node_env,
    start_workers,
    stop_workers,
    wait_for,
)

pytestmark = pytest.mark.integration
DOWN = 1.0  # seconds Redis stays dead: systemd restarts a killed redis-server within 1-3 s
RETRYING = re.compile(r"^taskfleet: Redis unavailable \(.+\); retrying for up to 30 s$", re.M)


@dataclass
class Outage:
    """A crashable Redis, two workers kept running, and the CLI run against them."""

    redis: CrashableRedis
    env: dict[str, str]
    tmp: Path
    workers: list[Worker]
    restarted: list[str] = field(default_factory=list)

    def supervise(self) -> None:
        """Start again a worker that exited (Restart=always) once Redis answers; if it is
        still coming up, the next call tries again."""
        if all(w.alive() for w in self.workers) or not self.redis.answers():
            return
        for i, w in enumerate(self.workers):
            if not w.alive():
                with contextlib.suppress(Exception, pytest.fail.Exception):
                    self.workers[i] = start_workers(self.env, [w.name.split("@")[0]],
                                                    self.tmp)[0]
                    self.restarted.append(w.name)

    def ledger(self, batch: str) -> int:
        return int(self.redis.admin().llen(f"taskfleet:ledger:{batch}"))

    def published(self, batch: str) -> int:
        """At least how many tasks of `batch` Redis took: ran, or waiting in the queue (on a
        loaded machine the workers may lag far behind the CLI)."""
        return self.ledger(batch) + int(self.redis.admin().llen("celery"))

    def run(self, args: list[str], kill_when: Callable[[Path], bool],
            restart_after: float | None = DOWN, timeout: float = 180) -> Run:
        """Run `python -m app ARGS`; SIGKILL Redis once kill_when(stdout file) is true; start
        it again `restart_after` seconds later, once the CLI has said it waits (None: not at
        all)."""
        tag = secrets.token_hex(3)
        out, err = self.tmp / f"cli-{tag}.out", self.tmp / f"cli-{tag}.err"
        start = time.monotonic()
        with out.open("w") as o, err.open("w") as e:
            cli = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT,
                                   env=self.env, stdout=o, stderr=e)
        try:
            wait_for(lambda: cli.poll() is not None or kill_when(out), 60,
                     "the moment to kill Redis", 0.01)
            assert cli.poll() is None, f"the CLI ended before the kill: {out.read_text()}"
            killed = time.monotonic()
            published = "submitted " in out.read_text()
            self.redis.kill()
            if restart_after is not None:
                time.sleep(restart_after)
                # On a loaded machine the CLI may not run at all for a few seconds; then it
                # meets a Redis that is back and rightly says nothing. Stay down until it
                # has noticed (bounded: clean() fails if it never says so).
                with contextlib.suppress(pytest.fail.Exception):
                    wait_for(lambda: cli.poll() is not None or RETRYING.search(err.read_text()),
                             20, "the CLI to notice the outage", 0.05)
                self.redis.start()
            deadline = time.monotonic() + timeout
            while cli.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"the CLI still runs after {timeout} s: {out.read_text()}")
                self.supervise()
                time.sleep(0.2)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(10)
        ended = time.monotonic()
        return Run(cli.returncode, out.read_text(), err.read_text(), published,
                   killed - start, ended - killed)


@dataclass
class Run:
    code: int
    out: str
    err: str
    published_at_kill: bool  # the CLI had printed "submitted ..." when Redis died
    kill_after: float
    ran_after_kill: float

    def show(self, o: Outage) -> None:
        print(f"\nRedis killed {self.kill_after:.1f} s in, the CLI ended "
              f"{self.ran_after_kill:.1f} s later; workers started again: {o.restarted}\n"
              f"{self.out}{self.err}")

    def clean(self, password: str) -> None:
        text = self.out + self.err
        assert "Traceback" not in text, text
        assert password not in text
        assert len(RETRYING.findall(self.err)) == 1, self.err  # one line per outage

    def submitted(self, count: int) -> int:
        """The tasks the CLI says Redis took; the rest must be reported as unconfirmed (a
        failed send that may have reached Redis), none as not sent."""
        m = re.search(rf"^submitted (\d+)/{count} tasks", self.out, re.M)
        assert m, self.out + self.err
        submitted = int(m.group(1))
        if submitted < count:
            unconfirmed = count - submitted
            assert self.code == 1, self.err
            assert (f"taskfleet: error: {unconfirmed} submissions failed ({unconfirmed} "
                    f"unconfirmed: Redis failed during their batch, they may still run; "
                    "0 not sent); first error: ") in self.err, self.err
        else:
            assert self.code == 0, self.out + self.err
        return submitted


@pytest.fixture(scope="module")
def outage(no_celery_env, tmp_path_factory) -> Iterator[Outage]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    tmp = tmp_path_factory.mktemp("outage")
    redis = CrashableRedis(tmp)
    redis.start()
    env = node_env(tmp, redis.url())
    o = Outage(redis, env, tmp, [])
    try:
        o.workers = start_workers(env, ["o1", "o2"], tmp)
        yield o
    finally:
        stop_workers(o.workers)
        redis.stop()


@pytest.fixture
def redis_up(outage) -> Iterator[Outage]:
    """Each test starts with Redis answering and every worker up, and leaves it so."""
    if not outage.redis.answers():
        outage.redis.start()
    wait_for(lambda: outage.supervise() or all(w.alive() for w in outage.workers), 60,
             "every worker to run")
    yield outage
    if not outage.redis.answers():
        outage.redis.start()


def batch_name() -> str:
    return f"outage-{secrets.token_hex(4)}"


def test_redis_restart_while_publishing(redis_up):
    """Killed mid-burst (each task confirmed before the next): the CLI waits for Redis, sends
    the rest, and waits for every result."""
    o, batch, count = redis_up, batch_name(), 2000
    run = o.run(["submit", "mark", batch, "0", "0", "--count", str(count), "--batch", "1",
                 "--wait", "--timeout", "120"],
                kill_when=lambda _: o.published(batch) >= 50)
    run.show(o)
    assert not run.published_at_kill, "Redis died after publishing: nothing tested"
    submitted = run.submitted(count)
    assert re.search(rf"^done {submitted}, failed 0, no result 0 in ", run.out, re.M), run.out
    run.clean(o.redis.password)
    wait_for(lambda: o.ledger(batch) >= submitted, 30, f"{submitted} tasks to run")


def test_redis_restart_while_waiting_for_results(redis_up):
    """Killed after publishing, with results still to come: the CLI waits for Redis, then for
    the results it did not have yet, and counts each once."""
    o, batch, count = redis_up, batch_name(), 200
    run = o.run(["submit", "mark", batch, "0", "0.2", "--count", str(count), "--wait",
                 "--timeout", "120"],
                kill_when=lambda out: "submitted " in out.read_text() and o.ledger(batch) >= 10)
    run.show(o)
    assert run.published_at_kill, "Redis died before publishing ended: not this scenario"
    assert run.submitted(count) == count
    assert re.search(rf"^done {count}, failed 0, no result 0 in ", run.out, re.M), run.out
    workers = re.findall(r"^  \S+ +(\d+)$", run.out, re.M)
    assert sum(int(n) for n in workers) == count, run.out
    assert o.ledger(batch) >= count
    run.clean(o.redis.password)


def test_redis_restart_while_waiting_for_one_result(redis_up):
    o, batch = redis_up, batch_name()
    # Down for 3 s, longer than Celery's own single reconnect can hide: the CLI must wait.
    # Killed once a worker holds the task: the CLI has published it and waits for its result.
    held = set(o.redis.admin().hkeys("unacked"))
    run = o.run(["submit", "mark", batch, "7", "5", "--wait", "--timeout", "60"],
                kill_when=lambda _: bool(set(o.redis.admin().hkeys("unacked")) - held),
                restart_after=3.0)
    run.show(o)
    assert run.code == 0 and run.out == "7\n", run.out + run.err
    assert o.ledger(batch) >= 1
    run.clean(o.redis.password)


def test_redis_that_stays_down_while_publishing_ends_the_command(redis_up):
    """No Redis for longer than the CLI's patience: it stops publishing after 30 s (not the
    minutes of Celery's own retries) and says what failed, in one line."""
    o, batch, count = redis_up, batch_name(), 2000
    run = o.run(["submit", "mark", batch, "0", "0", "--count", str(count), "--batch", "1",
                 "--wait", "--timeout", "120"],
                kill_when=lambda _: o.published(batch) >= 50, restart_after=None, timeout=60)
    run.show(o)
    assert not run.published_at_kill
    assert run.code == 1
    assert 29 < run.ran_after_kill < 45, run.ran_after_kill
    errors = [line for line in run.err.splitlines() if not RETRYING.match(line)]
    assert len(errors) == 1 and re.match(
        r"taskfleet: error: \d+ submissions failed \(\d+ unconfirmed: .*; \d+ not sent\); "
        r"first error: .*Connection refused", errors[0]), run.err
    assert re.search(rf"^submitted \d+/{count} tasks", run.out, re.M), run.out
    assert "done " not in run.out  # no wait for results from a Redis that is gone
    run.clean(o.redis.password)


def test_redis_that_stays_down_while_waiting_ends_the_command_at_its_timeout(redis_up):
    """While waiting for results the wait for Redis ends at --timeout too: the summary counts
    the results still missing and one line says why."""
    o, batch, count = redis_up, batch_name(), 200
    run = o.run(["submit", "mark", batch, "0", "0.2", "--count", str(count), "--wait",
                 "--timeout", "10"],
                kill_when=lambda out: "submitted " in out.read_text() and o.ledger(batch) >= 10,
                restart_after=None, timeout=60)
    run.show(o)
    assert run.published_at_kill
    assert run.code == 1
    assert run.ran_after_kill < 15, run.ran_after_kill
    m = re.search(r"^done (\d+), failed 0, no result (\d+) in ", run.out, re.M)
    assert m and int(m.group(1)) + int(m.group(2)) == count, run.out
    lines = run.err.splitlines()
    assert len(lines) == 2, run.err
    assert re.fullmatch(r"taskfleet: Redis unavailable \(Error 111 connecting to [\d.:]+\. "
                        r"Connection refused\); retrying for up to \d+ s", lines[0]), run.err
    assert re.fullmatch(rf"taskfleet: error: {m.group(2)} results missing: Redis unavailable "
                        r"for \d+ s \(Error 111 connecting to [\d.:]+\. Connection refused\)",
                        lines[1]), run.err
    assert "Traceback" not in run.out + run.err
