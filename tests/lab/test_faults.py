"""Fault and security suite on a deployed lab cluster: nothing the broker accepted is lost.

Every scenario submits a numbered batch of `app.tasks.mark` tasks. `mark` appends
"<n>@<host>@<time>" to the Redis list taskfleet:ledger:<batch> each time it runs, so afterwards
the ledger says which numbers never ran (lost) and which ran more than once (duplicated). The
figures go to .cache/reliability.json and tests/lab/reliability.py renders docs/RELIABILITY.md
from them when the module ends.

The shared lab at this point: redis1, worker1..worker3, client1, spare1; the short time limits
and visibility timeout of conftest's TEST_GROUP_VARS keep the recovery waits short. Each scenario
ends as soon as its evidence is complete (Fleet.finish), not after a fixed wait.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pickle
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from . import reliability
from .conftest import REPO, Cluster, record_timing

pytestmark = pytest.mark.lab

MARK = "app.tasks.mark"
LEDGER_PREFIX = "taskfleet:ledger:"
WORKERS = ("worker1", "worker2", "worker3")
# Set while the workers run the rolling-update scenario's code. The scale-in scenario's deploy
# (next and last) puts the repository's code back; if it did not run, the module's teardown does.
CODE = {"modified": False}
SERVICE = "taskfleet-worker"


# --------------------------------------------------------------------------- the client side


@dataclass
class Tally:
    """What the ledger says about a batch of numbers."""

    submitted: int
    runs: dict[int, list[tuple[str, float]]]  # n -> [(host, unix time), ...]
    expected: set[int]

    @property
    def lost(self) -> list[int]:
        return sorted(self.expected - self.runs.keys())

    @property
    def duplicated(self) -> dict[int, int]:
        return {n: len(r) for n, r in sorted(self.runs.items()) if len(r) > 1}

    def hosts(self) -> Counter[str]:
        return Counter(h for runs in self.runs.values() for h, _ in runs)

    def first_run(self, n: int) -> float | None:
        return min((t for _, t in self.runs.get(n, [])), default=None)

    def last_done(self) -> float:
        return max(t for runs in self.runs.values() for _, t in runs)


class Fleet:
    """The test's own Celery client and Redis client, configured exactly like a deployed client
    (app.config turns the controller's env file into Celery settings)."""

    def __init__(self, cluster: Cluster) -> None:
        from dotenv import dotenv_values

        from app.config import celery_settings, read_settings

        self.cluster = cluster
        env = {k: v for k, v in dotenv_values(cluster.env_file).items() if v is not None}
        self.settings = read_settings(env)
        self.url = self.settings.broker_url
        self.password = unquote(urlsplit(self.url).password or "")
        assert self.password, "the deployed broker URL has no password"
        from celery import Celery

        self.celery = Celery("taskfleet-faults", set_as_current=False)
        self.celery.conf.update(celery_settings(self.settings))

    def redis(self, timeout: float = 5.0):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout,
                                    socket_connect_timeout=timeout, decode_responses=True)

    # -- submitting

    def send(self, name: str, args: list[Any], queue: str | None = None, **opts: Any):
        return self.celery.send_task(name, args=args, queue=queue or self.settings.default_queue,
                                     **opts)

    def submit(self, batch: str, numbers: range | list[int], seconds: float = 0,
               queue: str | None = None) -> list[int]:
        for n in numbers:
            self.send(MARK, [batch, n, seconds], queue)
        return list(numbers)

    # -- the ledger

    def ledger(self, batch: str) -> dict[int, list[tuple[str, float]]]:
        runs: dict[int, list[tuple[str, float]]] = {}
        for entry in self.redis().lrange(LEDGER_PREFIX + batch, 0, -1):
            n, host, t = entry.split("@")
            runs.setdefault(int(n), []).append((host, float(t)))
        return runs

    def wait_batch(self, batch: str, expected: set[int] | list[int], timeout: float,
                   submitted: int | None = None) -> Tally:
        """Poll the ledger until every expected number ran once (or the time is up)."""
        expected = set(expected)
        deadline = time.monotonic() + timeout
        runs: dict[int, list[tuple[str, float]]] = {}
        while True:
            with contextlib.suppress(Exception):  # Redis may still be coming back
                runs = self.ledger(batch)
            if expected <= runs.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return Tally(submitted if submitted is not None else len(expected), runs, expected)

    def broker_idle(self, unconsumed: tuple[str, ...] = ()) -> bool:
        """No message waits in a consumed queue and none is held unacknowledged."""
        queues = [self.settings.default_queue, *(f"host.{w}" for w in self.workers())]
        try:
            r = self.redis()
            return (sum(r.llen(q) for q in queues if q not in unconsumed) == 0
                    and r.hlen("unacked") == 0)
        except Exception:  # Redis may still be coming back
            return False

    def finish(self, batch: str, expected: set[int] | list[int], timeout: float, *,
               cut_off_at: float | None = None, submitted: int | None = None,
               unconsumed: tuple[str, ...] = ()) -> Tally:
        """The batch's final tally, read as soon as no further run of its numbers can appear.

        A number runs again only if (a) its message still waits in a queue or is held in the
        `unacked` hash (a redelivery after the visibility timeout), or (b) a task cut off from
        Redis at `cut_off_at` (wall clock; a partition or Redis outage) still finishes and
        writes after its message was handed out again -- the pool kills it at the hard time
        limit. A crashed or stopped worker runs nothing more, so it needs no (b) window. So:
        every number ran, the broker is idle and the window is over; the ledger is read after
        the broker was seen idle (a task is acknowledged only after its write). At `timeout`
        the tally says what is missing.
        """
        deadline = time.monotonic() + timeout
        quiet_at = (cut_off_at or 0) + self.settings.task_time_limit
        while True:
            idle = self.broker_idle(unconsumed)
            tally = self.wait_batch(batch, expected, timeout=0, submitted=submitted)
            if (idle and not tally.lost and time.time() >= quiet_at) \
                    or time.monotonic() > deadline:
                return tally
            time.sleep(0.5)

    # -- the workers

    def workers(self) -> list[str]:
        return [w for w in self.cluster.workers() if w in WORKERS]

    def active_numbers(self, worker: str, batch: str) -> list[int]:
        """Numbers of `batch` the worker is running right now (Celery remote control)."""
        node = f"worker@{worker}"
        reply = self.celery.control.inspect(destination=[node], timeout=1.0).active() or {}
        return sorted(t["args"][1] for t in reply.get(node, [])
                      if t.get("name") == MARK and t["args"][0] == batch)

    def wait_held(self, worker: str, batch: str, timeout: float = 20) -> list[int]:
        """Wait until `worker` runs tasks of `batch`; their numbers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                held = self.active_numbers(worker, batch)
                if held:
                    return held
            time.sleep(0.2)
        return []

    def ping(self, timeout: float = 1.0) -> list[str]:
        replies = self.celery.control.ping(timeout=timeout) or []
        return sorted(node for reply in replies for node in reply)

    def consumes(self, worker: str, timeout: float) -> float | None:
        """Seconds until a task pinned to the worker's host queue ran there, None if never."""
        batch = f"canary-{worker}-{uuid.uuid4().hex[:6]}"
        start = time.monotonic()
        with contextlib.suppress(Exception):
            self.submit(batch, [0], queue=f"host.{worker}")
        while time.monotonic() - start < timeout:
            with contextlib.suppress(Exception):
                runs = self.ledger(batch)
                if 0 in runs:
                    assert runs[0][0][0] == worker, runs
                    return time.monotonic() - start
            time.sleep(0.3)
        return None

    def service(self, worker: str) -> dict[str, str]:
        out = self.cluster.on(worker, "systemctl", "show", SERVICE, "-p", "MainPID",
                              "-p", "ActiveState", "-p", "ActiveEnterTimestampMonotonic",
                              "-p", "ActiveExitTimestampMonotonic", "-p", "NRestarts",
                              check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def batch_name(scenario: str) -> str:
    return f"{scenario}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"


def redis_up(fleet: Fleet) -> bool:
    try:
        return bool(fleet.redis(timeout=1.0).ping())
    except Exception:
        return False


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.3) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(step)
    return None


