"""Faults on a deployed lab cluster: nothing the broker accepted is lost.

A worker host crashes, a worker hangs, Redis is SIGKILLed, a worker is cut off from Redis, the
Redis host reboots. Each scenario counts its batch in the ledger (faultkit.py) and files one row
of docs/RELIABILITY.md under its key.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from .faultkit import LEDGER_PREFIX, MARK, SERVICE, Fleet, Report, batch_name, redis_up, wait_until

pytestmark = pytest.mark.lab


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
