"""The measurements: the two sides (kit and baseline), which workers serve a run, the timed runs.

Worker hosts are picked without SSH: every run gets its own queue name and remote control
(`add_consumer` / `cancel_consumer`) attaches it to the first 1, 2 or 3 workers of each side.

Figures (each --repeat times; median, min and max):
  throughput   N noop tasks submitted and all results collected, tasks/s end to end
  fire         N noop tasks with ignore_result, tasks/s until the queue is empty and the workers'
               own counters (inspect stats) show all N started
  efficiency   sleep(0.1) tasks, rounds x C of them, C = total concurrency of the chosen
               workers: achieved rate / (C x 10/s)
  latency      one task at a time, client -> worker -> client, p50/p99 (on a client host when
               the inventory has one: bench.probe)
  scaling      throughput and efficiency with 1, 2 and 3 worker hosts
  replicas     the HA tier only: what waiting for a replica (TASKFLEET_PUBLISH_REPLICAS, Redis
               WAIT) costs a publish, kit with and without it in turns: a burst of `fire`
               tasks (tasks/s) and `samples` single publishes (ms each), to a queue no worker
               consumes (dropped after)
  fsync        what the AOF policy costs: the kit's throughput and fire-and-forget runs at the
               most hosts with Redis's `appendfsync always` (the role's default: a write is on
               disk before Redis answers it) and `everysec`, in turns within each repeat; set
               with CONFIG SET by the operators' ACL user, and set back after
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import BenchError, log
from .machine import CpuMeter

SLEEP_SECONDS = 0.1
# The fsync part's Redis AOF policies, the default first (deploy/roles/redis).
FSYNC_POLICIES = ("always", "everysec")


@dataclass(frozen=True)
class Sizes:
    tasks: int       # throughput: noop tasks with results per run
    fire: int        # fire-and-forget: noop tasks per run
    rounds: int      # efficiency: sleep tasks per unit of concurrency
    samples: int     # latency: round trips
    repeat: int


FULL = Sizes(tasks=500, fire=1000, rounds=20, samples=200, repeat=3)
QUICK = Sizes(tasks=100, fire=200, rounds=5, samples=20, repeat=1)


def summary(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated runs."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "values": [round(v, 4) for v in values]}


def ratio(kit: dict[str, Any] | None, base: dict[str, Any] | None) -> float | None:
    if not kit or not base or not base["median"]:
        return None
    return round(kit["median"] / base["median"], 3)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]



@dataclass
class Node:
    name: str          # Celery node name, e.g. worker@worker1
    host: str          # the part after @
    concurrency: int   # pool processes/threads (inspect stats: pool.max-concurrency)


@dataclass
class Side:
    """One way of running the work: the kit or the baseline."""

    label: str
    app: Any
    noop: Any
    sleep: Any
    batched: bool                   # kit: pipelined publishing + collective result wait
    nodes: list[Node] = field(default_factory=list)

    # -- worker selection via remote control ---------------------------------------------
    def attach(self, queue: str, nodes: list[Node]) -> None:
        names = [n.name for n in nodes]
        replies = self.app.control.add_consumer(queue, destination=names, reply=True,
                                                timeout=5.0)
        got = {name for r in replies or [] for name in r}
        if got != set(names):
            raise BenchError(f"{self.label} workers {sorted(set(names) - got)} did not take "
                             f"queue {queue}: are they running and reachable?")

    def detach(self, queue: str, nodes: list[Node]) -> None:
        self.app.control.cancel_consumer(queue, destination=[n.name for n in nodes],
                                         reply=True, timeout=5.0)

    def started_count(self, nodes: list[Node], task_name: str) -> int:
        """Tasks of `task_name` the workers have started since they booted (their counters)."""
        stats = self.app.control.inspect(destination=[n.name for n in nodes], timeout=5.0,
                                         limit=len(nodes)).stats() or {}
        if len(stats) < len(nodes):
            raise BenchError(f"{self.label} workers did not answer inspect stats")
        return sum(int(s.get("total", {}).get(task_name, 0)) for s in stats.values())

    def cpu_seconds(self, nodes: list[Node]) -> float:
        """CPU time (user + system) the workers' main processes have used since they started."""
        stats = self.app.control.inspect(destination=[n.name for n in nodes], timeout=5.0,
                                         limit=len(nodes)).stats() or {}
        return sum(float(s.get("rusage", {}).get("utime", 0))
                   + float(s.get("rusage", {}).get("stime", 0)) for s in stats.values())

    # -- submitting --------------------------------------------------------------------------
    @contextlib.contextmanager
    def publisher(self, burst: bool = True) -> Iterator[Callable[..., Any]]:
        """A function send(task, args, queue, ignore_result) -> AsyncResult.

        kit: one producer (one connection) for the whole burst, publishes buffered in a Redis
        pipeline, flushed every BATCH commands and at the end of the burst (burst=False: the
        same held producer, each publish sent at once -- for one-at-a-time round trips).
        baseline: a plain apply_async() per task, as `.delay()` does.
        """
        if not self.batched:
            def send_one(task: Any, args: tuple[Any, ...], queue: str,
                         ignore_result: bool = False) -> Any:
                return task.apply_async(args, queue=queue, ignore_result=ignore_result)
            yield send_one
            return
        from app.publish import BATCH, BatchPublisher

        # The same publisher `taskfleet submit --count` uses (app/publish.py).
        with BatchPublisher(self.app, BATCH if burst else 1) as pub:
            def send_batched(task: Any, args: tuple[Any, ...], queue: str,
                             ignore_result: bool = False) -> Any:
                return pub.send(task, args, queue=queue, ignore_result=ignore_result)
            yield send_batched

    def collect(self, results: list[Any], timeout: float) -> None:
        """Wait for every result; raise if one failed.

        Both sides wait the same way: each task's result channel was subscribed when it was
        sent, results arriving for other tasks are buffered, so get() in order costs one
        pub/sub read per result. (ResultSet.join_native looks like the bulk path, but with the
        Redis backend of Celery 5.7 it polls MGET and sleeps `interval`, 0.5 s, between polls:
        slower for bursts.)
        """
        deadline = time.monotonic() + timeout
        for r in results:
            r.get(timeout=max(1.0, deadline - time.monotonic()))

    def forget(self, results: list[Any]) -> None:
        """Delete result keys after a run (outside the timing) so Redis does not fill up."""
        backend = self.app.backend
        keys = [backend.get_key_for_task(r.id) for r in results]
        for i in range(0, len(keys), 1000):
            backend.client.delete(*keys[i:i + 1000])