# --------------------------------------------------------------------------- results


@dataclass
class Report:
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    security: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Set again once the fleet is ready: the suite time excludes adding worker3 (a module run
    # on its own), which the full test run's deployment tests have already done.
    started: float = field(default_factory=time.monotonic)

    def scenario(self, key: str, title: str, tally: Tally | None = None, **extra: Any) -> dict:
        row: dict[str, Any] = {"title": title, "passed": False, **extra}
        if tally is not None:
            row.update(submitted=tally.submitted, lost=len(tally.lost),
                       lost_numbers=tally.lost[:20], duplicated=len(tally.duplicated),
                       duplicated_numbers=dict(list(tally.duplicated.items())[:20]),
                       hosts=dict(sorted(tally.hosts().items())))
        self.scenarios[key] = row
        print(f"\n[reliability] {key}: {json.dumps(row)}")
        return row

    def check(self, key: str, title: str, result: str) -> dict:
        row = {"title": title, "result": result, "passed": False}
        self.security[key] = row
        return row


@pytest.fixture(scope="module")
def report(cluster: Cluster) -> Iterator[Report]:
    rep = Report()
    yield rep
    if CODE["modified"]:
        run = cluster.deploy()
        record_timing("deploy: restore the original code", run.seconds)
        CODE["modified"] = run.rc != 0
    suite = time.monotonic() - rep.started
    record_timing("fault suite", suite)
    fleet = Fleet(cluster)
    s = fleet.settings
    reliability.save(rep.scenarios, rep.security, {
        "task_time_limit": s.task_time_limit, "task_soft_time_limit": s.task_soft_time_limit,
        "visibility_timeout": s.visibility_timeout,
        "unacked_restore_interval":
            fleet.celery.conf.broker_transport_options["unacked_restore_interval"],
        "worker_prefetch_multiplier": s.worker_prefetch_multiplier,
        "watchdog_sec": cluster.on("worker1", "systemctl", "show", SERVICE, "-p",
                                   "WatchdogUSec", "--value").stdout.strip() or "?",
        "suite_seconds": round(suite, 1),
    })
    reliability.render()


@pytest.fixture(scope="module")
def fleet(cluster: Cluster, report: Report) -> Fleet:
    """The cluster with its three workers (adds worker3 when this module runs on its own)."""
    if "worker3" not in cluster.workers():
        cluster.lab.add("worker3", "workers", distro="trixie")
        run = cluster.deploy()
        record_timing("deploy: scale-out for the fault suite", run.seconds)
        assert run.rc == 0, run.out[-4000:]
    f = Fleet(cluster)
    assert wait_until(lambda: len(f.ping()) >= 3, 30), f"workers not answering: {f.ping()}"
    report.started = time.monotonic()
    return f


# --------------------------------------------------------------------------- security: Redis


def redis_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """redis-cli on redis1 as the app's ACL user; the password goes through stdin, never argv."""
    ip = fleet.cluster.lab.ip("redis1")
    user = unquote(urlsplit(fleet.url).username or "default")
    script = ('read -r REDISCLI_AUTH; export REDISCLI_AUTH; '
              f'exec redis-cli --no-auth-warning -h {ip} --user {user} "$@"')
    return fleet.cluster.lab.ssh("redis1", "bash", "-c", script, "redis-cli", *args,
                                 check=False, input=fleet.password + "\n", timeout=30)


def test_app_acl_user_cannot_run_dangerous_commands(fleet: Fleet, report: Report):
    row = report.check("acl", "App ACL user: FLUSHALL, CONFIG, KEYS refused; default user off",
                       "")
    assert redis_cli(fleet, "PING").stdout.strip() == "PONG"
    refused = {}
    for cmd in (["FLUSHALL"], ["CONFIG", "GET", "requirepass"], ["KEYS", "*"],
                ["FLUSHDB"], ["DEBUG", "SLEEP", "0"], ["ACL", "LIST"]):
        out = redis_cli(fleet, *cmd)
        # DEBUG is also off server-wide (enable-debug-command no): either refusal counts.
        text = out.stdout + out.stderr
        refused[" ".join(cmd[:1])] = "NOPERM" in text or "not allowed" in text
    assert all(refused.values()), refused
    # The default user: without credentials nothing is allowed, and it is switched off in the
    # ACL file (a disabled user cannot authenticate even with the right password).
    ip = fleet.cluster.lab.ip("redis1")
    anon = fleet.cluster.on("redis1", "redis-cli", "-h", ip, "PING")
    assert "NOAUTH" in anon.stdout + anon.stderr, anon.stdout
    acl = fleet.cluster.on("redis1", "sh", "-c",
                           "cat /etc/redis/*.acl 2>/dev/null; grep -h '^user ' /etc/redis/*.conf",
                           check=False).stdout
    default = [line for line in acl.splitlines() if line.startswith("user default ")]
    assert default and " off" in default[0] and "nopass" not in default[0], acl
    row["result"] = "refused: " + ", ".join(refused) + "; `user default off`"
    row["passed"] = True


# --------------------------------------------------------------------------- security: input


def kombu_producer(fleet: Fleet):
    from kombu import Connection

    conn = Connection(fleet.url, transport_options=dict(
        fleet.celery.conf.broker_transport_options))
    return conn


def journal_since(cluster: Cluster, host: str, since: str, grep: str) -> str:
    return cluster.on(host, "sh", "-c",
                      f"journalctl -u {SERVICE} --since '{since}' --no-pager -o cat "
                      f"| grep -E '{grep}' | tail -n 5", check=False).stdout


def host_time(cluster: Cluster) -> str:
    return cluster.on("redis1", "date", "+%Y-%m-%d %H:%M:%S", check=True).stdout.strip()


class PickleBomb:
    """Unpickling this calls the worker's own Redis (URL from its environment, so no password
    travels in the message) and writes to a ledger key: proof that the code ran."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self):
        code = ("__import__('redis').Redis.from_url(__import__('os').environ"
                f"['CELERY_BROKER_URL']).rpush('{self.key}', 'executed')")
        return (eval, (code,))


def test_pickle_message_is_not_executed(fleet: Fleet, report: Report, monkeypatch):
    row = report.check("pickle", "A pickle message injected into the queue is not executed", "")
    key = LEDGER_PREFIX + batch_name("pickle")
    bomb = pickle.dumps(PickleBomb(key))
    # Control: the payload is live -- unpickling it here writes to Redis. So the assertion
    # below would fail if a worker unpickled it.
    monkeypatch.setenv("CELERY_BROKER_URL", fleet.url)
    pickle.loads(bomb)  # noqa: S301 -- our own payload, the control of this test
    r = fleet.redis()
    assert r.lrange(key, 0, -1) == ["executed"]
    r.delete(key)
    pids = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    since = host_time(fleet.cluster)
    task_id = str(uuid.uuid4())
    with kombu_producer(fleet) as conn:
        conn.Producer().publish(
            PickleBomb(key), serializer="pickle", routing_key=fleet.settings.default_queue,
            exchange="", headers={"task": "app.tasks.add", "id": task_id, "lang": "py",
                                  "root_id": task_id, "parent_id": None, "group": None})
    # A good task behind it runs, so the bad one was taken off the queue first.
    batch = batch_name("after-pickle")
    fleet.submit(batch, range(6))
    tally = fleet.wait_batch(batch, range(6), timeout=30)
    assert not tally.lost, tally.lost
    time.sleep(1)
    assert r.lrange(key, 0, -1) == [], "a worker unpickled the message and ran its code"
    assert {w: fleet.cluster.main_pid(w) for w in fleet.workers()} == pids
    logged = "".join(journal_since(fleet.cluster, w, since, "pickle|ContentDisallowed|untrusted")
                     for w in fleet.workers())
    assert logged, "no worker logged the refused pickle message"
    row["result"] = "refused and dropped (accept_content=['json']); logged: " \
        + logged.strip().splitlines()[0][:120]
    row["passed"] = True


def test_malformed_messages_at_scale_are_dropped(fleet: Fleet, report: Report):
    """1,000 bad messages next to 50 good ones: the good ones run, workers stay up, the bad
    ones are logged and dropped (nothing left in the queue or unacked)."""
    pids = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    since = host_time(fleet.cluster)
    batch = batch_name("malformed")
    queue = fleet.settings.default_queue
    start = time.monotonic()
    kinds: Counter[str] = Counter()
    with kombu_producer(fleet) as conn:
        producer = conn.Producer()

        def headers(task: str) -> dict[str, Any]:
            task_id = str(uuid.uuid4())
            return {"task": task, "id": task_id, "lang": "py", "root_id": task_id,
                    "parent_id": None, "group": None, "argsrepr": "", "kwargsrepr": ""}

        for i in range(1000):
            kind = ("bad-json", "unknown-task", "wrong-args", "no-headers")[i % 4]
            if kind == "bad-json":
                producer.publish(b'{"not": json', content_type="application/json",
                                 content_encoding="utf-8", routing_key=queue, exchange="",
                                 headers=headers(MARK))
            elif kind == "unknown-task":
                producer.publish([[1, 2], {}, {}], serializer="json", routing_key=queue,
                                 exchange="", headers=headers("app.tasks.no_such_task"))
            elif kind == "wrong-args":
                producer.publish([[1, 2, 3, 4, 5], {}, {}], serializer="json",
                                 routing_key=queue, exchange="", headers=headers(MARK))
            else:
                producer.publish({"garbage": i}, serializer="json", routing_key=queue,
                                 exchange="")
            kinds[kind] += 1
            if i % 20 == 0:
                n = i // 20
                fleet.send(MARK, [batch, n, 0], producer=producer)
    good = range(50)
    tally = fleet.finish(batch, good, timeout=90)
    seconds = time.monotonic() - start
    r = fleet.redis()
    left = r.llen(queue) + r.hlen("unacked")
    after = {w: fleet.cluster.main_pid(w) for w in fleet.workers()}
    logged = Counter[str]()
    for w in fleet.workers():
        text = fleet.cluster.on(w, "sh", "-c", f"journalctl -u {SERVICE} --since '{since}' "
                                "--no-pager -o cat", check=False).stdout
        logged["decode"] += len(re.findall(r"decode|Can't decode|DecodeError", text))
        logged["unregistered"] += text.count("unregistered task")
        logged["TypeError"] += len(re.findall(r"TypeError", text))
        logged["unknown message"] += text.count("unknown message")
    row = report.scenario("malformed", "1,000 malformed messages beside 50 good tasks", tally,
                          bad_messages=dict(kinds), recovery_s=round(seconds, 1),
                          recovery_what="all 1,050 handled",
                          held_by="accept_content json; unknown/undecodable messages are "
                                  "acked and logged; task errors stored as FAILURE",
                          logged=dict(logged), left_in_queue=left)
    assert not tally.lost, f"good tasks lost: {tally.lost}"
    assert after == pids, f"a worker restarted: {pids} -> {after}"
    assert left == 0, f"{left} messages still queued or unacked"
    assert logged["unregistered"] > 0 and logged["decode"] > 0, dict(logged)
    row["passed"] = True


# --------------------------------------------------------------------------- faults


def test_worker_host_crash_loses_nothing(fleet: Fleet, report: Report):
    """worker1's host dies (SIGKILL of its init) while it runs tasks: those run elsewhere after
    the visibility timeout, nothing is lost; the host comes back with its service."""
    lab, vt = fleet.cluster.lab, fleet.settings.visibility_timeout
    batch = batch_name("crash")
    numbers = fleet.submit(batch, range(30), seconds=2)
    held = fleet.wait_held("worker1", batch)
    assert held, "worker1 never ran a task of the batch"
    crashed_at = time.time()
    lab.crash("worker1")
    boot = threading.Thread(target=lab.start, args=("worker1",))
    boot.start()  # the host boots while the others work; its service must start by itself
    tally = fleet.finish(batch, numbers, timeout=vt + 45)
    boot.join(120)
    recovered = [t - crashed_at for n in held if (t := tally.first_run(n)) is not None]
    recovery = round(max(recovered), 1) if len(recovered) == len(held) else None
    back = wait_until(lambda: "worker@worker1" in fleet.ping(), 60)
    tally = fleet.finish(batch, numbers, timeout=vt + 15)  # worker1's restart ran nothing twice
    bound = vt + fleet.celery.conf.broker_transport_options["unacked_restore_interval"] + 2 + 10
    row = report.scenario(
        "crash", "Worker host hard crash (SIGKILL of its init) mid-batch", tally,
        recovery_s=recovery, recovery_what=f"{len(held)} tasks held by worker1 ran elsewhere",
        bound_s=bound, held_by="task_acks_late + task_reject_on_worker_lost; "
        "visibility_timeout (taskfleet_visibility_timeout) returns a dead worker's messages",
        worker_back=back is not None)
    assert not tally.lost, f"lost: {tally.lost}"
    assert recovery is not None and recovery <= bound, (recovery, bound)
    assert back is not None, "worker1's service did not come back after the host booted"
    assert fleet.cluster.on("worker1", "systemctl", "is-active", SERVICE).stdout.strip() \
        == "active"
    row["passed"] = True


def test_hung_worker_is_restarted_by_the_watchdog(fleet: Fleet, report: Report):
    """worker3's main process stops mid-batch (SIGSTOP: alive, never looping again, as after
    a hang): systemd's watchdog aborts and restarts it, its tasks run again, nothing is lost."""
    cluster, vt = fleet.cluster, fleet.settings.visibility_timeout
    show = cluster.on("worker3", "systemctl", "show", SERVICE, "-p", "WatchdogUSec", "--value",
                      check=True).stdout.strip()
    assert show not in ("", "0", "infinity"), f"the worker unit has no watchdog ({show!r})"
    pid = cluster.main_pid("worker3")
    batch = batch_name("hang")
    numbers = fleet.submit(batch, range(30), seconds=2)
    held = fleet.wait_held("worker3", batch)
    assert held, "worker3 never ran a task of the batch"
    hung_at, hung_wall = time.monotonic(), time.time()

    def journal() -> str:
        return cluster.on("worker3", "journalctl", "-u", SERVICE, "--no-pager", "-o", "cat",
                          "--since", f"@{int(hung_wall) - 1}").stdout

    cluster.on("worker3", "kill", "-STOP", str(pid), check=True)
    fired = wait_until(lambda: "Watchdog timeout" in journal(), 90, step=1)
    # A hung process still takes signals: systemd's SIGABRT acts at once and Python prints
    # the stack (PYTHONFAULTHANDLER). A stopped one would wait for SIGCONT, so continue it
    # now, as the hang it stands for would be.
    cluster.on("worker3", "kill", "-CONT", str(pid))
    restarted = wait_until(lambda: cluster.main_pid("worker3") not in (0, pid), 60, step=0.5)
    resumed = fleet.consumes("worker3", timeout=60) if restarted is not None else None
    tally = fleet.finish(batch, numbers, timeout=vt + 45, cut_off_at=hung_wall)
    text = journal()
    row = report.scenario(
        "hang", "Worker main process hangs (SIGSTOP) mid-batch", tally,
        recovery_s=round(time.monotonic() - hung_at if resumed is None else
                         (fired or 0) + (restarted or 0) + resumed, 1),
        recovery_what="watchdog restart + worker3 consuming again", watchdog=show,
        watchdog_fired_s=None if fired is None else round(fired, 1),
        stack_in_journal="Fatal Python error: Aborted" in text,
        held_by="systemd WatchdogSec (pings from the worker's event loop); "
                "visibility_timeout reruns the tasks it held")
    assert fired is not None, f"no watchdog timeout within 90 s of the hang:\n{text[-2000:]}"
    assert restarted is not None, "systemd did not restart the hung worker"
    assert "Fatal Python error: Aborted" in text, text[-2000:]
    assert resumed is not None, "worker3 did not consume again after its restart"
    assert not tally.lost, f"lost: {tally.lost}"
    row["passed"] = True


