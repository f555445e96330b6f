"""Harness of test_operate: switch beat, Flower and TLS on as a user would, and watch.

The features are switched on through files of the lab's inventory directory: `operate.ini`
(the `beat` group) and marked lines in group_vars/all.yml. Redis is read from the controller
with the app's own settings (TLS when the env file says rediss://); tasks keep coming from a
Submitter while a deploy runs, and every one the broker accepted must run.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .labkit import REPO, DeployedLab, clean_environ, record_timing

PERIOD = 2  # seconds between ticks of the example periodic task
TICKS_KEY = "taskfleet:beat:ticks"  # app.tasks.beat_tick records each run here
FLOWER_PORT = 5555
TLS_PORT = 6380

# Run on the controller with the deploy's env file: read or clear a Redis list through the
# app's own settings (so it speaks TLS when the env file says rediss://).
REDIS_LIST = """
import json, sys
from app.config import get_settings
from app.connection import client
r = client(get_settings().broker_url, 5)
if sys.argv[1] == "clear":
    r.delete(sys.argv[2])
else:
    print(json.dumps([x.decode() for x in r.lrange(sys.argv[2], 0, -1)]))
"""

# Results of task ids given on stdin, one JSON value per line (an exception name if none).
RESULTS = """
import json, sys
from app.cli import celery_app
import time
app = celery_app()
deadline = time.monotonic() + 120  # for all of them: a lost task must not cost 120 s each
for line in sys.stdin.read().split():
    try:
        wait = max(1.0, deadline - time.monotonic())
        print(json.dumps(app.AsyncResult(line).get(timeout=wait)))
    except Exception as exc:
        print(json.dumps(f"{type(exc).__name__}"))
"""


# --------------------------------------------------------------------------- helpers


def controller_py(cluster: DeployedLab, code: str, *args: str, stdin: str | None = None,
                  timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = clean_environ() | {"TASKFLEET_ENV_FILE": str(cluster.env_file)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ticks(cluster: DeployedLab) -> list[dict]:
    proc = controller_py(cluster, REDIS_LIST, "read", TICKS_KEY)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(t) for t in json.loads(proc.stdout)]


def clear_ticks(cluster: DeployedLab) -> None:
    proc = controller_py(cluster, REDIS_LIST, "clear", TICKS_KEY)
    assert proc.returncode == 0, proc.stderr


def set_beat_hosts(cluster: DeployedLab, *hosts: str) -> None:
    """The `beat` group lives in its own inventory file beside the lab's hosts.ini."""
    lines = ["# Written by tests/lab/test_operate.py", "[beat]", *hosts, ""]
    (cluster.inventory / "operate.ini").write_text("\n".join(lines))


def set_vars(cluster: DeployedLab, **values: object) -> None:
    """Set this module's variables for all hosts. group_vars/all.yml belongs to conftest: its
    lines are kept and ours (marked) replaced. JSON values are valid YAML."""
    path = cluster.inventory / "group_vars" / "all.yml"
    kept = [ln for ln in path.read_text().splitlines() if not ln.endswith("# operate")]
    ours = [f"{k}: {json.dumps(v)}  # operate" for k, v in values.items()]
    path.write_text("\n".join(kept + ours) + "\n")


def inventory_workers(cluster: DeployedLab) -> list[str]:
    hosts, group = [], None
    for line in cluster.lab.inventory_path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            group = line.strip("[]")
        elif line and not line.startswith("#") and group == "workers":
            hosts.append(line.split()[0])
    return hosts


def unit_state(cluster: DeployedLab, host: str, unit: str) -> tuple[str, str]:
    active = cluster.on(host, "systemctl", "is-active", unit).stdout.strip()
    enabled = cluster.on(host, "systemctl", "is-enabled", unit).stdout.strip()
    return active, enabled


def deploy_ok(cluster: DeployedLab, label: str, *args: str, playbook: str = "deploy.yml") -> None:
    run = cluster.deploy(*args, playbook=playbook)
    record_timing(label, run.seconds)
    assert run.rc == 0, run.out[-6000:]


def check_ticks(cluster: DeployedLab, beat_host: str, wait: float) -> list[dict]:
    """Clear the tick list, wait, then check every tick came from one scheduler on beat_host,
    once per period: count ~= elapsed / period and no two ticks in the same period."""
    clear_ticks(cluster)
    start = time.time()
    time.sleep(wait)
    elapsed = time.time() - start
    got = [t for t in ticks(cluster) if t["at"] >= start]
    expected = elapsed / PERIOD
    print(f"\n[beat] {beat_host}: {len(got)} ticks in {elapsed:.1f} s "
          f"(period {PERIOD} s, expected ~{expected:.1f})")
    assert expected - 2 <= len(got) <= expected + 1, got
    origins = {t["origin"].rpartition("@")[2] for t in got}
    assert origins == {beat_host}, f"ticks sent by {origins}, expected only {beat_host}"
    times = sorted(t["at"] for t in got)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g > PERIOD / 2 for g in gaps), f"two ticks in one period: gaps {gaps}"
    return got


