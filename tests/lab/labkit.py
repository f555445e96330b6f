"""Harness of the tests on lab hosts: the deployed lab, ansible-playbook runs, wall times.

A plain module, imported by conftest.py (the fixtures) and the test files. The lab is named
"ci" on its own subnet so it never touches the user's `make demo` lab; TASKFLEET_TEST_LAB and
TASKFLEET_TEST_SUBNET choose another one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB_NAME = os.environ.get("TASKFLEET_TEST_LAB", "ci")
LAB_SUBNET = os.environ.get("TASKFLEET_TEST_SUBNET", "10.79.0.0/24")
TIMINGS_FILE = REPO / ".cache" / "lab-timings.json"
# The shared lab's hosts are reached as a cloud image's are: this sudo user, root login off.
LOGIN_USER = "admin"

# Wall times of this session, printed by conftest's terminal summary: an append-only record,
# never read by a test.
TIMINGS: dict[str, float] = {}


PROMETHEUS_PORT = 9090  # the monitoring tier's Prometheus (role monitoring)

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


def new_lab(name: str, subnet: str):
    """A deploy.lab Lab of this name on this subnet (not booted yet); the test is skipped
    where the lab cannot run."""
    reason = lab_missing()
    if reason:
        pytest.skip(reason)
    from deploy.lab import Lab

    return Lab(name, subnet=subnet)


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
                     timeout: float = 900, env: dict[str, str] | None = None) -> Run:
    """Run the real ansible-playbook from the repo root; output is kept for assertions."""
    cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), playbook, *args]
    env = clean_environ() | {"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
                             "PATH": f"{BIN}:{os.environ.get('PATH', '')}"} | (env or {})
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    return Run(proc.returncode, out, time.monotonic() - start)


class DeployedLab:
    """A lab with Taskfleet deployed on it: its inventory dir and the controller's env file
    written by the deploy, and ways to run the playbook, the app and commands on its hosts."""

    def __init__(self, lab):
        self.lab = lab
        self.inventory = lab.inventory_path.parent
        self.env_file = self.inventory / "taskfleet.env"

    def deploy(self, *args: str, playbook: str = "deploy.yml",
               env: dict[str, str] | None = None) -> Run:
        return ansible_playbook(self.inventory, playbook, *args, env=env)

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

    def prometheus(self, host: str, path: str, **params: str) -> Any:
        """GET the API of the Prometheus on `host` from the controller (which the monitoring
        firewall admits): the `data` of a successful answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{self.lab.ip(host)}:{PROMETHEUS_PORT}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def explain(self, run: Run) -> str:
        """Why a deploy failed, for an assertion message: every failed task in full (a cold
        deploy's output is too long to show whole), then each failing host's recent warnings
        and its Taskfleet units' journal, where the reason for a failed systemd job is."""
        lines = run.out.splitlines()
        failed = [i for i, line in enumerate(lines)
                  if re.match(r"^(fatal|failed): \[", line.strip())]
        parts = ["\n".join(lines[max(0, i - 12):i + 12]) for i in failed[:4]]
        parts.append(run.out.split("PLAY RECAP")[-1].strip())
        bad = [h for h, counts in run.recap().items()
               if counts.get("failed") or counts.get("unreachable")]
        for host in bad[:3]:
            journal = self.on(host, "journalctl", "--no-pager", "-q", "-o", "short-precise",
                              "--since", "-10min", "-n", "60", "-u", "taskfleet*", "-p", "info",
                              timeout=30)
            warnings = self.on(host, "journalctl", "--no-pager", "-q", "-o", "short-precise",
                               "--since", "-10min", "-n", "30", "-p", "warning", timeout=30)
            parts.append(f"--- {host}: journal of taskfleet* units\n"
                         f"{(journal.stdout + journal.stderr)[-4000:]}"
                         f"--- {host}: warnings\n{(warnings.stdout + warnings.stderr)[-3000:]}")
        return "\n\n".join(parts)

    def main_pid(self, host: str) -> int:
        out = self.on(host, "systemctl", "show", "-p", "MainPID", "--value",
                      "taskfleet-worker", check=True).stdout
        return int(out.strip())
