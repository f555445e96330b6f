"""Operating features on real lab hosts: one beat scheduler (and moving it), the Flower
dashboard behind basic auth and a firewall, and TLS between every node and Redis.

Runs last on the shared lab (conftest.RUN_LAST): it leaves beat and Flower running. Full deploys
dominate the time, so there are two: one switches TLS on while adding beat and Flower to the
running cluster, the last switches TLS off again (TLS back to the default); moving beat reruns
only playbooks/beat.yml. The harness is in operatekit.py.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from .labkit import REPO, DeployedLab
from .operatekit import (
    FLOWER_PORT,
    PERIOD,
    TLS_PORT,
    capture,
    check_ticks,
    deploy_ok,
    flower_get,
    inventory_workers,
    new_connections,
    redis_password,
    rolling_deploy,
    screenshot,
    set_beat_hosts,
    set_vars,
    unit_state,
)

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def operated(cluster: DeployedLab):
    """The running cluster, switched to TLS by one rerun of deploy.yml (tasks submitted all the
    while), which also adds beat on worker1 (example tick every PERIOD s) and Flower."""
    # Control: without TLS a capture does show the password, so the TLS check can fail.
    if shutil.which("tcpdump"):  # else only the capture check of the TLS test is skipped
        plain = capture(cluster, lambda: new_connections(cluster))
        assert redis_password(cluster).encode() in plain, "no password in a plain capture?"
    set_beat_hosts(cluster, "worker1")
    rolling_deploy(cluster, "deploy: TLS on + beat + flower (rolling)",
                    celery_beat_example_seconds=PERIOD, flower_enabled=True,
                    taskfleet_redis_tls=True)
    yield cluster
    if "taskfleet_redis_tls: true" in (cluster.inventory / "group_vars" / "all.yml").read_text():
        # A test failed before switching TLS off: leave the lab at the default anyway.
        set_vars(cluster, celery_beat_example_seconds=PERIOD, flower_enabled=True,
                 taskfleet_redis_tls=False)
        cluster.deploy()


# --------------------------------------------------------------------------- beat


def test_two_beat_hosts_are_refused(operated: DeployedLab):
    set_beat_hosts(operated, "worker1", "worker2")
    try:
        run = operated.deploy()
    finally:
        set_beat_hosts(operated, "worker1")
    assert run.rc != 0, run.out[-3000:]
    assert "[beat] must hold exactly one host" in run.out, run.out[-3000:]
    changed = {h: r.get("changed", 0) for h, r in run.recap().items() if r.get("changed")}
    assert not changed, changed


def test_beat_runs_each_tick_once_and_moves(operated: DeployedLab):
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


def test_flower_lists_workers_behind_auth_and_firewall(operated: DeployedLab):
    c = operated
    ip = c.lab.ip("redis1")
    password = (c.inventory / ".secrets" / "flower_password").read_text().strip()
    auth = f"admin:{password}"
    base = f"http://{ip}:{FLOWER_PORT}"
    workers = {f"worker@{w}" for w in inventory_workers(c)}
    deadline, listed = time.monotonic() + 30, set()
    while time.monotonic() < deadline:  # Flower learns workers from their heartbeats
        status, body = flower_get(f"{base}/api/workers?refresh=1", auth, timeout=10)
        listed = set(json.loads(body)) if status == 200 else set()
        if workers <= listed:
            break
        time.sleep(1)
    assert workers <= listed, f"Flower lists {listed}, expected {workers}"
    assert flower_get(f"{base}/api/workers", None)[0] == 401
    assert flower_get(f"{base}/api/workers", "admin:wrong-password")[0] == 401

    # Workers send no task events by default; Flower switches them on (enable_events), so a
    # task run now shows up in Flower's task list, which is built from those events only.
    task_id = ""
    deadline, seen = time.monotonic() + 30, False
    while time.monotonic() < deadline and not seen:
        sent = c.app("submit", "whoami", "--queue", "host.worker1")
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        time.sleep(2)
        status, body = flower_get(f"{base}/api/tasks?limit=200", auth, timeout=10)
        seen = status == 200 and task_id in json.loads(body)
    assert seen, f"Flower never saw task {task_id}: worker task events are not on"

    probe = ("import socket,sys\n"
             "s=socket.socket(); s.settimeout(3)\n"
             f"sys.exit(0 if s.connect_ex(('{ip}', {FLOWER_PORT})) == 0 else 1)\n")
    assert c.on("spare1", "python3", "-c", probe, timeout=20).returncode == 1
    assert c.on("client1", "python3", "-c", probe, timeout=20).returncode == 0

    screenshot(f"http://{auth}@{ip}:{FLOWER_PORT}/workers", REPO / "docs" / "flower-workers.png")


# --------------------------------------------------------------------------- TLS


def test_tls_every_node_verifies_redis_and_no_password_on_the_wire(operated: DeployedLab):
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

    wire = capture(c, lambda: new_connections(c))
    assert len(wire) > 2000, "no TLS traffic captured"
    assert redis_password(c).encode() not in wire, "the Redis password crossed the wire in clear"
    print(f"\n[tls] captured {len(wire)} bytes to/from Redis on {c.lab.bridge}: no password")

    # The verification playbook passes on its own, over TLS.
    verify = c.deploy(playbook="playbooks/verify.yml")
    assert verify.rc == 0, verify.out[-4000:]


def test_tls_redis_restart_recovers(operated: DeployedLab):
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


def test_tls_off_again_rolling(operated: DeployedLab):
    """Back to the default with one more rerun, tasks coming all the while."""
    rolling_deploy(operated, "deploy: TLS off (rolling)", celery_beat_example_seconds=PERIOD,
                    flower_enabled=True, taskfleet_redis_tls=False)
    env = operated.on("client1", "sh", "-c",
                      "grep ^CELERY_BROKER_URL= /etc/taskfleet/taskfleet.env", check=True).stdout
    assert "redis://" in env and "rediss://" not in env
    conf = operated.on("redis1", "grep", "-E", "^(port|tls-port) ", "/etc/redis/redis.conf",
                       check=True).stdout.split("\n")
    assert "port 6379" in conf and not any(ln.startswith("tls-port") for ln in conf), conf
