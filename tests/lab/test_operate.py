"""Operating features on real lab hosts: one beat scheduler (and moving it), the Flower
dashboard behind basic auth and a firewall, and TLS between every node and Redis.

Runs last on the shared lab (conftest.MODULE_ORDER). The features are switched on through
files of the lab's inventory directory -- `operate.ini` (the `beat` group) and lines appended
to group_vars -- exactly as a user would, and TLS is switched off again at the end so the
cluster is back to the default.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, Cluster, record_timing

pytestmark = pytest.mark.lab

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

# Results of task ids given on stdin, one JSON value per line (null if not done in time).
RESULTS = """
import json, sys
from app.cli import celery_app
app = celery_app()
for line in sys.stdin.read().split():
    try:
        print(json.dumps(app.AsyncResult(line).get(timeout=60)))
    except Exception as exc:
        print(json.dumps(f"{type(exc).__name__}"))
"""


# --------------------------------------------------------------------------- helpers


def controller_py(cluster: Cluster, code: str, *args: str, stdin: str | None = None,
                  timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TASKFLEET_ENV_FILE": str(cluster.env_file)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ticks(cluster: Cluster) -> list[dict]:
    proc = controller_py(cluster, REDIS_LIST, "read", TICKS_KEY)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(t) for t in json.loads(proc.stdout)]


def clear_ticks(cluster: Cluster) -> None:
    proc = controller_py(cluster, REDIS_LIST, "clear", TICKS_KEY)
    assert proc.returncode == 0, proc.stderr


def set_beat_hosts(cluster: Cluster, *hosts: str) -> None:
    """The `beat` group lives in its own inventory file beside the lab's hosts.ini."""
    lines = ["# Written by tests/lab/test_operate.py", "[beat]", *hosts, ""]
    (cluster.inventory / "operate.ini").write_text("\n".join(lines))


def set_vars(cluster: Cluster, **values: object) -> None:
    """Set this module's variables for all hosts. group_vars/all.yml belongs to conftest: its
    lines are kept and ours (marked) replaced. JSON values are valid YAML."""
    path = cluster.inventory / "group_vars" / "all.yml"
    kept = [ln for ln in path.read_text().splitlines() if not ln.endswith("# operate")]
    ours = [f"{k}: {json.dumps(v)}  # operate" for k, v in values.items()]
    path.write_text("\n".join(kept + ours) + "\n")


def inventory_workers(cluster: Cluster) -> list[str]:
    hosts, group = [], None
    for line in cluster.lab.inventory_path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            group = line.strip("[]")
        elif line and not line.startswith("#") and group == "workers":
            hosts.append(line.split()[0])
    return hosts


def unit_state(cluster: Cluster, host: str, unit: str) -> tuple[str, str]:
    active = cluster.on(host, "systemctl", "is-active", unit).stdout.strip()
    enabled = cluster.on(host, "systemctl", "is-enabled", unit).stdout.strip()
    return active, enabled


def deploy_ok(cluster: Cluster, label: str, *args: str, playbook: str = "deploy.yml") -> None:
    run = cluster.deploy(*args, playbook=playbook)
    record_timing(label, run.seconds)
    assert run.rc == 0, run.out[-6000:]


def check_ticks(cluster: Cluster, beat_host: str, wait: float) -> list[dict]:
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


# --------------------------------------------------------------------------- beat + flower


@pytest.fixture(scope="module")
def operated(cluster: Cluster) -> Cluster:
    """The cluster with beat on worker1 (example tick every PERIOD s) and Flower enabled."""
    set_beat_hosts(cluster, "worker1")
    set_vars(cluster, celery_beat_example_seconds=PERIOD, flower_enabled=True)
    deploy_ok(cluster, "deploy: + beat + flower")
    return cluster


def test_two_beat_hosts_are_refused(operated: Cluster):
    set_beat_hosts(operated, "worker1", "worker2")
    try:
        run = operated.deploy()
    finally:
        set_beat_hosts(operated, "worker1")
    assert run.rc != 0, run.out[-3000:]
    assert "beat" in run.out and "exactly one" in run.out, run.out[-3000:]
    changed = {h: r.get("changed", 0) for h, r in run.recap().items() if r.get("changed")}
    assert not changed, changed


