"""Messages held for longer than the visibility timeout, on a small lab of their own.

redis1, worker1 (Debian 12) and worker2 (Debian 13), deployed by deploy.yml with the production
settings except a 10 s visibility timeout. Without heartbeats kombu hands a message out again
once it has been held for that long (celery#6236, #5935); with them the timeout no longer bounds
how long a live worker holds a message, so an ETA task and a task running 3x the timeout each
run exactly once. Rows "eta" and "long" of docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from .faultkit import MARK, Fleet, Report, batch_name, wait_until
from .labkit import DeployedLab, new_lab, record_timing

pytestmark = pytest.mark.lab
HOLD_LAB = os.environ.get("TASKFLEET_TEST_HOLD_LAB", "cihold")
HOLD_SUBNET = os.environ.get("TASKFLEET_TEST_HOLD_SUBNET", "10.84.0.0/24")
VISIBILITY = 10


@pytest.fixture(scope="module")
def hold_fleet(report: Report) -> Iterator[Fleet]:
    lab = new_lab(HOLD_LAB, HOLD_SUBNET)
    try:
        start = time.monotonic()
        lab.up(redis=1, workers=2, distros=("bookworm", "trixie"))
        group_vars = lab.inventory_path.parent / "group_vars"
        group_vars.mkdir(exist_ok=True)
        (group_vars / "all.yml").write_text(
            "# Written by tests/lab/test_holding.py: production settings, a short timeout.\n"
            f"taskfleet_visibility_timeout: {VISIBILITY}\n")
        cluster = DeployedLab(lab)
        run = cluster.deploy()
        record_timing("hold lab: up + cold deploy (3 hosts)", time.monotonic() - start)
        assert run.rc == 0, run.out[-6000:]
        fleet = Fleet(cluster)
        assert wait_until(lambda: len(fleet.answering()) >= 2, 30), fleet.answering()
        if report.cluster is None:
            report.cluster = cluster
        with report.timed():
            yield fleet
    finally:
        if not os.environ.get("TASKFLEET_KEEP_LAB"):
            lab.down()


def test_eta_and_long_tasks_beyond_the_visibility_timeout(hold_fleet: Fleet, report: Report):
    fleet = hold_fleet
    vt = fleet.settings.visibility_timeout
    assert vt == VISIBILITY and fleet.settings.task_time_limit > 3 * vt
    eta, long = batch_name("eta"), batch_name("long")
    sent = time.time()
    eta_numbers = list(range(4))
    for n in eta_numbers:
        fleet.send(MARK, [eta, n, 0], countdown=3 * vt)
    long_numbers = fleet.submit(long, range(2), seconds=3 * vt)
    eta_tally = fleet.finish(eta, eta_numbers, timeout=3 * vt + 60)
    long_tally = fleet.finish(long, long_numbers, timeout=3 * vt + 60)
    early = [n for n in eta_numbers if (t := eta_tally.first_run(n)) and t < sent + 3 * vt]
    eta_row = report.scenario(
        "eta", f"ETA task {3 * vt} s away, 3x the visibility timeout ({vt} s)", eta_tally,
        recovery_s=None, recovery_what="no fault: held, then run once at its ETA",
        held_by="heartbeats re-stamp every held message; the timeout covers only messages "
                "without an owner", early=early)
    long_row = report.scenario(
        "long", f"Task running {3 * vt} s, 3x the visibility timeout ({vt} s)", long_tally,
        recovery_s=None, recovery_what="no fault: run once",
        held_by="heartbeats; the visibility timeout no longer has to exceed the hard limit")
    assert not eta_tally.lost and not long_tally.lost, (eta_tally.lost, long_tally.lost)
    assert not early, f"ETA tasks ran before their ETA: {early}"
    assert eta_tally.duplicated == {}, eta_tally.duplicated
    assert long_tally.duplicated == {}, long_tally.duplicated
    eta_row["passed"] = long_row["passed"] = True
