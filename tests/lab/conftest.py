"""Shared fixtures for tests on lab hosts: one lab, deployed once, used by every module.

The lab is named "ci" on its own subnet so it never touches the user's `make demo` lab. Set
TASKFLEET_KEEP_LAB=1 to leave it running after the session (for debugging).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB_NAME = os.environ.get("TASKFLEET_TEST_LAB", "ci")
LAB_SUBNET = os.environ.get("TASKFLEET_TEST_SUBNET", "10.79.0.0/24")
TIMINGS_FILE = REPO / ".cache" / "lab-timings.json"

# Short timeouts so the fault scenarios finish in CI time; docs/RELIABILITY.md gives the
# production values. Every fault-suite task sleeps at most 2 s, so a 10 s hard limit never
# stops one that runs normally; the visibility timeout must stay above the hard limit (the app
# and preflight refuse anything else). A dead worker's tasks run elsewhere after the visibility
# timeout + the sweep (timeout / 10, at least 1 s): ~13 s instead of ~33 s. A hung worker is
# restarted by systemd's watchdog after 20 s (production: 60 s). The stop timeout stays above
# the hard limit (warm shutdowns never cut a task short) but shorter than the default hard + 30:
# systemd in a lab host (hybrid cgroups, inside nspawn) is not told when a killed service's
# last process is gone and waits the whole stop timeout before restarting a watchdog victim.
TEST_GROUP_VARS = """\
# Written by tests/lab/conftest.py: short limits so fault tests recover quickly.
taskfleet_task_time_limit: 10
taskfleet_task_soft_time_limit: 8
taskfleet_visibility_timeout: 12
celery_worker_watchdog_sec: 20
celery_worker_stop_timeout: 15
"""

TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    """Keep a wall time for the terminal summary and for the docs generators."""
    TIMINGS[name] = round(seconds, 1)
    print(f"\n[timing] {name}: {seconds:.1f} s")


def lab_missing() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (systemd-nspawn, bridges, mounts)"
    if shutil.which("systemd-nspawn") is None or shutil.which("debootstrap") is None:
        return "lab tests need systemd-nspawn and debootstrap (make test installs them)"
    return None


@dataclass
class Run:
    rc: int
    out: str
    seconds: float

    def recap(self) -> dict[str, dict[str, int]]:
        """Parse PLAY RECAP lines: {host: {"ok": n, "changed": n, ...}}."""
        hosts: dict[str, dict[str, int]] = {}
        for line in self.out.split("PLAY RECAP")[-1].splitlines():
            m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
            if m:
                hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return hosts


def clean_environ() -> dict[str, str]:
    """os.environ without app settings: lab commands must take theirs from the deploy's env
    file, never from a variable an earlier test (or the developer's shell) left behind."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "TASKFLEET_"))}


def ansible_playbook(inventory: Path, playbook: str = "deploy.yml", *args: str,
                     timeout: float = 900) -> Run:
    """Run the real ansible-playbook from the repo root; output is kept for assertions."""
    cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), playbook, *args]
    env = clean_environ() | {"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
                        "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    return Run(proc.returncode, out, time.monotonic() - start)


class Cluster:
    """A lab plus its inventory dir and the controller's env file written by the deploy."""

    def __init__(self, lab):
        self.lab = lab
        self.inventory = lab.inventory_path.parent
        self.env_file = self.inventory / "taskfleet.env"

    def deploy(self, *args: str, playbook: str = "deploy.yml") -> Run:
        return ansible_playbook(self.inventory, playbook, *args)

    def app(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """`python -m app ...` on the controller, configured by the deploy's env file."""
        full_env = clean_environ() | {"TASKFLEET_ENV_FILE": str(self.env_file)} | (env or {})
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def on(self, host: str, *cmd: str, timeout: float = 120,
           check: bool = False) -> subprocess.CompletedProcess[str]:
        """A command on a lab host over SSH."""
        return self.lab.ssh(host, *cmd, check=check, timeout=timeout)

    def workers(self) -> list[str]:
        return [h["name"] for h in self.lab.status() if h["group"] == "workers"]

    def main_pid(self, host: str) -> int:
        out = self.on(host, "systemctl", "show", "-p", "MainPID", "--value",
                      "taskfleet-worker", check=True).stdout
        return int(out.strip())


@pytest.fixture(scope="session")
def lab():
    reason = lab_missing()
    if reason:
        pytest.skip(reason)
    from deploy.lab import Lab

    lab = Lab(LAB_NAME, subnet=LAB_SUBNET)
    start = time.monotonic()
    lab.up(redis=1, workers=2, clients=1, spare=1, distros=("bookworm", "trixie"))
    record_timing("lab up (5 hosts, bookworm + trixie)", time.monotonic() - start)
    group_vars = lab.inventory_path.parent / "group_vars"
    group_vars.mkdir(exist_ok=True)
    (group_vars / "all.yml").write_text(TEST_GROUP_VARS)
    yield lab
    if not os.environ.get("TASKFLEET_KEEP_LAB"):
        lab.down()


@pytest.fixture(scope="session")
def cluster(lab) -> Cluster:
    """The lab with Taskfleet deployed on it (cold deploy, timed once per session)."""
    c = Cluster(lab)
    run = c.deploy()
    record_timing("deploy: cold", run.seconds)
    assert run.rc == 0, run.out[-6000:]
    return c


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.section("lab timings")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:<50} {seconds:>7.1f} s")
    TIMINGS_FILE.parent.mkdir(exist_ok=True)
    old = json.loads(TIMINGS_FILE.read_text()) if TIMINGS_FILE.exists() else {}
    TIMINGS_FILE.write_text(json.dumps(old | TIMINGS, indent=2) + "\n")


# Modules share one deployed lab, so their order matters: the lab tool's own tests (their own
# lab), then the deployment (bad inventories first, while the hosts are still fresh; scale-out
# last), the benchmark (wants 3 workers), and the fault suite, which ends by scaling in.
MODULE_ORDER = ["test_lab", "test_deploy", "test_bench", "test_faults", "test_operate"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent

    def rank(item) -> int:
        path = Path(str(item.fspath))
        if path.parent != here:
            return -1  # unit and integration tests first: fast feedback
        stem = path.stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    items.sort(key=rank)  # stable: order inside a module is kept
