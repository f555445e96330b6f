"""Faults on a deployed lab cluster: nothing the broker accepted is lost.

A worker host crashes, a worker hangs, Redis is SIGKILLed, a worker is cut off from Redis, the
Redis host reboots. Each scenario counts its batch in the ledger (faultkit.py) and files one row
of docs/RELIABILITY.md under its key.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from .faultkit import LEDGER_PREFIX, MARK, SERVICE, Fleet, Report, batch_name, redis_up, wait_until

pytestmark = pytest.mark.lab
STOCK_UNIT = "taskfleet-stock"
STOCK_WATCH_S = 8  # the stock side is watched for twice this after the crash
# Five times the dead-after time: the worker's tasks are handed back well before the heal.
PARTITION_S = 30


@contextlib.contextmanager
def stock_workers(fleet: Fleet, hosts: list[str]) -> Iterator[list[str]]:
    """Workers of kombu as shipped (TASKFLEET_HEARTBEAT_INTERVAL=0: no heartbeats, the
    production visibility timeout alone) beside the kit's, on queue `stock`, as transient
    units with the deployed code and env file; their node names. The env file's variables
    win over systemd's Environment=, so the override goes through env(1)."""
    nodes = [f"stock@{h}" for h in hosts]
    for host in hosts:
        fleet.cluster.on(host, "systemctl", "reset-failed", STOCK_UNIT)
        fleet.cluster.on(
            host, "systemd-run", f"--unit={STOCK_UNIT}", "--uid=taskfleet", "--gid=taskfleet",
            "--property=EnvironmentFile=/etc/taskfleet/taskfleet.env",
            "--property=WorkingDirectory=/var/lib/taskfleet", "--property=KillMode=mixed",
            "/usr/bin/env", "TASKFLEET_HEARTBEAT_INTERVAL=0", "/opt/taskfleet/venv/bin/celery",
            "--app", "app", "worker", f"--hostname=stock@{host}", "--queues=stock",
            "--without-gossip", "--without-mingle", "--concurrency=2", check=True)
    try:
        assert wait_until(lambda: set(nodes) <= set(fleet.answering()), 60), \
            f"stock workers not answering: {fleet.answering()}"
        yield nodes
    finally:
        for host in hosts:
            fleet.cluster.on(host, "systemctl", "stop", STOCK_UNIT)


def hand_back(fleet: Fleet, batch: str, numbers: list[int]) -> int:
    """Return the unacked messages of `batch` with these numbers to their queue, as kombu
    would after the visibility timeout; how many."""
    from kombu import Connection
    from kombu.utils.json import loads

    tags = []
    for tag, record in fleet.redis().hgetall("unacked").items():
        body = loads(record)[0]["body"]
        args = json.loads(base64.b64decode(body))[0]
        if args[0] == batch and args[1] in numbers:
            tags.append(tag)
    options = fleet.celery.conf.broker_transport_options
    with Connection(fleet.url, transport="app.transport:Transport",
                    transport_options=options) as conn:
        for tag in tags:
            conn.default_channel.qos.restore_by_tag(tag)
    return len(tags)


def test_worker_host_crash_loses_nothing(fleet: Fleet, report: Report):
    """worker1's host dies (SIGKILL of its init) while it runs tasks: its heartbeats stop, and
    its tasks run elsewhere within the dead-after time; the host comes back with its service.
    Side by side, in the same crash: workers of kombu as shipped (no heartbeats) on worker1 and
    worker2, whose tasks on worker1 wait for the visibility timeout (an hour)."""
    lab = fleet.cluster.lab
    batch, stock = batch_name("crash"), batch_name("crash-stock")
    with stock_workers(fleet, ["worker1", "worker2"]):
        numbers = fleet.submit(batch, range(30), seconds=2)
        stock_numbers = fleet.submit(stock, range(12), seconds=2, queue="stock")
        held = fleet.wait_held("worker1", batch)
        stock_held = fleet.wait_held("worker1", stock, node="stock@worker1")
        assert held, "worker1 never ran a task of the batch"
        assert stock_held, "stock@worker1 never ran a task of its batch"
        crashed_at = time.time()
        lab.crash("worker1")
        boot = threading.Thread(target=lab.start, args=("worker1",))
        boot.start()  # the host boots while the others work; its service must start by itself
        tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 45)
        # The stock side gets the same time and as long again: nothing hands its messages back.
        time.sleep(max(0.0, crashed_at + 2 * STOCK_WATCH_S - time.time()))
        stock_tally = fleet.wait_batch(stock, stock_numbers, timeout=0)
        stock_recovered = [n for n in stock_held if n in stock_tally.runs]
        returned = hand_back(fleet, stock, stock_held)
        stock_final = fleet.finish(stock, stock_numbers, timeout=60, unconsumed=("stock",))
        boot.join(120)
    recovered = [t - crashed_at for n in held if (t := tally.first_run(n)) is not None]
    recovery = round(max(recovered), 1) if len(recovered) == len(held) else None
    back = wait_until(lambda: "worker@worker1" in fleet.ping(), 60)
    # worker1's restart ran nothing twice:
    tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 15)
    bound = round(fleet.reclaim_s + 4, 1)
    row = report.scenario(
        "crash", "Worker host hard crash (SIGKILL of its init) mid-batch", tally,
        recovery_s=recovery, recovery_what=f"{len(held)} tasks held by worker1 ran elsewhere",
        bound_s=bound, held_by="task_acks_late + task_reject_on_worker_lost; heartbeats: "
        "worker1's messages go back once it is silent for taskfleet_dead_after",
        worker_back=back is not None)
    report.scenario(
        "crash-stock", "The same crash, kombu as shipped (no heartbeats, visibility timeout "
        f"{fleet.settings.visibility_timeout} s)", stock_final,
        recovery_s=None, recovery_what=f"{len(stock_held) - len(stock_recovered)} of "
        f"{len(stock_held)} tasks held by stock@worker1 not started again within "
        f"{2 * STOCK_WATCH_S} s; the suite handed them back by hand",
        held_by=f"visibility_timeout: back after {fleet.settings.visibility_timeout} s + a sweep",
        stranded=len(stock_held) - len(stock_recovered), handed_back=returned,
        passed=not stock_final.lost)
    assert not tally.lost, f"lost: {tally.lost}"
    assert recovery is not None and recovery <= bound, (recovery, bound)
    assert back is not None, "worker1's service did not come back after the host booted"
    assert fleet.cluster.on("worker1", "systemctl", "is-active", SERVICE).stdout.strip() \
        == "active"
    assert not stock_recovered, "kombu as shipped brought the tasks back: the comparison is void"
    row["passed"] = True