def test_redis_sigkill_mid_batch(fleet: Fleet, report: Report):
    """SIGKILL redis-server mid-batch: systemd restarts it from its AOF; everything a client
    saw accepted runs; every worker consumes again within 30 s by itself; the CLI reports the
    submissions that failed during the outage instead of dropping them."""
    cluster = fleet.cluster
    pids = {w: cluster.main_pid(w) for w in fleet.workers()}
    batch, cli_batch = batch_name("redis-kill"), batch_name("redis-kill-cli")
    accepted: list[int] = []
    failed: list[int] = []
    stop = threading.Event()

    def submitter() -> None:
        for n in range(80):  # bounded: ~8 s at most plus retries
            if stop.is_set():
                break
            try:
                fleet.send(MARK, [batch, n, 1])
                accepted.append(n)
            except Exception:
                failed.append(n)
            time.sleep(0.1)

    # The CLI on client1 publishes a large batch on one connection while Redis dies.
    # --batch 1 (each task confirmed before the next) keeps it publishing for seconds; a
    # pipelined burst would be over before the kill.
    cli_count = 2000
    cli = subprocess.Popen(
        cluster.lab.ssh_argv("client1", "taskfleet", "submit", "mark", cli_batch, "0", "0",
                             "--count", str(cli_count), "--batch", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thread = threading.Thread(target=submitter)
    thread.start()
    started = time.monotonic()
    # Kill once the CLI's tasks are running (it is mid-burst) and the submitter has a few in.
    cli_running = wait_until(
        lambda: fleet.redis().llen(LEDGER_PREFIX + cli_batch) >= 50 and len(accepted) >= 10,
        30, step=0.05)
    cli_ran_at_kill = fleet.redis().llen(LEDGER_PREFIX + cli_batch)
    killed_at, killed_wall = time.monotonic(), time.time()
    cluster.on("redis1", "pkill", "-KILL", "-x", "redis-server", check=True)
    back = wait_until(lambda: redis_up(fleet), 60, step=0.2)
    thread.join(60)
    stop.set()
    cli_out, cli_err = cli.communicate(timeout=120)
    assert cli_running is not None, f"the CLI's tasks did not start running: {cli_err!r}"
    assert cli_ran_at_kill < cli_count, "the CLI was done before the kill: nothing tested"
    assert back is not None, "redis-server did not come back after SIGKILL (Restart=always?)"
    back_at = killed_at + back
    # Every worker consumes again within 30 s of Redis being back, without help.
    resume = {w: fleet.consumes(w, timeout=max(1.0, 30 - (time.monotonic() - back_at)))
              for w in fleet.workers()}
    resumed = {w: round(time.monotonic() - back_at, 1) if s is not None else None
               for w, s in resume.items()}
    tally = fleet.finish(batch, accepted, timeout=fleet.settings.visibility_timeout + 45,
                         cut_off_at=killed_wall, submitted=len(accepted))
    m = re.search(r"submitted (\d+)/(\d+)", cli_out)
    cli_accepted = int(m.group(1)) if m else -1
    cli_runs = wait_until(lambda: fleet.redis().llen(LEDGER_PREFIX + cli_batch) >= cli_accepted,
                          60)
    cli_ran = fleet.redis().llen(LEDGER_PREFIX + cli_batch)
    after = {w: cluster.main_pid(w) for w in fleet.workers()}
    row = report.scenario(
        "redis-kill", "Redis SIGKILL mid-batch (systemd restarts it)", tally,
        recovery_s=round(max([back, *[v or 99 for v in resumed.values()]]), 1),
        recovery_what="Redis back + every worker consuming again",
        redis_back_s=round(back, 1), workers_resumed_s=resumed,
        batch_done_s=round(tally.last_done() - killed_wall, 1) if tally.runs else None,
        failed_submissions=len(failed), workers_restarted=[w for w in pids if pids[w] != after[w]],
        cli={"count": cli_count, "accepted": cli_accepted, "ran": cli_ran, "exit": cli.returncode,
             "ran_at_kill": cli_ran_at_kill, "kill_after_s": round(killed_at - started, 1),
             "stderr": cli_err.strip()[-300:]},
        held_by="Restart=always; appendonly yes (AOF); broker_connection_retry; kombu BRPOP "
                "health check + socket_timeout; visibility_timeout returns interrupted tasks; "
                "app/transport.py records a task taken as Redis died once it is back")
    print(cli_out, cli_err)
    assert not tally.lost, f"accepted but never ran: {tally.lost}"
    assert all(v is not None and v <= 30 for v in resumed.values()), resumed
    # The CLI said how many it published; each of those ran; failures were reported.
    assert m, f"CLI printed no summary: {cli_out!r} {cli_err!r}"
    assert cli_runs is not None, f"CLI said {cli_accepted} accepted, only {cli_ran} ran"
    assert "Traceback" not in cli_err and fleet.password not in cli_out + cli_err
    if cli_accepted < cli_count:
        assert cli.returncode != 0 and "submissions failed" in cli_err, cli_err
    row["passed"] = True


def test_worker_partitioned_from_redis_for_60s(fleet: Fleet, report: Report):
    lab, vt = fleet.cluster.lab, fleet.settings.visibility_timeout
    pid = fleet.cluster.main_pid("worker1")
    batch = batch_name("partition")
    numbers = fleet.submit(batch, range(24), seconds=2)
    held = fleet.wait_held("worker1", batch)
    assert held, "worker1 never ran a task of the batch"
    cut_at = time.time()
    lab.partition("worker1")
    try:
        time.sleep(60)
    finally:
        lab.heal("worker1")
    healed = time.monotonic()
    resumed = fleet.consumes("worker1", timeout=90)
    tally = fleet.finish(batch, numbers, timeout=vt + 30, cut_off_at=cut_at)
    elsewhere = [t - cut_at for n in held if (t := tally.first_run(n)) is not None]
    row = report.scenario(
        "partition", "Worker partitioned from Redis for 60 s, then healed", tally,
        recovery_s=round(time.monotonic() - healed if resumed is None else resumed, 1),
        recovery_what="worker1 consuming again after the heal",
        held_elsewhere_s=round(max(elsewhere), 1) if elsewhere else None,
        restarted=fleet.cluster.main_pid("worker1") != pid,
        held_by="socket_timeout + kombu BRPOP health check drop the dead connection; "
                "broker_connection_retry reconnects (or the systemd watchdog restarts a worker "
                "that stays unconnected or stuck); visibility_timeout reruns held tasks")
    assert not tally.lost, f"lost: {tally.lost}"
    assert resumed is not None, "worker1 did not consume again within 90 s of the heal"
    row["passed"] = True


def test_redis_host_reboot_keeps_queued_tasks(fleet: Fleet, report: Report):
    """Tasks queued for a stopped worker survive a reboot of the Redis host (AOF); running
    workers reconnect by themselves."""
    cluster, lab = fleet.cluster, fleet.cluster.lab
    others = [w for w in fleet.workers() if w != "worker2"]
    pids = {w: cluster.main_pid(w) for w in others}
    cluster.on("worker2", "systemctl", "stop", SERVICE, check=True)
    batch = batch_name("redis-reboot")
    try:
        pinned = fleet.submit(batch, range(10), queue="host.worker2")
        shared = fleet.submit(batch, range(10, 20), seconds=1)
        down_at, down_wall = time.monotonic(), time.time()
        lab.stop("redis1")
        lab.start("redis1")
        back = wait_until(lambda: redis_up(fleet), 60)
        assert back is not None, "Redis did not come back after the reboot"
        back_s = time.monotonic() - down_at
        r = fleet.redis()
        queued = r.llen("host.worker2")
        assert queued == 10, f"{queued} of 10 tasks pinned to host.worker2 survived the reboot"
        resumed = {w: fleet.consumes(w, timeout=60) for w in others}
    finally:
        cluster.on("worker2", "systemctl", "start", SERVICE, check=True)
    tally = fleet.finish(batch, pinned + shared, timeout=fleet.settings.visibility_timeout + 45,
                         cut_off_at=down_wall)
    row = report.scenario(
        "redis-reboot", "Redis host reboot with tasks queued for a stopped worker", tally,
        recovery_s=round(back_s + max(v or 99 for v in resumed.values()), 1),
        recovery_what="reboot + running workers consuming again",
        redis_back_s=round(back_s, 1), queued_survived=queued,
        restarted=[w for w in others if cluster.main_pid(w) != pids[w]],
        held_by="appendonly yes + appendfsync everysec (AOF replayed at boot); "
                "broker_connection_retry (workers reconnect)")
    assert not tally.lost, f"lost: {tally.lost}"
    assert all(v is not None for v in resumed.values()), resumed
    row["passed"] = True


# --------------------------------------------------------------------------- security: secrets


def test_password_in_no_readable_file_log_output_or_git(fleet: Fleet, report: Report,
                                                        tmp_path: Path):
    """After all the faults above (reconnect errors are logged): the Redis password is in no
    file an unprivileged user can read, in no journal, not in `verify.yml -v`, not in git."""
    cluster = fleet.cluster
    row = report.check("password", "Redis password: not in world-readable files, journals, "
                       "playbook output (-v) or git history", "")
    dirs = "/etc /opt /var /home /root /tmp /run /srv /usr/local"

    def search(host: str) -> dict[str, Any]:
        # grep as `nobody`: exactly the files any local user could read. Pattern via stdin.
        proc = cluster.lab.ssh(
            host, "sh", "-c", f"runuser -u nobody -- grep -rlsF --devices=skip -f - {dirs}",
            check=False, input=fleet.password + "\n", timeout=120)
        # Exit 2 only means some files were unreadable to nobody (-s hides those messages).
        assert proc.returncode in (0, 1, 2), proc.stderr
        journal = cluster.lab.ssh(
            host, "sh", "-c", "f=$(mktemp); cat > \"$f\"; journalctl --no-pager -o cat "
            "| grep -cF -f \"$f\"; rm -f \"$f\"", check=False,
            input=fleet.password + "\n", timeout=120)
        return {"readable_files": proc.stdout.split(),
                "journal_lines": int(journal.stdout.strip() or 0)}

    # The hosts are searched at the same time, and verify.yml runs meanwhile: independent
    # reads, so only the wall time changes. (verify.yml's own log lines are not searched:
    # its output is checked below.)
    hosts = ("redis1", *fleet.workers(), "client1")
    with ThreadPoolExecutor(len(hosts) + 1) as pool:
        verifying = pool.submit(cluster.deploy, "-v", playbook="playbooks/verify.yml")
        found = dict(zip(hosts, pool.map(search, hosts), strict=True))
        verify = verifying.result()
    assert verify.rc == 0, verify.out[-3000:]
    pattern = tmp_path / "pattern"
    pattern.write_text(fleet.password + "\n")
    pattern.chmod(0o600)
    revs = subprocess.run(["git", "rev-list", "--all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.split()
    in_git = subprocess.run(["git", "grep", "-lF", "-f", str(pattern), *revs], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.split()
    leaks = {h: v for h, v in found.items() if v["readable_files"] or v["journal_lines"]}
    row["result"] = (f"{len(found)} hosts searched ({dirs}) as nobody, journals, verify.yml -v,"
                     f" {len(revs)} commits: " + ("no leak" if not leaks and not in_git
                                                  and fleet.password not in verify.out
                                                  else "LEAK"))
    assert not leaks, leaks
    assert fleet.password not in verify.out, "password printed by verify.yml -v"
    assert not in_git, in_git
    row["passed"] = True


# --------------------------------------------------------------------------- rolling update


RELEASE_TASK = '''

@app.task
def release() -> str:
    """Added by the fault suite's rolling-update scenario: which code version runs."""
    return "{token}"
'''


@dataclass
class Pinger:
    """Pings every second during a deploy: how many workers answered, when."""

    fleet: Fleet
    samples: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 900
        while not self.stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), len(self.fleet.ping(timeout=2.0))))
            time.sleep(0.5)


def app_src_var(cluster: Cluster) -> str:
    defaults = (REPO / "deploy/roles/taskfleet/defaults/main.yml").read_text()
    assert "taskfleet_app_src" in defaults, "the taskfleet role has no taskfleet_app_src"
    return "taskfleet_app_src"


def test_rolling_update_under_load(fleet: Fleet, report: Report, tmp_path: Path):
    """New app code deployed while tasks run: one worker host at a time, each with a warm
    shutdown, nothing lost, the new code answers. The next deploy (scale-in) restores the code."""
    cluster = fleet.cluster
    var = app_src_var(cluster)
    token = f"v2-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "app"
    shutil.copytree(REPO / "app", src, ignore=shutil.ignore_patterns("__pycache__"))
    with (src / "tasks.py").open("a") as f:
        f.write(RELEASE_TASK.format(token=token))
    before = {w: fleet.service(w) for w in fleet.workers()}
    since = host_time(cluster)
    batch = batch_name("rolling")
    numbers: list[int] = []
    stop = threading.Event()

    def load() -> None:
        for n in range(1800):  # one task every 0.5 s for the whole deploy, bounded
            if stop.is_set():
                return
            with contextlib.suppress(Exception):
                fleet.send(MARK, [batch, n, 1])
                numbers.append(n)
            time.sleep(0.5)

    pinger = Pinger(fleet)
    threads = [threading.Thread(target=load), threading.Thread(target=pinger.run)]
    for t in threads:
        t.start()
    try:
        CODE["modified"] = True
        run = cluster.deploy("-e", f"{var}={src}")
    finally:
        stop.set()
        pinger.stop.set()
        for t in threads:
            t.join(30)
    record_timing("deploy: rolling update", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    after = {w: fleet.service(w) for w in fleet.workers()}
    tally = fleet.finish(batch, numbers, timeout=fleet.settings.visibility_timeout + 45)
    # Restart windows: [ActiveExit, ActiveEnter] of each worker's service (monotonic clock of
    # the shared kernel); serial restarts never overlap.
    windows = sorted((int(after[w]["ActiveExitTimestampMonotonic"]),
                      int(after[w]["ActiveEnterTimestampMonotonic"]), w) for w in after)
    overlaps = [(a[2], b[2]) for a, b in itertools.pairwise(windows) if b[0] < a[1]]
    new_pid = {w: after[w]["MainPID"] != before[w]["MainPID"] for w in after}
    warm = {w: "Warm shutdown" in journal_since(cluster, w, since, "Warm shutdown")
            for w in after}
    answers = {}
    for w in fleet.workers():
        res = fleet.send("app.tasks.release", [], queue=f"host.{w}")
        with contextlib.suppress(Exception):
            answers[w] = res.get(timeout=30)
    min_alive = min((n for _, n in pinger.samples), default=0)
    row = report.scenario(
        "rolling", "Rolling update (new app code) under load", tally,
        recovery_s=round(run.seconds, 1), recovery_what="deploy duration (no outage)",
        restarts_overlap=overlaps, warm_shutdown=warm, new_code=answers == dict.fromkeys(
            answers, token) and len(answers) == len(after),
        min_workers_answering=min_alive,
        held_by="serial: 1 on the worker play; warm shutdown (TERM, TimeoutStopSec > hard "
                "limit); unacked messages requeued on close")
    assert not tally.lost, f"lost: {tally.lost}"
    assert all(new_pid.values()), f"not every worker was restarted: {new_pid}"
    assert not overlaps, f"workers restarted at the same time: {windows}"
    assert all(warm.values()), f"no warm shutdown logged: {warm}"
    assert answers == dict.fromkeys(fleet.workers(), token), answers
    row["passed"] = True


# --------------------------------------------------------------------------- scale in (last)


def test_scale_in_drains_a_worker(fleet: Fleet, report: Report):
    """playbooks/remove-worker.yml drains worker3 while a batch runs: it stops consuming,
    finishes or returns what it holds, stops; after the inventory change + deploy the firewall
    no longer admits it. Nothing lost."""
    cluster, lab = fleet.cluster, fleet.cluster.lab
    batch = batch_name("scale-in")
    numbers = fleet.submit(batch, range(40), seconds=1)
    fleet.submit(batch, range(100, 105), queue="host.worker3")
    start = time.monotonic()
    run = cluster.deploy("-e", "host=worker3", playbook="playbooks/remove-worker.yml")
    record_timing("remove-worker.yml", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    state = cluster.on("worker3", "systemctl", "is-active", SERVICE).stdout.strip()
    host_queue = fleet.redis().llen("host.worker3")
    # The documented second step: take the host out of the inventory and deploy, so the Redis
    # firewall stops admitting it.
    hosts = lab.inventory_path.read_text()
    lab.inventory_path.write_text(re.sub(r"(?m)^worker3 .*\n", "", hosts))
    # It also puts the repository's code back after the rolling-update scenario (one deploy
    # instead of two: CI time).
    redeploy = cluster.deploy()
    record_timing("deploy: after scale-in", redeploy.seconds)
    assert redeploy.rc == 0, redeploy.out[-4000:]
    CODE["modified"] = False
    redis_ip = lab.ip("redis1")
    probe = ("import socket,sys\ns=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{redis_ip}', 6379)) == 0 else 1)\n")
    admitted = cluster.on("worker3", "python3", "-c", probe).returncode == 0
    # host.worker3 keeps its 5 pinned messages on purpose: nobody consumes it any more.
    tally = fleet.finish(batch, numbers, timeout=fleet.settings.visibility_timeout + 45,
                         unconsumed=("host.worker3",))
    row = report.scenario(
        "scale-in", "Scale in: remove-worker.yml drains worker3 mid-batch", tally,
        recovery_s=round(time.monotonic() - start, 1),
        recovery_what="drain + inventory change + deploy",
        service_after=state, host_queue_left=host_queue, firewall_admits=admitted,
        held_by="cancel_consumer, warm shutdown, unacked requeued on close")
    assert not tally.lost, f"lost: {tally.lost}"
    assert state in ("inactive", "failed", "unknown") and state != "failed", state
    assert not admitted, "worker3 still reaches Redis after it left the inventory"
    row["passed"] = True
