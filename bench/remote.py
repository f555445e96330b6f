"""The bench on the hosts, through Ansible: baseline workers, the latency probe, deploy times.

playbooks/bench.yml brings what a run needs onto the hosts and takes it away again: the
baseline worker app (bench/baseline.py) as a transient unit on the worker hosts, and the
latency probe (bench/probe.py) on the client host that measures latency. Without --inventory
the baseline workers run as local processes (a development setup on one machine).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import BenchError, log
from .measure import Sizes
from .probe import JSON_MARK

REPO = Path(__file__).resolve().parents[1]
TIMINGS_FILE = REPO / ".cache" / "lab-timings.json"
DEPLOY_TIMINGS = {"cold_s": "deploy: cold", "no_change_s": "deploy: no-change re-run",
                  "scale_out_s": "deploy: scale-out (+1 worker)"}
PLAYBOOK = REPO / "playbooks" / "bench.yml"
# Layout of a deployed host (deploy/roles/taskfleet defaults).
HOST_PYTHON = "/opt/taskfleet/venv/bin/python"
HOST_ENV_FILE = "/etc/taskfleet/taskfleet.env"
# The operators' ACL user (deploy/roles/redis: redis_admin_user) and where the deploy generated
# its password, under the inventory.
ADMIN_USER = "admin"
ADMIN_SECRET = Path(".secrets") / "redis_admin_password"


def run_cmd(cmd: list[str], timeout: float = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Every subprocess of the bench: argv list, output kept, a clear error on failure."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise BenchError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         + "\n".join(tail))
    return proc


def tool(name: str) -> str:
    """An Ansible command of this venv (ansible, ansible-playbook, ansible-inventory)."""
    return str(Path(sys.executable).parent / name)


class BenchHosts:
    """What a run needs on the hosts, for its length: baseline workers on `workers`, the
    probe's code on `client` (playbooks/bench.yml); without an inventory, local workers."""

    def __init__(self, inventory: Path | None, workers: list[str],
                 client: str | None = None) -> None:
        self.inventory = inventory
        self.workers = workers
        self.client = client
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        if self.inventory:
            log(f"starting baseline workers on {', '.join(self.workers) or 'no host'}"
                + (f", the latency probe on {self.client}" if self.client else "")
                + " (playbooks/bench.yml)")
            self._playbook("started")
            return
        # Local development: one solo worker per kit worker host name, on this machine.
        for host in self.workers:
            cmd = [sys.executable, "-m", "celery", "-A", "bench.baseline", "worker",
                   "--pool=solo", "-n", f"baseline@{host}", "-Q", "bench.idle", "-l", "WARNING"]
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        if self.inventory:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                self._playbook("stopped")
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def _playbook(self, state: str) -> None:
        hosts = self.workers + ([self.client] if self.client else [])
        run_cmd([tool("ansible-playbook"), "-i", str(self.inventory), str(PLAYBOOK),
                 "-e", f"bench_state={state}", "-l", ",".join(hosts)], timeout=300)


def latency_client(inventory: Path) -> str | None:
    """The inventory's first client host, where latency is measured; None if it has none."""
    out = run_cmd([tool("ansible-inventory"), "-i", str(inventory), "--list"], timeout=60).stdout
    clients = json.loads(out).get("clients", {}).get("hosts", [])
    return sorted(clients)[0] if clients else None


def remote_latency(inventory: Path, client: str, sizes: Sizes,
                   with_baseline: bool) -> dict[str, Any]:
    """Run the latency part on `client` (bench.probe, installed there by BenchHosts)."""
    log(f"latency: running on {client}")
    cmd = (f"env TASKFLEET_ENV_FILE={HOST_ENV_FILE} {HOST_PYTHON} -m bench.probe "
           f"--samples {sizes.samples} --repeat {sizes.repeat}"
           + ("" if with_baseline else " --no-baseline"))
    proc = run_cmd([tool("ansible"), "-i", str(inventory), client,
                    "-m", "ansible.builtin.command", "-a", cmd], timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_MARK):
            # Ansible prints the remote stdout (its last newline stripped) and stderr right
            # after it: decode the one JSON object and ignore what follows.
            remote, _ = json.JSONDecoder().raw_decode(line[len(JSON_MARK):])
            return dict(remote["latency"])
    raise BenchError(f"no result line from the latency run on {client}")


def admin_redis(inventory: Path | None) -> tuple[Any, str | None]:
    """(client, None): a redis-py client of the broker's Redis (the primary, with Sentinel) as
    the operators' ACL user, whose password the deploy generated under the inventory; or
    (None, why not)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    from app.config import get_settings
    from app.connection import client

    if inventory is None:
        return None, "needs --inventory (the Redis admin password is in its .secrets)"
    secret = inventory / ADMIN_SECRET
    if not secret.is_file():
        return None, (f"no {secret}: the part sets appendfsync as the `{ADMIN_USER}` user, "
                      "whose password the deploy generates there (unless set from a Vault)")
    password = secret.read_text().strip()
    s = get_settings()

    def as_admin(url: str) -> str:
        """The URL with the admin's login (a sentinel:// URL carries the primary's login)."""
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{ADMIN_USER}:{quote(password, safe='')}@{host}"))

    url = ";".join(as_admin(u) for u in s.broker_url.split(";"))
    return client(url, 5.0, **s.sentinel_args), None


def deploy_figures(measure: bool, inventory: Path | None) -> dict[str, Any]:
    """Deploy wall times: timed now (--deploy: no-change re-run) or from the lab tests' file."""
    out: dict[str, Any] = {"source": str(TIMINGS_FILE.relative_to(REPO))}
    if TIMINGS_FILE.exists():
        timings = json.loads(TIMINGS_FILE.read_text())
        # The names tests/lab/test_deploy.py records (the file also holds other timings,
        # e.g. "image build cold", so only these exact names count).
        for key, name in DEPLOY_TIMINGS.items():
            out[key] = timings.get(name)
    if measure:
        if inventory is None:
            raise BenchError("--deploy needs --inventory")
        log("deploy: timing a no-change re-run of deploy.yml")
        t0 = time.monotonic()
        run_cmd([tool("ansible-playbook"), "-i", str(inventory), str(REPO / "deploy.yml")],
                timeout=1800)
        out["no_change_s"] = round(time.monotonic() - t0, 1)
        out["source"] = "no_change_s measured by this run; others from " + out["source"]
    return out