# --------------------------------------------------------------------------- the deploy


def redis_password(cluster: DeployedLab) -> str:
    return (cluster.inventory / ".secrets" / "redis_password").read_text().strip()


def capture(cluster: DeployedLab, traffic) -> bytes:
    """Packets to/from Redis on the lab bridge while `traffic()` runs (bounded in count/time)."""
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump not installed (apt-get install tcpdump)")
    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "redis.pcap"
        dump = subprocess.Popen(
            ["timeout", "30", "tcpdump", "-i", cluster.lab.bridge, "-U", "-s", "0", "-c", "2000",
             "-w", str(pcap), "host", cluster.lab.ip("redis1"), "and",
             "(", "port", "6379", "or", "port", str(TLS_PORT), ")"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)  # tcpdump is listening
            traffic()
            time.sleep(1)
        finally:
            dump.terminate()
            dump.wait(timeout=10)
        return pcap.read_bytes() if pcap.exists() else b""


def new_connections(cluster: DeployedLab) -> None:
    """Fresh connections (each starts with AUTH) from the controller and from client1."""
    ping = cluster.app("ping", "--expect", "1")
    assert ping.returncode == 0, ping.stderr
    proc = cluster.on("client1", "taskfleet", "submit", "add", "1", "2", "--wait",
                      "--timeout", "30")
    assert proc.returncode == 0, proc.stderr


# Submits add(i, 1000) every 0.3 s until the stop file appears (bounded in count and time),
# one line per try: [task id, expected value] when the broker accepted it, else ["refused", ..].
# One process, re-reading the env file for every task: a deploy that switches the URL is
# followed at once, without the CPU of a new interpreter per task slowing the deploy down.
SUBMITTER = """
import json, sys, time
from pathlib import Path
from celery import Celery
from dotenv import dotenv_values
from app.config import celery_settings, read_settings
env_file, stop, deadline = sys.argv[1], Path(sys.argv[2]), time.monotonic() + 600
for i in range(2000):
    if stop.exists() or time.monotonic() > deadline:
        break
    try:
        app = Celery("submitter")
        app.config_from_object(celery_settings(read_settings(dotenv_values(env_file))))
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            result = app.send_task("app.tasks.add", (i, 1000), connection=conn, retry=False)
        print(json.dumps([result.id, i + 1000]), flush=True)
    except Exception as exc:
        print(json.dumps(["refused", type(exc).__name__]), flush=True)
    time.sleep(0.3)
"""


class Submitter:
    """Tasks submitted from the controller while a deploy runs; the ids the broker accepted."""

    def __init__(self, cluster: DeployedLab) -> None:
        self.cluster = cluster
        self.tmp = tempfile.TemporaryDirectory()
        self.stop_file = Path(self.tmp.name) / "stop"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUBMITTER, str(cluster.env_file), str(self.stop_file)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self) -> tuple[dict[str, int], int]:
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=60)
        self.tmp.cleanup()
        assert self.proc.returncode == 0, err
        accepted, refused = {}, 0
        for line in out.splitlines():
            key, value = json.loads(line)
            if key == "refused":
                refused += 1
            else:
                accepted[key] = value
        return accepted, refused


def rolling_deploy(cluster: DeployedLab, label: str, **values: object) -> None:
    """Set variables and rerun deploy.yml while tasks keep coming: every accepted one runs."""
    submitter = Submitter(cluster)
    try:
        set_vars(cluster, **values)
        deploy_ok(cluster, label)
    finally:
        accepted, refused = submitter.finish()
    ids = list(accepted)
    print(f"\n[{label}] {len(ids)} tasks accepted during the deploy, {refused} refused")
    assert len(ids) >= 5, "too few tasks submitted during the deploy to prove anything"
    proc = controller_py(cluster, RESULTS, stdin="\n".join(ids), timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.split()]
    lost = [(i, r) for i, r in zip(ids, results, strict=True) if r != accepted[i]]
    assert not lost, f"{len(lost)} of {len(ids)} accepted tasks lost: {lost[:5]}"


# --------------------------------------------------------------------------- flower


def flower_get(url: str, auth: str | None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url)  # noqa: S310 (http:// to a lab host only)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def screenshot(url: str, out: Path) -> None:
    """A page (the Flower workers, the Prometheus graph) in headless Chromium, for the docs."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium not installed: no screenshot (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        shot = Path(profile) / "shot.png"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}/data", f"--screenshot={shot}",
             # Let the page's own requests fill the table before the shot (without it a
             # busy lab gets an empty "Connecting..." page).
             "--virtual-time-budget=10000", "--window-size=1280,800", url],
            capture_output=True, timeout=90, check=False)
        assert shot.exists() and shot.stat().st_size > 10_000, "chromium made no screenshot"
        shutil.copyfile(shot, out)
