"""Changes to a running cluster under load: a rolling update of the app code, then scale-in.

Rows `rolling` and `scale-in` of docs/RELIABILITY.md. The rolling update leaves modified code on
the workers (the `app_code` fixture knows); scale-in's deploy puts the repository's code back,
or the fixture does when the module ends. Scale-in takes worker3 away for good, so conftest
runs this file after every other suite that wants three workers.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .faultkit import MARK, SERVICE, AppCode, Fleet, Report, batch_name, host_time, journal_since
from .labkit import REPO, record_timing

pytestmark = pytest.mark.lab


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



def test_rolling_update_under_load(fleet: Fleet, report: Report, app_code: AppCode,
                                   tmp_path: Path):
    """New app code deployed while tasks run: one worker host at a time, each with a warm
    shutdown, nothing lost, the new code answers. The next deploy (scale-in) restores the code."""
    cluster = fleet.cluster
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
        run = app_code.deploy_modified(src)
    finally:
        stop.set()
        pinger.stop.set()
        for t in threads:
            t.join(30)
    record_timing("deploy: rolling update", run.seconds)
    assert run.rc == 0, run.out[-4000:]
    after = {w: fleet.service(w) for w in fleet.workers()}
    tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 45)
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


def test_scale_in_drains_a_worker(fleet: Fleet, report: Report, app_code: AppCode):
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
    app_code.deployed_original()
    redis_ip = lab.ip("redis1")
    probe = ("import socket,sys\ns=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{redis_ip}', 6379)) == 0 else 1)\n")
    admitted = cluster.on("worker3", "python3", "-c", probe).returncode == 0
    # host.worker3 keeps its 5 pinned messages on purpose: nobody consumes it any more.
    tally = fleet.finish(batch, numbers, timeout=fleet.reclaim_s + 45,
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
