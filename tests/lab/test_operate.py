"""Operating features on real lab hosts: one beat scheduler (and moving it), the Flower
dashboard behind basic auth and a firewall, and TLS between every node and Redis.

Runs last on the shared lab (conftest.MODULE_ORDER). The features are switched on as a user
would, through files of the lab's inventory directory: `operate.ini` (the `beat` group) and
marked lines in group_vars/all.yml. Full deploys dominate the time, so there are two: one
switches TLS on while adding beat and Flower to the running cluster, the last switches TLS off
again (the cluster is back to the default); moving beat reruns only playbooks/beat.yml.
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

from .conftest import REPO, Cluster, clean_environ, record_timing

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


def controller_py(cluster: Cluster, code: str, *args: str, stdin: str | None = None,
                  timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = clean_environ() | {"TASKFLEET_ENV_FILE": str(cluster.env_file)}
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


# --------------------------------------------------------------------------- the deploy


def _redis_password(cluster: Cluster) -> str:
    return (cluster.inventory / ".secrets" / "redis_password").read_text().strip()


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


def _new_connections(cluster: Cluster) -> None:
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

    def __init__(self, cluster: Cluster) -> None:
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


def _rolling_deploy(cluster: Cluster, label: str, **values: object) -> None:
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


@pytest.fixture(scope="module")
def operated(cluster: Cluster):
    """The running cluster, switched to TLS by one rerun of deploy.yml (tasks submitted all the
    while), which also adds beat on worker1 (example tick every PERIOD s) and Flower."""
    # Control: without TLS a capture does show the password, so the TLS check can fail.
    if shutil.which("tcpdump"):  # else only the capture check of the TLS test is skipped
        plain = _capture(cluster, lambda: _new_connections(cluster))
        assert _redis_password(cluster).encode() in plain, "no password in a plain capture?"
    set_beat_hosts(cluster, "worker1")
    _rolling_deploy(cluster, "deploy: TLS on + beat + flower (rolling)",
                    celery_beat_example_seconds=PERIOD, flower_enabled=True,
                    taskfleet_redis_tls=True)
    yield cluster
    if "taskfleet_redis_tls: true" in (cluster.inventory / "group_vars" / "all.yml").read_text():
        # A test failed before switching TLS off: leave the lab at the default anyway.
        set_vars(cluster, celery_beat_example_seconds=PERIOD, flower_enabled=True,
                 taskfleet_redis_tls=False)
        cluster.deploy()


# --------------------------------------------------------------------------- beat


def test_two_beat_hosts_are_refused(operated: Cluster):
    set_beat_hosts(operated, "worker1", "worker2")
    try:
        run = operated.deploy()
    finally:
        set_beat_hosts(operated, "worker1")
    assert run.rc != 0, run.out[-3000:]
    assert "[beat] must hold exactly one host" in run.out, run.out[-3000:]
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

    # Move beat: change the inventory, rerun (the beat tier is enough). The old host's beat
    # is stopped and disabled before the new one starts, so the two never overlap.
    set_beat_hosts(c, "worker2")
    deploy_ok(c, "beat.yml: move beat worker1 -> worker2", playbook="playbooks/beat.yml")
    assert unit_state(c, "worker1", "taskfleet-beat") == ("inactive", "disabled")
    assert unit_state(c, "worker2", "taskfleet-beat") == ("active", "enabled")
    check_ticks(c, "worker2", wait=5 * PERIOD + 1)


# --------------------------------------------------------------------------- flower


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

    # Workers send no task events by default; Flower switches them on (enable_events), so a
    # task run now shows up in Flower's task list, which is built from those events only.
    task_id = ""
    deadline, seen = time.monotonic() + 30, False
    while time.monotonic() < deadline and not seen:
        sent = c.app("submit", "whoami", "--queue", "host.worker1")
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        time.sleep(2)
        status, body = _flower_get(f"{base}/api/tasks?limit=200", auth, timeout=10)
        seen = status == 200 and task_id in json.loads(body)
    assert seen, f"Flower never saw task {task_id}: worker task events are not on"

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


# --------------------------------------------------------------------------- TLS


def test_tls_every_node_verifies_redis_and_no_password_on_the_wire(operated: Cluster):
    c = operated
    redis_ip = c.lab.ip("redis1")
    env = c.on("client1", "sh", "-c", "grep ^CELERY_BROKER_URL= /etc/taskfleet/taskfleet.env",
               check=True).stdout
    assert "rediss://" in env and f":{TLS_PORT}/" in env and "ssl_cert_reqs=required" in env

    # Plain TCP is refused: nothing listens on 6379 any more, and a plain client on the TLS
    # port gets no answer it can use.
    probe = ("import socket,sys\n"
             "s=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{redis_ip}', 6379)) == 0 else 1)\n")
    assert c.on("client1", "python3", "-c", probe).returncode == 1
    plain = c.on("client1", "env", f"CELERY_BROKER_URL=redis://{redis_ip}:{TLS_PORT}/0",
                 "taskfleet", "ping", timeout=30)
    assert plain.returncode != 0, plain.stdout
    # Verification is on: a client that does not trust the deploy's CA is refused.
    untrusted = c.on(
        "client1", "sh", "-c",
        "u=$(sed -n 's/^CELERY_BROKER_URL=//p' /etc/taskfleet/taskfleet.env"
        " | sed 's#ssl_ca_certs=[^&]*#ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt#');"
        " CELERY_BROKER_URL=$u CELERY_RESULT_BACKEND=$u taskfleet ping", timeout=30)
    assert untrusted.returncode != 0, untrusted.stdout
    assert "certificate" in untrusted.stderr.lower(), untrusted.stderr

    wire = _capture(c, lambda: _new_connections(c))
    assert len(wire) > 2000, "no TLS traffic captured"
    assert _redis_password(c).encode() not in wire, "the Redis password crossed the wire in clear"
    print(f"\n[tls] captured {len(wire)} bytes to/from Redis on {c.lab.bridge}: no password")

    # The verification playbook passes on its own, over TLS.
    verify = c.deploy(playbook="playbooks/verify.yml")
    assert verify.rc == 0, verify.out[-4000:]


def test_tls_redis_restart_recovers(operated: Cluster):
    c = operated
    c.on("redis1", "systemctl", "restart", "redis-server", check=True)
    deadline = time.monotonic() + 40
    while True:
        proc = c.on("client1", "taskfleet", "submit", "add", "2", "3", "--wait",
                    "--timeout", "10", timeout=30)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert proc.stdout.strip() == "5", proc.stderr
    workers = str(len(inventory_workers(c)))
    deadline = time.monotonic() + 40
    while c.app("ping", "--expect", workers, "--timeout", "3").returncode != 0:
        assert time.monotonic() < deadline, "workers did not come back after a Redis restart"
        time.sleep(1)


def test_tls_off_again_rolling(operated: Cluster):
    """Back to the default with one more rerun, tasks coming all the while."""
    _rolling_deploy(operated, "deploy: TLS off (rolling)", celery_beat_example_seconds=PERIOD,
                    flower_enabled=True, taskfleet_redis_tls=False)
    env = operated.on("client1", "sh", "-c",
                      "grep ^CELERY_BROKER_URL= /etc/taskfleet/taskfleet.env", check=True).stdout
    assert "redis://" in env and "rediss://" not in env
    conf = operated.on("redis1", "grep", "-E", "^(port|tls-port) ", "/etc/redis/redis.conf",
                       check=True).stdout.split("\n")
    assert "port 6379" in conf and not any(ln.startswith("tls-port") for ln in conf), conf