def drop_queue(app: Any, q: str) -> None:
    """A run's queue is never used again: drop it (and anything a failed run left in it) and
    kombu's exchange-binding sets for it, so runs leave no keys behind."""
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete(
            q, f"_kombu.binding.{q}", f"_kombu.binding_permanent.{q}")


def make_sides(with_baseline: bool) -> tuple[Side, Side | None]:
    from app.celery import app
    from app.tasks import noop, sleep

    from . import baseline

    kit = Side("kit", app, noop, sleep, batched=True)
    base = (Side("baseline", baseline.app, baseline.noop, baseline.sleep, batched=False)
            if with_baseline else None)
    return kit, base


def discover(side: Side, prefix: str | None, exclude: str | None, want: int,
             wait: float = 0.0) -> list[Node]:
    """Workers of one side (by node-name prefix), sorted by host; waits up to `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        stats = side.app.control.inspect(timeout=2.0).stats() or {}
        nodes = []
        for name, s in stats.items():
            if (prefix and not name.startswith(prefix)) or (exclude and name.startswith(exclude)):
                continue
            pool = s.get("pool", {})
            conc = pool.get("max-concurrency", 1) if isinstance(pool, dict) else 1
            nodes.append(Node(name, name.split("@", 1)[-1], int(conc)))
        nodes.sort(key=lambda n: n.host)
        if len(nodes) >= want or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def find_kit(kit: Side, hosts: int) -> None:
    """The kit's workers (at most `hosts`, first by host name); fail if none answers."""
    kit.nodes = discover(kit, None, "baseline@", 1)[:hosts]
    if not kit.nodes:
        raise BenchError("no Taskfleet workers answered: deploy the cluster and check "
                         "`python -m app status`")