def test_beat_runs_each_tick_once_and_moves(operated: Cluster):
    c = operated
    assert unit_state(c, "worker1", "taskfleet-beat") == ("active", "enabled")
    for host in ("worker2", "redis1", "client1"):
        assert unit_state(c, host, "taskfleet-beat")[0] != "active", host
    schedule = c.on("worker1", "sh", "-c", "ls /var/lib/taskfleet/beat-schedule*").stdout
    assert "beat-schedule" in schedule
    check_ticks(c, "worker1", wait=5 * PERIOD + 1)

    # Move beat: change the inventory, rerun. The old host's beat is stopped and disabled
    # before the new one starts, so the two never overlap.
    set_beat_hosts(c, "worker2")
    deploy_ok(c, "deploy: move beat worker1 -> worker2")
    assert unit_state(c, "worker1", "taskfleet-beat") == ("inactive", "disabled")
    assert unit_state(c, "worker2", "taskfleet-beat") == ("active", "enabled")
    check_ticks(c, "worker2", wait=5 * PERIOD + 1)


def _flower_get(url: str, auth: str | None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url)  # noqa: S310 (http:// to a lab host only)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_flower_lists_workers_behind_auth_and_firewall(operated: Cluster):
    c = operated
    ip = c.lab.ip("redis1")
    password = (c.inventory / ".secrets" / "flower_password").read_text().strip()
    auth = f"admin:{password}"
    base = f"http://{ip}:{FLOWER_PORT}"
    workers = {f"worker@{w}" for w in inventory_workers(c)}
    deadline, listed = time.monotonic() + 30, set()
    while time.monotonic() < deadline:  # Flower learns workers from their heartbeats
        status, body = _flower_get(f"{base}/api/workers?refresh=1", auth, timeout=10)
        listed = set(json.loads(body)) if status == 200 else set()
        if workers <= listed:
            break
        time.sleep(1)
    assert workers <= listed, f"Flower lists {listed}, expected {workers}"
    assert _flower_get(f"{base}/api/workers", None)[0] == 401
    assert _flower_get(f"{base}/api/workers", "admin:wrong-password")[0] == 401

    probe = ("import socket,sys\n"
             "s=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{ip}', {FLOWER_PORT})) == 0 else 1)\n")
    assert c.on("spare1", "python3", "-c", probe, timeout=20).returncode == 1
    assert c.on("client1", "python3", "-c", probe, timeout=20).returncode == 0

    _screenshot(f"http://{auth}@{ip}:{FLOWER_PORT}/workers", REPO / "docs" / "flower-workers.png")


