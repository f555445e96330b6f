"""Harness of the reliability suites (test_faults, test_security_lab, test_changes).

Every scenario submits a numbered batch of `app.tasks.mark` tasks. `mark` appends
"<n>@<host>@<time>" to the Redis list taskfleet:ledger:<batch> each time it runs, so afterwards
the ledger says which numbers never ran (lost) and which ran more than once (duplicated). A
scenario is a test function taking the `fleet` and `report` fixtures (conftest.py): it submits
through the Fleet, tallies with Fleet.finish (which ends as soon as the evidence is complete,
not after a fixed wait), and files one row under its key with Report.scenario. The session's
rows go to .cache/reliability.json, and tests/lab/reliability.py renders docs/RELIABILITY.md
from them once, when the session ends.

The shared lab the suites expect: redis1, worker1..worker3, client1, spare1, with the
production task settings (conftest's TEST_GROUP_VARS): recovery waits are bounded by the
heartbeats' dead-after time, not by the hour-long visibility timeout.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from . import reliability
from .labkit import LAB_NAME, REPO, DeployedLab, Run, record_timing

MARK = "app.tasks.mark"
LEDGER_PREFIX = "taskfleet:ledger:"
WORKERS = ("worker1", "worker2", "worker3")
SERVICE = "taskfleet-worker"
# A `mark` task cut off from Redis retries its ledger write with at most 2 s between tries
# (app/connection.retry_until_back) and gives up after 60 s. So once Redis is reachable again
# for it, its write lands within seconds, or never: no run can appear later than this.
LATE_WRITES_S = 10


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

    def __init__(self, cluster: DeployedLab) -> None:
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
        # Seconds until a dead worker's messages are back in their queue: the heartbeats'
        # dead-after time plus a heartbeat and a sweep interval.
        self.reclaim_s = self.settings.dead_after + 2 * self.settings.heartbeat_interval

    def redis(self, timeout: float = 5.0):
        """A client of Redis (of the primary the Sentinels name now, in the HA tier)."""
        import redis

        if self.settings.sentinel:
            from app.connection import client

            return client(self.url, timeout, **self.settings.sentinel_args,
                          decode_responses=True)
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
               reachable_at: float | None = None, submitted: int | None = None,
               unconsumed: tuple[str, ...] = ()) -> Tally:
        """The batch's final tally, read as soon as no further run of its numbers can appear.

        A number runs again only if (a) its message still waits in a queue or is held in the
        `unacked` hash (by a worker, or of a dead one until the sweep hands it back), or (b) a
        task cut off from Redis (a partition or Redis outage) still writes its run once Redis
        is reachable again at `reachable_at` (wall clock): within LATE_WRITES_S of it. A
        crashed or stopped worker runs nothing more, so it needs no (b) window. So: every
        number ran, the broker is idle and the window is over; the ledger is read after the
        broker was seen idle (a task is acknowledged only after its write). At `timeout` the
        tally says what is missing.
        """
        deadline = time.monotonic() + timeout
        quiet_at = (reachable_at + LATE_WRITES_S) if reachable_at is not None else 0
        while True:
            idle = self.broker_idle(unconsumed)
            tally = self.wait_batch(batch, expected, timeout=0, submitted=submitted)
            if idle and not tally.lost and time.time() >= quiet_at:
                return tally
            if time.monotonic() > deadline:
                if tally.lost:  # shown with a failed test's captured output
                    print(f"whereabouts of the lost numbers of {batch}: "
                          f"{self.whereabouts(batch, tally.lost)}; the workers' own view: "
                          f"{self.requests_of(batch)}")
                return tally
            time.sleep(0.5)

    def requests_of(self, batch: str) -> dict[str, dict[str, list[Any]]]:
        """The batch's tasks each worker reports as active, reserved or scheduled."""
        inspect = self.celery.control.inspect(timeout=5)
        out: dict[str, dict[str, list[Any]]] = {}
        for state in ("active", "reserved", "scheduled"):
            for node, tasks in (getattr(inspect, state)() or {}).items():
                mine = [t.get("args") or t.get("request", {}).get("args") for t in tasks]
                out.setdefault(node, {})[state] = [a for a in mine if a and a[0] == batch]
        return out

    @staticmethod
    def stamp_ages(r: Any, tags: list[str]) -> dict[str, str]:
        """Each tag's stamp age by Redis's clock, read twice 2 s apart: a record its holder
        keeps re-stamping stays young."""
        if not tags:
            return {}

        def ages() -> dict[str, float | None]:
            seconds, micros = r.time()
            now = seconds + micros / 1e6
            return {tag: None if (score := r.zscore("unacked_index", tag)) is None
                    else round(now - score, 1) for tag in tags}

        first = ages()
        time.sleep(2)
        second = ages()
        return {tag: f"stamp age {first[tag]} s, 2 s later {second[tag]} s" for tag in tags}

    def unacked(self, limit: int = 20) -> list[str]:
        """Every record in the unacked hash (up to `limit`): its task, owner and stamp ages."""
        r = self.redis()
        tags = r.hkeys("unacked")[:limit]
        out = []
        for tag, ages in self.stamp_ages(r, tags).items():
            task = re.search(r'"task": "([^"]*)"', r.hget("unacked", tag) or "")
            out.append(f"{tag}: task {task.group(1) if task else '?'}, owner "
                       f"{r.hget('unacked_owner', tag) or '(none)'}, {ages}")
        return out

    def whereabouts(self, batch: str, numbers: list[int]) -> dict[int, list[str]]:
        """Where Redis holds the messages of `numbers` of `batch`: a list (queue, staging
        list), or the unacked hash with the record's owner and stamp ages."""
        r = self.redis()
        found: dict[int, list[str]] = {n: [] for n in numbers}

        def numbers_in(payload: str) -> list[int]:
            return [n for n in numbers if f"'{batch}', {n}," in payload]  # its argsrepr header

        for key in r.scan_iter(count=1000, _type="list"):
            for payload in r.lrange(key, 0, -1):
                for n in numbers_in(payload):
                    found[n].append(f"list {key}")
        records = {tag: record for tag, record in r.hgetall("unacked").items()
                   if numbers_in(record)}
        for tag, ages in self.stamp_ages(r, list(records)).items():
            for n in numbers_in(records[tag]):
                found[n].append(f"unacked by {r.hget('unacked_owner', tag) or '(no owner)'}, "
                                 f"{ages}")
        return found

    # -- the workers

    def workers(self) -> list[str]:
        return [w for w in self.cluster.workers() if w in WORKERS]

    def active_numbers(self, worker: str, batch: str, node: str | None = None) -> list[int]:
        """Numbers of `batch` the worker (or node, e.g. stock@worker1) is running right now
        (Celery remote control)."""
        node = node or f"worker@{worker}"
        reply = self.celery.control.inspect(destination=[node], timeout=1.0).active() or {}
        return sorted(t["args"][1] for t in reply.get(node, [])
                      if t.get("name") == MARK and t["args"][0] == batch)

    def wait_held(self, worker: str, batch: str, timeout: float = 20,
                  node: str | None = None) -> list[int]:
        """Wait until `worker` (or `node`) runs tasks of `batch`; their numbers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                held = self.active_numbers(worker, batch, node)
                if held:
                    return held
            time.sleep(0.2)
        return []

    def ping(self, timeout: float = 1.0) -> list[str]:
        replies = self.celery.control.ping(timeout=timeout) or []
        return sorted(node for reply in replies for node in reply)

    def answering(self) -> list[str]:
        """The nodes answering a ping; none while the broker connection fails (a suite may
        start right after another one's Redis fault)."""
        try:
            return self.ping()
        except Exception:
            return []

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


def journal_since(cluster: DeployedLab, host: str, since: str, grep: str) -> str:
    return cluster.on(host, "sh", "-c",
                      f"journalctl -u {SERVICE} --since '{since}' --no-pager -o cat "
                      f"| grep -E '{grep}' | tail -n 5", check=False).stdout


def host_time(cluster: DeployedLab) -> str:
    return cluster.on("redis1", "date", "+%Y-%m-%d %H:%M:%S", check=True).stdout.strip()


# --------------------------------------------------------------------------- results


@dataclass
class Report:
    """The rows of one session: every scenario and security check that ran, whichever file
    it is in. conftest's `report` fixture saves and renders them once, at the end."""

    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    security: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Time spent in the suites (each module from its fleet being ready to its end): adding
    # worker3 when a suite runs without the deployment tests is not part of it.
    seconds: float = 0.0
    # The lab whose settings head the page: the shared one once a suite used it.
    cluster: DeployedLab | None = None

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds += time.monotonic() - start

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

    def save(self, cluster: DeployedLab) -> None:
        """Merge the rows into .cache/reliability.json and render the page. The shared lab's
        settings head the page; a module with a lab of its own saves while its lab stands,
        and its settings are used only when none are stored yet."""
        head = cluster.lab.name == LAB_NAME
        if head:
            record_timing("fault suite", self.seconds)
        fleet = Fleet(cluster)
        s = fleet.settings
        reliability.save(self.scenarios, self.security, {
            "task_time_limit": s.task_time_limit, "task_soft_time_limit": s.task_soft_time_limit,
            "visibility_timeout": s.visibility_timeout,
            "heartbeat_interval": s.heartbeat_interval, "dead_after": s.dead_after,
            "unacked_restore_interval":
                fleet.celery.conf.broker_transport_options["unacked_restore_interval"],
            "worker_prefetch_multiplier": s.worker_prefetch_multiplier,
            "watchdog_sec": cluster.on("worker1", "systemctl", "show", SERVICE, "-p",
                                       "WatchdogUSec", "--value").stdout.strip() or "?",
            "suite_seconds": round(self.seconds, 1),
        }, head=head)
        reliability.render()


# --------------------------------------------------------------------------- the app code


class AppCode:
    """Which app code the workers run: the repository's, or a modified copy a test deployed.

    conftest's module-scoped `app_code` fixture deploys the repository's code again when the
    module ends if a test left the modified code on the workers."""

    VAR = "taskfleet_app_src"

    def __init__(self, cluster: DeployedLab) -> None:
        self.cluster = cluster
        self.modified = False

    def deploy_modified(self, src: Path) -> Run:
        """Deploy the app at `src` instead of the repository's `app/`."""
        defaults = (REPO / "deploy/roles/taskfleet/defaults/main.yml").read_text()
        assert self.VAR in defaults, f"the taskfleet role has no {self.VAR}"
        self.modified = True
        return self.cluster.deploy("-e", f"{self.VAR}={src}")

    def deployed_original(self) -> None:
        """A deploy of the repository's code succeeded (another test's, to save one)."""
        self.modified = False

    def restore(self) -> None:
        if self.modified:
            run = self.cluster.deploy()
            record_timing("deploy: restore the original code", run.seconds)
            self.modified = run.rc != 0