def find_baseline(base: Side, kit: Side, want: int) -> None:
    """Baseline workers on the kit's hosts, waiting up to 90 s for `want` of them."""
    base.nodes = discover(base, "baseline@", None, want, wait=90)
    wanted = {n.host for n in kit.nodes}
    base.nodes = [n for n in base.nodes if n.host in wanted] or base.nodes
    if len(base.nodes) < want:
        raise BenchError(f"only {len(base.nodes)} baseline worker(s) answered "
                         f"(want {len(kit.nodes)})")


class Bench:
    def __init__(self, kit: Side, base: Side | None, sizes: Sizes, run_id: str) -> None:
        self.kit = kit
        self.base = base
        self.sizes = sizes
        self.run_id = run_id
        self.phases: dict[str, Any] = {}

    def queue(self, side: Side, what: str) -> str:
        return f"bench.{self.run_id}.{side.label}.{what}"

    @contextlib.contextmanager
    def on(self, side: Side, nodes: list[Node], what: str) -> Iterator[str]:
        """A fresh queue served by exactly `nodes` for the duration of the block."""
        q = self.queue(side, what)
        side.attach(q, nodes)
        try:
            yield q
        finally:
            side.detach(q, nodes)
            drop_queue(side.app, q)

    def warm(self, side: Side, q: str) -> None:
        """A few tasks first so connections and pools exist before the clock starts."""
        with side.publisher() as send:
            results = [send(side.noop, (), q) for _ in range(10)]
        side.collect(results, timeout=30)
        side.forget(results)

    def throughput(self, side: Side, q: str, nodes: list[Node], n: int,
                   phase: str = "throughput") -> float:
        # Where the time goes, read around (not inside) the timed part: the workers' own CPU
        # counters (main process: consumer, Redis I/O, events; prefork children not included)
        # and this client's CPU, per task.
        worker_cpu0 = side.cpu_seconds(nodes)
        cpu = CpuMeter(side.app)
        t0 = time.perf_counter()
        with side.publisher() as send:
            results = [send(side.noop, (), q) for _ in range(n)]
        t1 = time.perf_counter()
        side.collect(results, timeout=max(60.0, n / 20))
        t2 = time.perf_counter()
        used = cpu.per_task(n)
        worker_cpu1 = side.cpu_seconds(nodes)
        side.forget(results)
        self.phases.setdefault(f"{phase}.{side.label}", []).append({
            "submit_s": round(t1 - t0, 4), "collect_s": round(t2 - t1, 4),
            "wall_ms_per_task": round((t2 - t0) / n * 1000, 3),
            "worker_main_cpu_ms_per_task": round((worker_cpu1 - worker_cpu0) / n * 1000, 3),
            **used})
        return n / (t2 - t0)

    def fire(self, side: Side, q: str, nodes: list[Node], n: int, phase: str = "fire") -> float:
        name = side.noop.name
        before = side.started_count(nodes, name)
        cpu = CpuMeter(side.app)
        with side.app.connection_for_write() as conn:
            redis = conn.default_channel.client
            t0 = time.perf_counter()
            with side.publisher() as send:
                for _ in range(n):
                    send(side.noop, (), q, ignore_result=True)
            t1 = time.perf_counter()
            deadline = time.monotonic() + max(60.0, n / 20)
            while True:
                # Cheap check first (queue length), the workers' counters only once it is empty:
                # a prefetched message is out of the list but not yet run.
                if redis.llen(q) == 0 and side.started_count(nodes, name) - before >= n:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{side.label}: fire-and-forget tasks not drained in time")
                time.sleep(0.005)
            t2 = time.perf_counter()
        self.phases.setdefault(f"{phase}.{side.label}", []).append(
            {"submit_s": round(t1 - t0, 4), "drain_after_submit_s": round(t2 - t1, 4),
             **cpu.per_task(n)})
        return n / (t2 - t0)

    def efficiency(self, side: Side, q: str, nodes: list[Node]) -> tuple[float, int]:
        conc = sum(n.concurrency for n in nodes)
        m = conc * self.sizes.rounds
        t0 = time.perf_counter()
        with side.publisher() as send:
            results = [send(side.sleep, (SLEEP_SECONDS,), q) for _ in range(m)]
        side.collect(results, timeout=60 + m * SLEEP_SECONDS)
        elapsed = time.perf_counter() - t0
        side.forget(results)
        return (m / elapsed) / (conc / SLEEP_SECONDS), conc

    def latency(self, side: Side, q: str) -> list[float]:
        out = []
        with side.publisher(burst=False) as send:  # one task in flight: nothing to batch
            for _ in range(self.sizes.samples):
                t0 = time.perf_counter()
                r = send(side.noop, (), q)
                r.get(timeout=30)
                out.append((time.perf_counter() - t0) * 1000)
                side.forget([r])
        return out

    # kit and baseline alternate inside each repeat, so drift (a noisy neighbour, a warm
    # cache) hits both sides alike.
    def sides(self) -> list[Side]:
        return [self.kit] + ([self.base] if self.base else [])

    def per_hosts(self, k: int, parts: set[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"hosts": k}
        vals: dict[str, dict[str, list[float]]] = {}
        conc: dict[str, int] = {}
        for side in self.sides():
            nodes = side.nodes[:k]
            with self.on(side, nodes, f"k{k}") as q:
                self.warm(side, q)
                for _ in range(self.sizes.repeat):
                    if "throughput" in parts:
                        log(f"{side.label}: throughput, {k} host(s), {self.sizes.tasks} tasks")
                        vals.setdefault("throughput", {}).setdefault(side.label, []).append(
                            self.throughput(side, q, nodes, self.sizes.tasks))
                    if "fire" in parts:
                        log(f"{side.label}: fire-and-forget, {k} host(s), {self.sizes.fire} tasks")
                        vals.setdefault("fire", {}).setdefault(side.label, []).append(
                            self.fire(side, q, nodes, self.sizes.fire))
                    if "efficiency" in parts:
                        log(f"{side.label}: efficiency, {k} host(s)")
                        eff, conc[side.label] = self.efficiency(side, q, nodes)
                        vals.setdefault("efficiency", {}).setdefault(side.label, []).append(eff)
        for part, by_side in vals.items():
            kit = summary(by_side["kit"])
            base = summary(by_side["baseline"]) if "baseline" in by_side else None
            row[part] = {"kit": kit, "baseline": base, "ratio": ratio(kit, base)}
            if part == "efficiency":
                row[part]["concurrency"] = conc
        return row

    def latency_part(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.sizes.samples * self.sizes.repeat}
        for side in self.sides():
            nodes = side.nodes[:1]
            with self.on(side, nodes, "lat") as q:
                self.warm(side, q)
                log(f"{side.label}: latency to {nodes[0].name}")
                ms: list[float] = []
                for _ in range(self.sizes.repeat):
                    ms += self.latency(side, q)
            out[side.label] = {"p50_ms": round(percentile(ms, 50), 3),
                               "p99_ms": round(percentile(ms, 99), 3),
                               "worker": nodes[0].name}
        return out

    def fsync_part(self, admin: Any) -> dict[str, Any]:
        """The kit under each AOF fsync policy in turn (see the module doc). `admin`: a redis-py
        client of the broker's Redis (the primary, with Sentinel) allowed CONFIG and INFO."""
        nodes = self.kit.nodes
        was = admin.config_get("appendfsync")["appendfsync"]
        runs: dict[str, dict[str, list[float]]] = {p: {"throughput": [], "fire": []}
                                                   for p in FSYNC_POLICIES}
        # Redis counts the fsyncs `everysec` postponed because the disk was slow: writes it
        # answered while they sat in its own buffer, which a crash then loses.
        postponed = dict.fromkeys(FSYNC_POLICIES, 0)

        def delayed() -> int:
            return int(admin.info("persistence").get("aof_delayed_fsync", 0))

        try:
            with self.on(self.kit, nodes, "fsync") as q:
                self.warm(self.kit, q)
                for _ in range(self.sizes.repeat):
                    for policy in FSYNC_POLICIES:
                        admin.config_set("appendfsync", policy)
                        before = delayed()
                        log(f"fsync {policy}: throughput {self.sizes.tasks} tasks, "
                            f"fire-and-forget {self.sizes.fire}")
                        runs[policy]["throughput"].append(self.throughput(
                            self.kit, q, nodes, self.sizes.tasks, phase=f"fsync.{policy}"))
                        runs[policy]["fire"].append(self.fire(
                            self.kit, q, nodes, self.sizes.fire, phase=f"fsync.{policy}"))
                        postponed[policy] += delayed() - before
        finally:
            admin.config_set("appendfsync", was)
        out: dict[str, Any] = {"hosts": len(nodes), "policy_before": was,
                               "postponed_fsyncs": postponed}
        for part in ("throughput", "fire"):
            always, everysec = summary(runs["always"][part]), summary(runs["everysec"][part])
            out[part] = {"always": always, "everysec": everysec,
                         "ratio": ratio(always, everysec)}
        return out


def _noop() -> None:
    """The task the replicas part publishes (nothing consumes it)."""


def replicas_part(sizes: Sizes, run_id: str) -> dict[str, Any]:
    """Publishing with and without WAIT, alternating in each repeat (see the module doc)."""
    from dataclasses import replace

    from celery import Celery

    from app.config import celery_settings, get_settings
    from app.publish import BATCH, BatchPublisher

    s = get_settings()
    if not s.sentinel:
        return {"skipped": "no replicas: the HA tier ([redis_replicas]) is not deployed"}
    wait = s.publish_replicas or 1
    q = f"bench.{run_id}.replicas"
    sides = {}
    for n in (0, wait):
        app = Celery(f"bench-replicas-{n}", set_as_current=False)
        app.config_from_object(celery_settings(replace(s, publish_replicas=n)))
        sides[n] = (app, app.task(name="bench.replicas.noop", shared=False)(_noop))
    burst: dict[int, list[float]] = {n: [] for n in sides}
    single: dict[int, list[float]] = {n: [] for n in sides}
    try:
        for _ in range(sizes.repeat):
            for n, (app, task) in sides.items():
                log(f"replicas: WAIT {n}, a burst of {sizes.fire} and {sizes.samples} singles")
                t0 = time.perf_counter()
                with BatchPublisher(app, BATCH) as pub:
                    for _ in range(sizes.fire):
                        pub.send(task, (), queue=q, ignore_result=True)
                burst[n].append(sizes.fire / (time.perf_counter() - t0))
                with BatchPublisher(app, 1) as pub:
                    for _ in range(sizes.samples):
                        t0 = time.perf_counter()
                        pub.send(task, (), queue=q, ignore_result=True)
                        single[n].append((time.perf_counter() - t0) * 1000)
    finally:
        drop_queue(sides[0][0], q)
    waited, plain = summary(burst[wait]), summary(burst[0])
    return {"replicas": wait, "batch": BATCH,
            "burst": {"wait": waited, "no_wait": plain, "ratio": ratio(waited, plain)},
            "single_ms": {side: {"p50": round(percentile(ms, 50), 3),
                                 "p99": round(percentile(ms, 99), 3)}
                          for side, ms in (("wait", single[wait]), ("no_wait", single[0]))}}