def test_hung_worker_is_restarted_by_the_watchdog(fleet: Fleet, report: Report):
    """worker3's main process stops mid-batch (SIGSTOP: alive, never looping again, as after
    a hang): its heartbeats stop, so its tasks run elsewhere within the dead-after time, and
    systemd's watchdog aborts and restarts it; nothing is lost."""
    cluster = fleet.cluster
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
    tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 45, reachable_at=hung_wall)
    elsewhere = [t - hung_wall for n in held
                 if (t := min((t for h, t in tally.runs.get(n, []) if h != "worker3"),
                              default=None)) is not None]
    text = journal()
    row = report.scenario(
        "hang", "Worker main process hangs (SIGSTOP) mid-batch", tally,
        recovery_s=round(time.monotonic() - hung_at if resumed is None else
                         (fired or 0) + (restarted or 0) + resumed, 1),
        recovery_what="watchdog restart + worker3 consuming again", watchdog=show,
        watchdog_fired_s=None if fired is None else round(fired, 1),
        stack_in_journal="Fatal Python error: Aborted" in text,
        held_elsewhere_s=round(max(elsewhere), 1) if len(elsewhere) == len(held) else None,
        held_by="heartbeats from the event loop stop: its tasks go back after "
                "taskfleet_dead_after; systemd WatchdogSec (pings from the same loop) restarts it")
    assert fired is not None, f"no watchdog timeout within 90 s of the hang:\n{text[-2000:]}"
    assert restarted is not None, "systemd did not restart the hung worker"
    assert "Fatal Python error: Aborted" in text, text[-2000:]
    assert resumed is not None, "worker3 did not consume again after its restart"
    assert not tally.lost, f"lost: {tally.lost}"
    assert len(elsewhere) == len(held) and max(elsewhere) <= fleet.reclaim_s + 4, elsewhere
    row["passed"] = True