def _screenshot(url: str, out: Path) -> None:
    """The Flower workers page in headless Chromium, kept for the README."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium not installed: no screenshot (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        tmp = Path(profile) / "shot.png"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}/data", f"--screenshot={tmp}",
             "--window-size=1280,800", url],
            capture_output=True, timeout=90, check=False)
        assert tmp.exists() and tmp.stat().st_size > 10_000, "chromium made no screenshot"
        shutil.copyfile(tmp, out)


# --------------------------------------------------------------------------- TLS


def _capture(cluster: Cluster, traffic) -> bytes:
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


def _redis_password(cluster: Cluster) -> str:
    return (cluster.inventory / ".secrets" / "redis_password").read_text().strip()


def _new_connections(cluster: Cluster) -> None:
    """Fresh connections (each starts with AUTH) from the controller and from client1."""
    assert cluster.app("ping", "--expect", "1").returncode == 0
    proc = cluster.on("client1", "taskfleet", "submit", "add", "1", "2", "--wait",
                      "--timeout", "30")
    assert proc.returncode == 0, proc.stderr


class Submitter(threading.Thread):
    """Submits one task after another from the controller until stopped (bounded), keeping
    the id of every task the broker accepted."""

    def __init__(self, cluster: Cluster, limit: int = 150) -> None:
        super().__init__(daemon=True)
        self.cluster, self.limit = cluster, limit
        self.accepted: dict[str, int] = {}
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        for i in range(self.limit):
            if self.stop.is_set():
                return
            proc = self.cluster.app("submit", "add", str(i), "1000", timeout=30)
            if proc.returncode == 0:
                self.accepted[proc.stdout.strip()] = i + 1000
            else:
                self.refused += 1
                time.sleep(0.5)


def _switch_tls(cluster: Cluster, on: bool) -> None:
    """Switch TLS with one rerun of deploy.yml while tasks keep coming: none is lost."""
    submitter = Submitter(cluster)
    submitter.start()
    try:
        set_vars(cluster, celery_beat_example_seconds=PERIOD, flower_enabled=True,
                 taskfleet_redis_tls=on)
        deploy_ok(cluster, f"deploy: TLS {'on' if on else 'off'} (rolling)")
    finally:
        submitter.stop.set()
        submitter.join(timeout=60)
    ids = list(submitter.accepted)
    print(f"\n[tls] {len(ids)} tasks accepted during the switch, {submitter.refused} refused")
    assert len(ids) >= 5, "too few tasks submitted during the switch to prove anything"
    proc = controller_py(cluster, RESULTS, stdin="\n".join(ids), timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.split()]
    lost = [(i, r) for i, r in zip(ids, results, strict=True) if r != submitter.accepted[i]]
    assert not lost, f"{len(lost)} of {len(ids)} accepted tasks lost: {lost[:5]}"


def test_tls_between_every_node_and_redis(operated: Cluster):
    c = operated
    password = _redis_password(c)
    redis_ip = c.lab.ip("redis1")

    # Control: without TLS the capture does show the password (so the check below can fail).
    plain = _capture(c, lambda: _new_connections(c))
    assert password.encode() in plain, "capture without TLS shows no password: capture broken?"

    start = time.monotonic()
    _switch_tls(c, on=True)
    try:
        # The env files now say rediss:// with certificate verification on.
        url = c.on("client1", "sh", "-c", "grep ^CELERY_BROKER_URL= /etc/taskfleet/taskfleet.env",
                   check=True).stdout
        assert "rediss://" in url and "ssl_cert_reqs=required" in url, "not TLS"
        # Plain TCP is refused: nothing listens on 6379 any more, and a plain client on the
        # TLS port is dropped by Redis.
        probe = ("import socket,sys\n"
                 "s=socket.socket(); s.settimeout(3)\n"
                 f"sys.exit(0 if s.connect_ex(('{redis_ip}', 6379)) == 0 else 1)\n")
        assert c.on("client1", "python3", "-c", probe).returncode == 1
        plain_client = c.on("client1", "env",
                            f"CELERY_BROKER_URL=redis://{redis_ip}:{TLS_PORT}/0",
                            f"CELERY_RESULT_BACKEND=redis://{redis_ip}:{TLS_PORT}/0",
                            "taskfleet", "ping", timeout=30)
        assert plain_client.returncode != 0
        # A client that does not trust our CA is refused too (verification is on).
        untrusted = c.on("client1", "sh", "-c",
                         "sed -n 's/^CELERY_BROKER_URL=//p' /etc/taskfleet/taskfleet.env "
                         "| sed 's#ssl_ca_certs=[^&]*#ssl_ca_certs=/etc/ssl/certs/"
                         "ca-certificates.crt#' > /tmp/u && CELERY_BROKER_URL=$(cat /tmp/u) "
                         "CELERY_RESULT_BACKEND=$(cat /tmp/u) taskfleet ping; rc=$?; rm -f /tmp/u;"
                         " exit $rc", timeout=30)
        assert untrusted.returncode != 0, untrusted.stdout
        assert "certificate" in untrusted.stderr.lower(), untrusted.stderr

        wire = _capture(c, lambda: _new_connections(c))
        assert len(wire) > 2000, "no TLS traffic captured"
        assert password.encode() not in wire, "the Redis password crossed the wire in clear"
        print(f"\n[tls] captured {len(wire)} bytes to/from Redis: password not in them")

        # Redis restart: every node reconnects over TLS.
        c.on("redis1", "systemctl", "restart", "redis-server", check=True)
        deadline = time.monotonic() + 30
        while True:
            proc = c.on("client1", "taskfleet", "submit", "add", "2", "3", "--wait",
                        "--timeout", "10", timeout=30)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert proc.stdout.strip() == "5", proc.stderr
        assert c.app("ping", "--expect", str(len(inventory_workers(c))),
                     "--timeout", "5").returncode == 0
    finally:
        _switch_tls(c, on=False)
    url = c.on("client1", "sh", "-c", "grep ^CELERY_BROKER_URL= /etc/taskfleet/taskfleet.env",
               check=True).stdout
    assert "redis://" in url and "rediss://" not in url
    record_timing("TLS on + checks + off", time.monotonic() - start)
