"""Fixtures of the tests on lab hosts: one lab, deployed once, used by every file.

The harness is in labkit.py (the deployed lab) and faultkit.py (the reliability suites). Set
TASKFLEET_KEEP_LAB=1 to leave the lab running after the session (for debugging).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .faultkit import AppCode, Fleet, Report, wait_until
from .labkit import (
    LAB_NAME,
    LAB_SUBNET,
    LOGIN_USER,
    TIMINGS,
    TIMINGS_FILE,
    DeployedLab,
    new_lab,
    record_timing,
)
from .reliability import locked

# The production task settings (hard limit 300 s, visibility timeout 3600 s, heartbeats 1 s,
# dead after 6 s): the fault suite proves the guarantees at the values the README recommends,
# not at short ones. Two lab-only values: a hung worker is restarted by systemd's watchdog after
# 20 s (production: 60 s), and the stop timeout is 15 s: every fault-suite task sleeps at most
# 2 s, so no warm shutdown is cut short, and systemd in a lab host (hybrid cgroups, inside
# nspawn) is not told when a killed service's last process is gone and waits the whole stop
# timeout before restarting a watchdog victim.
TEST_GROUP_VARS = """\
# Written by tests/lab/conftest.py: production task settings; a shorter watchdog and stop timeout.
celery_worker_watchdog_sec: 20
celery_worker_stop_timeout: 15
"""


@pytest.fixture(scope="session")
def lab():
    lab = new_lab(LAB_NAME, LAB_SUBNET)
    start = time.monotonic()
    # The cloud way: the deploy logs in as `admin` and becomes root through sudo; root cannot
    # log in over SSH (the lab's own commands go through the same sudo).
    lab.up(redis=1, workers=2, clients=1, spare=1, distros=("bookworm", "trixie"),
           login_user=LOGIN_USER)
    record_timing("lab up (5 hosts, bookworm + trixie)", time.monotonic() - start)
    group_vars = lab.inventory_path.parent / "group_vars"
    group_vars.mkdir(exist_ok=True)
    (group_vars / "all.yml").write_text(TEST_GROUP_VARS)
    yield lab
    if not os.environ.get("TASKFLEET_KEEP_LAB"):
        lab.down()


@pytest.fixture(scope="session")
def cluster(lab) -> DeployedLab:
    """The lab with Taskfleet deployed on it (cold deploy, timed once per session)."""
    c = DeployedLab(lab)
    run = c.deploy()
    record_timing("deploy: cold", run.seconds)
    assert run.rc == 0, c.explain(run)
    # Over Mitogen (ansible.cfg), not the shim's plain-SSH fallback.
    assert "Mitogen for Ansible is not installed" not in run.out, run.out[-3000:]
    return c


# --------------------------------------------------------------------------- reliability suites


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    """The rows of every reliability suite of the session (test_faults, test_security_lab,
    test_changes, test_holding, ...); merged into .cache/reliability.json and rendered into
    docs/RELIABILITY.md when the session ends, with the settings of the shared lab. Modules
    with a lab of their own (test_holding, test_ha) save while their lab stands."""
    rep = Report()
    yield rep
    if rep.cluster is not None:
        rep.save(rep.cluster)


@pytest.fixture(scope="session")
def three_workers(cluster: DeployedLab) -> DeployedLab:
    """The cluster with worker3 (the deployment tests' scale-out adds it; a suite run without
    them adds it here)."""
    if "worker3" not in cluster.workers():
        cluster.lab.add("worker3", "workers", distro="trixie")
        run = cluster.deploy()
        record_timing("deploy: scale-out for the fault suite", run.seconds)
        assert run.rc == 0, run.out[-4000:]
    return cluster


@pytest.fixture(scope="module")
def fleet(three_workers: DeployedLab, report: Report) -> Iterator[Fleet]:
    """The test's Celery and Redis clients for the three workers; the module's time counts
    towards the suite time of the report."""
    f = Fleet(three_workers)
    assert wait_until(lambda: len(f.answering()) >= 3, 30), \
        f"workers not answering: {f.answering()}"
    report.cluster = three_workers
    with report.timed():
        yield f


@pytest.fixture(scope="module")
def app_code(cluster: DeployedLab) -> Iterator[AppCode]:
    """Which app code the workers run; the repository's again when the module ends."""
    code = AppCode(cluster)
    yield code
    code.restore()


# --------------------------------------------------------------------------- session hooks


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.section("lab timings")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:<50} {seconds:>7.1f} s")
    with locked(TIMINGS_FILE):  # the other pytest of `make test` may be writing it too
        old = json.loads(TIMINGS_FILE.read_text()) if TIMINGS_FILE.exists() else {}
        TIMINGS_FILE.write_text(json.dumps(old | TIMINGS, indent=2) + "\n")


# Every file sets up what it needs through its fixtures, so each also runs on its own. Files
# share one deployed lab, though, and some change it for those after them: only these are
# ordered, the others keep pytest's order between the two lists.
RUN_FIRST = [
    "test_lab",  # boots a lab of its own: done before the shared one is up
    "test_deploy",  # its bad inventories need fresh hosts; its checks expect two workers
]
RUN_LAST = [
    "test_security_lab",  # its password search covers the journals the faults filled
    "test_changes",  # scale-in takes worker3 away for good
    "test_operate",  # leaves beat and Flower running: the suites above need an idle broker
]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent

    def rank(item) -> int:
        path = Path(str(item.fspath))
        if path.parent != here:
            return -1  # unit and integration tests first: fast feedback
        stem = path.stem
        if stem in RUN_FIRST:
            return RUN_FIRST.index(stem)
        if stem in RUN_LAST:
            return len(RUN_FIRST) + 1 + RUN_LAST.index(stem)
        return len(RUN_FIRST)

    items.sort(key=rank)  # stable: order inside a module is kept