def test_redis_sigkill_mid_batch(fleet: Fleet, report: Report):
    """SIGKILL redis-server mid-batch: systemd restarts it from its AOF; everything a client
    saw accepted runs; every worker consumes again within 30 s by itself; the CLI reports the
    submissions that failed during the outage instead of dropping them."""
    cluster = fleet.cluster
    pids = {w: cluster.main_pid(w) for w in fleet.workers()}
    batch, cli_batch = batch_name("redis-kill"), batch_name("redis-kill-cli")
    accepted: list[int] = []
    results: list[Any] = []
    failed: list[int] = []
    stop = threading.Event()

    def submitter() -> None:
        for n in range(80):  # bounded: ~8 s at most plus retries
            if stop.is_set():
                break
            try:
                results.append(fleet.send(MARK, [batch, n, 1]))
                accepted.append(n)
            except Exception:
                failed.append(n)
            time.sleep(0.1)

    # The CLI on client1 publishes a large batch on one connection while Redis dies, and
    # waits for every result. --batch 1 (each task confirmed before the next) keeps it
    # publishing for seconds; a pipelined burst would be over before the kill.
    cli_count = 2000
    cli = subprocess.Popen(
        cluster.lab.ssh_argv("client1", "taskfleet", "submit", "mark", cli_batch, "0", "0",
                             "--count", str(cli_count), "--batch", "1", "--wait",
                             "--timeout", "120"),
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
    # Every worker consumes again within 30 s of Redis being back, without help: a canary on
    # each host queue, sent at once (not after the CLI's batch, whose length under load
    # says nothing about the workers).
    canaries_at = time.monotonic()
    with ThreadPoolExecutor(len(fleet.workers())) as pool:
        resume = {w: pool.submit(fleet.consumes, w, 30) for w in fleet.workers()}
        thread.join(60)
        stop.set()
        cli_out, cli_err = cli.communicate(timeout=300)
        resumed = {w: None if (s := f.result()) is None
                   else round(canaries_at - (killed_at + (back or 0)) + s, 1)
                   for w, f in resume.items()}
    assert cli_running is not None, f"the CLI's tasks did not start running: {cli_err!r}"
    assert cli_ran_at_kill < cli_count, "the CLI was done before the kill: nothing tested"
    assert back is not None, "redis-server did not come back after SIGKILL (Restart=always?)"
    tally = fleet.finish(batch, accepted, timeout=fleet.reclaim_s + 60,
                         reachable_at=killed_wall + back, submitted=len(accepted))
    m = re.search(r"submitted (\d+)/(\d+)", cli_out)
    cli_accepted = int(m.group(1)) if m else -1
    cli_runs = wait_until(lambda: fleet.redis().llen(LEDGER_PREFIX + cli_batch) >= cli_accepted,
                          60)
    cli_ran = fleet.redis().llen(LEDGER_PREFIX + cli_batch)
    waited = re.search(r"done (\d+), failed (\d+), no result (\d+)", cli_out)
    states = Counter(r.state for r in results)
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
             "results": waited.group(0) if waited else None, "stderr": cli_err.strip()[-300:]},
        result_states=dict(states),
        held_by="Restart=always; appendonly yes (AOF); broker_connection_retry; kombu BRPOP "
                "health check + socket_timeout; heartbeats: tasks cancelled on the connection "
                "loss go back once their stamps are older than taskfleet_dead_after; "
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
    # Every accepted task's result came back, none a failure (the CLI waited for them).
    assert waited and waited.groups() == (str(cli_accepted), "0", "0"), cli_out
    assert states == Counter({"SUCCESS": len(results)}), states
    row["passed"] = True


def test_worker_partitioned_from_redis_for_30s(fleet: Fleet, report: Report):
    lab = fleet.cluster.lab
    pid = fleet.cluster.main_pid("worker1")
    batch = batch_name("partition")
    numbers = list(range(24))
    results = [fleet.send(MARK, [batch, n, 2]) for n in numbers]
    held = fleet.wait_held("worker1", batch)
    assert held, "worker1 never ran a task of the batch"
    cut_at = time.time()
    lab.partition("worker1")
    try:
        time.sleep(PARTITION_S)
    finally:
        lab.heal("worker1")
    healed, healed_wall = time.monotonic(), time.time()
    resumed = fleet.consumes("worker1", timeout=90)
    tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 60, reachable_at=healed_wall)
    elsewhere = [t - cut_at for n in held if (t := tally.first_run(n)) is not None]
    states = Counter(r.state for r in results)
    row = report.scenario(
        "partition", f"Worker partitioned from Redis for {PARTITION_S} s, then healed", tally,
        recovery_s=round(time.monotonic() - healed if resumed is None else resumed, 1),
        recovery_what="worker1 consuming again after the heal",
        held_elsewhere_s=round(max(elsewhere), 1) if elsewhere else None,
        restarted=fleet.cluster.main_pid("worker1") != pid, result_states=dict(states),
        held_by="socket_timeout + kombu BRPOP health check drop the dead connection; "
                "broker_connection_retry reconnects (or the systemd watchdog restarts a worker "
                "that stays unconnected or stuck); heartbeats: what it held runs elsewhere "
                "after taskfleet_dead_after")
    assert not tally.lost, f"lost: {tally.lost}"
    assert elsewhere and max(elsewhere) <= fleet.reclaim_s + 4, elsewhere
    assert resumed is not None, "worker1 did not consume again within 90 s of the heal"
    # A task that ran is never reported failed because its worker lost Redis for a while.
    assert states == Counter({"SUCCESS": len(results)}), states
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
        down_at = time.monotonic()
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
    tally = fleet.finish(batch, pinned + shared, timeout=fleet.reclaim_s + 60,
                         reachable_at=time.time())
    row = report.scenario(
        "redis-reboot", "Redis host reboot with tasks queued for a stopped worker", tally,
        recovery_s=round(back_s + max(v or 99 for v in resumed.values()), 1),
        recovery_what="reboot + running workers consuming again",
        redis_back_s=round(back_s, 1), queued_survived=queued,
        restarted=[w for w in others if cluster.main_pid(w) != pids[w]],
        held_by="appendonly yes + appendfsync always (AOF replayed at boot); "
                "broker_connection_retry (workers reconnect)")
    assert not tally.lost, f"lost: {tally.lost}"
    assert all(v is not None for v in resumed.values()), resumed
    row["passed"] = True
